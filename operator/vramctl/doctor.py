"""``vramctl doctor``: is this machine ready for the config, and what will it cost?

One line per check, OK / WARN / FAIL, each WARN and FAIL with its fix:

- the config loads;
- NVML and the driver (versions), each GPU with its memory, and whether the
  configured GPU indexes exist; without NVML the simulated GPU is used;
- WSL2, and what it costs: no per-process GPU memory, so a model's memory is
  attributed from what vramctl started and a stranger holding memory cannot
  be named;
- whether NVML reports per-process memory here;
- the Docker engine, its nvidia runtime, the images the config needs;
- the driver's checkpoint API (``switchStrategy: checkpoint``): there, or
  why not (WSL2, no cuda-bindings, a driver before 570);
- the config's pitfalls (``pitfalls.env_pitfalls``: removed vLLM variables
  and flags, TORCH_SDPA, expandable_segments with sleep mode).

FAIL is kept for what stops the main job (the config does not load, the
runtime it needs is not there, ``gpuProbe.kind: nvml`` without NVML): exit
code 1. Everything else is a WARN: exit code 0.

``checks()`` is pure over the gathered facts (tested with made-up machines);
``gather()`` is the only I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from vramctl.gpu.nvml import NvmlFacts, NvmlUnavailable, nvml_facts, running_under_wsl2
from vramctl.runtimes.checkpoint import Availability, load_driver
from vramctl.spec.models import Config, ConfigError
from vramctl.spec.pitfalls import env_pitfalls

if TYPE_CHECKING:
    from vramctl.runtimes.docker import EngineFacts
    from vramctl.runtimes.kubernetes import KubeRequests

Level = Literal["OK", "WARN", "FAIL"]


@dataclass(frozen=True)
class Check:
    level: Level
    name: str
    message: str
    fix: str = ""

    def render(self) -> str:
        line = f"{self.level:<4} {self.name}: {self.message}"
        return line + (f" -> fix: {self.fix}" if self.fix else "")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Facts:
    """Everything ``checks`` looks at."""

    config: Config | ConfigError
    config_source: str
    nvml: NvmlFacts | str  # str: why NVML cannot be used
    wsl2: bool
    docker: EngineFacts | str  # str: why the engine cannot be asked
    missing_images: str | None  # docker_problem() for the config's images; None: all present
    checkpoint: Availability | None = None  # the driver's checkpoint API (switchStrategy checkpoint); None: not asked


def gather(config: Config | ConfigError, config_source: str) -> Facts:
    try:
        nvml: NvmlFacts | str = nvml_facts()
    except NvmlUnavailable as err:
        nvml = str(err)
    except Exception as err:  # a probe timeout, a broken driver: report, never crash the doctor
        nvml = f"{type(err).__name__}: {err}"
    docker: EngineFacts | str
    missing = None
    try:
        from vramctl.runtimes.docker import docker_problem, engine_facts
    except ImportError as err:  # a GPU box without the docker SDK: the process runtime only
        docker = f"the docker SDK is not installed ({err})"
    else:
        docker = engine_facts()
        images = sorted({m.image for d in config.gpus for m in d.models.values() if m.image}) if isinstance(config, Config) else []
        missing = docker_problem(images) if images and not isinstance(docker, str) else None
    return Facts(config, config_source, nvml, running_under_wsl2(), docker, missing, load_driver()[1])


def checks(f: Facts) -> list[Check]:
    out: list[Check] = []
    cfg = f.config if isinstance(f.config, Config) else None
    if cfg is None:
        assert isinstance(f.config, ConfigError)
        problems = "; ".join(f"{path}: {msg}" for path, msg in f.config.problems)
        out.append(
            Check("FAIL", "config", f"{f.config_source} does not load: {problems}", "correct the fields named (vramctl validate FILE)")
        )
    else:
        models = sum(len(d.models) for d in cfg.gpus)
        out.append(Check("OK", "config", f"{f.config_source}: {len(cfg.gpus)} GPU(s), {models} model(s)"))
    out += _nvml_checks(f, cfg)
    out += _docker_checks(f, cfg)
    if f.checkpoint is not None:
        out.append(_checkpoint_check(f.checkpoint, cfg))
    if cfg is not None:
        out += _pitfall_checks(f, cfg)
    return out


def _checkpoint_check(a: Availability, cfg: Config | None) -> Check:
    """Whether switchStrategy checkpoint can run here: a WARN only where the config asks for it."""
    users = sorted(f"{d.name or f'gpu{d.gpu}'}/{n}" for d in cfg.gpus for n, m in d.models.items() if m.switch_strategy == "checkpoint") if cfg else []
    if a.available:
        return Check("OK", "checkpoint", f"checkpoint switching {a.describe()}")
    if not users:
        return Check("OK", "checkpoint", f"checkpoint switching {a.describe()}; not needed: no model has switchStrategy checkpoint")
    return Check(
        "WARN",
        "checkpoint",
        f"checkpoint switching {a.describe()}: {', '.join(users)} will be stopped instead (SleepFallback CheckpointRefused)",
        "Linux with NVIDIA driver 570+ and pip install 'vramctl[checkpoint]' (not WSL2), or switchStrategy stop",
    )


def _nvml_checks(f: Facts, cfg: Config | None) -> list[Check]:
    out: list[Check] = []
    kind = cfg.gpu_probe.kind if cfg is not None else "auto"
    wanted = sorted({d.gpu for d in cfg.gpus}) if cfg is not None else []
    if isinstance(f.nvml, str):
        if kind == "simulated":
            out.append(Check("OK", "nvml", f"not available ({f.nvml}); not needed: gpuProbe.kind is simulated"))
        elif kind == "nvml":
            out.append(
                Check(
                    "FAIL",
                    "nvml",
                    f"not available ({f.nvml}) but gpuProbe.kind is nvml",
                    "install the NVIDIA driver and nvidia-ml-py, or set gpuProbe.kind: auto to run on a simulated GPU",
                )
            )
        else:
            out.append(
                Check(
                    "WARN",
                    "nvml",
                    f"not available ({f.nvml}): simulated memory will be used (figures follow the models' declared vramMiB)",
                    "install the NVIDIA driver and nvidia-ml-py for real memory figures",
                )
            )
        out.append(
            Check(
                "WARN",
                "per-process memory",
                "unknown without NVML: no GPU process can be attributed or named",
                "install the NVIDIA driver" if kind != "simulated" else "",
            )
        )
        out.append(_wsl2_check(f.wsl2))
        return out

    n = f.nvml
    out.append(Check("OK", "nvml", f"driver {n.driver}, NVML {n.nvml_version}, CUDA {n.cuda_driver_version}; {len(n.devices)} GPU(s)"))
    for d in n.devices:
        m = d.memory
        version = "memory info v2" if d.memory_info_version == 2 else "memory info v1 only: reserved memory counts as used"
        out.append(
            Check(
                "OK",
                f"gpu {d.index}",
                f"{d.name}, {d.uuid}: {m.total_mib} MiB total, {m.used_mib} used, {m.reserved_mib} reserved, {m.free_mib} free ({version})",
            )
        )
    if len(n.devices) > 1:
        out.append(_numbering_check(n))
    present = {d.index for d in n.devices}
    for g in wanted:
        if g not in present:
            level: Level = "FAIL" if kind == "nvml" else "WARN"
            what = "vramctl will not start" if kind == "nvml" else "it will be simulated"
            out.append(Check(level, f"gpu {g}", f"configured, but NVML sees no GPU {g}: {what}", "fix the gpu index in the config"))
    out.append(_wsl2_check(f.wsl2))
    out.append(_per_process_check(n, f.wsl2))
    return out


def _numbering_check(n: NvmlFacts) -> Check:
    """Which GPU is ``gpu: N``: NVML's index (PCI bus order), the same number
    the docker runtime asks for and the process runtime passes with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. CUDA's own default is fastest first, so
    with different cards a program that counts GPUs by itself counts otherwise."""
    order = ", ".join(f"{d.index}: {d.name} ({d.uuid})" for d in n.devices)
    if len({d.name for d in n.devices}) > 1:
        return Check(
            "WARN",
            "gpu numbering",
            f"gpu N is NVML's index, in PCI bus order: {order}. These cards differ, so CUDA's default order (fastest first) "
            "numbers them otherwise: a model that sets CUDA_VISIBLE_DEVICES or CUDA_DEVICE_ORDER itself can land on another GPU",
            "leave CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER to vramctl (it sets CUDA_DEVICE_ORDER=PCI_BUS_ID); vramctl validate names any that are set",
        )
    return Check("OK", "gpu numbering", f"gpu N is NVML's index, in PCI bus order: {order} (identical cards: CUDA counts them the same way)")


def _wsl2_check(wsl2: bool) -> Check:
    if not wsl2:
        return Check("OK", "wsl2", "not WSL2")
    return Check(
        "WARN",
        "wsl2",
        "WSL2 detected (/proc/version says microsoft): NVML has no per-process GPU memory here, so a model's memory is attributed "
        "from what vramctl started, and a process that is not vramctl's holding memory cannot be named (a blocked switch says how "
        "much is held, not by whom)",
        "nothing to do; on a native Linux host NVML reports per-process memory",
    )


def _per_process_check(n: NvmlFacts, wsl2: bool) -> Check:
    if any(d.processes is None for d in n.devices):
        return Check(
            "WARN",
            "per-process memory",
            "NVML cannot list GPU processes here: release is confirmed by memory figures alone",
            "run vramctl on the host (or with the host's pid namespace) with a driver that supports process queries",
        )
    known = [d.per_process_memory for d in n.devices if d.per_process_memory is not None]
    if known and all(known):
        return Check("OK", "per-process memory", "available: GPU processes are attributed to models and containers")
    if known:
        return Check(
            "WARN",
            "per-process memory",
            "not available (NVML lists processes without their memory): attribution falls back to what vramctl started",
            "" if wsl2 else "check that vramctl sees the host's pids (hostPID / pid: host)",
        )
    if wsl2:
        return Check("WARN", "per-process memory", "not available under WSL2: attribution falls back to what vramctl started")
    return Check("OK", "per-process memory", "no GPU process running to check it by; NVML normally reports it on Linux")


def _docker_checks(f: Facts, cfg: Config | None) -> list[Check]:
    out: list[Check] = []
    runtime = cfg.runtime if cfg is not None else "auto"
    commands = cfg is not None and all(m.command for d in cfg.gpus for m in d.models.values())
    if isinstance(f.docker, str):
        if runtime == "docker" or (runtime == "auto" and cfg is not None and not commands):
            out.append(
                Check(
                    "FAIL",
                    "docker",
                    f"{f.docker}; the config needs the docker runtime",
                    "start the Docker engine, or give every model a `command` and set runtime: process",
                )
            )
        elif runtime == "auto":
            out.append(
                Check("WARN", "docker", f"{f.docker}: the process runtime will be used", "start the Docker engine to run containers")
            )
        else:
            out.append(Check("OK", "docker", f"not used (runtime: process); {f.docker}"))
        return out
    e = f.docker
    used = "not used (runtime: process)" if runtime == "process" else "answers"
    out.append(Check("OK", "docker", f"engine {e.version} (API {e.api_version}) {used}; runtimes: {', '.join(e.runtimes) or '-'}"))
    if runtime != "process":
        if e.nvidia:
            out.append(Check("OK", "nvidia runtime", "present: containers can be given the GPU"))
        else:
            gpu = not isinstance(f.nvml, str)
            out.append(
                Check(
                    "WARN",
                    "nvidia runtime",
                    "absent: containers get no GPU unless a model sets gpuRequest: always"
                    + ("" if gpu else " (no NVIDIA GPU here either: fine for the stand-in demo)"),
                    "install nvidia-container-toolkit and run `nvidia-ctk runtime configure --runtime=docker`, then restart dockerd;"
                    " where `docker run --gpus all` works without it (CDI, Docker Desktop), set gpuRequest: always on the models",
                )
            )
        if f.missing_images:
            level: Level = "FAIL" if runtime == "docker" or not commands else "WARN"
            fallback = "" if level == "FAIL" else ": the process runtime will be used"
            out.append(Check(level, "images", f"{f.missing_images}{fallback}", "build or pull the images (vramctl never pulls)"))
    return out


def _pitfall_checks(f: Facts, cfg: Config) -> list[Check]:
    total = None
    if not isinstance(f.nvml, str):
        total = f.nvml.devices[0].memory.total_mib if f.nvml.devices else None
    elif cfg.gpu_probe.kind != "nvml":
        total = cfg.gpu_probe.total_mib
    out: list[Check] = []
    for i, d in enumerate(cfg.gpus):
        if not isinstance(f.nvml, str):
            total = next((x.memory.total_mib for x in f.nvml.devices if x.index == d.gpu), total)
        findings = env_pitfalls(d, total)
        for finding in findings:  # each message ends with its fix
            level: Level = "FAIL" if finding.severity == "error" else "WARN"
            out.append(Check(level, f"gpus[{i}].{finding.path}", finding.message))
        if not findings:
            out.append(Check("OK", f"gpus[{i}] pitfalls", "none of the known env/flag pitfalls"))
    return out


def exit_code(found: list[Check]) -> int:
    return 1 if any(c.level == "FAIL" for c in found) else 0


# ------------------------------------------------------------ --kubernetes


@dataclass(frozen=True)
class KubeFacts:
    """What ``vramctl doctor --kubernetes`` looks at on this node (gathered by
    ``sources.kubernetes.client.node_facts``; str fields say why they are unknown)."""

    node: str
    api: str | None  # None: the API server answered; else why not
    runtime_class: str  # the model Pods' RuntimeClass name
    runtime_class_handler: str | Literal[False] | None  # its handler; None: absent; False: could not be read
    gpu_allocatable: int | Literal[False] | None  # the node's nvidia.com/gpu; None: not advertised; False: could not be read
    gpu_mode: str  # runtimeClass | resource | none
    nvml: NvmlFacts | str
    # namespace of each ModelDeployment on the node -> the Pod runtime's accesses
    # refused there ("create pods", ...; empty: all granted); str: why unknown; None: not asked
    pod_rights: Mapping[str, tuple[str, ...]] | str | None = None


def kubernetes_checks(k: KubeFacts) -> list[Check]:
    """The node's readiness for the Pod runtime: API reachable, runtime class,
    device plugin, NVML in this Pod, and the right to run Pods in the
    namespaces of the node's ModelDeployments."""
    out: list[Check] = []
    if k.api is not None:
        return [Check("FAIL", "kubernetes api", k.api, "run inside the vramctl Pod (service account) or pass --kubeconfig")]
    out.append(Check("OK", "kubernetes api", f"reachable; node {k.node}"))
    rc_needed = k.gpu_mode == "runtimeClass"
    if k.runtime_class_handler is False:
        out.append(
            Check(
                "WARN",
                "runtime class",
                f"RuntimeClass {k.runtime_class} could not be read",
                "grant get on runtimeclasses, or check it by hand",
            )
        )
    elif k.runtime_class_handler is None:
        out.append(
            Check(
                "FAIL" if rc_needed else "WARN",
                "runtime class",
                f"RuntimeClass {k.runtime_class} does not exist"
                + ("; model Pods cannot start (--pod-gpu runtimeClass)" if rc_needed else ""),
                "create it: install the NVIDIA GPU Operator or nvidia-container-toolkit (k3s creates `nvidia` when it finds the toolkit); "
                "or name another with --runtime-class; or give the GPU another way: --pod-gpu resource (the device plugin) "
                "or a model's gpuRequest: resource | none",
            )
        )
    else:
        out.append(Check("OK", "runtime class", f"RuntimeClass {k.runtime_class} (handler {k.runtime_class_handler})"))
    if k.gpu_allocatable is False:
        out.append(
            Check(
                "WARN", "device plugin", f"node {k.node} could not be read", "grant get on nodes, or check `kubectl describe node` by hand"
            )
        )
    elif not k.gpu_allocatable:
        level: Level = "FAIL" if k.gpu_mode == "resource" else "WARN"
        out.append(
            Check(
                level,
                "device plugin",
                f"node {k.node} advertises no nvidia.com/gpu" + ("; --pod-gpu resource cannot place a model" if level == "FAIL" else ""),
                "deploy the NVIDIA device plugin (or the GPU Operator)" if level == "FAIL" else "",
            )
        )
    else:
        out.append(Check("OK", "device plugin", f"node {k.node}: nvidia.com/gpu {k.gpu_allocatable}"))
    if isinstance(k.nvml, str):
        out.append(
            Check(
                "FAIL",
                "nvml in this pod",
                k.nvml,
                "the vramctl Pod needs runtimeClassName nvidia and NVIDIA_VISIBLE_DEVICES=all (the chart sets both); without NVML the memory is only simulated",
            )
        )
    else:
        out.append(Check("OK", "nvml in this pod", f"driver {k.nvml.driver}, {len(k.nvml.devices)} GPU(s)"))
    if k.pod_rights is not None:
        out.append(_pod_rights_check(k.node, k.pod_rights))
    return out


def _pod_rights_check(node: str, rights: Mapping[str, tuple[str, ...]] | str) -> Check:
    from vramctl.runtimes.kubernetes import forbidden_fix

    if isinstance(rights, str):
        return Check(
            "WARN",
            "pod rights",
            f"could not be checked: {rights}",
            "kubectl auth can-i create pods -n <namespace> --as system:serviceaccount:<vramctl namespace>:<its service account>",
        )
    if not rights:
        return Check("OK", "pod rights", f"no ModelDeployment names node {node} yet")
    refused = {ns: missing for ns, missing in sorted(rights.items()) if missing}
    if not refused:
        return Check("OK", "pod rights", f"vramctl may run Pods in namespace(s) {', '.join(sorted(rights))}")
    return Check(
        "FAIL",
        "pod rights",
        "; ".join(f"forbidden in namespace {ns}: {', '.join(missing)}" for ns, missing in refused.items())
        + " (their ModelDeployments cannot run Pods and are Failed)",
        "; ".join(forbidden_fix(ns) for ns in refused),
    )


def pod_rights(api: KubeRequests, node: str) -> dict[str, tuple[str, ...]]:
    """For each namespace with a ModelDeployment on ``node``: what the Pod
    runtime needs there (``POD_ACCESS``) that the API server refuses this
    client, asked with SelfSubjectAccessReviews (any authenticated client may)."""
    from vramctl.runtimes.kubernetes import POD_ACCESS

    listed: Any = api.request("GET", "/apis/vramctl.io/v1alpha1/modeldeployments") or {}
    namespaces = sorted(
        {
            str((md.get("metadata") or {}).get("namespace"))
            for md in listed.get("items") or []
            if (md.get("spec") or {}).get("nodeName") == node
        }
    )
    out: dict[str, tuple[str, ...]] = {}
    for ns in namespaces:
        missing = []
        for verb, resource in POD_ACCESS:
            plural, _, sub = resource.partition("/")
            attrs = {"namespace": ns, "verb": verb, "group": "", "resource": plural, **({"subresource": sub} if sub else {})}
            review: Any = api.request(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {"resourceAttributes": attrs}},
            )
            if not ((review or {}).get("status") or {}).get("allowed"):
                missing.append(f"{verb} {resource}")
        out[ns] = tuple(missing)
    return out


def gather_kubernetes(node: str, runtime_class: str, gpu_mode: str, kubeconfig: str | None = None) -> KubeFacts:
    """The only I/O of ``--kubernetes``: the API server (runtime class, node) and NVML in this Pod."""
    try:
        nvml: NvmlFacts | str = nvml_facts()
    except NvmlUnavailable as err:
        nvml = str(err)
    except Exception as err:
        nvml = f"{type(err).__name__}: {err}"
    try:
        from vramctl.sources.kubernetes.client import connect, node_facts

        api = connect(kubeconfig)
        api_problem, handler, gpus = node_facts(api, node, runtime_class)
    except Exception as err:  # no kopf, no credentials: said, never a crash
        api_problem, handler, gpus = f"{type(err).__name__}: {err}", False, False
    rights: Mapping[str, tuple[str, ...]] | str | None = None
    if api_problem is None:
        try:
            rights = pod_rights(api, node)
        except Exception as err:  # e.g. no list on modeldeployments: said, never a crash
            rights = f"{type(err).__name__}: {err}"
    return KubeFacts(node, api_problem, runtime_class, handler, gpus, gpu_mode, nvml, rights)
