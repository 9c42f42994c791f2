"""The default host-memory budget for sleeping models (MemAvailable at start
minus a margin) is applied where no ``hostMemoryBudgetMiB`` is set: read once
when the worker's settings are made, enforced by the planner's eviction
(level-1 sleepers whose host buffers do not fit are stopped, least recently
used first), and shown in the status with its arithmetic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.fakes import FakeGpu, FakeRuntime, FakeSleeper
from vramctl.host.memory import parse_meminfo, read_host_memory
from vramctl.observed import WorkloadState
from vramctl.spec.models import Config, DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING
# 64000 MiB total, 30000 available: margin 6400, default budget 23600 MiB.
MEMINFO = "MemTotal: 65536000 kB\nMemFree: 1000 kB\nMemAvailable: 30720000 kB\n"


def sleepy(port: int) -> dict[str, Any]:
    return {
        "image": "i",
        "vramMiB": 6000,
        "startTimeoutSeconds": 1,
        "health": {"port": port, "path": "/health"},
        "switchStrategy": "sleep",
        "sleep": {
            "level": 1,
            "hostMemoryMiB": 10000,
            "maxResidueMiB": 800,
            "path": "/sleep",
            "wakePath": "/wake_up",
            "statePath": "/is_sleeping",
        },
    }


def spec(**fields: Any) -> DeploymentSpec:
    return DeploymentSpec.model_validate(
        {"gpu": 0, "activeModel": "a", "models": {m: sleepy(19030 + i) for i, m in enumerate("abcd")}, **fields}
    )


def rig(d: DeploymentSpec, rt: FakeRuntime, settings: WorkerSettings) -> GpuWorker:
    w = GpuWorker(d, rt, FakeGpu(rt, d), settings)
    w.actuator.sleeper = FakeSleeper(rt)
    return w


def settings(meminfo: str | None) -> WorkerSettings:
    reading = parse_meminfo(meminfo) if meminfo is not None else None
    return WorkerSettings(poll_interval_s=0.01, memory_timeout_s=5, backoff_initial_s=30, baseline_mib=0, host_memory=reading)


def switch(w: GpuWorker, model: str) -> None:
    w.request(model, ())
    w.reconcile_once()


def test_the_settings_read_the_default_budget_at_start(tmp_path: Path) -> None:
    config = Config.model_validate({"gpus": [{"gpu": 0, "models": {"a": {"image": "i", "vramMiB": 1}}}]})
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    s = WorkerSettings.from_config(config, meminfo)
    assert s.host_memory is not None and s.host_memory.budget_mib == 23600
    assert WorkerSettings.from_config(config, tmp_path / "absent").host_memory is None  # unknown: unbounded, as before
    real = WorkerSettings.from_config(config).host_memory  # the machine's own /proc/meminfo
    assert real is not None and real.total_mib == read_host_memory().total_mib  # type: ignore[union-attr]


def test_without_host_memory_budget_the_default_evicts_the_least_recently_used_sleeper() -> None:
    rt = FakeRuntime(states={"a": RUN}, residue={m: 500 for m in "abcd"})
    w = rig(spec(), rt, settings(MEMINFO))
    for m in "abcd":  # equally costly to bring back cold: among equals the least recently used goes
        for _ in range(3):
            w.reporter.costs.record(m, "start", 20.0)
    w.reconcile_once()
    switch(w, "b")  # a asleep: 10000 MiB of host memory
    switch(w, "c")  # a and b asleep: 20000 <= 23600
    assert ("stop", "a") not in rt.calls
    switch(w, "d")  # a, b and c asleep: 30000 > 23600: a (least recently used) goes
    assert ("stop", "a") in rt.calls and ("stop", "b") not in rt.calls
    assert any("host memory 30000 MiB is over the host memory budget 23600 MiB" in p["message"] for p in w.progress())
    assert w.model_states()["a"] == "stopped" and w.model_states()["b"] == "asleep"
    budget = w.status()["hostMemoryBudget"]
    assert budget["mib"] == 23600
    assert budget["source"] == "default: MemAvailable 30000 MiB - margin 6400 MiB (10% of MemTotal 64000 MiB, at least 2048) = 23600 MiB"


def test_hostmemorybudgetmib_wins_over_the_default() -> None:
    rt = FakeRuntime(states={"a": RUN}, residue={m: 500 for m in "abcd"})
    w = rig(spec(hostMemoryBudgetMiB=40000), rt, settings(MEMINFO))
    w.reconcile_once()
    for m in "bcd":
        switch(w, m)
    assert not any(c[0] == "stop" for c in rt.calls)  # 30000 <= 40000
    assert w.status()["hostMemoryBudget"] == {"mib": 40000, "source": "hostMemoryBudgetMiB"}


def test_an_unknown_host_memory_leaves_the_sleepers_unbounded_and_says_so() -> None:
    rt = FakeRuntime(states={"a": RUN}, residue={m: 500 for m in "abcd"})
    w = rig(spec(), rt, settings(None))
    w.reconcile_once()
    for m in "bcd":
        switch(w, m)
    assert not any(c[0] == "stop" for c in rt.calls)
    assert w.status()["hostMemoryBudget"] == {"mib": None, "source": "unknown: /proc/meminfo unreadable; set hostMemoryBudgetMiB"}
