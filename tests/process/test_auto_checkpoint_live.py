"""switchStrategy auto with ``sleep.checkpoint`` through the real worker and
the process runtime: stand-in model processes with a sleep API, the fake
driver (tests.support.fake_cuda) in place of cuda-bindings, a GPU probe
whose NVML list follows the driver, and a pinned-memory ceiling under the
level-1 copies (so a sleep never fits and the choice is checkpoint or stop).

The cost book starts with the H100's figures (benchmarks/results/
warm_proof-checkpoint-h100.json): ``sdxl`` starts cold in 14.7 s and round
trips by checkpoint in 6.7 s, so auto checkpoints it (the same process comes
back); ``llm`` starts in 3.8 s, cheaper than its 12.8 s checkpoint round
trip, so auto stops it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.support.fake_cuda import FakeCu, FakeCudaGpu, S
from tests.support.live_up import standin
from tests.support.ports import free_port
from tests.support.warm_live import SLEEP_API
from vramctl.reconcile.warm import HttpSleeper
from vramctl.runtimes.checkpoint import StrategySleeper, open_driver
from vramctl.runtimes.process import ProcessRuntime
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings

VRAM = 7000
H100 = {
    "sdxl": {"start": 14.7, "stop": 0.3, "checkpoint": 4.9, "restore": 1.8},
    "llm": {"start": 3.8, "stop": 0.6, "checkpoint": 9.1, "restore": 3.7},
}


def auto(port: int) -> dict[str, Any]:
    m = standin(port, vram=VRAM, STANDIN_SLEEP_SECONDS="0.05", STANDIN_WAKE_SECONDS="0.05")
    sleep = {"level": 1, "hostMemoryMiB": 6000, "checkpoint": True, **SLEEP_API}
    return m | {"switchStrategy": "auto", "sleep": sleep, "startTimeoutSeconds": 5}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[GpuWorker, FakeCu, ProcessRuntime, DeploymentSpec]]:
    d = DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "sdxl",
            "pinnedMemoryCeilingMiB": 512,  # no level-1 copy fits: checkpoint or stop
            "models": {"llm": auto(free_port()), "sdxl": auto(free_port())},
        }
    )
    rt = ProcessRuntime(tmp_path / "state", instance=f"ac-{uuid.uuid4().hex[:8]}")
    cu = FakeCu()

    def holders() -> dict[int, tuple[str, int]]:
        out = {int(k): (m, VRAM) for k, m in rt.owners(d).items()}
        for pid in out:
            cu.processes.setdefault(pid, S.CU_PROCESS_STATE_RUNNING)
        return out

    gpu = FakeCudaGpu(cu, holders, total_mib=16000)
    settings = WorkerSettings(poll_interval_s=0.02, memory_timeout_s=5, backoff_initial_s=30, resync_s=5, baseline_mib=0)
    costs = {m: {p: {"recent": [s] * 5} for p, s in paths.items()} for m, paths in H100.items()}
    w = GpuWorker(d, rt, gpu, settings, metrics=Metrics(CollectorRegistry()), costs=costs)
    w.actuator.sleeper = StrategySleeper(HttpSleeper(), gpu.snapshot, rt.owners, load=lambda: open_driver(cu, "fake-bindings"))
    try:
        w.reconcile_once()
        yield w, cu, rt, d
    finally:
        for m in d.models:
            with contextlib.suppress(Exception):
                rt.remove(d, m)
        rt.close()


def pid_of(rt: ProcessRuntime, d: DeploymentSpec, model: str) -> int | None:
    pids = [int(k) for k, v in rt.owners(d).items() if v == model]
    return pids[0] if pids else None


def ways(w: GpuWorker, model: str) -> list[str]:
    return [p["message"] for p in w.progress() if p["step"] == "way" and p.get("model") == model]


def test_auto_checkpoints_the_costly_cold_start_and_stops_the_cheap_one(rig: Any) -> None:
    w, cu, rt, d = rig
    assert dict(w.model_states())["sdxl"] == "running", w.progress()
    sdxl = pid_of(rt, d, "sdxl")
    assert sdxl is not None

    w.request("llm", ())
    w.reconcile_once()
    assert dict(w.model_states()) == {"sdxl": "asleep", "llm": "running"}, w.progress()
    assert cu.processes[sdxl] is S.CU_PROCESS_STATE_CHECKPOINTED and ("checkpoint", sdxl) in cu.calls
    [said] = ways(w, "sdxl")
    assert said.startswith("'sdxl' goes away by checkpoint: 6.7 s away and back (against stop 15.0 s)"), said
    assert "sleep does not fit (6000 MiB of pinned memory, over the ceiling of 512 MiB)" in said
    assert w.status()["asleepModes"] == {"sdxl": "checkpoint"}

    w.request("sdxl", ())
    w.reconcile_once()
    states = dict(w.model_states())
    assert states["sdxl"] == "running" and states.get("llm", "absent") in ("stopped", "absent"), w.progress()
    assert pid_of(rt, d, "sdxl") == sdxl and cu.processes[sdxl] is S.CU_PROCESS_STATE_RUNNING  # restored, not restarted
    [said] = ways(w, "llm")
    assert said.startswith("'llm' goes away by stop: 4.4 s away and back (against checkpoint 12.8 s)"), said
    assert not [c for c in cu.calls if c[0] == "lock" and c[1] != sdxl]  # llm never checkpointed
    # The switch measured the checkpoint and the restore under sdxl's checkpoint paths (six samples each now).
    costs = w.status()["costs"]["sdxl"]
    assert len(costs["checkpoint"]["recent"]) == 6 and len(costs["restore"]["recent"]) == 6
    assert "recent" not in costs["sleep-l1"]  # never booked as a sleep
    assert not [p for p in w.progress() if p["step"] == "SleepFallback"]
