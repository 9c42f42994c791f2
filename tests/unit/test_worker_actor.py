"""The worker as an actor, on recording fakes with its real loop thread.

- ``stop()`` during every kind of wait (memory, health, a slow stop, back-off,
  Blocked) returns within about one tick and the thread is gone, and the
  loop does not spin meanwhile;
- a spec change during a health wait starts the new spec at once;
- own starts are recognised by the ref the runtime returned, not by a window;
- an unreachable runtime is an outage (RuntimeUnavailable), not a failure;
- concurrent request / gate / update_spec / poke from several threads keep
  the invariant and lose no latest request (hypothesis, bounded).
"""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.clock import ManualClock, until
from tests.support.fakes import FakeGpu, FakeRuntime
from tests.support.workers import three_heavy as spec
from tests.support.workers import wait_for
from vramctl.observed import WorkloadState
from vramctl.runtimes.base import StartEvent, TransientError
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING
HEAVY = ("llm", "sdxl", "img")


class CountingRuntime(FakeRuntime):
    """Counts observations and health checks: a spinning loop shows up here."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.observations = 0
        self.health_checks = 0

    def observe(self, deployment: DeploymentSpec):  # type: ignore[no-untyped-def]
        self.observations += 1
        return super().observe(deployment)

    def check_health(self, deployment: DeploymentSpec, model: str) -> bool:
        self.health_checks += 1
        return super().check_health(deployment, model)


def started(
    rt: FakeRuntime, d: DeploymentSpec | None = None, run: bool = True, clock: ManualClock | None = None, **kw: object
) -> tuple[GpuWorker, FakeGpu]:
    d = d or spec()
    gpu = FakeGpu(rt, d)
    s = WorkerSettings(poll_interval_s=0.02, memory_timeout_s=30, backoff_initial_s=30, resync_s=5, baseline_mib=0)
    for k, v in kw.items():
        setattr(s, k, v)
    w = GpuWorker(d, rt, gpu, s, clock=clock or time.monotonic)
    if run:
        w.start()
    return w, gpu


def assert_stops_promptly(w: GpuWorker, rt: CountingRuntime, tick: float = 0.25) -> None:
    """No spinning while it waits, then stop() returns within a tick and the loop thread is gone."""
    before = (rt.observations, rt.health_checks)
    time.sleep(0.3)
    spent = (rt.observations - before[0]) + (rt.health_checks - before[1])
    assert spent < 60, f"{spent} observations + health checks in 0.3 s: the loop spins"
    t0 = time.monotonic()
    w.stop(timeout=5)
    assert time.monotonic() - t0 < tick
    assert w._thread is not None and not w._thread.is_alive()


def test_stop_during_a_health_wait() -> None:
    rt = CountingRuntime(never_healthy={"llm"})
    w, _ = started(rt)
    assert wait_for(lambda: ("start", "llm") in rt.calls)
    assert wait_for(lambda: w.status()["phase"] == "Switching")
    assert_stops_promptly(w, rt)


def test_stop_during_a_memory_wait() -> None:
    rt = CountingRuntime(states={"llm": RUN})
    w, gpu = started(rt)
    assert wait_for(lambda: w.status()["phase"] == "Ready")
    gpu.foreign[4242] = 10000  # someone else holds what sdxl needs
    w.request("sdxl", ())
    assert wait_for(lambda: any(p["step"] == "waiting-memory" for p in w.progress()))
    assert_stops_promptly(w, rt)
    assert ("start", "sdxl") not in rt.calls


def test_stop_while_a_stop_takes_its_grace_period() -> None:
    rt = CountingRuntime(states={"llm": RUN})
    release = threading.Event()
    rt.on_call = lambda verb, m: release.wait(10) if verb == "stop" else None
    w, _ = started(rt)
    assert wait_for(lambda: w.status()["phase"] == "Ready")
    w.request("sdxl", ())
    assert wait_for(lambda: ("stop", "llm") in rt.calls)
    assert w.model_states()["llm"] == "stopping"
    assert_stops_promptly(w, rt)
    release.set()  # the stop finishes on its own; nothing is started after the worker stopped
    time.sleep(0.1)
    assert ("start", "sdxl") not in rt.calls


def test_stop_during_back_off_and_while_blocked() -> None:
    rt = CountingRuntime(crash_on_start={"llm"})
    w, _ = started(rt)
    assert wait_for(lambda: w.status()["phase"] == "Failed")
    assert_stops_promptly(w, rt)

    rt2 = CountingRuntime(states={"llm": RUN})
    w2, gpu2 = started(rt2, memory_timeout_s=0.1, foreign_grace_s=0.05)
    assert wait_for(lambda: w2.status()["phase"] == "Ready")
    gpu2.foreign[4242] = 10000
    w2.request("sdxl", ())
    assert wait_for(lambda: w2.status()["phase"] == "Blocked")
    assert_stops_promptly(w2, rt2)


def test_a_spec_change_during_a_health_wait_starts_the_new_spec_at_once() -> None:
    """A wrong image name is fixed while the model waits to become healthy:
    the new spec starts now, not after startTimeoutSeconds (300 s)."""
    rt = CountingRuntime(never_healthy={"llm"})
    w, _ = started(rt, d=spec(timeout=300, image="typo"))
    assert wait_for(lambda: ("start", "llm") in rt.calls)
    starts = rt.calls.count(("start", "llm"))
    rt.never_healthy.clear()  # the fixed image comes up

    class Drift(CountingRuntime):
        pass

    fixed = spec(timeout=300, image="fixed")
    # The fake has no spec hash: the new spec drifts when the runtime says so.
    original_observe = rt.observe

    def observe(d: DeploymentSpec):  # type: ignore[no-untyped-def]
        out = original_observe(d)
        if d.models["llm"].image == "fixed" and rt.calls.count(("start", "llm")) == starts:
            from dataclasses import replace

            out = {m: replace(x, drifted=True) if m == "llm" else x for m, x in out.items()}
        return out

    rt.observe = observe  # type: ignore[method-assign]
    t0 = time.monotonic()
    w.update_spec(fixed)
    assert wait_for(lambda: rt.calls.count(("start", "llm")) == starts + 1, timeout=3)
    assert wait_for(lambda: w.status()["phase"] == "Ready", timeout=3)
    assert time.monotonic() - t0 < 2.0
    assert ("stop", "llm") in rt.calls
    w.stop()


def test_own_starts_are_known_by_ref_and_a_hand_start_of_the_same_model_is_gated() -> None:
    rt = FakeRuntime()
    w, _ = started(rt, run=False)

    def echo(verb: str, model: str) -> None:
        if verb == "start":
            w.gate_start(StartEvent(model, 0, model, True))  # the engine's event for vramctl's own start

    rt.on_call = echo
    w.start()
    assert wait_for(lambda: w.status()["phase"] == "Ready")
    assert ("pause", "llm") not in rt.calls
    # Seconds later (inside any time window), someone restarts a container of
    # the same model: another ref. It is paused, whatever the time since.
    rt.on_call = None
    w.gate_start(StartEvent("llm", 0, "llm-by-hand", True))  # another container of llm, not vramctl's start
    assert wait_for(lambda: ("pause", "llm") in rt.calls)
    w.stop()


def test_a_restart_of_vramctls_own_container_is_a_crash_not_an_intruder() -> None:
    """A restart policy starts vramctl's own container again (same ref): the
    model crashed. It is a failure with back-off, and stopped; never paused
    as "started outside vramctl"."""
    rt = FakeRuntime()
    w, _ = started(rt, run=False)
    rt.on_call = lambda verb, m: w.gate_start(StartEvent(m, 0, m, True)) if verb == "start" else None  # the engine's event
    w.start()
    assert wait_for(lambda: w.status()["phase"] == "Ready")
    rt.on_call = None
    w.gate_start(StartEvent("llm", 0, "llm", True))  # the same ref again: its restart policy
    assert wait_for(lambda: w.status()["phase"] == "Failed")
    assert "CrashLoop" in [c["reason"] for c in w.status()["conditions"] if c["type"] == "Degraded"]
    assert wait_for(lambda: ("stop", "llm") in rt.calls)
    assert ("pause", "llm") not in rt.calls
    assert "llm" in w.status()["backoff"]
    assert not any(p["step"] == "gated" for p in w.progress())
    w.stop()


def test_an_unreachable_runtime_is_an_outage_not_a_failure() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    down = threading.Event()
    observe = rt.observe
    refused: list[float] = []
    clock = ManualClock()

    def flaky(d: DeploymentSpec):  # type: ignore[no-untyped-def]
        if down.is_set():
            refused.append(clock())
            raise TransientError("the Docker engine is unreachable: connection refused")
        return observe(d)

    rt.observe = flaky  # type: ignore[method-assign]
    w, _ = started(rt, clock=clock)
    assert wait_for(lambda: w.status()["phase"] == "Ready")
    down.set()
    w.request("sdxl", ())
    cond = lambda: next(c for c in w.status()["conditions"] if c["type"] == "RuntimeUnavailable")  # noqa: E731
    assert wait_for(lambda: cond()["status"] == "True")
    assert "unreachable" in cond()["message"]
    assert w.status()["phase"] != "Failed"
    assert w.desired.active == "sdxl"  # an outage never changes the desired state
    notes = [p for p in w.progress() if p["step"] == "runtime-unavailable"]
    assert until(lambda: len(refused) >= 4, clock, w)  # retried (0.2 s doubling, at most 1 s) ...
    assert [p for p in w.progress() if p["step"] == "runtime-unavailable"] == notes  # ... and said once per outage
    assert all(b - a >= 0.2 - 1e-9 for a, b in itertools.pairwise(refused))  # backed off, never spun
    down.clear()
    assert until(lambda: w.status()["phase"] == "Ready" and rt.states.get("sdxl") is RUN, clock, w)
    assert cond()["status"] == "False"
    w.stop()


# ------------------------------------------------------------------ concurrency


class InvariantRuntime(FakeRuntime):
    """Records a violation when vramctl starts (or unpauses) a heavy model
    while another heavy model that vramctl started is still live. A hand start
    racing vramctl is the intruder's doing, not vramctl's: it is gated, and
    counts once vramctl has started it itself."""

    def __init__(self, d: DeploymentSpec) -> None:
        super().__init__()
        self.d = d
        self.violations: list[str] = []
        self.lock = threading.Lock()
        self.ours: set[str] = set()

    def start(self, deployment: DeploymentSpec, model: str) -> str:
        with self.lock:
            if self.d.models[model].heavy:
                live = [m for m in self.ours if self.states.get(m, WorkloadState.ABSENT).live and m != model and self.d.models[m].heavy]
                if live:
                    self.violations.append(f"start {model} while {live} live")
            self.ours.add(model)
            return super().start(deployment, model)

    def stop(self, deployment: DeploymentSpec, model: str):  # type: ignore[no-untyped-def]
        with self.lock:
            self.ours.discard(model)
            return super().stop(deployment, model)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.sampled_from(["request", "gate", "update", "poke"]), st.sampled_from([*HEAVY, None])),
        min_size=5,
        max_size=25,
    ),
    st.integers(min_value=0, max_value=2**16),
)
def test_concurrent_callers_keep_the_invariant_and_the_latest_request(ops: list[tuple[str, str | None]], seed: int) -> None:
    d = spec()
    rt = InvariantRuntime(d)
    w, _ = started(rt, d=d, poll_interval_s=0.005)
    rng = random.Random(seed)
    order: list[str | None] = []
    order_lock = threading.Lock()

    def caller(part: list[tuple[str, str | None]]) -> None:
        for op, model in part:
            if op == "request":
                with order_lock:
                    w.request(model, ())
                    order.append(model)
            elif op == "gate" and model is not None:
                with rt.lock:
                    if rt.states.get(model) is not RUN:
                        rt.states[model] = RUN  # a hand start: the engine reports it
                w.gate_start(StartEvent(model, 0, f"hand-{rng.random()}", True))
            elif op == "update":
                w.update_spec(d)
            else:
                w.poke()
            time.sleep(rng.random() * 0.01)

    parts = [ops[i::3] for i in range(3)]
    threads = [threading.Thread(target=caller, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # Gated hand starts also become requests (when the loop gets to them): the
    # last word is the worker's newest desired state once everything is applied.

    def settled() -> bool:
        st = w.status()
        return st["observedGeneration"] == w.desired.generation == st["desiredGeneration"] and st["phase"] in ("Ready", "Idle")

    try:
        assert wait_for(lambda: settled() and (time.sleep(0.15) or settled()), 10)
        final = w.desired
        live = sorted(m for m, s in rt.states.items() if s.live)
        assert live == sorted(final.members), (live, final)
        if order and final.generation == len(order):  # no gated start came after the last request
            assert final.active == order[-1]
        assert rt.violations == []
    finally:
        w.stop()


@pytest.mark.parametrize("n", [200])
def test_many_requests_coalesce_into_few_switches(n: int) -> None:
    rt = InvariantRuntime(spec())
    w, _ = started(rt)
    for i in range(n):
        w.request(HEAVY[i % 3], ())
    last = HEAVY[(n - 1) % 3]
    assert wait_for(lambda: w.status()["phase"] == "Ready" and rt.states.get(last) is RUN)
    starts = sum(1 for v, _ in rt.calls if v == "start")
    assert starts < n / 4, f"{starts} starts for {n} queued requests: not coalesced"
    assert rt.violations == []
    w.stop()


def test_an_initial_desired_state_that_does_not_fit_is_refused_like_a_request() -> None:
    """A state file or config naming a companion that cannot fit: the same
    message as the API's 422, nothing started, no Switching/Blocked loop."""
    from vramctl.observed import Desired
    from vramctl.spec.models import DesiredStateError, check_desired

    d = spec()
    d = d.model_copy(update={"models": {**d.models, "big": d.models["tts"].model_copy(update={"vram_mib": 6000})}})
    rt = FakeRuntime()
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.01, baseline_mib=0), initial=Desired("llm", ("big",), 3))
    with pytest.raises(DesiredStateError) as api:
        check_desired(d, "llm", ["big"], 16000)
    w.reconcile_once()
    st = w.status()
    assert st["phase"] == "Failed" and str(api.value) in st["message"]
    assert rt.calls == []
    w.request("llm", ())
    w.reconcile_once()
    assert w.status()["phase"] == "Ready" and rt.calls == [("start", "llm")]


def test_secrets_in_log_lines_never_reach_status_or_progress() -> None:
    """A failed start's last log lines echo its --api-key: masked in the
    phase message and the progress, like the API masks /status."""
    doc = spec().model_dump(by_alias=True, exclude_none=True)
    doc["models"]["llm"]["args"] = ["--api-key", "sk-live-0123456789abcdef"]
    d = DeploymentSpec.model_validate(doc)

    class Leaky(FakeRuntime):
        def logs_tail(self, deployment: DeploymentSpec, model: str, lines: int = 20) -> list[str]:
            return ["starting with --api-key sk-live-0123456789abcdef", "Traceback: boom"]

    rt = Leaky(crash_on_start={"llm"})
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.01, baseline_mib=0))
    w.reconcile_once()
    st = w.status()
    assert st["phase"] == "Failed" and "Traceback: boom" in st["message"]
    assert "sk-live-0123456789abcdef" not in st["message"]
    assert not any("sk-live-0123456789abcdef" in p["message"] for p in w.progress())
