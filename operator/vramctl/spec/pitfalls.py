"""Configurations that load fine and then do nothing, or fail at 3 a.m.

Each check here encodes one upstream fact that the users' own documents get
wrong or do not know (DESIGN.md, "Facts that beat the documents"): a variable
current vLLM ignores, a flag it no longer accepts, an allocator setting that
makes sleep mode free nothing, a reservation that cannot fit the budget. The
spec cannot reject these outright (an older image may still honour them), so
they are reported where a person will read them: ``vramctl validate`` (WARN
lines, exit 0), ``vramctl doctor``, and each worker's ``ConfigWarnings``
status condition.

``env_pitfalls`` is pure: no I/O, no clock. Every finding names the field as
written in the YAML (relative to the GPU's spec, like ``Runtime.validate``;
callers prefix ``gpus[0].`` or ``spec.``) and says how to fix it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from vramctl.spec.engines import flag_name
from vramctl.spec.models import DEFAULT_MARGIN_MIB, DeploymentSpec, ModelSpec

Severity = Literal["warning", "error"]

REMOVED_VLLM_FLAGS: Mapping[str, str] = {
    "--num-scheduler-steps": "multi-step scheduling was removed from vLLM; current vLLM refuses to start with this flag: delete it",
}
REMOVED_VLLM_ENV: Mapping[str, str] = {
    "VLLM_USE_V1": "VLLM_USE_V1 was removed from vLLM: V1 is its only engine and the variable does nothing: delete it",
}
_ATTENTION_BACKENDS = "FLASH_ATTN, FLASHINFER, TRITON_ATTN or FLEX_ATTENTION"
_FALSY = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class Finding:
    """One pitfall: how bad, where (a field path), and what to do instead."""

    severity: Severity
    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "path": self.path, "message": self.message}

    def render(self, prefix: str = "") -> str:
        """``WARN gpus[0].env.VLLM_USE_V1: ...`` (``ERROR`` for errors)."""
        path = f"{prefix}{self.path}" if prefix else self.path
        return f"{'ERROR' if self.severity == 'error' else 'WARN'} {path}: {self.message}"


def env_pitfalls(
    deployment: DeploymentSpec,
    total_mib: int | None = None,
    *,
    wsl2: bool = False,
    compute_capability: tuple[int, int] | None = None,
) -> list[Finding]:
    """Every known pitfall of one GPU's spec, in the order of the fields.

    ``total_mib``: the GPU's total memory when known (the probe, or a
    simulated GPU's totalMiB); without it the reservation check is skipped.
    ``wsl2``: the machine is WSL2 (``gpu.nvml.running_under_wsl2``);
    ``compute_capability``: the GPU's (NVML's
    ``nvmlDeviceGetCudaComputeCapability``), for the Blackwell sleep leak.
    """
    d = deployment
    vllm_models = sorted(n for n, m in d.models.items() if m.engine == "vllm")
    out = _env_findings("env", d.env, vllm_models)
    for name, m in sorted(d.models.items()):
        out += _env_findings(f"models.{name}.env", m.env, vllm_models)
        out += _arg_findings(name, m)
        out += _sleep_mode_findings(d, name, m)
        out += _sleep_strategy_findings(name, m, wsl2, compute_capability)
        out += _reservation_findings(d, name, m, total_mib)
    return out


# ------------------------------------------------------------------ environment


def _env_findings(path: str, env: Mapping[str, str], vllm_models: list[str]) -> list[Finding]:
    out = []
    backend = env.get("VLLM_ATTENTION_BACKEND")
    if backend is not None:
        where = (
            " on " + ", ".join(f"models.{n}.vllm.attentionBackend" for n in vllm_models)
            if vllm_models
            else " (on a model with engine: vllm)"
        )
        out.append(
            Finding(
                "warning",
                f"{path}.VLLM_ATTENTION_BACKEND",
                "current vLLM ignores VLLM_ATTENTION_BACKEND (deprecated in v0.13, removed in January 2026): "
                f"set vllm.attentionBackend{where} instead ({_ATTENTION_BACKENDS}; rendered as --attention-backend), "
                "or leave it unset so vLLM picks one, and delete the variable",
            )
        )
        if backend.strip().upper() == "TORCH_SDPA":
            out.append(_torch_sdpa(f"{path}.VLLM_ATTENTION_BACKEND"))
        if backend.strip().upper() == "XFORMERS":
            out.append(_xformers(f"{path}.VLLM_ATTENTION_BACKEND", "VLLM_ATTENTION_BACKEND=XFORMERS"))
    for var, message in REMOVED_VLLM_ENV.items():
        if var in env:
            out.append(Finding("warning", f"{path}.{var}", message))
    out += _gpu_numbering_findings(path, env)
    for var, value in sorted(env.items()):
        if "XFORMERS" not in var.upper():
            continue
        disabling = "DISABLE" in var.upper()
        # XFORMERS_DISABLED=0 asks for xformers as much as USE_XFORMERS=1 does.
        if (disabling and value.strip().lower() in _FALSY) or (not disabling and value.strip().lower() not in _FALSY):
            out.append(_xformers(f"{path}.{var}", f"{var}={value}"))
    return out


def _gpu_numbering_findings(path: str, env: Mapping[str, str]) -> list[Finding]:
    """GPUs are numbered as NVML numbers them (PCI bus order): the worker of
    ``gpu: N`` watches NVML's GPU N, the docker runtime asks for device N, the
    process runtime sets ``CUDA_VISIBLE_DEVICES=N`` and
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. CUDA's own default order is fastest
    first, so on a machine with two different cards an override here puts
    the model on one GPU while vramctl watches the memory of the other."""
    out = []
    order = env.get("CUDA_DEVICE_ORDER")
    if order is not None and order.strip().upper() != "PCI_BUS_ID":
        out.append(
            Finding(
                "warning",
                f"{path}.CUDA_DEVICE_ORDER",
                f"CUDA_DEVICE_ORDER={order} numbers GPUs differently from NVML (PCI bus order), which vramctl's gpu index follows: "
                "on a machine with different cards the model runs on another GPU than the one its worker watches; delete it",
            )
        )
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if var in env:
            out.append(
                Finding(
                    "warning",
                    f"{path}.{var}",
                    f"{var} is set by vramctl from the GPU's index (its worker watches that GPU's memory): "
                    "setting it here can put the model on another GPU; delete it and choose the GPU with gpu: N",
                )
            )
    return out


def _torch_sdpa(path: str) -> Finding:
    return Finding(
        "warning",
        path,
        "TORCH_SDPA is not a CUDA attention backend for text models in vLLM: where it is still read, vLLM fails at startup. "
        "PyTorch SDPA for the image models needs nothing more than XFORMERS_DISABLED=1 (injected by default); "
        f"for vLLM use vllm.attentionBackend ({_ATTENTION_BACKENDS}) or leave it unset",
    )


def _xformers(path: str, what: str) -> Finding:
    return Finding(
        "warning",
        path,
        f"{what} requests xformers: this stack runs PyTorch SDPA everywhere and never xformers; "
        "remove it (vramctl injects XFORMERS_DISABLED=1 unless envPolicy.sdpaDefaults is false)",
    )


# ------------------------------------------------------------------ arguments


def _arg_sources(name: str, m: ModelSpec) -> list[tuple[str, list[str]]]:
    out = [(f"models.{name}.args", list(m.args))]
    if m.vllm is not None:
        out.append((f"models.{name}.vllm.extraArgs", list(m.vllm.extra_args)))
    if m.command:
        out.append((f"models.{name}.command", list(m.command)))
    return out


def _flags(args: Iterable[str]) -> list[tuple[str, str | None]]:
    """(flag, its value) for each flag: ``--a=1`` and ``--a 1`` alike."""
    args = list(args)
    out: list[tuple[str, str | None]] = []
    for i, a in enumerate(args):
        name = flag_name(a)
        if name is None:
            continue
        if "=" in a:
            value: str | None = a.split("=", 1)[1]
        else:
            nxt = args[i + 1] if i + 1 < len(args) else None
            value = nxt if nxt is not None and flag_name(nxt) is None else None
        out.append((name, value))
    return out


def _norm(flag: str) -> str:
    return flag.replace("_", "-").removeprefix("--no-").removeprefix("--")


def _arg_findings(name: str, m: ModelSpec) -> list[Finding]:
    out = []
    typed: dict[str, str] = {}
    if m.vllm is not None:
        for a in m.vllm.model_copy(update={"extra_args": []}).flags():
            flag = flag_name(a)
            if flag is not None:
                typed[_norm(flag)] = flag
    for path, args in _arg_sources(name, m):
        for flag, value in _flags(args):
            norm = _norm(flag)
            removed = REMOVED_VLLM_FLAGS.get("--" + norm)
            if removed is not None:
                out.append(Finding("warning", path, f"{flag}: {removed}"))
            if norm == "attention-backend" and value is not None and value.upper() == "TORCH_SDPA":
                out.append(_torch_sdpa(path))
            if "xformers" in flag.lower() or (norm == "attention-backend" and value is not None and value.upper() == "XFORMERS"):
                out.append(_xformers(path, flag if value is None or "xformers" in flag.lower() else f"{flag} {value}"))
            if norm in typed and not path.endswith(".command"):
                out.append(
                    Finding(
                        "warning",
                        path,
                        f"{flag} is also rendered from the typed vllm fields ({typed[norm]}); vLLM takes the later one, this one: "
                        "keep one of the two, preferably the typed field",
                    )
                )
    return out


# ------------------------------------------------------------------ sleep mode


def _alloc_conf_expandable(value: str) -> bool:
    for part in value.split(","):
        key, _, val = part.partition(":")
        if key.strip() == "expandable_segments" and val.strip().lower() == "true":
            return True
    return False


def _vllm_sleeps(name: str, m: ModelSpec) -> bool:
    if m.engine == "vllm" and m.sleeps_by_api:
        return True
    return (m.vllm is not None and m.vllm.enable_sleep_mode) or any(
        _norm(f) == "enable-sleep-mode" for _, args in _arg_sources(name, m) for f, _ in _flags(args)
    )


def _sleep_mode_findings(d: DeploymentSpec, name: str, m: ModelSpec) -> list[Finding]:
    if not _vllm_sleeps(name, m):
        return []
    env = d.merged_env(name)
    off = "set switchStrategy: stop" if m.sleeps_by_api else "turn vllm.enableSleepMode off"
    out = []
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        conf = env.get(var, "")
        if not _alloc_conf_expandable(conf):
            continue
        where = f"models.{name}.env" if var in m.env else "env"
        # PyTorch reads PYTORCH_ALLOC_CONF as the newer name of the same
        # setting; vLLM's own guard looks only at the old one, so it stays quiet.
        unseen = (
            " (PyTorch reads PYTORCH_ALLOC_CONF, but vLLM checks only PYTORCH_CUDA_ALLOC_CONF, so it does not warn)"
            if var == "PYTORCH_ALLOC_CONF"
            else ""
        )
        out.append(
            Finding(
                "warning",
                f"{where}.{var}",
                f"{var}={conf} with vLLM sleep mode on {name}: with expandable_segments:True, POST /sleep frees "
                f"nothing on the GPU{unseen}; drop expandable_segments (e.g. max_split_size_mb:512), or {off}",
            )
        )
    return out


# Blackwell: compute capability 10.x (B200) and 12.x (RTX 50, SM120).
_BLACKWELL_MAJORS = frozenset({10, 12})
BLACKWELL_SAFE_CYCLES = 3


def _sleep_strategy_findings(name: str, m: ModelSpec, wsl2: bool, cc: tuple[int, int] | None) -> list[Finding]:
    if not m.sleeps_by_api:
        return []
    s = m.sleep_settings
    out = []
    if wsl2 and s.level == 1:
        out.append(
            Finding(
                "warning",
                f"models.{name}.sleep.level",
                f"sleep level 1 on WSL2 ({name}): WSL2 pins little or no host memory, so a sleep copies the weights into pageable "
                "memory (about 10 s for 14 GiB instead of 0.3 s, wake 2 s); expect slow warm switches, or use level: 2, or switchStrategy: stop",
            )
        )
    if (
        m.engine == "vllm"
        and cc is not None
        and cc[0] in _BLACKWELL_MAJORS
        and (s.max_cycles is None or s.max_cycles > BLACKWELL_SAFE_CYCLES)
    ):
        now = "unbounded" if s.max_cycles is None else f"{s.max_cycles}"
        out.append(
            Finding(
                "warning",
                f"models.{name}.sleep.maxCycles",
                f"vLLM sleep on Blackwell (compute capability {cc[0]}.{cc[1]}): repeated sleep/wake cycles have leaked memory and produced "
                f"garbage by the 4th; maxCycles is {now}: set sleep.maxCycles to {BLACKWELL_SAFE_CYCLES} or fewer "
                "(vramctl then stops the model and starts it cold)",
            )
        )
    return out


# ------------------------------------------------------------------ reservation


def _reservation_findings(d: DeploymentSpec, name: str, m: ModelSpec, total_mib: int | None) -> list[Finding]:
    if m.vllm is None or total_mib is None:
        return []
    reserved = m.vllm.reservation_mib(total_mib)
    if d.vram_budget_mib is not None:
        budget, what = d.vram_budget_mib, f"vramBudgetMiB {d.vram_budget_mib} MiB"
    else:
        budget = total_mib - DEFAULT_MARGIN_MIB
        what = f"the default budget {budget} MiB (total minus a {DEFAULT_MARGIN_MIB} MiB margin)"
    if reserved <= budget:
        return []
    most = math.floor(budget / total_mib * 100) / 100
    return [
        Finding(
            "warning",
            f"models.{name}.vllm.gpuMemoryUtilization",
            f"vLLM reserves {m.vllm.gpu_memory_utilization:g} x {total_mib} MiB = {reserved} MiB, above {what}: "
            f"set vllm.gpuMemoryUtilization to at most {most:g}, or raise vramBudgetMiB",
        )
    ]
