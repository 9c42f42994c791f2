"""One GPU's reconcile state machine, owned by its worker's loop.

Every mutable field of a GPU lives here and only the worker's loop thread
touches it (llama-swap's single writer). ``tick`` is KubeAI's shape:
observe, plan from the snapshot, do one step, return how long until the
next look. Waits (for a stop, for memory, for health) are not blocking
calls but states re-derived at every tick, so a newer request, a spec
change or the worker's stop interrupt any of them within one tick.

Stops and starts run aside (``Actuator``): the loop keeps hearing its inbox
while docker waits out a grace period. While one runs, nothing else is
planned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from vramctl import memory_gate, sleepctl
from vramctl.backoff import Backoff
from vramctl.errors import Classified, ErrorClass, Outage, classify
from vramctl.gating import GateDecision, StartGate
from vramctl.gpu.base import GpuProbe
from vramctl.observed import Desired, Observed, Workload, WorkloadState
from vramctl.planner import Cleanup, Plan, Sleep, Start, Stop, WaitForMemory, WaitHealthy, Wake, plan
from vramctl.runtimes.base import Runtime, StartEvent, StopOutcome
from vramctl.runtimes.health import LocalResourceError, http_ready
from vramctl.sleeping import HttpSleeper, SleepBook, Sleeper, WarmSwitches, sleepable
from vramctl.spec import DeploymentSpec

log = logging.getLogger("vramctl.supervisor")

# After an engine outage, how long to look before starting anything: the
# engine restarts containers by their restart policies right after it answers.
ENGINE_SETTLE_S = 2.0

# A model's state as its worker knows it (vramctl_model_state).
MODEL_STATES = ("running", "starting", "paused", "stopping", "stopped", "failed", "absent", "asleep", "sleeping", "waking")


@dataclass
class Op:
    """A stop, start or cleanup running aside."""

    action: Cleanup | Stop | Start | Sleep | Wake
    future: Future[Any]
    spec: DeploymentSpec


class Actuator:
    """Runs the runtime's slow calls on one thread of their own; ``inline``
    runs them on the caller's thread (deterministic tests, ``--once``)."""

    def __init__(self, runtime: Runtime, on_done: Callable[[], None], inline: bool = False) -> None:
        self.runtime, self.on_done, self.inline = runtime, on_done, inline
        self._pool: ThreadPoolExecutor | None = None
        self.sleeper: Sleeper = HttpSleeper()

    def submit(self, spec: DeploymentSpec, action: Cleanup | Stop | Start | Sleep | Wake) -> Op:
        fn: Callable[[], Any]
        match action:
            case Stop(model=m):
                fn = lambda: self.runtime.stop(spec, m)  # noqa: E731
            case Start(model=m):
                fn = lambda: self.runtime.start(spec, m)  # noqa: E731
            case Cleanup(model=m):
                fn = lambda: self.runtime.cleanup(spec, m)  # noqa: E731
            case Sleep(model=m):
                fn = lambda: self.sleeper.sleep(spec, m)  # noqa: E731
            case Wake(model=m):
                fn = lambda: self.sleeper.wake(spec, m)  # noqa: E731
        if self.inline:
            fut: Future[Any] = Future()
            try:
                fut.set_result(fn())
            except Exception as err:
                fut.set_exception(err)
            return Op(action, fut, spec)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="vramctl-actuator")
        fut = self._pool.submit(fn)
        fut.add_done_callback(lambda _: self.on_done())
        return Op(action, fut, spec)

    def close(self) -> None:
        """Let a stop in flight finish on its own (a half-stopped model is the
        worst of both worlds); start nothing more."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Tracking:
    """What the loop remembers between ticks about its own actions."""

    gate: StartGate = field(default_factory=StartGate)  # vramctl's own starts, by ref
    started_at: dict[str, float] = field(default_factory=dict)  # model -> when vramctl's start returned
    starting: set[str] = field(default_factory=set)  # started by vramctl, not yet healthy
    healthy: set[str] = field(default_factory=set)  # seen healthy since vramctl started or adopted it
    health_since: dict[str, float] = field(default_factory=dict)  # not ours: when the health wait began
    exited_at: float | None = None  # the last stop's return (the runtime saw the exit)
    exited: tuple[str, ...] = ()  # the models of that stop (and any cleaned up since)
    ready: dict[str, bool] = field(default_factory=dict)  # last health verdict, kept over local resource errors
    exited_on_its_own: set[str] = field(default_factory=set)  # failed as "Exited": a removal if it disappears next

    def forget(self, model: str) -> None:
        self.gate.forget(model)
        self.started_at.pop(model, None)
        self.starting.discard(model)
        self.healthy.discard(model)
        self.health_since.pop(model, None)


def model_state(w: Workload | None, failed: bool, in_spec: bool) -> str:
    """MODEL_STATES from an observation; ``failed``: its last start failed."""
    st = w.state if w is not None else WorkloadState.ABSENT
    if st is WorkloadState.RUNNING and w is not None and w.asleep:
        return "asleep"
    if st is WorkloadState.RUNNING:
        # Not in the spec: no health check was run, so ready says nothing.
        return "running" if (w is not None and w.ready) or not in_spec else "starting"
    if st is WorkloadState.RESTARTING:
        return "starting"
    if st is WorkloadState.PAUSED:
        return "paused"
    if failed:
        return "failed"
    return "absent" if st is WorkloadState.ABSENT else "stopped"


def observe(
    runtime: Runtime, spec: DeploymentSpec, tracking: Tracking, sleeper: Sleeper | None = None, book: SleepBook | None = None
) -> Observed:
    """The runtime's workloads with a health verdict for each running model of
    the spec. A health check that fails for a reason of this machine's own
    (out of descriptors) keeps the last verdict: vramctl's problem, never the model's.
    A running sleepable model is asked whether it sleeps (a restarted vramctl
    finds its sleeping models so); one that cannot tell keeps the book's word."""
    out: dict[str, Workload] = {}
    for name, w in runtime.observe(spec).items():
        if book is not None and w.state is not WorkloadState.RUNNING:
            book.asleep.discard(name)  # exited (or paused) while asleep: it holds nothing asleep now
        if sleeper is not None and book is not None and w.state is WorkloadState.RUNNING and sleepable(spec, name):
            try:
                said = sleeper.is_sleeping(spec, name)
            except Exception:
                said = None
            asleep = said if said is not None else name in book.asleep
            if asleep:
                book.asleep.add(name)
                out[name] = replace(w, asleep=True)
                continue
            book.asleep.discard(name)
        if w.state in (WorkloadState.RUNNING, WorkloadState.RESTARTING) and name in spec.models:
            try:
                ready = runtime.check_health(spec, name)
            except LocalResourceError as err:
                log.warning("gpu%d: health check of %r failed on this machine (%s); keeping the last verdict", spec.gpu, name, err)
                ready = tracking.ready.get(name, False)
            tracking.ready[name] = ready
            w = replace(w, ready=ready)
        out[name] = w
    return Observed(out)


def describe_error(c: Classified) -> str:
    return f"{c.reason}: {c.message}"


def is_transient(c: Classified) -> bool:
    return c.kind is ErrorClass.TRANSIENT


def memory_verdict(
    probe: GpuProbe, w: WaitForMemory, kept: frozenset[str], wait: memory_gate.MemoryWait, now: float, timeout_s: float, grace_s: float
) -> memory_gate.Verdict:
    try:
        snap = probe.snapshot()
    except Exception as err:  # ProbeError, ProbeTimeout: unknown, never free
        return memory_gate.check(None, str(err), w, kept, wait, now, timeout_s, grace_s)
    return memory_gate.check(snap, None, w, kept, wait, now, timeout_s, grace_s)


def plan_for(
    spec: DeploymentSpec,
    desired: Desired,
    observed: Observed,
    now: float,
    backoff: Backoff,
    baseline: int | None,
    margin: int,
    total: int | None,
    book: SleepBook | None = None,
) -> Plan:
    cold = frozenset(book.cold) if book is not None else frozenset()
    return plan(spec, desired, observed, now, backoff.until, baseline or 0, margin, total, cold, book.last_used if book else None)


def stop_message(out: StopOutcome) -> str:
    how = "killed after its grace period" if out.killed else "stopped"
    return f"{out.model!r} {how} in {out.seconds:.2f}s"


def states_of(spec: DeploymentSpec, observed: Mapping[str, Workload], failed: set[str]) -> dict[str, str]:
    states = {m: model_state(observed.get(m), m in failed, True) for m in spec.models}
    states.update({m: model_state(w, False, False) for m, w in observed.items() if m not in spec.models})
    return states


class Reconciler:
    """The loop-owned state of one GPU and its tick. Not thread-safe on
    purpose: only the worker's loop (or a test, in its place) calls it.

    ``note(step, model, message)`` records progress; ``phase(phase, reason,
    message)`` moves the status book; ``request(active, companions, source)``
    hands a new desired state to the worker's own request path (a start made
    behind vramctl's back becomes the desired model).
    """

    def __init__(self, spec: DeploymentSpec, desired: Desired, runtime: Runtime, probe: GpuProbe, ctx: Any) -> None:
        self.spec, self.desired = spec, desired
        self.runtime, self.probe, self.ctx = runtime, probe, ctx
        s = ctx.settings
        self.backoff = Backoff(s.backoff_initial_s, s.backoff_max_s, s.stable_s)
        self.baseline = memory_gate.Baseline(s.baseline_mib, s.baseline_mib is not None, s.baseline_mib is not None)
        self.track = Tracking()
        self.watch = ModelWatch(ctx, self.backoff, self.track, self._publish_states)
        self.op: Op | None = None
        self.mem_wait: tuple[tuple[int, int], memory_gate.MemoryWait] | None = None
        self.blocked: str | None = None
        self.outage: Outage | None = None
        self.after_outage = False
        self.reachable_at = 0.0
        self.refused: tuple[int, str, str] | None = None
        self.invalid: str | None = None  # the initial desired state failed validation
        self._observed = Observed()
        self.stop_retry_at = 0.0
        self.kept: frozenset[str] = frozenset()
        self.running: list[str] = []
        self.asleep: list[str] = []
        self.model_states: Mapping[str, str] = {}
        self.last_release_seconds: float | None = None
        self.sleep = SleepBook()
        self.warm = WarmSwitches(ctx, self.sleep)

    # ------------------------------------------------------------ the tick

    def tick(self) -> tuple[float, bool]:
        """One step. Returns (seconds until the next look, settled): settled
        when nothing more happens before then unless something arrives."""
        now = self.ctx.clock()
        if self.invalid is not None:
            return self.ctx.settings.resync_s, True  # nothing is done for a refused desired state
        if self.op is not None:
            if not self.op.future.done():
                return self.ctx.settings.poll_interval_s, False  # its completion pokes the loop
            self._op_done(now)
        if self.outage is not None and now < self.outage.retry_at:
            return self.outage.retry_at - now, True
        try:
            observed = observe(self.runtime, self.spec, self.track, self._sleeper(), self.sleep)
        except Exception as err:
            return self._runtime_error(classify(err), now)
        self._reachable(now)
        self.watch.account(self.spec, self.desired, observed, now)
        self.warm.awake(observed, self.track.started_at, now)
        if self.op is not None:  # _account stopped a model that did not come up
            return self.ctx.settings.poll_interval_s, False
        self._learn_baseline(observed)
        if self.ctx.has_commands():
            return 0.0, False  # a newer command (maybe from this look) is applied before anything is done
        p = plan_for(
            self.spec,
            self.desired,
            observed,
            now,
            self.backoff,
            self.baseline.mib,
            self.ctx.settings.margin_mib,
            self.ctx.total_mib(),
            self.sleep,
        )
        self._view(observed, p)
        if p.empty:
            self._settle(p, now)
            wait = self.ctx.settings.resync_s
            if p.deferred:
                wait = min(wait, max(0.05, min(p.deferred.values()) - now))
            return wait, True
        return self._step(p, now)

    def _step(self, p: Plan, now: float) -> tuple[float, bool]:
        s = self.ctx.settings
        if self.ctx.book.switch is None and p.switching:
            self.ctx.begin_switch(self._holder(), self.desired.active, now)
        elif self.ctx.book.phase in ("Idle", "Ready") and not p.switching:
            self.ctx.phase("Switching", "Starting", "; ".join(p.describe()))
        refused = self._unrunnable(p, now)
        if refused is not None:
            return refused
        for action in p.actions:
            match action:
                case Sleep(model=m) if self.sleep.cycles_reached(self.spec, m):
                    limit = self.spec.models[m].sleep_settings.max_cycles
                    self.warm.fallback(self.spec, m, "MaxCycles", f"{m!r} slept {limit} times (sleep.maxCycles)", now)
                    return 0.0, False
                case Cleanup() | Stop() | Start() | Sleep() | Wake():
                    if isinstance(action, Stop) and now < self.stop_retry_at:
                        return self.stop_retry_at - now, True
                    if isinstance(action, Start) and self._port_taken(action.model, now):
                        return s.poll_interval_s, False
                    if isinstance(action, (Start, Wake)) and self.after_outage and now - self.reachable_at < ENGINE_SETTLE_S:
                        # An engine that just came back restarts containers by their restart policies for a
                        # moment after it answers: look again before starting anything beside them.
                        return ENGINE_SETTLE_S - (now - self.reachable_at), False
                    self._submit(action)
                    return s.poll_interval_s, False
                case WaitForMemory():
                    verdict = self._wait_memory(action, now)
                    if verdict is not None:
                        return verdict
                case WaitHealthy(model=m, timeout_seconds=timeout):
                    return self._wait_health(m, timeout, now)
        return s.poll_interval_s, False

    def _unrunnable(self, p: Plan, now: float) -> tuple[float, bool] | None:
        """Before anything is stopped for them: can the models this plan starts
        run at all (image present, executable found)? If not, nothing of the
        plan is done, the models that run keep running, and the phase says why
        until the desired state or the spec changes."""
        observed = self._observed
        for a in p.actions:
            if not isinstance(a, Start) or observed.state(a.model).live:
                continue
            try:
                problem = self.runtime.preflight(self.spec, a.model)
            except Exception:
                problem = None  # cannot tell (an outage): the start itself will say
            if problem is not None:
                key = (self.desired.generation, a.model, problem)
                if self.refused != key:
                    self.refused = key
                    msg = f"{a.model!r} cannot start: {problem}; nothing was stopped for it"
                    self.ctx.note("failed", a.model, msg)
                    self.watch.fail_switch("NotRunnable", msg, now)
                return self.ctx.settings.resync_s, True
        self.refused = None
        return None

    def _port_taken(self, m: str, now: float) -> bool:
        """Health must come from the workload vramctl starts: a health port that
        already answers before the model runs is served by something else."""
        h = self.spec.health_of(m)
        if h is None or h.path is None or h.port is None or self._observed.state(m).live:
            return False
        try:
            answered = http_ready(h.host, h.port, h.path, timeout=0.5)
        except LocalResourceError:
            return False
        if not answered:
            return False
        msg = f"port {h.port} ({h.host}) already answers {h.path} before {m!r} was started: something else serves it; not started"
        self.watch.fail(m, "PortInUse", msg, [], now)
        return True

    # ------------------------------------------------------------ actions

    def _submit(self, action: Cleanup | Stop | Start | Sleep | Wake) -> None:
        match action:
            case Stop(model=m, reason=reason):
                self.ctx.note("stopping", m, f"stopping {m!r} ({reason})")
            case Start(model=m, reason=reason):
                self.ctx.note("starting", m, f"starting {m!r} ({reason})")
            case Cleanup(model=m):
                self.ctx.note("cleanup", m, f"cleaning up what {m!r} left behind")
            case Sleep(model=m, reason=reason):
                self.ctx.note("sleeping", m, f"putting {m!r} to sleep ({reason})")
                self.sleep.strategy = "warm"
            case Wake(model=m):
                self.ctx.note("waking", m, f"waking {m!r}")
                self.sleep.strategy = "warm"
        if isinstance(action, Start):
            self.sleep.strategy = "cold"
        # Readers see the step before it takes its time (an inline actuator
        # returns only when it is done).
        self.model_states = {**self.model_states, action.model: OP_STATES[type(action).__name__]}
        self.ctx.publish()
        self.ctx.actuator.sleeper = self._sleeper()
        self.op = self.ctx.actuator.submit(self.spec, action)
        self._publish_states()

    def _op_done(self, now: float) -> None:
        op, self.op = self.op, None
        assert op is not None
        try:
            result = op.future.result()
        except Exception as err:
            if isinstance(op.action, (Sleep, Wake)):
                waking = isinstance(op.action, Wake)
                default = "WakeFailed" if waking else "SleepFailed"
                reason = sleepctl.fallback_reason(err, waking) if isinstance(err, sleepctl.SleepCallError) else default
                self.warm.fallback(self.spec, op.action.model, reason, str(err), now)
                self._publish_states()
                return
            self._op_failed(op, classify(err), now)
            return
        match op.action:
            case Stop(model=m):
                self.track.exited_at = now
                self.track.exited = (*self.track.exited, m)
                self.track.forget(m)
                self.backoff.gone(m)
                self.sleep.gone(m)
                self.ctx.note("stopped", m, stop_message(result))
            case Start(model=m):
                ref = str(result)
                self.track.started_at[m] = now
                self.track.starting.add(m)
                self.kept = self.kept | {m}  # it stays live through the plan: not a leftover for a companion's wait
                self.ctx.note("started", m, f"{m!r} started ({ref[:12]})")
                for ev in self.track.gate.started(m, ref):
                    self._pause(ev)
            case Cleanup(model=m):
                self.track.exited_at = now
                self.track.exited = (*self.track.exited, m)
                self.ctx.note("cleaned-up", m, f"what {m!r} left behind is gone")
            case Sleep(model=m):
                self.sleep.slept(m, now)
                self._observed = Observed({**self._observed.workloads, m: replace(self._observed.workloads[m], asleep=True)})
                self.track.healthy.discard(m)
                self.track.exited_at, self.track.exited = now, (*self.track.exited, m)
            case Wake(model=m):
                self.sleep.woke(m, now)
                self.track.started_at[m] = now
                self.track.starting.add(m)
                self.track.healthy.discard(m)
                self.kept = self.kept | {m}
        self._publish_states()

    def _op_failed(self, op: Op, c: Classified, now: float) -> None:
        m = op.action.model
        if is_transient(c):
            self._runtime_error(c, now)
            return
        logs = self.ctx.logs(op.spec, m)
        if isinstance(op.action, Start):
            self.watch.fail(m, c.reason, f"{m!r} could not be started: {c.message}", logs, now, permanent=c.kind is ErrorClass.PERMANENT)
            return
        # A stop or cleanup that failed is retried after a back-off of its own;
        # the model stays where it is meanwhile and nothing is started.
        _, delay = self.backoff.fail(f"stop:{m}", now)
        self.stop_retry_at = now + delay
        verb = "stop" if isinstance(op.action, Stop) else "clean up after"
        self.watch.fail_switch(
            "StopFailed", f"could not {verb} {m!r}: {describe_error(c)} (retrying in {delay:.0f}s); nothing is started meanwhile", now
        )

    # -------------------------------------------------------------- waits

    def _wait_memory(self, w: WaitForMemory, now: float) -> tuple[float, bool] | None:
        s = self.ctx.settings
        key = (self.desired.generation, w.need_free_mib)
        if self.baseline.mib is None and w.max_used_mib is not None:
            # A bound computed from an unknown baseline would be a guess; the
            # stopped models' processes leaving and the free memory still tell.
            w = replace(w, max_used_mib=None)
        if self.mem_wait is None or self.mem_wait[0] != key:
            self.mem_wait = (key, memory_gate.MemoryWait(now))
            self.ctx.note("waiting-memory", None, waiting_message(w))
        if self.sleep.slept_at and self.warm.verify(self.spec, self.probe, self.baseline.mib or 0, now, self.ctx.settings.memory_timeout_s):
            return 0.0, False
        v = memory_verdict(self.probe, w, self.kept, self.mem_wait[1], now, s.memory_timeout_s, s.foreign_grace_s)
        self.mem_wait = (key, v.wait)
        if v.free:
            self._memory_free(now, v.wait.since)
            return None
        if v.blocked is not None:
            if self.blocked is None:
                self.ctx.phase("Blocked", "MemoryNotReleased", v.blocked)
                self.ctx.finish_switch("blocked", now)
                self.ctx.book.observed_generation = self.desired.generation
            self.blocked = v.blocked
            return max(s.poll_interval_s, 0.25), True
        return s.poll_interval_s, False

    def _memory_free(self, now: float, since: float) -> None:
        self.mem_wait = None
        after = ""
        if self.track.exited_at is not None:
            self.last_release_seconds = max(0.0, now - self.track.exited_at)
            after = f", {self.last_release_seconds:.3f}s after {', '.join(self.track.exited)} exited"
            self.track.exited_at, self.track.exited = None, ()
        if self.blocked is not None:
            self.blocked = None
            self.ctx.begin_switch(None, self.desired.active, now)
        self.ctx.note("memory-free", None, f"GPU memory confirmed free after {now - since:.2f}s{after}")

    def _wait_health(self, m: str, timeout: float, now: float) -> tuple[float, bool]:
        since = self.track.started_at.get(m)
        if since is None:
            since = self.track.health_since.setdefault(m, now)
        health = self.spec.health_of(m)
        interval = min(health.interval_seconds if health else 0.1, self.ctx.settings.resync_s)
        if now - since < timeout:
            return interval, False
        if m in self.sleep.waking:
            self.track.forget(m)
            self.warm.fallback(self.spec, m, "WakeFailed", f"{m!r} not healthy within {timeout:.0f}s after its wake", now)
            return 0.0, False
        logs = self.ctx.logs(self.spec, m)
        self.ctx.note("stopping", m, f"{m!r} not healthy after {timeout:.0f}s: stopping it")
        self.track.forget(m)
        self.watch.fail(m, "StartTimeout", f"{m!r} did not become healthy within {timeout:.0f}s", logs, now)
        self._submit(Stop(m, "not healthy in time"))
        return self.ctx.settings.poll_interval_s, False

    # -------------------------------------------------------- observation

    def _learn_baseline(self, observed: Observed) -> None:
        if self.baseline.configured or self.track.exited_at is not None or self.mem_wait is not None:
            return  # a release may be under way: its memory is not the baseline
        try:
            snap = self.probe.snapshot()
        except Exception:
            return
        self.baseline = self.baseline.observe(snap, any(w.state.live for w in observed.workloads.values()))

    def _view(self, observed: Observed, p: Plan) -> None:
        stopped = {a.model for a in p.actions if isinstance(a, (Stop, Cleanup))}
        self.kept = frozenset(m for m, w in observed.workloads.items() if w.state.live and m not in stopped)
        self.running = sorted(m for m, w in observed.workloads.items() if w.state is WorkloadState.RUNNING and not w.asleep)
        self.asleep = sorted(m for m, w in observed.workloads.items() if w.state is WorkloadState.RUNNING and w.asleep)
        self._observed = observed
        self._publish_states()

    def _publish_states(self) -> None:
        """Model states for readers: the last observation, overlaid with the
        action in flight. Replaced whole, never mutated."""
        observed = self._observed
        states = states_of(self.spec, observed.workloads, set(self.backoff.failures) & set(self.backoff.until))
        if self.op is not None:
            m = self.op.action.model
            states[m] = OP_STATES[type(self.op.action).__name__]
        for m in self.sleep.waking:
            if states.get(m) == "starting":
                states[m] = "waking"
        self.model_states = states

    def _settle(self, p: Plan, now: float) -> None:
        self.ctx.book.observed_generation = self.desired.generation
        self.mem_wait, self.blocked = None, None
        self.track.exited_at, self.track.exited = None, ()  # nothing waits for that release
        self.after_outage = False
        self.ctx.finish_switch("success", now)
        self.ctx.settled(now, ok=not p.deferred)
        d = self.desired
        if p.deferred:
            failed = ", ".join(repr(m) for m in sorted(p.deferred))
            wait = min(p.deferred.values()) - now
            if self.ctx.book.phase != "Failed":
                when = "until the spec changes" if wait == float("inf") else f"retrying in {max(0.0, wait):.0f}s"
                self.ctx.phase("Failed", "BackingOff", f"{failed} failed; {when}")
        elif d.active is None and not d.companions:
            self.ctx.phase("Idle", "NoModel", "no model is desired; the GPU is free")
        else:
            self.ctx.phase("Ready", "ModelReady", f"{', '.join(d.members)} ready")

    def _holder(self) -> str | None:
        for w in self._observed.workloads.values():
            if w.state.live and w.heavy and not w.asleep:
                return w.model
        return None

    # ----------------------------------------------------- runtime outages

    def _runtime_error(self, c: Classified, now: float) -> tuple[float, bool]:
        """The runtime could not be asked: transient errors are an outage
        (said once, retried with back-off, the switch stays in progress);
        anything else is reported and retried at the resync."""
        if not is_transient(c):
            log.error("gpu%d: observing the %s runtime failed: %s", self.spec.gpu, self.runtime.kind, c.message)
            self.ctx.phase("Failed", c.reason, f"observing the {self.runtime.kind} runtime failed: {c.message}")
            return self.ctx.settings.resync_s, True
        if self.outage is None:
            self.outage = Outage(c, now)
            msg = f"the {self.runtime.kind} runtime is unreachable ({c.message}); vramctl keeps retrying and changes nothing meanwhile"
            self.ctx.note("runtime-unavailable", None, msg)
            self.ctx.condition("RuntimeUnavailable", True, c.reason, msg)
        return self.outage.again(c, now), True

    def _reachable(self, now: float) -> None:
        if self.outage is None:
            return
        gone = now - self.outage.since
        self.outage = None
        self.after_outage = True  # until the next settled state
        self.reachable_at = now
        msg = f"the {self.runtime.kind} runtime answers again after {gone:.1f}s; reconciling"
        self.ctx.note("runtime-available", None, msg)
        self.ctx.condition("RuntimeUnavailable", False, "Reachable", msg)

    # ------------------------------------------------------- warm switches

    def _sleeper(self) -> Sleeper:
        return getattr(self.ctx, "sleeper", None) or self.ctx.actuator.sleeper  # type: ignore[no-any-return]

    # ------------------------------------------------------------- gating

    def gate(self, ev: StartEvent) -> None:
        """A managed workload of this GPU started (``gating.StartGate`` tells
        whether it was vramctl's own). Anyone else's start is frozen at once,
        before it can allocate; a heavy one becomes the desired model and the
        plan hands over."""
        if ev.action != "start":
            return  # the next tick (this one's poke) observes the change
        op = self.op
        starting = op.action.model if op is not None and isinstance(op.action, Start) else None
        decision = self.track.gate.decide(ev, ev.model in self.spec.models, starting)
        if decision is GateDecision.PAUSE:
            self._pause(ev)
        elif decision is GateDecision.RESTARTED:
            self._restarted(ev)

    def _restarted(self, ev: StartEvent) -> None:
        """vramctl's own container of ``ev.model`` was started again by its
        restart policy: the model crashed. Wanted: a failure (crash loop,
        back-off) and stopped, never taken for an intruder; not wanted: frozen."""
        m = ev.model
        if m not in self.desired.members or self.op is not None:
            self._pause(ev)
            return
        now = self.ctx.clock()
        logs = self.ctx.logs(self.spec, m)
        self.track.forget(m)
        self.watch.fail(m, "CrashLoop", f"{m!r} crashed and its restart policy started it again", logs, now)
        self._submit(Stop(m, "crash loop: its restart policy restarted it"))

    def _pause(self, ev: StartEvent) -> None:
        try:
            self.runtime.pause(self.spec, ev.model)
        except Exception as err:  # it may have exited already: the next tick sees it
            log.warning("gpu%d: could not pause %r: %s", self.spec.gpu, ev.model, err)
        else:
            self.model_states = {**self.model_states, ev.model: "paused"}
        self.ctx.gated(ev, self._not_adopted(ev))

    def _not_adopted(self, ev: StartEvent) -> str | None:
        """Why a gated start does not become the desired state (None: it does).

        - After an engine outage the daemon restarts containers on its own
          (restart policies): an engine restart never changes the desired state.
        - One `docker compose --profile X up -d` also starts every service
          without a profile: such an incidental start never takes the GPU from
          a heavy model that is desired; a service named by a profile does
          (of several, the last one started).
        """
        if self.outage is not None or self.after_outage:
            return "it was started by the engine after its restart; the desired state stays"
        active = self.desired.active
        if ev.incidental and ev.heavy and active is not None and active != ev.model:
            return f"`docker compose up` starts it with any profile (it has none); {active!r} keeps the GPU"
        return None


OP_STATES = {"Stop": "stopping", "Start": "starting", "Cleanup": "stopping", "Sleep": "sleeping", "Wake": "waking"}


def waiting_message(w: WaitForMemory) -> str:
    return (
        f"waiting for GPU memory (need {w.need_free_mib} MiB free"
        + (f", at most {w.max_used_mib} MiB used" if w.max_used_mib is not None else "")
        + (f"; {', '.join(w.released)} gone from the GPU" if w.released else "")
        + ")"
    )


class ModelWatch:
    """What becomes of the models vramctl started or watches: healthy,
    crashed while starting, exited on its own; and failures, each with its
    back-off (a crash loop keeps backing off) and the switch's outcome."""

    def __init__(self, ctx: Any, backoff: Backoff, track: Tracking, changed: Callable[[], None]) -> None:
        self.ctx, self.backoff, self.track, self.changed = ctx, backoff, track, changed

    def account(self, spec: DeploymentSpec, desired: Desired, observed: Observed, now: float) -> None:
        """What the observation says about the models vramctl started or
        watches: became healthy, crashed while starting, exited on their own."""
        heavy_live = sorted(w.model for w in observed.workloads.values() if w.state is WorkloadState.RUNNING and w.heavy and not w.asleep)
        if len(heavy_live) > 1:
            self.ctx.violation(heavy_live)
        for m, w in observed.workloads.items():
            if w.ready and m not in self.track.healthy:
                self.track.healthy.add(m)
                self.backoff.healthy(m, now)
                self.track.health_since.pop(m, None)
                if m in self.track.starting:
                    self.track.starting.discard(m)
                    self.ctx.note("healthy", m, f"{m!r} is healthy after {now - self.track.started_at.get(m, now):.2f}s")
        self.backoff.settle(now)
        for m in sorted(self.track.exited_on_its_own):
            # Exited, then removed (``docker rm -f`` and ``compose down`` kill
            # first): not a crash after all, but a removal outside vramctl.
            now_seen = observed.workloads.get(m)
            if now_seen is None or now_seen.state.live:
                self.track.exited_on_its_own.discard(m)
            if now_seen is None and m in desired.members:
                self.backoff.reset(m)
                self._removed(spec, desired, m)
        for m in sorted(self.track.starting | self.track.healthy):
            gone = observed.workloads.get(m)
            if gone is not None and gone.state.live:
                continue
            code = gone.exit_code if gone is not None else None
            was_starting = m in self.track.starting
            self.track.forget(m)
            if m not in desired.members:
                continue
            if gone is None:
                self._removed(spec, desired, m)
                continue
            logs = self.ctx.logs(spec, m)
            if was_starting:
                self.fail(m, "Crashed", f"{m!r} exited while starting (exit code {code})", logs, now)
            else:
                self.track.exited_on_its_own.add(m)
                self.fail(m, "Exited", f"{m!r} exited on its own after it was healthy (exit code {code})", logs, now)

    def _removed(self, spec: DeploymentSpec, desired: Desired, m: str) -> None:
        """A wanted model's workload was removed outside vramctl (``docker
        compose down``, ``docker rm``): said, then recreated or released as
        the spec's onRemoved says. Not a crash: no back-off."""
        what = f"{m!r} was removed outside vramctl (docker compose down or docker rm; run `vramctl switch ''` first to free the GPU)"
        if spec.on_removed == "release" and m == desired.active:
            self.ctx.note("removed-outside", m, f"{what}: freeing the GPU (onRemoved: release)")
            self.ctx.request(None, (), source="removed-outside")
        elif spec.on_removed == "release":
            self.ctx.note("removed-outside", m, f"{what}: dropped from the companions (onRemoved: release)")
            self.ctx.request(desired.active, tuple(c for c in desired.companions if c != m), source="removed-outside")
        else:
            self.ctx.note("removed-outside", m, f"{what}: recreating it (onRemoved: recreate)")

    def fail(self, m: str, reason: str, msg: str, logs: list[str], now: float, permanent: bool = False) -> None:
        """A model failed: back off before its next start (or until the spec changes)."""
        if permanent:
            n, retry = self.backoff.fail(m, now)[0], "not retried until the spec changes"
            self.backoff.until[m] = float("inf")
        else:
            n, delay = self.backoff.fail(m, now)
            retry = f"retrying in {delay:.0f}s"
        tail = "\n".join(logs[-10:])
        text = f"{msg} (attempt {n}; {retry})" + (f"\nlast log lines:\n{tail}" if tail else "")
        self.ctx.note("failed", m, text)
        self.fail_switch(reason, text, now)
        self.changed()

    def fail_switch(self, reason: str, text: str, now: float) -> None:
        self.ctx.phase("Failed", reason, text)
        self.ctx.finish_switch("failed", now)
