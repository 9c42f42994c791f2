"""The fast lane: gateway requests for the served model admitted without a
round trip through the worker's inbox, and still counted by every decision.

Pure parts (``demand_queue.lane_models`` / ``lane_activity``), the lane on
its own, and the lane on the real worker (loop thread, recording fake
runtime): a switch drains the lane's requests like holds, a queued demand
closes the lane, the lane's use restarts the idle clock, and nothing is
admitted before the model is healthy or after the worker stopped."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from tests.support.workers import loading, queued, start, wait_for
from tests.support.workers import three_heavy as spec
from vramctl.demand import policy as dq
from vramctl.demand.lane import FastLane
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec

RUN = WorkloadState.RUNNING
POL = dq.QueuePolicy(max_queue=8, queue_timeout_seconds=100, max_serve_seconds=10, drain_timeout_seconds=4)


# -- pure ---------------------------------------------------------------------------


def served(**kw: object) -> dq.QueueState:
    return replace(dq.QueueState(policy=POL, active="llm", active_companions=("tts",), light=frozenset({"tts"})), **kw)  # type: ignore[arg-type]


def test_the_lane_admits_the_served_models_only_while_nothing_waits_switches_or_drains() -> None:
    assert dq.lane_models(served()) == {"llm", "tts"}
    waiting = dq.Demand("d", "sdxl", 1.0)
    for blocked in (
        served(active=None, active_companions=()),
        served(demands=(waiting,)),
        served(demands=(replace(waiting, model="llm"),)),  # even a waiting demand for llm: the queue orders it
        served(switching_to=dq.Target("sdxl")),
        served(drain_since=3.0),
        served(companions_pending=("tts", "asr")),
    ):
        assert dq.lane_models(blocked) == frozenset()


def test_requests_in_flight_become_one_hold_per_model_and_a_switch_drains_them() -> None:
    s = dq.lane_activity(served(), {"llm": 3, "tts": 0, "sdxl": 2}, last_used=None, now=5.0)
    assert [(h.id, h.model, h.expires) for h in s.holds] == [("lane:llm", "llm", None)]  # sdxl is not served: not counted
    assert s.last_activity == 5.0
    s = dq.add_demand(s, dq.Demand("d", "sdxl", 5.0))
    s, d = dq.step(s, 5.0 + POL.max_serve_seconds - POL.drain_timeout_seconds)  # the window is over: drain
    assert d.switch_to is None and d.drain is not None and d.drain.holds == ("lane:llm",)
    s = dq.lane_activity(s, {"llm": 1}, last_used=11.5, now=12.0)  # still one in flight: still held, since kept
    assert [h.granted for h in s.holds] == [5.0]
    s, d = dq.step(s, 12.0)
    assert d.switch_to is None
    s = dq.lane_activity(s, {}, last_used=12.5, now=13.0)  # the last one ended
    s, d = dq.step(s, 13.0)
    assert d.switch_to == dq.Target("sdxl") and d.revoke == ()


def test_a_drain_timeout_revokes_the_lane_hold_and_it_is_not_counted_again() -> None:
    s = dq.add_demand(dq.lane_activity(served(), {"llm": 1}, None, 0.0), dq.Demand("d", "sdxl", 0.0))
    s, d = dq.step(s, 6.0)
    assert d.drain is not None
    s, d = dq.step(dq.lane_activity(s, {"llm": 1}, None, 10.0), 10.0)
    assert d.revoke == ("lane:llm",) and d.switch_to == dq.Target("sdxl")
    assert dq.lane_activity(s, {"llm": 1}, None, 11.0).holds == ()  # switching: the old model's stragglers hold nothing


def test_the_lanes_last_use_restarts_the_idle_clock() -> None:
    idle = dq.IdlePolicy(after_seconds=10, action="free")
    s = replace(served(), idle=idle, last_activity=0.0)
    assert dq.decide(s, 10.0).idle == "free"
    s2 = dq.lane_activity(s, {}, last_used=8.0, now=10.0)
    d = dq.decide(s2, 10.0)
    assert d.idle is None and d.wake_at == 18.0
    s3 = replace(s, idled=True)  # idled once already; the lane's use starts a new idle period
    assert dq.lane_activity(s3, {}, last_used=8.0, now=10.0).idled is False
    assert dq.decide(dq.lane_activity(s, {"llm": 1}, last_used=None, now=30.0), 30.0).idle is None  # in flight: not idle


# -- the lane itself ---------------------------------------------------------------------


def test_enter_leave_close_and_the_wake_up_when_counted_requests_end() -> None:
    pokes: list[int] = []
    lane = FastLane(lambda: pokes.append(1), clock=lambda: 7.0)
    assert not lane.enter("llm")  # closed until the worker opens it
    lane.open({"llm"})
    assert lane.enter("llm") and lane.enter("llm") and not lane.enter("sdxl")
    lane.leave("llm")
    assert pokes == [] and lane.last_used == 7.0  # not counted by the desk yet: no wake-up needed
    assert lane.close() == {"llm": 1}
    assert not lane.enter("llm")
    lane.leave("llm")
    assert pokes == [1] and lane.in_flight("llm") == 0  # the desk held for it: wake the worker


def test_concurrent_enters_and_a_close_never_lose_a_request() -> None:
    lane = FastLane(lambda: None)
    lane.open({"llm"})
    admitted = [0] * 8
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            if lane.enter("llm"):
                admitted[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    counted = lane.close()["llm"]
    time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    assert counted == sum(admitted) > 0  # every admitted request was counted by the close


# -- on the worker -----------------------------------------------------------------------


def test_a_switch_waits_for_the_lanes_requests_then_goes_at_once_when_they_end() -> None:
    w, rt, _ = start(queued(maxServeSeconds=0.5, drainTimeoutSeconds=30))
    try:
        assert wait_for(lambda: w.lane.admits == {"llm"})
        assert w.lane.enter("llm")  # a request in flight through the lane
        w.demand_switch("sdxl", ())
        assert wait_for(lambda: w.lane.admits == frozenset())  # a demand waits: the lane is closed
        assert not w.lane.enter("llm")
        time.sleep(1.0)
        assert ("start", "sdxl") not in rt.calls and rt.states["llm"] is RUN  # draining for the request
        assert w.status()["queue"]["draining"] and w.status()["queue"]["holds"] == {"llm": 1}
        t0 = time.monotonic()
        w.lane.leave("llm")
        assert wait_for(lambda: rt.states.get("sdxl") is RUN and w.status()["phase"] == "Ready")
        assert time.monotonic() - t0 < 2  # woken by the request's end, not the 30 s drain timeout
        assert wait_for(lambda: w.lane.admits == {"sdxl"})
        assert not w.lane.enter("llm") and w.lane.enter("sdxl")
        w.lane.leave("sdxl")
    finally:
        w.stop()


def test_the_lanes_use_keeps_the_gpu_from_idling() -> None:
    base = spec().model_dump(by_alias=True, exclude_none=True)
    w, _, _ = start(DeploymentSpec.model_validate({**base, "idle": {"afterSeconds": 0.6, "action": "free"}}))
    try:
        assert wait_for(lambda: w.lane.admits == {"llm"})
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:  # requests every 0.2 s for 1.5 s: never 0.6 s quiet
            assert w.lane.enter("llm")
            time.sleep(0.01)
            w.lane.leave("llm")
            time.sleep(0.2)
        assert w.desired.active == "llm"
        assert wait_for(lambda: w.desired.active is None, timeout=3)  # then quiet: freed
        assert not w.lane.enter("llm")
    finally:
        w.stop()


def test_nothing_is_admitted_before_the_model_is_healthy_or_after_the_worker_stopped() -> None:
    w, rt, _ = loading(queued())
    try:
        assert wait_for(lambda: rt.states.get("llm") is RUN)
        time.sleep(0.3)
        assert not w.lane.enter("llm")
        rt.never_healthy.clear()
        assert wait_for(lambda: w.lane.enter("llm"))
        w.lane.leave("llm")
    finally:
        w.stop()
    assert not w.lane.enter("llm")


def test_a_request_from_another_source_closes_the_lane_at_once() -> None:
    w, _, _ = start(queued())
    try:
        assert wait_for(lambda: w.lane.admits == {"llm"})
        w.request("sdxl", source="api")  # the spec / state file decides (declared mode, vramctl switch --force)
        assert not w.lane.enter("llm")  # closed on the caller's thread, before the loop even looked
        assert wait_for(lambda: w.lane.admits == {"sdxl"})
    finally:
        w.stop()
