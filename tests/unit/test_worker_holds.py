"""Holds and the demand queue on the real worker (its loop thread, the
recording fake runtime): a hold switches the GPU and is answered once the
model is healthy; a switch away waits for live holds (drain); a client that
goes away while queued causes no switch; the queue shows in /status."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.clock import ManualClock, until, until_async
from tests.support.fakes import FakeGpu, FakeRuntime
from tests.support.workers import loading, queued, start, wait_for
from tests.support.workers import three_heavy as spec
from vramctl.demand.desk import InboxHolder, Refused
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING


def start_on(clock: ManualClock, d: DeploymentSpec) -> tuple[GpuWorker, FakeRuntime, InboxHolder]:
    """``start`` on a clock the test moves: the queue's timers (serving window,
    drain, idle) pass in no real time."""
    rt = FakeRuntime(states={"llm": RUN})
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.01, baseline_mib=0, resync_s=1), clock=clock)
    w.start()
    assert wait_for(lambda: w.status()["phase"] == "Ready")
    return w, rt, InboxHolder(lambda _gpu, cmd: w.post(cmd), gpu_of=lambda _m: "0", clock=w.clock)


def test_a_hold_switches_and_is_granted_once_the_model_is_healthy() -> None:
    w, rt, holder = start(queued())

    async def go() -> None:
        g = await asyncio.wait_for(holder.demand("sdxl", ttl_seconds=30), 5)
        assert g.model == "sdxl"
        assert rt.states.get("sdxl") is RUN and rt.states.get("llm") is not RUN  # healthy and alone when granted
        assert w.status()["queue"]["holds"] == {"sdxl": 1}
        assert holder.release(g.id)

    try:
        asyncio.run(go())
        assert wait_for(lambda: w.status()["queue"]["holds"] == {})
        assert [p["message"] for p in w.progress() if p["step"] == "requested"][-1].endswith("(queue)")
    finally:
        w.stop()


def test_a_switch_away_waits_for_a_live_hold_then_the_drain_timeout() -> None:
    clock = ManualClock()
    w, rt, holder = start_on(clock, queued(maxServeSeconds=3, drainTimeoutSeconds=1))

    async def go() -> None:
        g = await asyncio.wait_for(holder.demand("llm", ttl_seconds=30), 5)
        t0 = clock()
        other = asyncio.ensure_future(holder.demand("sdxl", ttl_seconds=30))
        assert await until_async(lambda: w.status()["queue"]["queueDepth"] == 1, clock, w, step=0.0)  # posted
        clock.advance(0.5)
        w.poke()
        await asyncio.sleep(0.05)
        assert not other.done() and ("start", "sdxl") not in rt.calls  # no switch while the llm hold is live
        assert await until_async(other.done, clock, w, step=0.05)
        g2 = other.result()
        waited = clock() - t0
        assert g2.model == "sdxl" and waited >= 0.9  # the drain ran its course (drainTimeoutSeconds 1)
        assert await holder.renew(g.id) == "revoked"  # the llm holder learns its hold ended: 409

    try:
        asyncio.run(go())
    finally:
        w.stop()


def test_a_client_gone_while_queued_causes_no_switch() -> None:
    clock = ManualClock()
    w, rt, holder = start_on(clock, queued(maxServeSeconds=30, drainTimeoutSeconds=30))

    async def go() -> None:
        g = await asyncio.wait_for(holder.demand("llm", ttl_seconds=30), 5)
        t0 = clock()
        waiting = asyncio.ensure_future(holder.demand("sdxl", ttl_seconds=30))
        assert await until_async(lambda: w.status()["queue"]["queueDepth"] == 1, clock, w, step=0.0)
        waiting.cancel()  # the client closed its connection
        with pytest.raises(asyncio.CancelledError):
            await waiting
        holder.release(g.id)
        # Past the serving window and the drain (30 s + 30 s): still no switch.
        assert not await until_async(lambda: ("start", "sdxl") in rt.calls, clock, w, step=2.0, timeout=0.3)
        assert clock() - t0 > 60

    try:
        asyncio.run(go())
        assert ("start", "sdxl") not in rt.calls
        assert w.status()["queue"]["queueDepth"] == 0 and w.desired.active == "llm"
    finally:
        w.stop()


def test_a_full_queue_answers_503_with_retry_after() -> None:
    w, _, holder = start(queued(maxQueue=1, maxServeSeconds=30, drainTimeoutSeconds=30))

    async def go() -> None:
        await asyncio.wait_for(holder.demand("llm", ttl_seconds=30), 5)
        first = asyncio.ensure_future(holder.demand("sdxl", ttl_seconds=30))
        await asyncio.sleep(0.2)
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(holder.demand("img", ttl_seconds=30), 5)
        assert refused.value.status == 503 and refused.value.retry_after
        first.cancel()

    try:
        asyncio.run(go())
    finally:
        w.stop()


def test_idle_returns_to_the_default_model_and_free_frees_the_gpu() -> None:
    d = spec()
    base = d.model_dump(by_alias=True, exclude_none=True)
    clock = ManualClock()
    w, rt, holder = start_on(
        clock, DeploymentSpec.model_validate({**base, "idle": {"afterSeconds": 0.5, "action": "default", "defaultModel": "llm"}})
    )

    async def go() -> None:
        g = await asyncio.wait_for(holder.demand("sdxl", ttl_seconds=30), 5)
        holder.release(g.id)

    try:
        asyncio.run(go())
        assert w.desired.active == "sdxl"
        t0 = clock()
        assert until(lambda: w.desired.active == "llm" and w.status()["phase"] == "Ready", clock, w, step=0.05)
        assert clock() - t0 >= 0.5  # quiet for 0.5 s: back to llm
        assert rt.states.get("llm") is RUN and rt.states.get("sdxl") is not RUN
    finally:
        w.stop()
    clock2 = ManualClock()
    w2, rt2, _ = start_on(clock2, DeploymentSpec.model_validate({**base, "idle": {"afterSeconds": 0.5, "action": "free"}}))
    try:
        assert until(lambda: w2.desired.active is None and w2.status()["phase"] == "Idle", clock2, w2, step=0.05)
        assert not any(s is RUN for s in rt2.states.values())
    finally:
        w2.stop()


def test_a_grant_is_answered_only_once_status_shows_it() -> None:
    """The answer goes out after the publish: a client that got its hold finds
    it in /status at once (repeated: the loop's timing varies)."""
    w, _, holder = start(queued())

    async def go() -> None:
        for _ in range(40):
            g = await asyncio.wait_for(holder.demand("llm", ttl_seconds=30), 5)
            assert w.status()["queue"]["holds"] == {"llm": 1}
            assert holder.release(g.id)
            assert wait_for(lambda: w.status()["queue"]["holds"] == {})

    try:
        asyncio.run(go())
    finally:
        w.stop()


def test_clients_still_waiting_when_the_worker_stops_are_answered_503_at_once() -> None:
    w, _, holder = start(queued(maxServeSeconds=30, drainTimeoutSeconds=30, queueTimeoutSeconds=60))

    async def go() -> None:
        await asyncio.wait_for(holder.demand("llm", ttl_seconds=30), 5)
        waiting = asyncio.ensure_future(holder.demand("sdxl", ttl_seconds=30))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, w.stop)
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(waiting, 2)
        assert refused.value.status == 503 and "stopped" in refused.value.message
        assert time.monotonic() - t0 < 2

    asyncio.run(go())


def test_a_hold_on_the_desired_model_waits_until_it_is_healthy_at_start_up() -> None:
    """Right after start-up the desired model may still be loading: a hold
    (a gateway request) on it is granted only once it is healthy, not
    proxied to a server that does not listen yet."""
    d = queued()
    w, rt, holder = loading(d)

    async def go() -> None:
        pending = asyncio.ensure_future(holder.demand("llm", ttl_seconds=30))
        await asyncio.sleep(0.1)  # posted
        assert wait_for(lambda: rt.states.get("llm") is RUN and w.status()["queue"]["queueDepth"] == 1)
        await asyncio.sleep(0.3)
        assert not pending.done()  # started, not healthy: no grant
        rt.never_healthy.clear()
        g = await asyncio.wait_for(pending, 5)
        assert g.model == "llm" and w.status()["phase"] == "Ready"

    try:
        asyncio.run(go())
    finally:
        w.stop()


def test_a_switch_superseded_by_another_source_is_not_a_failure_its_demands_keep_their_turn() -> None:
    """The queue's switch (here the start-up one, to llm) is overtaken by a
    request from elsewhere (sdxl): the hold waiting for llm is not refused;
    once sdxl runs, the queue brings llm back for it."""
    d = queued(maxServeSeconds=0.5, drainTimeoutSeconds=0.2)
    w, rt, holder = loading(d)

    async def go() -> None:
        pending = asyncio.ensure_future(holder.demand("llm", ttl_seconds=30))
        await asyncio.sleep(0.1)  # posted
        assert wait_for(lambda: rt.states.get("llm") is RUN and w.status()["queue"]["queueDepth"] == 1)
        w.request("sdxl", source="api")  # overtakes the start-up switch
        assert wait_for(lambda: any(p["step"] == "healthy" and "sdxl" in p["message"] for p in w.progress()))
        rt.never_healthy.clear()
        g = await asyncio.wait_for(pending, 10)  # not a 503: llm came back for it
        assert g.model == "llm" and w.desired.active == "llm"
        assert [p["message"] for p in w.progress() if p["step"] == "requested"][-1].endswith("(queue)")

    try:
        asyncio.run(go())
    finally:
        w.stop()
