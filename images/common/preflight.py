#!/usr/bin/env python3
"""GPU preflight for vramctl's model images: can this image work on this card?

Runs first in every model image (vLLM, SDXL, GPT-SoVITS), before the model
server loads gigabytes of weights, so a container that cannot work dies in a
second or two with one clear line instead of a CUDA traceback minutes later:

- no CUDA device visible (no ``--gpus``, driver missing, CUDA_VISIBLE_DEVICES="");
- compute capability below the image's minimum (``--min-capability``);
- torch built without kernels for this architecture (``torch.cuda.get_arch_list()``:
  the RTX 50xx cards are sm_120 and need a CUDA 12.8+ build);
- no scaled-dot-product-attention kernel runs (each of flash, memory-efficient
  and math is tried on a tiny fp16 input with ``torch.nn.attention.sdpa_kernel``);
- xformers is installed (the users' rule: PyTorch SDPA everywhere, never
  xformers), unless ``--allow-xformers``;
- for the vLLM image: ``VLLM_ATTENTION_BACKEND=TORCH_SDPA`` with a vLLM that
  still honours the variable (before 0.13), which fails at startup because
  TORCH_SDPA is no CUDA backend for text models.

Usage: ``preflight.py [--json] [--min-capability 8.0] [--allow-xformers] [--engine vllm]``.
Every flag also has an environment variable (VRAMCTL_MIN_CAPABILITY,
VRAMCTL_ALLOW_XFORMERS=1, VRAMCTL_PREFLIGHT_ENGINE) so a compose file or a
ModelDeployment can tune it without rebuilding. Exit status: 0 the image can
work, 1 it cannot (the reasons are printed, one a line, prefixed ``preflight: FAIL``),
2 bad usage.

The module is split in two: ``gather()`` reads the facts (torch, the GPU, the
environment) and ``decide(facts, policy)`` is a pure function from those facts
to a verdict, unit-tested with recorded facts from real cards. Standard library
only, plus whatever torch the image ships (imported lazily: without torch the
verdict is a clear failure, not an ImportError).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

SDPA_KERNELS = ("flash", "efficient", "math", "cudnn")
# cudnn attention is reported but never required: it is the newest and the
# least available of the four, and none of our servers depends on it.
REQUIRED_ANY_OF = ("flash", "efficient", "math")


@dataclass
class Facts:
    """What gather() saw. Everything optional: a missing piece is itself a finding."""

    python: str = ""
    torch_version: str | None = None
    torch_error: str | None = None
    cuda_version: str | None = None  # torch.version.cuda: the toolkit torch was built with
    cuda_available: bool = False
    cuda_error: str | None = None
    device_count: int = 0
    gpu_name: str | None = None
    capability: tuple[int, int] | None = None
    total_memory_bytes: int | None = None
    arch_list: list[str] = field(default_factory=list)
    sdpa: dict[str, str] = field(default_factory=dict)  # kernel -> "ok" or the error
    xformers_installed: bool = False
    xformers_version: str | None = None
    vllm_version: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    min_capability: tuple[int, int] = (7, 0)
    allow_xformers: bool = False
    engine: str = ""  # "vllm" adds the vLLM-specific environment checks


@dataclass
class Verdict:
    ok: bool
    problems: list[str]
    warnings: list[str]
    kernel_for_arch: bool | None


ENV_SHOWN = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "XFORMERS_DISABLED",
    "VLLM_ATTENTION_BACKEND",
    "VLLM_USE_TRITON_FLASH_ATTN",
    "PYTORCH_CUDA_ALLOC_CONF",
)


# -- pure decision ----------------------------------------------------------


def parse_capability(text: str) -> tuple[int, int]:
    """'8.6' -> (8, 6); '12.0' -> (12, 0); '90' is refused (ambiguous)."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    if not m:
        raise ValueError(f"compute capability must look like 8.6 or 12.0, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` (an entry of torch.cuda.get_arch_list()) runs on ``capability``.

    - ``sm_XY``: a cubin runs on the same major version at the same or a higher minor
      (sm_80 runs on 8.6 and 8.9, not on 9.0);
    - ``sm_XYa``: arch-specific, only on exactly X.Y;
    - ``sm_XYf``: family-specific, same major at the same or a higher minor;
    - ``compute_XY``: PTX, JIT-compiled by the driver for X.Y and anything newer.
    The last digit is the minor version: sm_120 is 12.0, sm_90 is 9.0.
    """
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch.strip())
    if not m:
        return False
    kind, major, minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "compute":
        return (major, minor) <= capability
    if suffix == "a":
        return (major, minor) == capability
    return major == capability[0] and minor <= capability[1]


def decide(facts: Facts, policy: Policy) -> Verdict:
    """The verdict for ``facts`` under ``policy``: pure, no I/O."""
    problems: list[str] = []
    warnings: list[str] = []
    kernel_for_arch: bool | None = None

    if facts.xformers_installed and not policy.allow_xformers:
        problems.append(
            f"xformers {facts.xformers_version or '(unknown version)'} is installed: this stack uses PyTorch SDPA only; "
            "uninstall it from the image (pip uninstall -y xformers) or set VRAMCTL_ALLOW_XFORMERS=1"
        )
    elif facts.xformers_installed:
        warnings.append("xformers is installed (allowed by VRAMCTL_ALLOW_XFORMERS)")

    backend = facts.env.get("VLLM_ATTENTION_BACKEND", "")
    if policy.engine == "vllm" and backend:
        honoured = _vllm_honours_backend_env(facts.vllm_version)
        if backend.upper() == "TORCH_SDPA" and honoured:
            problems.append(
                f"VLLM_ATTENTION_BACKEND=TORCH_SDPA: vLLM {facts.vllm_version or '(version unknown)'} honours it, and TORCH_SDPA is no CUDA "
                "backend for text models, so vLLM would fail at startup; unset it (XFORMERS_DISABLED=1 already keeps "
                "xformers out) or pass --attention-backend FLASH_ATTN|FLASHINFER|TRITON_ATTN|FLEX_ATTENTION"
            )
        elif not honoured:
            warnings.append(
                f"VLLM_ATTENTION_BACKEND={backend} is ignored by vLLM {facts.vllm_version} (removed after 0.12); "
                "use --attention-backend instead"
            )

    if facts.torch_version is None:
        problems.append(f"torch is not importable in this image ({facts.torch_error or 'not installed'})")
        return Verdict(ok=False, problems=problems, warnings=warnings, kernel_for_arch=None)

    if facts.cuda_version is None:
        problems.append(f"torch {facts.torch_version} is a CPU-only build (torch.version.cuda is None): the image needs a CUDA build")
    if not facts.cuda_available or facts.device_count < 1:
        detail = f": {facts.cuda_error}" if facts.cuda_error else ""
        problems.append(
            "no CUDA device: torch.cuda.is_available() is False"
            f"{detail} (start the container with a GPU: --gpus, the nvidia runtime, or a device reservation; "
            "check CUDA_VISIBLE_DEVICES and the host driver)"
        )
        return Verdict(ok=False, problems=problems, warnings=warnings, kernel_for_arch=None)

    cap = facts.capability
    if cap is None:
        problems.append("CUDA device 0 reported no compute capability")
    else:
        cap_s = f"{cap[0]}.{cap[1]}"
        if cap < policy.min_capability:
            problems.append(
                f"{facts.gpu_name or 'GPU 0'} has compute capability {cap_s}, below this image's minimum "
                f"{policy.min_capability[0]}.{policy.min_capability[1]}"
            )
        if facts.arch_list:
            kernel_for_arch = any(arch_runs_on(a, cap) for a in facts.arch_list)
            if not kernel_for_arch:
                problems.append(
                    f"torch {facts.torch_version} (CUDA {facts.cuda_version}) has no kernels for {facts.gpu_name or 'GPU 0'} "
                    f"(compute capability {cap_s}, sm_{cap[0]}{cap[1]}): it was built for {' '.join(facts.arch_list)}; "
                    "use a torch build that lists this architecture (RTX 50xx cards need CUDA 12.8 or newer)"
                )
        else:
            warnings.append("torch.cuda.get_arch_list() is empty: cannot tell whether torch has kernels for this GPU")

    if facts.sdpa:
        working = [k for k in REQUIRED_ANY_OF if facts.sdpa.get(k) == "ok"]
        if not working:
            detail = "; ".join(f"{k}: {facts.sdpa.get(k, 'not tried')}" for k in REQUIRED_ANY_OF)
            problems.append(f"no scaled-dot-product-attention kernel runs on this GPU ({detail})")
        elif "flash" not in working:
            warnings.append(f"flash SDPA kernel unavailable ({facts.sdpa.get('flash')}); using {', '.join(working)}")
    elif not problems:
        problems.append("the SDPA kernels were not tried")

    if facts.env.get("XFORMERS_DISABLED") not in (None, "1", "true", "True"):
        warnings.append(f"XFORMERS_DISABLED={facts.env['XFORMERS_DISABLED']} (expected 1)")

    return Verdict(ok=not problems, problems=problems, warnings=warnings, kernel_for_arch=kernel_for_arch)


def _vllm_honours_backend_env(version: str | None) -> bool:
    """vLLM deprecated VLLM_ATTENTION_BACKEND in 0.13 and removed it later; before 0.13 it is honoured."""
    if not version:
        return True  # unknown: assume the older behaviour, the one that fails
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        return True
    return (int(m.group(1)), int(m.group(2))) < (0, 13)


# -- gathering (I/O) --------------------------------------------------------


def gather(try_kernels: bool = True) -> Facts:
    """Read the facts: torch and CUDA versions, GPU 0, its SDPA kernels, xformers, the environment."""
    facts = Facts(python=sys.version.split()[0])
    facts.env = {k: os.environ[k] for k in ENV_SHOWN if k in os.environ}
    facts.xformers_installed = importlib.util.find_spec("xformers") is not None
    if facts.xformers_installed:
        facts.xformers_version = _dist_version("xformers")
    facts.vllm_version = _dist_version("vllm")
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken CUDA library at import
        facts.torch_error = f"{type(exc).__name__}: {exc}"
        return facts
    facts.torch_version = str(torch.__version__)
    facts.cuda_version = torch.version.cuda
    try:
        facts.cuda_available = bool(torch.cuda.is_available())
        facts.device_count = int(torch.cuda.device_count()) if facts.cuda_available else 0
    except Exception as exc:
        facts.cuda_error = f"{type(exc).__name__}: {exc}"
        return facts
    if not facts.cuda_available:
        return facts
    try:
        props = torch.cuda.get_device_properties(0)
        facts.gpu_name = str(props.name)
        facts.capability = (int(props.major), int(props.minor))
        facts.total_memory_bytes = int(props.total_memory)
        facts.arch_list = list(torch.cuda.get_arch_list())
    except Exception as exc:
        facts.cuda_error = f"{type(exc).__name__}: {exc}"
        return facts
    if try_kernels:
        facts.sdpa = probe_sdpa(torch)
    return facts


def probe_sdpa(torch: Any) -> dict[str, str]:
    """Run scaled_dot_product_attention once per kernel on a tiny fp16 input: "ok" or the error."""
    import torch.nn.functional as F

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {k: "torch.nn.attention.sdpa_kernel is missing (torch < 2.3)" for k in SDPA_KERNELS}
    backends = {
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "math": "MATH",
        "cudnn": "CUDNN_ATTENTION",
    }
    results: dict[str, str] = {}
    for name, attr in backends.items():
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            results[name] = f"SDPBackend.{attr} does not exist in torch {torch.__version__}"
            continue
        try:
            # batch 1, 2 heads, 16 tokens, head dim 64: every kernel's sweet spot.
            q, k, v = (torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float16) for _ in range(3))
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
            results[name] = "ok" if bool(torch.isfinite(out).all()) else "ran, but produced non-finite values"
        except Exception as exc:  # RuntimeError "No available kernel", CUDA errors
            results[name] = _one_line(f"{type(exc).__name__}: {exc}")
    return results


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- output -----------------------------------------------------------------


def report(facts: Facts, policy: Policy, verdict: Verdict) -> dict[str, Any]:
    """The JSON document printed by --json."""
    return {
        "ok": verdict.ok,
        "problems": verdict.problems,
        "warnings": verdict.warnings,
        "kernel_for_arch": verdict.kernel_for_arch,
        "policy": {
            "min_capability": f"{policy.min_capability[0]}.{policy.min_capability[1]}",
            "allow_xformers": policy.allow_xformers,
            "engine": policy.engine,
        },
        "facts": {**asdict(facts), "capability": f"{facts.capability[0]}.{facts.capability[1]}" if facts.capability else None},
    }


def render_text(facts: Facts, verdict: Verdict) -> str:
    lines = [
        f"preflight: python {facts.python}, torch {facts.torch_version or 'missing'}, CUDA {facts.cuda_version or 'none'}",
    ]
    if facts.gpu_name:
        cap = f"{facts.capability[0]}.{facts.capability[1]}" if facts.capability else "?"
        mem = f", {facts.total_memory_bytes / 2**30:.1f} GiB" if facts.total_memory_bytes else ""
        lines.append(
            f"preflight: GPU 0 {facts.gpu_name}, compute capability {cap}{mem}, torch arch list {' '.join(facts.arch_list) or '?'}"
        )
    if facts.sdpa:
        lines.append("preflight: SDPA kernels " + ", ".join(f"{k}={'ok' if v == 'ok' else 'FAIL'}" for k, v in facts.sdpa.items()))
    lines.append(f"preflight: xformers {'installed ' + (facts.xformers_version or '') if facts.xformers_installed else 'absent'}".rstrip())
    lines += [f"preflight: warning: {w}" for w in verdict.warnings]
    lines += [f"preflight: FAIL {p}" for p in verdict.problems]
    lines.append("preflight: ok" if verdict.ok else "preflight: this image cannot work on this machine")
    return "\n".join(lines)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preflight.py", description="Can this model image work on this GPU?")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument(
        "--min-capability",
        default=os.environ.get("VRAMCTL_MIN_CAPABILITY", "7.0"),
        help="lowest compute capability the image supports, like 8.0 (env VRAMCTL_MIN_CAPABILITY; default 7.0)",
    )
    parser.add_argument(
        "--allow-xformers",
        action="store_true",
        default=_truthy(os.environ.get("VRAMCTL_ALLOW_XFORMERS")),
        help="do not fail when xformers is installed (env VRAMCTL_ALLOW_XFORMERS=1)",
    )
    parser.add_argument(
        "--engine",
        default=os.environ.get("VRAMCTL_PREFLIGHT_ENGINE", ""),
        choices=["", "vllm", "sdxl", "sovits"],
        help="engine-specific checks (env VRAMCTL_PREFLIGHT_ENGINE)",
    )
    args = parser.parse_args(argv)
    try:
        policy = Policy(min_capability=parse_capability(args.min_capability), allow_xformers=args.allow_xformers, engine=args.engine)
    except ValueError as exc:
        parser.error(str(exc))

    started = time.monotonic()
    facts = gather()
    verdict = decide(facts, policy)
    if args.json:
        doc = report(facts, policy, verdict)
        doc["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render_text(facts, verdict), flush=True)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
