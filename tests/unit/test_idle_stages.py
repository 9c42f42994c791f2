"""Two-stage idle (``idle: {sleepAfterSeconds, stopAfterSeconds}``): after
the first quiet period the active model sleeps (its CUDA context and host
memory kept, the next use is a wake); after the second, counted from the same
last use, every model is stopped, sleepers too. The policy on times the test
passes in, the spec's checks, and the real worker on a clock the test moves.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.clock import ManualClock, until
from tests.support.fakes import FakeGpu, FakeRuntime, FakeSleeper
from vramctl.demand.policy import Demand, IdlePolicy, QueuePolicy, QueueState, Target, add_demand, policies_of, step, switch_done
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING
TWO = IdlePolicy(after_seconds=100, action="sleep", stop_after_seconds=300)


def state(idle: IdlePolicy = TWO, active: str | None = "llm") -> QueueState:
    return QueueState(policy=QueuePolicy(), idle=idle, active=active, active_since=0.0, last_activity=0.0)


# -- the policy ------------------------------------------------------------------------


def test_the_first_stage_sleeps_the_second_frees_each_once_from_the_last_use() -> None:
    s, d = step(state(), 10.0)
    assert d.idle is None and d.wake_at == 100.0
    s, d = step(s, 100.0)
    assert d.idle == "sleep" and s.active is None
    assert d.wake_at is None  # the second stage is due at 300: the next decision says so
    s, d = step(s, 101.0)
    assert d.idle is None and d.wake_at == 300.0
    s, d = step(s, 299.9)
    assert d.idle is None
    s, d = step(s, 300.0)
    assert d.idle == "free" and s.idle_stopped
    s, d = step(s, 10_000.0)
    assert d.empty  # once per idle period


def test_a_use_between_the_stages_starts_a_new_idle_period() -> None:
    s, _ = step(state(), 100.0)  # asleep
    s = add_demand(s, Demand("d", "llm", 150.0, kind="switch"))
    assert not s.idled and not s.idle_stopped
    s, d = step(s, 150.0)
    assert d.switch_to is not None  # the wake
    s, d = step(switch_done(s, Target("llm"), 151.0), 151.0)
    assert d.grant == ("d",)
    s, d = step(s, 200.0)  # 200 s after the first use, 49 s after the new one: nothing
    assert d.idle is None and d.wake_at == 251.0
    s, d = step(s, 251.0)
    assert d.idle == "sleep"
    s, d = step(s, 300.0)  # the old period's second stage is gone with it
    assert d.idle is None and d.wake_at == 451.0
    s, d = step(s, 451.0)
    assert d.idle == "free"


@pytest.mark.parametrize(
    ("idle", "active", "at", "expected"),
    [
        # The second stage alone: free after stopAfterSeconds.
        (IdlePolicy(stop_after_seconds=300), "llm", 300.0, "free"),
        (IdlePolicy(stop_after_seconds=300), "llm", 299.0, None),
        # Nothing runs and no first stage put anything to sleep: nothing to free.
        (IdlePolicy(stop_after_seconds=300), None, 1000.0, None),
        # A first stage that freed already: no second stage.
        (IdlePolicy(after_seconds=100, action="free", stop_after_seconds=300), "llm", 100.0, "free"),
    ],
)
def test_the_second_stage(idle: IdlePolicy, active: str | None, at: float, expected: str | None) -> None:
    s, d = step(state(idle, active), at)
    assert d.idle == expected
    if expected == "free":
        s, d = step(s, at + 10_000)
        assert d.idle is None


def test_a_held_gpu_reaches_neither_stage() -> None:
    s, _ = step(add_demand(state(), Demand("h", "llm", 0.0)), 0.0)  # a hold on the active model
    s, d = step(s, 10_000.0)
    assert d.idle is None and s.active == "llm"


# -- the spec --------------------------------------------------------------------------


def doc(**idle: Any) -> dict[str, Any]:
    return {"models": {"llm": {"image": "x"}, "sdxl": {"image": "y"}}, "idle": idle}


def test_policies_from_the_spec_keep_the_old_form() -> None:
    assert policies_of(DeploymentSpec.model_validate(doc(sleepAfterSeconds=60, stopAfterSeconds=600)))[1] == IdlePolicy(
        60, "sleep", None, 600
    )
    assert policies_of(DeploymentSpec.model_validate(doc(afterSeconds=60, action="free")))[1] == IdlePolicy(60, "free", None, None)
    assert policies_of(DeploymentSpec.model_validate(doc(stopAfterSeconds=600)))[1] == IdlePolicy(None, "default", None, 600)


@pytest.mark.parametrize(
    ("idle", "message"),
    [
        ({"sleepAfterSeconds": 60, "afterSeconds": 60, "action": "sleep"}, "set one of them"),
        ({"sleepAfterSeconds": 600, "stopAfterSeconds": 60}, "must be longer than the first stage"),
        ({"afterSeconds": 60, "action": "free", "stopAfterSeconds": 60}, "must be longer than the first stage"),
    ],
)
def test_the_spec_refuses_stages_that_contradict(idle: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeploymentSpec.model_validate(doc(**idle))


# -- the worker ------------------------------------------------------------------------


def sleepy_spec() -> DeploymentSpec:
    llm = {
        "image": "i",
        "vramMiB": 12000,
        "startTimeoutSeconds": 1,
        "health": {"port": 19041, "path": "/health"},
        "switchStrategy": "sleep",
        "sleep": {"level": 2, "maxResidueMiB": 800, "path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"},
    }
    return DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "llm",
            "switching": {"mode": "onDemand"},
            "models": {"llm": llm},
            "idle": {"sleepAfterSeconds": 30, "stopAfterSeconds": 120},
        }
    )


def test_the_worker_sleeps_then_stops_on_its_clock() -> None:
    d = sleepy_spec()
    rt = FakeRuntime(states={"llm": RUN}, residue={"llm": 500})
    clock = ManualClock()
    w = GpuWorker(
        d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.01, baseline_mib=0, resync_s=1), sleeper=FakeSleeper(rt), clock=clock
    )
    w.start()
    try:
        assert until(lambda: w.status()["phase"] == "Ready", clock, w, step=0.0)
        t0 = clock()
        assert until(lambda: w.model_states().get("llm") == "asleep", clock, w, step=1.0)
        slept = clock() - t0
        assert 30 <= slept < 33 and ("sleep", "llm") in rt.calls and ("stop", "llm") not in rt.calls
        assert until(lambda: ("stop", "llm") in rt.calls and w.status()["phase"] == "Idle", clock, w, step=1.0)
        assert 120 <= clock() - t0 < 123  # counted from the same last use
        assert w.model_states().get("llm") in ("stopped", "absent")
        requested = [p["message"] for p in w.progress() if p["step"] == "requested"]
        assert requested[-2:] == ["desired: (none) (idle (sleep))", "desired: (none) (idle (free))"]
    finally:
        w.stop()
