"""A stop or restart by hand of the model vramctl runs, told from a crash
(issue 18, item 8), on recording fakes and a clock the test moves:

- the engine's kill (or an exit with 0, 130 or 143), then a start of the same
  container within the window: the user's restart, waited for, said, no
  failure, no stop, nothing started in its place meanwhile;
- an exit with a crash's code and a start by the restart policy: still a
  crash loop (failure, back-off, stopped);
- stopped by hand and not started again: once the window is over, it exited
  (a failure with back-off, as before).

The real engine's events are tested in tests/docker/test_hand_restart.py.
"""

from __future__ import annotations

from tests.support.clock import ManualClock
from tests.support.fakes import FakeGpu, FakeRuntime
from tests.support.workers import three_heavy
from vramctl.observed import WorkloadState
from vramctl.reconcile.model_watch import RESTART_WINDOW_S
from vramctl.runtimes.base import StartEvent
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN, EXITED = WorkloadState.RUNNING, WorkloadState.EXITED


def rig() -> tuple[GpuWorker, FakeRuntime, ManualClock]:
    d = three_heavy()
    rt = FakeRuntime()
    clock = ManualClock()
    s = WorkerSettings(poll_interval_s=0.05, baseline_mib=0, backoff_initial_s=30, resync_s=5)
    w = GpuWorker(d, rt, FakeGpu(rt, d), s, clock=clock, sleep=clock.sleep)
    w.reconcile_once()
    assert rt.calls == [("start", "llm")] and w.status()["phase"] == "Ready"
    w.gate_start(StartEvent(model="llm", gpu=0, ref="llm", heavy=True))  # the engine's event of vramctl's own start
    w.reconcile_once()
    rt.calls.clear()
    return w, rt, clock


def event(action: str, exit_code: int | None = None) -> StartEvent:
    return StartEvent(model="llm", gpu=0, ref="llm", heavy=True, action=action, exit_code=exit_code)


def steps(w: GpuWorker) -> list[str]:
    return [str(p["step"]) for p in w.progress()]


def test_a_restart_by_hand_is_waited_for_and_said_not_failed() -> None:
    w, rt, clock = rig()
    w.gate_start(event("kill"))
    rt.states["llm"] = EXITED
    w.gate_start(event("die", 143))
    w.reconcile_once(max_ticks=10)  # looks while it is down: nothing started in its place
    assert rt.calls == [] and "failed" not in steps(w)
    rt.states["llm"] = RUN
    w.gate_start(event("start"))
    w.gate_start(event("restart"))
    w.reconcile_once()
    assert rt.calls == [] and "failed" not in steps(w)
    got = steps(w)
    assert got.index("restarted-outside") < len(got) - 1 - got[::-1].index("healthy")
    st = w.status()
    assert st["phase"] == "Ready" and st["runningModels"] == ["llm"] and st["backoff"] == {}
    clock.advance(60)
    w.reconcile_once()
    assert rt.calls == []


def test_an_exit_with_a_crash_code_restarted_by_its_policy_is_still_a_crash() -> None:
    w, rt, _ = rig()
    rt.states["llm"] = EXITED
    w.gate_start(event("die", 3))
    rt.states["llm"] = RUN
    w.gate_start(event("start"))
    w.reconcile_once()
    assert ("stop", "llm") in rt.calls and "restarted-outside" not in steps(w)
    st = w.status()
    assert st["phase"] == "Failed" and any(c["type"] == "Degraded" and c["reason"] == "CrashLoop" for c in st["conditions"])


def test_a_stop_by_hand_not_followed_by_a_start_is_an_exit_once_the_window_is_over() -> None:
    w, rt, clock = rig()
    w.gate_start(event("kill"))
    rt.states["llm"] = EXITED
    w.gate_start(event("die", 143))
    w.reconcile_once(max_ticks=10)
    assert "failed" not in steps(w)
    clock.advance(RESTART_WINDOW_S)
    w.reconcile_once()
    assert "failed" in steps(w) and "exited on its own" in w.status()["message"]
