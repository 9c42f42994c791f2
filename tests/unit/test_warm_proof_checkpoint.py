"""benchmarks/warm_proof.py's checkpoint and rotation runs, without a GPU:
the configs they hand to ``vramctl up`` load (three models, every one
checkpointed, their host memory within the budget they set), vramctl's
progress is turned into timed steps, and the driver's seconds are read back
from the very log lines ``CheckpointSleeper`` writes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.support.fake_cuda import FakeCu, FakeCudaGpu, S
from tests.support.images import load_module
from vramctl.runtimes.checkpoint import CheckpointSleeper, open_driver
from vramctl.spec.models import DeploymentSpec, parse_config

ROOT = Path(__file__).resolve().parents[2]
warm_proof = load_module("vramctl_warm_proof_cp", ROOT / "benchmarks" / "warm_proof.py")


def plan() -> object:
    return warm_proof.Plan(dry=False, gpu=0, llm_weights_mib=8192, llm_kv_mib=2048, sdxl_size="full", ports={"llm": 1, "sdxl": 2, "tts": 3})


def test_the_rotation_config_checkpoints_three_models_within_its_budget() -> None:
    cfg = warm_proof.config(plan(), "checkpoint", tts=True)
    d = parse_config(cfg, "warm-proof").gpus[0]
    assert sorted(d.models) == ["llm", "sdxl", "tts"]
    assert {m.switch_strategy for m in d.models.values()} == {"checkpoint"}
    assert all(m.sleep_api is None for m in d.models.values())  # the SDXL server's own sleep API is off
    assert d.models["llm"].env["SLEEP_PIN"] == "0"  # nothing pinned at load for a sleep that never comes
    assert d.host_memory_budget_mib == sum(m.host_memory_asleep_mib for m in d.models.values())
    assert d.models["llm"].host_memory_asleep_mib > (d.models["llm"].vram_mib or 0)  # the driver's copy: about 1.1x


def test_the_sleep_config_is_unchanged_by_the_third_model() -> None:
    d = parse_config(warm_proof.config(plan(), "sleep"), "warm-proof").gpus[0]
    assert sorted(d.models) == ["llm", "sdxl"] and d.host_memory_budget_mib is None
    assert {m.switch_strategy for m in d.models.values()} == {"sleep"}


def test_timed_steps_pair_each_begin_with_its_end() -> None:
    progress = [
        {"step": "sleeping", "model": "llm", "time": 10.0},
        {"step": "asleep", "model": "llm", "time": 16.0},
        {"step": "waking", "model": "sdxl", "time": 16.5},
        {"step": "awake", "model": "sdxl", "time": 20.5},
        {"step": "sleeping", "model": "sdxl", "time": 30.0},
        {"step": "SleepFallback", "model": "sdxl", "time": 31.0},  # a fall-back is no timed step
        {"step": "stopping", "model": "sdxl", "time": 31.0},
        {"step": "stopped", "model": "sdxl", "time": 32.0},
        {"step": "starting", "model": "tts", "time": 33.0},
        {"step": "healthy", "model": "tts", "time": 40.0},
    ]
    got = warm_proof.step_times(progress)
    assert got == {"llm": {"away": [6.0]}, "sdxl": {"back": [4.0], "stop": [1.0]}, "tts": {"start": [7.0]}}


def test_the_driver_seconds_are_read_from_vramctls_own_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    cu = FakeCu(processes={4101: S.CU_PROCESS_STATE_RUNNING})
    gpu = FakeCudaGpu(cu, lambda: {4101: ("llm", 10240)})
    driver, availability = open_driver(cu, "fake")
    sl = CheckpointSleeper(driver, availability, gpu.snapshot, available_mib=lambda: None)
    d = DeploymentSpec.model_validate(
        {"gpu": 0, "models": {"llm": {"command": ["x"], "switchStrategy": "checkpoint", "sleep": {"hostMemoryMiB": 12000}}}}
    )
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")  # vramctl up's format
    with caplog.at_level(logging.INFO, logger="vramctl.runtimes.checkpoint"):
        sl.sleep(d, "llm")
        sl.wake(d, "llm")
    log = "\n".join(fmt.format(r) for r in caplog.records)
    got = warm_proof.driver_times(log)["llm"]
    assert got["gpu_mib"] == 10240 and len(got["away_s"]) == 1 and len(got["back_s"]) == 1
    assert got["away_s_per_gib"] == pytest.approx(got["away_s"][0] / 10)
