"""``sleep.prewarm``: once a model is ready and nothing waits, it sleeps and
wakes once, so that the first warm switch a user waits for only copies;
never while a demand waits (then later, once the queue is quiet). Through the
real worker on recording fakes (FakeSleeper), on a clock the test moves."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.clock import ManualClock, until
from tests.support.fakes import FakeGpu, FakeRuntime, FakeSleeper
from vramctl.demand.desk import InboxHolder
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING


def sleepy(port: int, prewarm: bool = True) -> dict[str, Any]:
    return {
        "image": "i",
        "vramMiB": 7000,
        "startTimeoutSeconds": 5,
        "health": {"port": port, "path": "/health"},
        "switchStrategy": "sleep",
        "sleep": {"level": 2, "maxResidueMiB": 800, "path": "/sleep", "wakePath": "/wake_up", "prewarm": prewarm},
    }


def spec(**fields: Any) -> DeploymentSpec:
    return DeploymentSpec.model_validate(
        {"gpu": 0, "activeModel": "llm", "models": {"llm": sleepy(19051), "sdxl": sleepy(19052, prewarm=False)}, **fields}
    )


def worker(d: DeploymentSpec, rt: FakeRuntime, clock: ManualClock) -> GpuWorker:
    s = WorkerSettings(poll_interval_s=0.01, baseline_mib=0, resync_s=1)
    return GpuWorker(d, rt, FakeGpu(rt, d), s, sleeper=FakeSleeper(rt), clock=clock, sleep=clock.sleep)


def warm_calls(rt: FakeRuntime, model: str) -> list[str]:
    return [c for c, m in rt.calls if m == model and c in ("sleep", "wake", "stop", "start")]


def test_a_ready_model_sleeps_and_wakes_once_while_nothing_waits() -> None:
    rt = FakeRuntime()
    clock = ManualClock()
    w = worker(spec(), rt, clock)
    w.reconcile_once()
    assert warm_calls(rt, "llm") == ["start", "sleep", "wake"]  # prewarmed after its first ready
    steps = [(p["step"], p.get("model")) for p in w.progress()]
    assert steps.index(("healthy", "llm")) < steps.index(("prewarm", "llm")) < steps.index(("sleeping", "llm"))
    assert steps.index(("waking", "llm")) < steps.index(("awake", "llm"))
    assert w.status()["phase"] == "Ready" and w.model_states()["llm"] == "running"
    # Once: later looks, a switch away (a sleep, as always) and back (a wake) add no cycle of their own.
    w.reconcile_once()
    w.request("sdxl", ())
    w.reconcile_once()
    w.request("llm", ())
    w.reconcile_once()
    assert warm_calls(rt, "llm") == ["start", "sleep", "wake", "sleep", "wake"]
    assert warm_calls(rt, "sdxl") == ["start", "sleep"]  # no prewarm asked


def test_never_while_a_demand_waits_then_once_the_queue_is_quiet() -> None:
    rt = FakeRuntime()
    clock = ManualClock()
    d = spec(activeModel=None, switching={"mode": "onDemand"})
    w = worker(d, rt, clock)
    holder = InboxHolder(lambda _gpu, cmd: w.post(cmd), gpu_of=lambda _m: "0", clock=w.clock)
    w.start()

    async def go() -> None:
        g = await asyncio.wait_for(holder.demand("llm", ttl_seconds=3600), 5)  # waits for llm's start
        # Granted without a cycle in between: the demand waited when llm became ready.
        assert warm_calls(rt, "llm") == ["start"]
        # Held: still no cycle, at any later look.
        assert not until(lambda: "sleep" in warm_calls(rt, "llm"), clock, w, step=0.5, timeout=0.5)
        assert holder.release(g.id)

    try:
        asyncio.run(go())
        # Quiet now: the cycle runs at the next settled look, and the GPU is served again after it.
        assert until(lambda: warm_calls(rt, "llm") == ["start", "sleep", "wake"] and w.status()["phase"] == "Ready", clock, w, step=0.5)
        assert w.status()["queue"]["active"] == "llm"

        async def again() -> None:
            g = await asyncio.wait_for(holder.demand("llm", ttl_seconds=30), 5)
            assert holder.release(g.id)

        asyncio.run(again())
        assert warm_calls(rt, "llm") == ["start", "sleep", "wake"]
    finally:
        w.stop()


def test_an_auto_model_whose_sleep_would_not_fit_is_not_prewarmed() -> None:
    auto = {
        **sleepy(19053),
        "switchStrategy": "auto",
        "sleep": {"level": 1, "hostMemoryMiB": 14000, "path": "/sleep", "wakePath": "/wake_up", "prewarm": True},
    }
    d = DeploymentSpec.model_validate({"gpu": 0, "activeModel": "llm", "models": {"llm": auto}})
    for ceiling, calls in ((768, ["start"]), (None, ["start", "sleep", "wake"])):  # WSL2's pinned memory: it would be stopped
        rt, clock = FakeRuntime(), ManualClock()
        s = WorkerSettings(poll_interval_s=0.01, baseline_mib=0, resync_s=1, pinned_ceiling_mib=ceiling)
        w = GpuWorker(d, rt, FakeGpu(rt, d), s, sleeper=FakeSleeper(rt), clock=clock, sleep=clock.sleep)
        for _ in range(3):  # a real cold start (the test's own is measured at 0 s on its clock)
            w.reporter.costs.record("llm", "start", 30.0)
        w.reconcile_once()
        assert warm_calls(rt, "llm") == calls, ceiling
