"""switchStrategy checkpoint through the real worker and the process runtime:
stand-in model processes, the fake driver (tests.support.fake_cuda) in
place of cuda-bindings, a GPU probe whose NVML list follows the driver.

A switch away checkpoints the old model's process and leaves it alive (the
same pid comes back on the switch back, never restarted); each fall-back
(lock timeout, checkpoint failure, memory not released, restore failure, a
restored process that does not come back, health failing after the
restore, maxCycles) ends in a cold stop of that model with its
SleepFallback reason, and never two models on the GPU."""

from __future__ import annotations

import contextlib
import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.support.fake_cuda import CUresult, FakeCu, FakeCudaGpu, S
from tests.support.live_up import standin
from tests.support.ports import free_port
from vramctl.reconcile.warm import HttpSleeper
from vramctl.runtimes.checkpoint import StrategySleeper, open_driver
from vramctl.runtimes.process import ProcessRuntime
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings

VRAM = 7000


def model(port: int, **extra: Any) -> dict[str, Any]:
    sleep = {"hostMemoryMiB": 8000, **extra.pop("sleep", {})}
    m = standin(port, vram=VRAM, **extra.pop("env", {}))
    m |= {"switchStrategy": "checkpoint", "sleep": sleep, "startTimeoutSeconds": 3, **extra}
    return m


@dataclass
class Rig:
    worker: GpuWorker
    cu: FakeCu
    gpu: FakeCudaGpu
    runtime: ProcessRuntime
    spec: DeploymentSpec
    ports: dict[str, int]
    most_listed: int = 0  # the most models NVML listed at once

    def switch(self, to: str) -> None:
        self.worker.request(to, ())
        self.worker.reconcile_once()

    def pid(self, m: str) -> int | None:
        pids = [int(k) for k, v in self.runtime.owners(self.spec).items() if v == m]
        return pids[0] if pids else None

    def states(self) -> dict[str, str]:
        return dict(self.worker.model_states())

    def fallbacks(self) -> list[tuple[str | None, str]]:
        return [(p.get("model"), p["message"]) for p in self.worker.progress() if p["step"] == "SleepFallback"]


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    rigs: list[Rig] = []

    def build(llm: dict[str, Any] | None = None, sdxl: dict[str, Any] | None = None) -> Rig:
        ports = {"llm": free_port(), "sdxl": free_port()}
        d = DeploymentSpec.model_validate(
            {
                "gpu": 0,
                "activeModel": "llm",
                "models": {"llm": model(ports["llm"], **(llm or {})), "sdxl": model(ports["sdxl"], **(sdxl or {}))},
            }
        )
        rt = ProcessRuntime(tmp_path / "state", instance=f"cp-{uuid.uuid4().hex[:8]}")
        cu = FakeCu()
        rig: Rig

        def holders() -> dict[int, tuple[str, int]]:
            out = {int(k): (m, VRAM) for k, m in rt.owners(d).items()}
            for pid in out:
                cu.processes.setdefault(pid, S.CU_PROCESS_STATE_RUNNING)  # a new model process has its CUDA context
            listed = {m for pid, (m, _) in out.items() if cu.processes[pid] is not S.CU_PROCESS_STATE_CHECKPOINTED}
            rig.most_listed = max(rig.most_listed, len(listed))
            return out

        gpu = FakeCudaGpu(cu, holders, total_mib=16000)
        settings = WorkerSettings(poll_interval_s=0.02, memory_timeout_s=5, backoff_initial_s=30, resync_s=5, baseline_mib=0)
        w = GpuWorker(d, rt, gpu, settings, metrics=Metrics(CollectorRegistry()))
        w.actuator.sleeper = StrategySleeper(HttpSleeper(), gpu.snapshot, rt.owners, load=lambda: open_driver(cu, "fake-bindings"))
        rig = Rig(w, cu, gpu, rt, d, ports)
        rigs.append(rig)
        w.reconcile_once()
        assert rig.states()["llm"] == "running", rig.worker.progress()
        return rig

    yield build
    for r in rigs:
        for m in r.spec.models:
            with contextlib.suppress(Exception):
                r.runtime.remove(r.spec, m)
        r.runtime.close()


def test_a_switch_away_and_back_by_checkpoint(make: Any) -> None:
    r: Rig = make()
    llm = r.pid("llm")
    assert llm is not None
    r.switch("sdxl")
    assert r.states() == {"llm": "asleep", "sdxl": "running"}
    assert ("lock", llm) in r.cu.calls and ("checkpoint", llm) in r.cu.calls
    assert r.cu.processes[llm] is S.CU_PROCESS_STATE_CHECKPOINTED
    assert alive(llm)  # suspended, not stopped
    sdxl = r.pid("sdxl")
    assert sdxl is not None
    r.switch("llm")
    assert r.states() == {"llm": "running", "sdxl": "asleep"}
    assert r.pid("llm") == llm  # the same process: nothing reloaded
    assert r.cu.processes[llm] is S.CU_PROCESS_STATE_RUNNING and r.cu.processes[sdxl] is S.CU_PROCESS_STATE_CHECKPOINTED
    assert [c for c, pid in r.cu.calls if pid == llm] == ["lock", "checkpoint", "restore", "unlock"]
    steps = [(p["step"], p.get("model")) for p in r.worker.progress()]
    for step in [("sleeping", "llm"), ("asleep", "llm"), ("waking", "llm"), ("awake", "llm"), ("asleep", "sdxl")]:
        assert step in steps, steps
    assert r.fallbacks() == []
    assert r.worker.status()["asleepModels"] == ["sdxl"]
    assert r.worker.status()["asleepModes"] == {"sdxl": "checkpoint"}
    assert r.most_listed == 1


def _break_health_after_wake(r: Rig) -> None:
    # The stand-in with STANDIN_WAKE_BROKEN answers 503 on /health for good after a
    # sleep and a wake of its own API (the fake driver leaves its HTTP thread running):
    # the restore then comes back to a server that is not healthy.
    for path in ("/sleep?level=1", "/wake_up"):
        req = urllib.request.Request(f"http://127.0.0.1:{r.ports['llm']}{path}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            json.loads(resp.read() or b"{}")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("lock", "SleepTimeout"),
        ("checkpoint", "SleepFailed"),
        ("refused", "CheckpointRefused"),
        ("not-released", "ResidueOverLimit"),
        ("restore", "WakeFailed"),
        ("not-back", "WakeFailed"),
        ("unhealthy", "WakeFailed"),
        ("cycles", "MaxCycles"),
    ],
)
def test_each_fall_back_ends_in_a_cold_stop(make: Any, case: str, reason: str) -> None:
    llm_extra: dict[str, Any] = {}
    if case == "unhealthy":
        llm_extra = {"env": {"STANDIN_WAKE_BROKEN": "1"}}
    if case == "cycles":
        llm_extra = {"sleep": {"maxCycles": 1}}
    r: Rig = make(llm=llm_extra)
    llm = r.pid("llm")
    away = case in ("lock", "checkpoint", "refused", "not-released")
    if case == "lock":
        r.cu.fail["lock"] = CUresult.CUDA_ERROR_TIMEOUT
    elif case == "checkpoint":
        r.cu.fail["checkpoint"] = CUresult.CUDA_ERROR_UNKNOWN
    elif case == "refused":
        r.cu.fail["checkpoint"] = CUresult.CUDA_ERROR_NOT_SUPPORTED  # IPC or managed memory
    elif case == "not-released":
        assert llm is not None
        r.gpu.keep_listed = {llm}
    r.switch("sdxl")
    if away:
        assert r.states()["sdxl"] == "running"
        assert r.states()["llm"] in ("stopped", "absent")
        assert not alive(llm)
        assert any(m == "llm" and reason in msg for m, msg in r.fallbacks()), r.fallbacks()
        assert r.most_listed == 1 or case == "not-released"  # the one not released stays listed until its stop
        return
    assert r.states()["llm"] == "asleep"
    if case == "restore":
        r.cu.fail["restore"] = CUresult.CUDA_ERROR_UNKNOWN
    elif case == "not-back":
        assert llm is not None
        r.gpu.hide = {llm}
    elif case == "unhealthy":
        _break_health_after_wake(r)
    elif case == "cycles":
        r.switch("llm")  # the one cycle allowed
        r.switch("sdxl")  # a second checkpoint is over maxCycles: stopped instead
        assert r.states() == {"llm": "stopped", "sdxl": "running"} or r.states()["llm"] == "absent"
        assert not alive(llm)
        assert any(m == "llm" and reason in msg for m, msg in r.fallbacks()), r.fallbacks()
        assert r.most_listed == 1
        return
    r.switch("llm")
    r.cu.fail.clear()
    r.gpu.hide = set()
    r.worker.reconcile_once()
    assert any(m == "llm" and reason in msg for m, msg in r.fallbacks()), [
        (p["step"], p.get("model"), p["message"]) for p in r.worker.progress()
    ]
    assert not alive(llm)  # the suspended process was stopped...
    assert r.states()["llm"] == "running" and r.pid("llm") != llm  # ...and llm started cold
    assert r.states()["sdxl"] == "asleep"
