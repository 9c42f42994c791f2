"""Composition root: turn a Config into a running Supervisor.

Chooses the runtime (docker when an engine answers and has the images, else
local processes) and the GPU probe (NVML when it loads, else simulated), and
says which it chose and why: a user must never wonder whether the memory
figures are real.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vramctl.gpu.base import GpuProbe, ProbeError
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.observed import Desired
from vramctl.runtimes.base import Runtime
from vramctl.sources.statefile import StateFile, StateWriteError
from vramctl.spec.models import Config, ConfigError, DeploymentSpec, DesiredStateError, GpuProbeConfig, check_desired
from vramctl.telemetry import register as register_collector
from vramctl.worker.actor import Admission, DesiredSink, GpuWorker, Metrics, StatusSink, WorkerSettings
from vramctl.worker.supervisor import Supervisor, holders_of

log = logging.getLogger("vramctl")


@dataclass
class Built:
    supervisor: Supervisor
    state: StateFile


def settle_heap() -> int:
    """Once startup is done: collect, then move every object still alive (the
    imported modules, the models' specs, the servers) out of the collector's
    reach (``gc.freeze``). A full collection then walks only what was made
    since, not the ~60,000 objects of startup: each one took 40-55 ms on the
    HTTP thread, a pause every scrape and gateway request in flight waited
    out. Startup objects that turn into garbage later are not reclaimed: a
    bounded, one-time cost. Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "vramctl" / "state.json"


def _images(config: Config) -> list[str]:
    return sorted({m.image for d in config.gpus for m in d.models.values() if m.image})


def build_runtime(config: Config, state_dir: Path, instance: str, notes: list[str]) -> Runtime:
    want = config.runtime
    has_commands = all(m.command for d in config.gpus for m in d.models.values())
    if want in ("auto", "docker"):
        try:
            from vramctl.runtimes.docker import DockerRuntime, docker_problem

            problem = docker_problem(_images(config) if want == "auto" and has_commands else [])
        except ImportError as err:
            problem = f"the docker SDK is not installed ({err})"
        if problem is None:
            notes.append("runtime: docker")
            return DockerRuntime(instance=instance, compose=config.compose)
        if want == "docker" or not has_commands:
            raise ConfigError(
                "runtime",
                [
                    (
                        "runtime",
                        f"the docker runtime is needed but {problem}; start the Docker engine, or give every model a `command` and set runtime: process",
                    )
                ],
            )
        notes.append(f"runtime: process (docker not used: {problem})")
    else:
        notes.append("runtime: process")
    from vramctl.runtimes.process import ProcessRuntime

    return ProcessRuntime(state_dir=state_dir, instance=instance)


class _SpecRef:
    """The worker's current spec, read late so spec updates reach the probe too."""

    def __init__(self, spec: DeploymentSpec) -> None:
        self.spec = spec
        self.worker: GpuWorker | None = None

    def __call__(self) -> DeploymentSpec:
        return self.worker.spec if self.worker is not None else self.spec


def build_probe(config: Config, spec_of: _SpecRef, runtime: Runtime, notes: list[str]) -> GpuProbe:
    """NVML when it loads and the GPU index exists (kind auto or nvml), else the
    simulated GPU (auto, simulated); a note says which and why. ``kind: nvml``
    without NVML is a ConfigError: the user asked for real figures."""
    p = config.gpu_probe
    gpu = spec_of().gpu
    if p.kind in ("auto", "nvml"):
        probe, problem = _nvml_probe(gpu, runtime, spec_of, notes)
        if probe is not None:
            return probe
        if p.kind == "nvml":
            raise ConfigError(
                "gpuProbe",
                [
                    (
                        "gpuProbe.kind",
                        f"kind: nvml, but NVML cannot be used for gpu {gpu}: {problem}; install the NVIDIA driver "
                        "(and nvidia-ml-py), or set kind: auto to fall back to a simulated GPU",
                    )
                ],
            )
        why = f"NVML unavailable: {problem}"
    else:
        why = "gpuProbe.kind: simulated"
    notes.append(f"gpu {gpu}: SIMULATED GPU memory ({why}); figures follow the models' declared vramMiB, not real VRAM")
    return SimulatedGpu(
        index=gpu,
        total_mib=p.total_mib,
        baseline_mib=p.baseline_mib,
        release_delay_seconds=p.release_delay_seconds,
        holders=holders_of(lambda: spec_of.worker.model_states() if spec_of.worker is not None else {}, spec_of, p.total_mib),
        # It looks by itself, so that a model that comes and goes between two
        # reads still frees its memory only after the delay.
        sample_seconds=max(0.01, min(0.05, p.release_delay_seconds / 4)) if p.release_delay_seconds > 0 else None,
    )


def _nvml_probe(gpu: int, runtime: Runtime, spec_of: _SpecRef, notes: list[str]) -> tuple[GpuProbe | None, str]:
    """(the NVML probe of ``gpu``, "") or (None, why not)."""
    try:
        from vramctl.gpu.nvml import NvmlProbe, NvmlUnavailable, nvml_problem, running_under_wsl2
    except ImportError as err:  # nvidia-ml-py not installed
        return None, f"nvidia-ml-py is not installed ({err})"
    problem = nvml_problem(gpu)
    if problem is not None:
        return None, problem
    owners_of = getattr(runtime, "owners", None)

    def owners() -> Mapping[str, str]:
        return owners_of(spec_of()) if owners_of is not None else {}

    try:
        probe = NvmlProbe(gpu, owners, pod_names=getattr(runtime, "pod_of_uid", None))
        info = probe.info()
    except (NvmlUnavailable, ProbeError) as err:
        return None, str(err)
    notes.append(f"gpu {gpu}: NVML: {info.name}, {info.total_mib} MiB, driver {info.driver}, {info.uuid}")
    if running_under_wsl2():
        notes.append(
            f"gpu {gpu}: WSL2: NVML gives no per-process GPU memory here; a model's memory is attributed from what vramctl started"
        )
    return probe, ""


def open_state(state_path: Path) -> StateFile:
    """The state file, checked: a damaged one is set aside (its problem stays
    readable through ``problem()``), and one that cannot be written raises
    StateWriteError now rather than at the first switch."""
    state = StateFile(state_path)
    state.read()
    if state.problem() is not None:
        state.set_aside()
    state.check_writable()
    return state


def build(config: Config, state_path: Path, instance: str = "default") -> Built:
    """Raises ConfigError (the config cannot run here) or StateWriteError (the state file cannot be written)."""
    state = open_state(state_path)
    notes: list[str] = []
    runtime = build_runtime(config, state_path.parent, instance, notes)
    problems: list[tuple[str, str]] = []
    for i, d in enumerate(config.gpus):
        problems += [(f"gpus[{i}].{path}", msg) for path, msg in runtime.validate(d)]
    if problems:
        runtime.close()
        raise ConfigError("config", problems)
    metrics = Metrics()
    settings = WorkerSettings.from_config(config)
    workers = []
    for d in config.gpus:
        ref = _SpecRef(d)
        probe = build_probe(config, ref, runtime, notes)
        try:
            initial = initial_desired(state, d, runtime, notes)
        except StateWriteError:
            runtime.close()
            raise
        w = GpuWorker(
            d, runtime, probe, settings, initial=initial, status_sink=state, desired_sink=state, metrics=metrics, costs=state.costs(d.gpu)
        )
        ref.worker = w
        workers.append(w)
    for n in notes:
        log.info("%s", n)
    supervisor = Supervisor(workers, runtime, metrics, notes)
    register_collector(supervisor, dcgm_compat=config.metrics.dcgm_compat)
    return Built(supervisor, state)


@dataclass
class BuiltOperator:
    """The parts of the Kubernetes operator: workers are made per ModelDeployment."""

    supervisor: Supervisor
    runtime: Runtime
    make_worker: Callable[[DeploymentSpec, StatusSink, DesiredSink, Admission], GpuWorker]


def build_operator(
    instance: str, gpu_probe: GpuProbeConfig | None = None, dcgm_compat: bool = False, runtime: Runtime | None = None
) -> BuiltOperator:
    """A runtime (``runtime``, e.g. the Pod runtime; default docker) and a
    supervisor with no workers yet: the operator adds one per ModelDeployment
    of its node (``make_worker``), each with its GPU's probe chosen as in
    compose mode."""
    notes: list[str] = []
    probe_config = gpu_probe or GpuProbeConfig()

    def config_for(d: DeploymentSpec) -> Config:
        return Config(runtime="docker", gpu_probe=probe_config, gpus=[d])

    if runtime is None:
        try:
            from vramctl.runtimes.docker import DockerRuntime, docker_problem

            problem = docker_problem()
        except ImportError as err:
            problem = f"the docker SDK is not installed ({err})"
        if problem is not None:
            raise ConfigError(
                "runtime", [("runtime", f"the operator runs the models as docker containers, but {problem}: mount the node's Docker socket")]
            )
        runtime = DockerRuntime(instance=instance)
    notes.append(f"runtime: {runtime.kind} (instance {instance})")
    metrics = Metrics()
    supervisor = Supervisor([], runtime, metrics, notes)
    register_collector(supervisor, dcgm_compat=dcgm_compat)

    def make_worker(d: DeploymentSpec, status_sink: StatusSink, desired_sink: DesiredSink, admission: Admission) -> GpuWorker:
        config = config_for(d)
        ref = _SpecRef(d)
        probe = build_probe(config, ref, runtime, supervisor.notes)
        w = GpuWorker(
            d,
            runtime,
            probe,
            WorkerSettings.from_config(config),
            status_sink=status_sink,
            desired_sink=desired_sink,
            admission=admission,
            metrics=metrics,
        )
        ref.worker = w
        return w

    return BuiltOperator(supervisor, runtime, make_worker)


def running_desired(runtime: Runtime, d: DeploymentSpec) -> Desired | None:
    """What runs on this GPU now, as a desired state (generation 0): the live
    heavy model of the spec and the live light ones that fit beside it. None
    when none of its models runs, or the runtime cannot say."""
    try:
        live = [w for w in runtime.observe(d).values() if w.state.live and w.model in d.models]
    except Exception as err:
        log.warning("gpu %d: could not observe what runs (%s)", d.gpu, err)
        return None
    heavy = sorted(w.model for w in live if d.models[w.model].heavy)
    active = heavy[0] if heavy else None
    companions: list[str] = []
    for name in sorted(w.model for w in live if not d.models[w.model].heavy):
        try:
            check_desired(d, active, [*companions, name])
            companions.append(name)
        except DesiredStateError:
            continue
    if active is None and not companions:
        return None
    return Desired(active, tuple(companions), 0)


def initial_desired(state: StateFile, d: DeploymentSpec, runtime: Runtime | None = None, notes: list[str] | None = None) -> Desired:
    """The state file's desired state wins, unless the config's own default
    changed since it was recorded (the user edited activeModel in the file).

    A damaged state file (or a damaged entry for this GPU) says nothing about
    what the user wanted last: the models that run now are kept (adopted as
    desired) rather than replaced by the config's default, and a note names
    the file and the damage. Raises StateWriteError when the result cannot be
    recorded."""
    config_default = {"activeModel": d.active_model, "companions": list(d.companions)}
    recorded, problem = state.desired_or_problem(d.gpu)
    if problem is not None:
        kept = running_desired(runtime, d) if runtime is not None else None
        if kept is not None:
            desired = Desired(kept.active, kept.companions, 1)
            what = ", ".join(repr(m) for m in desired.members)
            note = f"gpu {d.gpu}: {problem}: keeping what runs ({what}) as the desired state"
        else:
            desired = Desired(d.active_model, tuple(d.companions), 1)
            note = f"gpu {d.gpu}: {problem}: none of its models runs; using the config's activeModel {d.active_model!r}"
        if notes is not None:
            notes.append(note)  # logged and printed with the other notes
        else:
            log.warning("%s", note)
        state.write_desired(d.gpu, desired, "recovered", config_default)
        return desired
    if recorded is not None and state.config_default(d.gpu) == config_default:
        try:
            check_desired(d, recorded.active, recorded.companions)
            return recorded
        except DesiredStateError as err:
            log.warning("gpu %d: recorded desired state no longer fits the config (%s); using the config's", d.gpu, err)
    gen = (recorded.generation + 1) if recorded else 1
    desired = Desired(d.active_model, tuple(d.companions), gen)
    state.write_desired(d.gpu, desired, "config", config_default)
    return desired
