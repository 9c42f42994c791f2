"""images/common/preflight.py: the pure verdict on recorded facts, and the real
thing on this CPU-only machine (it must say 'no CUDA device' and exit 1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import IMAGES, load_module

pf = load_module("vramctl_image_preflight", IMAGES / "common" / "preflight.py")
PREFLIGHT = IMAGES / "common" / "preflight.py"
ENTRYPOINT = IMAGES / "common" / "entrypoint.sh"
DATA = Path(__file__).parent / "data"

ALL_OK = {"flash": "ok", "efficient": "ok", "math": "ok", "cudnn": "ok"}
NO_KERNEL = "RuntimeError: No available kernel. Aborting execution."


def recorded_h100() -> Any:
    """gather()'s facts as read on an H100 (torch 2.11.0+cu130), through the device tool."""
    raw = json.loads((DATA / "preflight_h100.json").read_text())["facts"]
    raw["capability"] = pf.parse_capability(raw["capability"])
    return pf.Facts(**raw)


def gpu(name: str, cap: tuple[int, int], arch: list[str], sdpa: dict[str, str] | None = None, **kw: Any) -> Any:
    """Facts of a CUDA machine, for cards nobody here can plug in (their published capability,
    and the arch lists that those torch builds print)."""
    return pf.Facts(
        python="3.11.9",
        torch_version=kw.pop("torch_version", "2.7.0+cu128"),
        cuda_version=kw.pop("cuda_version", "12.8"),
        cuda_available=True,
        device_count=1,
        gpu_name=name,
        capability=cap,
        total_memory_bytes=16 * 2**30,
        arch_list=arch,
        sdpa=dict(ALL_OK if sdpa is None else sdpa),
        **kw,
    )


CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # torch 2.7.0+cu128
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # torch 2.6.0+cu126: no Blackwell
CPU_FACTS = pf.Facts(python="3.11.7", torch_version="2.13.0+cpu", cuda_version=None, cuda_available=False)


@pytest.mark.parametrize(
    ("facts", "policy", "ok", "problem"),
    [
        pytest.param(recorded_h100(), pf.Policy(), True, None, id="recorded-h100"),
        pytest.param(recorded_h100(), pf.Policy(min_capability=(10, 0)), False, "below this image's minimum 10.0", id="h100-below-min"),
        pytest.param(gpu("NVIDIA GeForce RTX 5080", (12, 0), CU128), pf.Policy(min_capability=(7, 5)), True, None, id="rtx5080-cu128"),
        pytest.param(
            gpu("NVIDIA GeForce RTX 5080", (12, 0), CU126, torch_version="2.6.0+cu126", cuda_version="12.6"),
            pf.Policy(),
            False,
            "has no kernels for NVIDIA GeForce RTX 5080 (compute capability 12.0, sm_120)",
            id="rtx5080-cu126-no-sm120",
        ),
        pytest.param(gpu("NVIDIA GeForce RTX 3060", (8, 6), ["sm_80", "sm_90"]), pf.Policy(), True, None, id="sm80-cubin-runs-on-8.6"),
        pytest.param(
            gpu("NVIDIA GeForce GTX 1080 Ti", (6, 1), CU126),
            pf.Policy(min_capability=(7, 5)),
            False,
            "compute capability 6.1, below",
            id="pascal",
        ),
        pytest.param(
            gpu("Tesla T4", (7, 5), CU128, {"flash": NO_KERNEL, "efficient": "ok", "math": "ok", "cudnn": NO_KERNEL}),
            pf.Policy(min_capability=(7, 5)),
            True,
            None,
            id="t4-no-flash-is-a-warning",
        ),
        pytest.param(
            gpu(
                "Odd GPU",
                (8, 0),
                CU128,
                {"flash": NO_KERNEL, "efficient": NO_KERNEL, "math": "CUDA error: an illegal memory access", "cudnn": NO_KERNEL},
            ),
            pf.Policy(),
            False,
            "no scaled-dot-product-attention kernel runs on this GPU",
            id="no-sdpa-kernel",
        ),
        pytest.param(
            replace(recorded_h100(), xformers_installed=True, xformers_version="0.0.32.post1"),
            pf.Policy(),
            False,
            "xformers 0.0.32.post1 is installed",
            id="xformers",
        ),
        pytest.param(replace(recorded_h100(), xformers_installed=True), pf.Policy(allow_xformers=True), True, None, id="xformers-allowed"),
        pytest.param(CPU_FACTS, pf.Policy(), False, "no CUDA device", id="cpu-build"),
        pytest.param(
            pf.Facts(torch_error="ModuleNotFoundError: No module named 'torch'"),
            pf.Policy(),
            False,
            "torch is not importable",
            id="no-torch",
        ),
        pytest.param(
            replace(recorded_h100(), vllm_version="0.11.2", env={"VLLM_ATTENTION_BACKEND": "TORCH_SDPA"}),
            pf.Policy(engine="vllm"),
            False,
            "VLLM_ATTENTION_BACKEND=TORCH_SDPA: vLLM 0.11.2 honours it",
            id="vllm-0.11-torch-sdpa",
        ),
        pytest.param(
            replace(recorded_h100(), vllm_version="0.14.0", env={"VLLM_ATTENTION_BACKEND": "TORCH_SDPA"}),
            pf.Policy(engine="vllm"),
            True,
            None,
            id="vllm-0.14-ignores-it",
        ),
        pytest.param(
            replace(recorded_h100(), env={"VLLM_ATTENTION_BACKEND": "TORCH_SDPA"}), pf.Policy(engine="sdxl"), True, None, id="not-vllm"
        ),
    ],
)
def test_decide(facts: Any, policy: Any, ok: bool, problem: str | None) -> None:
    verdict = pf.decide(facts, policy)
    assert verdict.ok is ok, verdict
    if problem is None:
        assert verdict.problems == []
    else:
        assert any(problem in p for p in verdict.problems), verdict.problems


def test_decide_warnings_name_what_is_missing() -> None:
    t4 = gpu("Tesla T4", (7, 5), CU128, {"flash": NO_KERNEL, "efficient": "ok", "math": "ok", "cudnn": NO_KERNEL})
    assert any("flash SDPA kernel unavailable" in w and "efficient, math" in w for w in pf.decide(t4, pf.Policy()).warnings)
    new_vllm = replace(recorded_h100(), vllm_version="0.14.0", env={"VLLM_ATTENTION_BACKEND": "FLASH_ATTN"})
    assert any("is ignored by vLLM 0.14.0" in w for w in pf.decide(new_vllm, pf.Policy(engine="vllm")).warnings)


def test_cpu_problems_come_in_a_useful_order() -> None:
    verdict = pf.decide(CPU_FACTS, pf.Policy())
    assert verdict.problems[0].startswith("torch 2.13.0+cpu is a CPU-only build")
    assert verdict.problems[1].startswith("no CUDA device")
    assert verdict.kernel_for_arch is None


@pytest.mark.parametrize(
    ("arch", "cap", "runs"),
    [
        ("sm_80", (8, 0), True),
        ("sm_80", (8, 6), True),  # same major, higher minor: binary compatible
        ("sm_86", (8, 0), False),
        ("sm_80", (9, 0), False),  # cubins don't cross majors
        ("sm_90a", (9, 0), True),
        ("sm_100a", (10, 3), False),  # arch-specific: exactly 10.0
        ("sm_100f", (10, 3), True),  # family-specific
        ("sm_120", (12, 0), True),
        ("compute_90", (12, 0), True),  # PTX: JIT for anything newer
        ("compute_120", (9, 0), False),
        ("gfx90a", (9, 0), False),
    ],
)
def test_arch_runs_on(arch: str, cap: tuple[int, int], runs: bool) -> None:
    assert pf.arch_runs_on(arch, cap) is runs


def test_parse_capability() -> None:
    assert pf.parse_capability("12.0") == (12, 0)
    assert pf.parse_capability(" 8.6 ") == (8, 6)
    for bad in ("86", "8", "sm_86", ""):
        with pytest.raises(ValueError, match="compute capability must look like"):
            pf.parse_capability(bad)


def run_preflight(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMCTL_")} | (env or {})
    return subprocess.run([sys.executable, str(PREFLIGHT), *args], capture_output=True, text=True, timeout=120, env=full_env, check=False)


def test_on_this_cpu_machine_it_says_no_cuda_device_and_exits_1() -> None:
    res = run_preflight()
    assert res.returncode == 1, res
    assert "preflight: FAIL no CUDA device" in res.stdout
    assert "preflight: python " in res.stdout and "torch 2.13.0" in res.stdout
    assert res.stdout.rstrip().endswith("preflight: this image cannot work on this machine")


def test_json_output() -> None:
    res = run_preflight("--json", "--min-capability", "8.0", env={"VRAMCTL_ALLOW_XFORMERS": "1"})
    assert res.returncode == 1, res
    doc = json.loads(res.stdout)
    assert doc["ok"] is False
    assert any(p.startswith("no CUDA device") for p in doc["problems"])
    assert doc["policy"] == {"min_capability": "8.0", "allow_xformers": True, "engine": ""}
    assert doc["facts"]["torch_version"].startswith("2.13.0")
    assert doc["facts"]["cuda_available"] is False and doc["facts"]["xformers_installed"] is False


def test_without_torch_it_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "torch.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    res = run_preflight(env={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 1
    assert "FAIL torch is not importable in this image (ImportError: libcuda.so.1: cannot open shared object file)" in res.stdout


def test_bad_usage_exits_2() -> None:
    res = run_preflight("--min-capability", "86")
    assert res.returncode == 2
    assert "compute capability must look like 8.6 or 12.0" in res.stderr


def entrypoint_copy(tmp_path: Path, preflight_body: str) -> Path:
    """entrypoint.sh beside a stand-in preflight.py, as the images lay them out in /opt/vramctl."""
    shutil.copy(ENTRYPOINT, tmp_path / "entrypoint.sh")
    (tmp_path / "preflight.py").write_text(preflight_body)
    return tmp_path / "entrypoint.sh"


def test_entrypoint_runs_the_command_after_a_passing_preflight(tmp_path: Path) -> None:
    script = entrypoint_copy(tmp_path, "print('preflight: ok')\n")
    env = os.environ | {"VRAMCTL_PREFLIGHT_PYTHON": sys.executable}
    res = subprocess.run(
        ["/bin/sh", str(script), "sh", "-c", 'echo "args:$*"; exit 7', "cmd", "--port=8000", "a b"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert res.returncode == 7  # exec: the command's status is the container's
    assert res.stdout == "preflight: ok\nargs:--port=8000 a b\n"


def test_entrypoint_does_not_start_the_server_when_the_preflight_fails() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMCTL_")} | {"VRAMCTL_PREFLIGHT_PYTHON": sys.executable}
    res = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), "echo", "SERVER STARTED"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert res.returncode == 1
    assert "SERVER STARTED" not in res.stdout
    assert "preflight: FAIL no CUDA device" in res.stdout
    assert "preflight: exit 1; not starting echo" in res.stderr


def test_entrypoint_skip_switch(tmp_path: Path) -> None:
    script = entrypoint_copy(tmp_path, "raise SystemExit(1)\n")
    env = os.environ | {"VRAMCTL_PREFLIGHT": "0", "VRAMCTL_PREFLIGHT_PYTHON": sys.executable}
    res = subprocess.run(["/bin/sh", str(script), "echo", "started"], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert res.returncode == 0 and res.stdout == "started\n"
    assert "preflight: skipped (VRAMCTL_PREFLIGHT=0)" in res.stderr
