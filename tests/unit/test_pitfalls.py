"""Known pitfalls: each is found, names its field and says the fix; a clean
spec has none; ``vramctl validate`` prints them as WARN lines and exits 0;
a worker reports them in its ConfigWarnings condition."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.builders import deployment, light
from tests.support.fakes import FakeGpu, FakeRuntime
from vramctl.cli import main
from vramctl.spec.models import HealthSpec, load_config
from vramctl.spec.pitfalls import Finding, env_pitfalls
from vramctl.worker.actor import GpuWorker, WorkerSettings

REPO = Path(__file__).resolve().parents[2]


def vllm(**fields: Any) -> dict[str, Any]:
    return {"engine": "vllm", "image": "vllm/vllm-openai:v0.11.2", "vllm": {"model": "Qwen/Qwen2.5-7B-Instruct", **fields}}


def find(models: dict[str, dict[str, Any]], total_mib: int | None = None, **fields: Any) -> list[Finding]:
    return env_pitfalls(deployment(models, **fields), total_mib)


# (case, models, GPU-level fields, total MiB, expected (path, words) of each finding, in order)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], int | None, list[tuple[str, tuple[str, ...]]]]] = [
    (
        "attention-backend-env-is-ignored",
        {"llm": vllm()},
        {"env": {"VLLM_ATTENTION_BACKEND": "FLASHINFER"}},
        None,
        [("env.VLLM_ATTENTION_BACKEND", ("ignores VLLM_ATTENTION_BACKEND", "models.llm.vllm.attentionBackend", "--attention-backend"))],
    ),
    (
        "torch-sdpa-env: ignored, and no CUDA backend for text models",
        {"llm": vllm(), "sdxl": {"image": "i"}},
        {"env": {"VLLM_ATTENTION_BACKEND": "TORCH_SDPA"}},
        None,
        [
            ("env.VLLM_ATTENTION_BACKEND", ("ignores VLLM_ATTENTION_BACKEND",)),
            (
                "env.VLLM_ATTENTION_BACKEND",
                ("TORCH_SDPA is not a CUDA attention backend for text models", "fails at startup", "FLASH_ATTN"),
            ),
        ],
    ),
    (
        "torch-sdpa-in-a-containers-args",
        {"llm": {"image": "vllm/vllm-openai", "args": ["--model", "m", "--attention-backend=TORCH_SDPA"]}},
        {},
        None,
        [("models.llm.args", ("TORCH_SDPA is not a CUDA attention backend",))],
    ),
    (
        "attention-backend-env-on-a-model-without-vllm-models",
        {"llm": {"image": "vllm/vllm-openai", "env": {"VLLM_ATTENTION_BACKEND": "FLASH_ATTN"}}},
        {},
        None,
        [("models.llm.env.VLLM_ATTENTION_BACKEND", ("ignores VLLM_ATTENTION_BACKEND", "engine: vllm"))],
    ),
    (
        "expandable-segments-defeat-sleep-mode",
        {"llm": vllm(enableSleepMode=True)},
        {"env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}},
        None,
        [("env.PYTORCH_CUDA_ALLOC_CONF", ("sleep mode on llm", "frees nothing", "max_split_size_mb:512", "enableSleepMode off"))],
    ),
    (
        "expandable-segments-in-the-models-env-with-the-flag-in-args",
        {
            "llm": {
                "image": "i",
                "args": ["--enable-sleep-mode"],
                "env": {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512,expandable_segments:true"},
            }
        },
        {},
        None,
        [("models.llm.env.PYTORCH_CUDA_ALLOC_CONF", ("frees nothing",))],
    ),
    (
        "expandable-segments-through-pytorch-alloc-conf-which-vllm-does-not-check",
        {"llm": vllm(), "sdxl": {"image": "i"}},
        {"env": {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}},
        None,
        [],  # no sleep mode, no pitfall
    ),
    (
        "sleep-strategy-with-expandable-segments-in-pytorch-alloc-conf",
        {"llm": {**vllm(), "switchStrategy": "sleep", "sleep": {"level": 2}, "env": {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}}},
        {},
        None,
        [
            (
                "models.llm.env.PYTORCH_ALLOC_CONF",
                ("frees nothing", "vLLM checks only PYTORCH_CUDA_ALLOC_CONF", "does not warn", "switchStrategy: stop"),
            )
        ],
    ),
    (
        "num-scheduler-steps-in-extra-args",
        {"llm": vllm(extraArgs=["--num-scheduler-steps", "10"])},
        {},
        None,
        [("models.llm.vllm.extraArgs", ("--num-scheduler-steps", "refuses to start", "delete it"))],
    ),
    (
        "num-scheduler-steps-in-args-of-a-container",
        {"llm": {"image": "i", "args": ["--num_scheduler_steps=8"]}},
        {},
        None,
        [("models.llm.args", ("--num_scheduler_steps", "removed"))],
    ),
    (
        "vllm-use-v1",
        {"llm": vllm(), "tts": light(env={"VLLM_USE_V1": "1"})},
        {"env": {"VLLM_USE_V1": "1"}},
        None,
        [("env.VLLM_USE_V1", ("VLLM_USE_V1 was removed", "delete it")), ("models.tts.env.VLLM_USE_V1", ("does nothing",))],
    ),
    (
        "reservation-above-the-budget",
        {"llm": vllm(gpuMemoryUtilization=0.95)},
        {"vramBudgetMiB": 15000},
        16303,
        [
            (
                "models.llm.vllm.gpuMemoryUtilization",
                ("0.95 x 16303 MiB = 15488 MiB", "above vramBudgetMiB 15000 MiB", "at most 0.92", "raise vramBudgetMiB"),
            )
        ],
    ),
    (
        "reservation-above-the-default-budget",
        {"llm": vllm(gpuMemoryUtilization=0.99)},
        {},
        16303,
        [("models.llm.vllm.gpuMemoryUtilization", ("16140 MiB", "default budget 15791 MiB", "at most 0.96"))],
    ),
    (
        "xformers-reenabled",
        {"sdxl": {"image": "i", "env": {"XFORMERS_DISABLED": "0"}}},
        {},
        None,
        [("models.sdxl.env.XFORMERS_DISABLED", ("XFORMERS_DISABLED=0 requests xformers", "PyTorch SDPA", "remove it"))],
    ),
    (
        "xformers-by-variable-flag-and-backend",
        {
            "sdxl": {"image": "i", "args": ["--xformers"], "env": {"USE_XFORMERS": "true"}},
            "llm": vllm(extraArgs=["--attention-backend", "XFORMERS"]),
        },
        {},
        None,
        [
            ("models.llm.vllm.extraArgs", ("--attention-backend XFORMERS requests xformers",)),
            ("models.sdxl.env.USE_XFORMERS", ("USE_XFORMERS=true requests xformers",)),
            ("models.sdxl.args", ("--xformers requests xformers",)),
        ],
    ),
    (
        "gpu-numbering-overridden: CUDA's fastest-first order and a pinned device",
        {"sdxl": {"image": "i", "env": {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "CUDA_VISIBLE_DEVICES": "1"}}},
        {"env": {"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}},
        None,
        [
            ("env.NVIDIA_VISIBLE_DEVICES", ("set by vramctl from the GPU's index", "gpu: N")),
            ("models.sdxl.env.CUDA_DEVICE_ORDER", ("numbers GPUs differently from NVML (PCI bus order)", "another GPU")),
            ("models.sdxl.env.CUDA_VISIBLE_DEVICES", ("set by vramctl from the GPU's index", "delete it")),
        ],
    ),
    (
        "a-typed-flag-given-twice",
        {"llm": vllm(maxModelLen=8192, extraArgs=["--max-model-len", "4096"])},
        {},
        None,
        [("models.llm.vllm.extraArgs", ("--max-model-len is also rendered", "keep one"))],
    ),
]


@pytest.mark.parametrize(("models", "fields", "total", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pitfall_is_found_with_its_field_and_fix(
    models: dict[str, Any], fields: dict[str, Any], total: int | None, expected: list[tuple[str, tuple[str, ...]]]
) -> None:
    found = find(models, total, **fields)
    assert [f.path for f in found] == [p for p, _ in expected], found
    for f, (_, words) in zip(found, expected, strict=True):
        assert f.severity == "warning"
        for w in words:
            assert w in f.message, (w, f.message)


def test_a_clean_spec_and_the_injected_defaults_have_no_pitfalls() -> None:
    models = {
        "llm": vllm(gpuMemoryUtilization=0.85, attentionBackend="FLASH_ATTN", enableSleepMode=True, extraArgs=["--enforce-eager"]),
        "sdxl": {"engine": "sdxl", "image": "i", "sdxl": {"modelPath": "/m.safetensors"}},
        "tts": {"class": "light", "engine": "sovits", "image": "i"},
    }
    assert find(models, 16303, vramBudgetMiB=15872) == []
    # Without the GPU's total the reservation cannot be checked: nothing to say.
    assert find({"llm": vllm(gpuMemoryUtilization=1.0)}) == []


def test_finding_renders_as_a_warn_line_and_a_status_entry() -> None:
    f = Finding("warning", "env.VLLM_USE_V1", "delete it")
    assert f.render("gpus[0].") == "WARN gpus[0].env.VLLM_USE_V1: delete it"
    assert Finding("error", "companions", "x").render() == "ERROR companions: x"
    assert f.as_dict() == {"severity": "warning", "path": "env.VLLM_USE_V1", "message": "delete it"}


# ------------------------------------------------------------------ vramctl validate


def validate(tmp_path: Path, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    return subprocess.run([sys.executable, "-m", "vramctl", "validate", str(p)], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_validate_prints_warnings_and_exits_0(tmp_path: Path) -> None:
    doc = {
        "gpuProbe": {"kind": "simulated", "totalMiB": 16303},
        "gpus": [{"env": {"VLLM_ATTENTION_BACKEND": "TORCH_SDPA"}, "models": {"llm": vllm(gpuMemoryUtilization=0.85)}}],
    }
    r = validate(tmp_path, doc)
    assert r.returncode == 0, r.stdout + r.stderr
    warns = [line for line in r.stdout.splitlines() if line.startswith("WARN ")]
    assert len(warns) == 2
    assert all(w.startswith("WARN gpus[0].env.VLLM_ATTENTION_BACKEND: ") for w in warns)
    assert "llm (heavy, vllm, 13858 MiB = 0.85 x 16303 MiB)" in r.stdout
    assert r.stdout.rstrip().endswith("ok (2 warnings)")


def test_validate_fails_when_companions_do_not_fit_the_gpus_total(tmp_path: Path) -> None:
    # Parsing cannot know the total; a simulated GPU's totalMiB says vLLM takes 13858 MiB.
    doc = {
        "gpuProbe": {"kind": "simulated", "totalMiB": 16303},
        "gpus": [
            {
                "activeModel": "llm",
                "companions": ["tts"],
                "vramBudgetMiB": 15872,
                "models": {"llm": {**vllm(gpuMemoryUtilization=0.85), "vramMiB": 12000}, "tts": light(3500)},
            }
        ],
    }
    r = validate(tmp_path, doc)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ERROR gpus[0].companions: companions do not fit: llm 13858 (0.85 x 16303 MiB) + tts 3500 = 17358 MiB" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_the_real_stack_declares_vllm_by_engine_and_validates_clean() -> None:
    path = REPO / "compose" / "vramctl.yaml"
    r = subprocess.run([sys.executable, "-m", "vramctl", "validate", str(path)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARN" not in r.stdout and r.stdout.rstrip().endswith("ok")
    assert "llm (heavy, vllm, 13858 MiB = 0.85 x 16303 MiB)" in r.stdout
    (g,) = load_config(path).gpus
    command = g.container_command("llm")
    assert command is not None and command[:4] == ["--model", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", "qwen2.5-7b"]
    assert g.health_of("llm") == HealthSpec(path="/health", port=8000)
    assert g.merged_env("llm")["XFORMERS_DISABLED"] == "1"


# ------------------------------------------------------------------ the worker's status


def test_worker_reports_pitfalls_in_a_condition_and_clears_it_on_a_fixed_spec() -> None:
    bad = deployment({"llm": vllm(gpuMemoryUtilization=0.99)}, env={"VLLM_USE_V1": "1"})
    rt = FakeRuntime()
    gpu = FakeGpu(rt, bad)
    w = GpuWorker(bad, rt, gpu, WorkerSettings(poll_interval_s=0.001, memory_timeout_s=0.05, baseline_mib=0))
    st = w.status()
    cond = next(c for c in st["conditions"] if c["type"] == "ConfigWarnings")
    assert (cond["status"], cond["reason"]) == ("True", "PitfallsFound")
    assert "env.VLLM_USE_V1: VLLM_USE_V1 was removed" in cond["message"]
    assert "models.llm.vllm.gpuMemoryUtilization" in cond["message"]  # the probe's total was used
    assert [f["path"] for f in st["configWarnings"]] == ["env.VLLM_USE_V1", "models.llm.vllm.gpuMemoryUtilization"]

    w.update_spec(deployment({"llm": vllm(gpuMemoryUtilization=0.85)}))
    w.reconcile_once()  # the worker's loop applies it
    st = w.status()
    cond = next(c for c in st["conditions"] if c["type"] == "ConfigWarnings")
    assert (cond["status"], cond["reason"]) == ("False", "NoPitfalls")
    assert st["configWarnings"] == []


def test_status_command_shows_the_config_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.json"
    warning = {"severity": "warning", "path": "env.VLLM_USE_V1", "message": "delete it"}
    state.write_text(json.dumps({"gpus": {"0": {"status": {"phase": "Ready", "activeModel": "llm", "configWarnings": [warning]}}}}))
    assert main(["status", "--url", "http://127.0.0.1:1", "--state", str(state)]) == 0
    assert "  WARN env.VLLM_USE_V1: delete it" in capsys.readouterr().out


SLEEPY = {"switchStrategy": "sleep", "sleep": {"level": 1, "hostMemoryMiB": 15000}}


@pytest.mark.parametrize(
    ("models", "wsl2", "cc", "expected"),
    [
        ({"llm": {**vllm(), **SLEEPY}}, True, None, [("models.llm.sleep.level", ("WSL2", "pageable", "level: 2"))]),
        ({"llm": {**vllm(), "switchStrategy": "sleep", "sleep": {"level": 2}}}, True, None, []),
        ({"llm": vllm()}, True, None, []),
        (
            {"llm": {**vllm(), **SLEEPY}},
            False,
            (12, 0),
            [("models.llm.sleep.maxCycles", ("Blackwell", "12.0", "4th", "maxCycles is unbounded", "3 or fewer"))],
        ),
        (
            {"llm": {**vllm(), "switchStrategy": "sleep", "sleep": {**SLEEPY["sleep"], "maxCycles": 5}}},
            False,
            (10, 0),
            [("models.llm.sleep.maxCycles", ("maxCycles is 5",))],
        ),
        ({"llm": {**vllm(), "switchStrategy": "sleep", "sleep": {**SLEEPY["sleep"], "maxCycles": 3}}}, False, (12, 0), []),
        ({"llm": {**vllm(), **SLEEPY}}, False, (9, 0), []),  # Hopper
    ],
    ids=["wsl2-level-1", "wsl2-level-2", "wsl2-no-sleep", "blackwell-unbounded", "blackwell-5", "blackwell-3", "hopper"],
)
def test_sleep_pitfalls_of_the_machine(
    models: dict[str, dict[str, Any]], wsl2: bool, cc: tuple[int, int] | None, expected: list[tuple[str, tuple[str, ...]]]
) -> None:
    found = env_pitfalls(deployment(models), None, wsl2=wsl2, compute_capability=cc)
    assert [f.path for f in found] == [path for path, _ in expected], found
    for f, (_, words) in zip(found, expected, strict=True):
        assert f.severity == "warning"
        for w in words:
            assert w in f.message, (w, f.message)
