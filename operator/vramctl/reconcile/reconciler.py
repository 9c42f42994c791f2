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

The ``Reconciler`` coordinates; each of its concerns is a small part of its own:

- ``model_view``: observing the runtime, and the model states readers see;
- ``model_watch``: what becomes of the models vramctl started (healthy,
  crashed, exited, removed) and their failures with back-off;
- ``finished_ops``: what a finished stop, start, cleanup, sleep or wake
  means, and the classification of a failed one;
- ``runtime_outage``: the runtime unreachable, and the moment after it;
- ``start_checks``: can a plan's starts run, is a health port free;
- ``release_wait``: the wait for the GPU's memory before a start (Blocked);
- ``hand_starts``: the gating of starts made behind vramctl's back;
- ``settled``: what an empty plan means (Ready, Idle, backing off);
- ``ways``: switchStrategy auto's way per switch away, and the sleepers'
  eviction order, by the switch costs;
- ``prewarm``: sleep.prewarm's one sleep and wake while nothing waits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set

from vramctl.costs import CostBook
from vramctl.gpu.base import GpuProbe
from vramctl.observed import Desired, Observed
from vramctl.planner import Cleanup, Plan, Sleep, Start, Stop, WaitForMemory, WaitHealthy, Wake, plan
from vramctl.reconcile import memory_gate
from vramctl.reconcile.actuator import Actuator, Op, OpAction, announcement
from vramctl.reconcile.backoff import Backoff
from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.errors import classify
from vramctl.reconcile.finished_ops import FinishedOps
from vramctl.reconcile.gpu_claims import GpuClaims
from vramctl.reconcile.hand_starts import HandStarts
from vramctl.reconcile.model_view import OP_STATES, ModelView, observe
from vramctl.reconcile.model_watch import ModelWatch, Tracking
from vramctl.reconcile.prewarm import Prewarm
from vramctl.reconcile.release_wait import ReleaseWait
from vramctl.reconcile.runtime_outage import RuntimeOutage
from vramctl.reconcile.settled import next_look, report
from vramctl.reconcile.start_checks import StartChecks
from vramctl.reconcile.warm import SleepBook, SleepMetrics, WarmSwitches
from vramctl.reconcile.ways import Limits, WayChoices
from vramctl.runtimes.base import Runtime, StartEvent
from vramctl.spec.models import DeploymentSpec


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
    host_budget: int | None = None,
    also_cold: Set[str] = frozenset(),
    eviction_order: Sequence[str] | None = None,
) -> Plan:
    cold = (frozenset(book.cold) if book is not None else frozenset()) | also_cold
    last_used = book.last_used if book else None
    return plan(spec, desired, observed, now, backoff.until, baseline or 0, margin, total, cold, last_used, host_budget, eviction_order)


class Reconciler:
    """The loop-owned state of one GPU and its tick. Not thread-safe on
    purpose: only the worker's loop (or a test, in its place) calls it.

    ``ctx`` (``context.LoopContext``) is all it and its parts may ask of
    their worker; ``actuator`` runs its stops, starts, sleeps and wakes;
    ``sleep_metrics`` counts warm switches' fall-backs and residues;
    ``costs``: the GPU's switch cost book (switchStrategy auto, eviction).
    """

    def __init__(
        self,
        spec: DeploymentSpec,
        desired: Desired,
        runtime: Runtime,
        probe: GpuProbe,
        actuator: Actuator,
        ctx: LoopContext,
        sleep_metrics: SleepMetrics | None = None,
        costs: CostBook | None = None,
    ) -> None:
        self.spec, self.desired = spec, desired
        self.runtime, self.probe, self.actuator, self.ctx = runtime, probe, actuator, ctx
        s = ctx.settings
        self.backoff = Backoff(s.backoff_initial_s, s.backoff_max_s, s.stable_s)
        self.baseline = memory_gate.Baseline(s.baseline_mib, s.baseline_mib is not None, s.baseline_mib is not None)
        self.track = Tracking()
        self.view = ModelView()
        self.watch = ModelWatch(ctx, self.backoff, self.track, self._publish_states)
        self.op: Op | None = None
        self.invalid: str | None = None  # the initial desired state failed validation
        self.sleep = SleepBook()
        self.warm = WarmSwitches(ctx, self.sleep, sleep_metrics)
        self.ways = WayChoices(ctx, self.sleep, costs if costs is not None else CostBook(), lambda: actuator.sleeper)
        self.prewarm = Prewarm(ctx, self.sleep)
        self.outage = RuntimeOutage(ctx, runtime)
        self.release = ReleaseWait(ctx, probe, self.track, self.sleep)
        self.checks = StartChecks(ctx, runtime, self.watch)
        self.hands = HandStarts(ctx, runtime, self.track, self.watch, self.outage, self.view, self._submit)
        self.finished = FinishedOps(
            ctx, self.track, self.backoff, self.sleep, self.warm, self.watch, self.outage, self.view, self._pause, self._publish_states
        )
        # The host's GPUs shared with other workers (models on several GPUs); None: this GPU alone.
        self.claims: GpuClaims | None = None
        self.waiting_for_gpus: str | None = None

    # ------------------------------------------------- what readers see

    @property
    def model_states(self) -> Mapping[str, str]:
        return self.view.states

    @property
    def running(self) -> list[str]:
        return self.view.running

    @property
    def asleep(self) -> list[str]:
        return self.view.asleep

    @property
    def kept(self) -> frozenset[str]:
        return self.view.kept

    @property
    def last_release_seconds(self) -> float | None:
        return self.release.last_release_seconds

    @last_release_seconds.setter
    def last_release_seconds(self, seconds: float | None) -> None:
        self.release.last_release_seconds = seconds

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
        retry = self.outage.retry_in(now)
        if retry is not None:
            return retry, True
        try:
            observed = observe(self.runtime, self.spec, self.track, self.actuator.sleeper, self.sleep)
        except Exception as err:
            verdict = self.outage.error(self.spec, classify(err), now)
            if self.outage.outage is not None:
                self.view.runtime_unreachable()
            return verdict
        if self.outage.reachable(now):
            self.release.blocked = None  # a memory wait says again where it stands
        if self.claims is not None:
            self.claims.publish(self.spec, [w.model for w in observed.workloads.values() if w.state.live and w.heavy])
        self.watch.account(self.spec, self.desired, observed, now)
        if self.watch.restart_pending(self.desired, observed, now):
            return self.ctx.settings.poll_interval_s, False  # stopped by hand a moment ago: it may be restarting
        self.warm.awake(observed, self.track.started_at, now)
        if self.op is not None:  # account stopped a model that did not come up
            return self.ctx.settings.poll_interval_s, False
        self._learn_baseline(observed)
        if self.ctx.has_commands():
            return 0.0, False  # a newer command (maybe from this look) is applied before anything is done
        s = self.ctx.settings
        # The sleeps that returned are checked on the GPU at every look until
        # each is verified (the `asleep` step) or falls back (then plan again),
        # whether a start waits behind them or not.
        if self.sleep.slept_at and self.warm.verify(self.spec, self.probe, self.baseline.mib or 0, now, s.memory_timeout_s):
            return 0.0, False
        total = self.ctx.total_mib()
        host_budget = s.host_memory.budget_mib if s.host_memory is not None else None
        limits = Limits(total, s.margin_mib, host_budget, s.pinned_ceiling_mib)
        auto_cold = self.ways.cold(self.spec, self.desired, observed, limits)
        p = plan_for(
            self.spec,
            self.desired,
            observed,
            now,
            self.backoff,
            self.baseline.mib,
            s.margin_mib,
            total,
            self.sleep,
            host_budget,
            auto_cold,
            self.ways.eviction_order(self.spec, total),
        )
        self._view(observed, p)
        if p.empty:
            warm = self.prewarm.begin(
                self.spec,
                self.desired,
                observed,
                lambda m: self.ways.would_sleep(self.spec, observed, m, limits),
            )
            if warm is not None:  # the next plan wakes it; the loop settles after
                self._submit(Sleep(warm, "prewarm"))
                return s.poll_interval_s, False
            if self.sleep.slept_at:  # a residue still settling: look again soon
                return min(self._settle(p, now), s.poll_interval_s), False
            return self._settle(p, now), True
        return self._step(p, now)

    def _step(self, p: Plan, now: float) -> tuple[float, bool]:
        """The plan's first step that can be taken now."""
        s = self.ctx.settings
        if not self.ctx.switch_in_progress and p.switching:
            self.ctx.begin_switch(self.view.holder(), self.desired.active, now)
        elif self.ctx.current_phase in ("Idle", "Ready") and not p.switching:
            self.ctx.phase("Switching", "Starting", "; ".join(p.describe()))
        refused = self.checks.unrunnable(self.spec, self.desired, self.view.observed, p, now)
        if refused is not None:
            return refused
        held = self._take_gpus(p)
        if held is not None:
            return held
        for action in p.actions:
            match action:
                case Sleep(model=m) if self.sleep.cycles_reached(self.spec, m):
                    limit = self.spec.models[m].sleep_settings.max_cycles
                    self.warm.fallback(self.spec, m, "MaxCycles", f"{m!r} slept {limit} times (sleep.maxCycles)", now)
                    return 0.0, False
                case WaitForMemory():
                    verdict = self.release.wait(self.desired, action, self.view.kept, self.baseline.mib, now)
                    if verdict is not None:
                        return verdict
                case WaitHealthy(model=m, timeout_seconds=timeout):
                    return self._wait_health(m, timeout, now)
                case Cleanup() | Stop() | Start() | Sleep() | Wake():
                    held = self._held_back(action, now)
                    if held is not None:
                        return held
                    self._submit(action)
                    return s.poll_interval_s, False
        return s.poll_interval_s, False

    def _take_gpus(self, p: Plan) -> tuple[float, bool] | None:
        """The plan's heavy start or wake takes the GPUs its model needs
        (``gpu_claims``); while another worker holds one, the plan waits
        (what runs keeps running) and the phase says why, once."""
        if self.claims is None:
            return None
        for a in p.actions:
            if isinstance(a, (Start, Wake)) and a.model in self.spec.models and self.spec.models[a.model].heavy:
                need = self.spec.reservation_mib(a.model, self.ctx.total_mib()) or 0
                why = self.claims.take(self.spec, a.model, need)
                if why is not None:
                    if why != self.waiting_for_gpus:
                        self.waiting_for_gpus = why
                        self.ctx.note("waiting", a.model, why)
                        self.ctx.phase("Switching", "WaitingForGpus", why)
                    return self.ctx.settings.poll_interval_s, False
                break
        self.waiting_for_gpus = None
        return None

    def _held_back(self, action: OpAction, now: float) -> tuple[float, bool] | None:
        """Why ``action`` is not submitted yet: a failed stop's retry is not due,
        a start's health port is taken, the engine just came back."""
        if isinstance(action, Stop) and now < self.finished.stop_retry_at:
            return self.finished.stop_retry_at - now, True
        if isinstance(action, Start) and self.checks.port_taken(self.spec, self.view.observed, action.model, now):
            return self.ctx.settings.poll_interval_s, False
        if isinstance(action, (Start, Wake)):
            settling = self.outage.settling(now)
            if settling is not None:
                return settling, False
        return None

    # ------------------------------------------------------------ actions

    def _submit(self, action: OpAction) -> None:
        """Hand ``action`` to the actuator: the op in flight."""
        step, message = announcement(action)
        self.ctx.note(step, action.model, message)
        if isinstance(action, (Sleep, Wake)):
            self.sleep.strategy = "warm"
        elif isinstance(action, Start):
            self.sleep.strategy = "cold"
        # Readers see the step before it takes its time (an inline actuator
        # returns only when it is done).
        self.view.show(action.model, OP_STATES[type(action).__name__])
        self.ctx.publish()
        self.op = self.actuator.submit(self.spec, action)
        self._publish_states()

    def _op_done(self, now: float) -> None:
        op, self.op = self.op, None
        assert op is not None
        self.finished.done(op, self.spec, now)

    # -------------------------------------------------------------- waits

    def _wait_health(self, m: str, timeout: float, now: float) -> tuple[float, bool]:
        """Until ``m`` is healthy, for at most ``timeout`` since its start (or
        since the wait began, for a model vramctl did not start); then a
        woken model goes the cold way and a started one fails and is stopped."""
        since = self.track.started_at.get(m)
        if since is None:
            since = self.track.health_since.setdefault(m, now)
        health = self.spec.health_of(m)
        interval = min(health.interval_seconds if health else 0.1, self.ctx.settings.resync_s)
        if now - since < timeout:
            return interval, False
        if m in self.sleep.waking:
            # The cold way now: stop it, confirm the memory, start it (never a
            # second wait for the health of the process that did not wake).
            self.track.forget(m)
            self.warm.fallback(self.spec, m, "WakeFailed", f"{m!r} not healthy within {timeout:.0f}s after its wake", now)
            self._submit(Stop(m, "not healthy after its wake; going the cold way"))
            return self.ctx.settings.poll_interval_s, False
        logs = self.ctx.logs(self.spec, m)
        self.ctx.note("stopping", m, f"{m!r} not healthy after {timeout:.0f}s: stopping it")
        self.track.forget(m)
        self.watch.fail(m, "StartTimeout", f"{m!r} did not become healthy within {timeout:.0f}s", logs, now)
        self._submit(Stop(m, "not healthy in time"))
        return self.ctx.settings.poll_interval_s, False

    # -------------------------------------------------------- observation

    def _learn_baseline(self, observed: Observed) -> None:
        if self.baseline.configured or self.track.exited_at is not None or self.release.waiting:
            return  # a release may be under way: its memory is not the baseline
        try:
            snap = self.probe.snapshot()
        except Exception:
            return
        self.baseline = self.baseline.observe(snap, any(w.state.live for w in observed.workloads.values()))

    def _view(self, observed: Observed, p: Plan) -> None:
        self.view.update(observed, p)
        self._publish_states()

    def _publish_states(self) -> None:
        """Model states for readers: the last observation, overlaid with the
        action in flight. Replaced whole, never mutated."""
        failed = set(self.backoff.failures) & set(self.backoff.until)
        self.view.publish(self.spec, failed, self.op.action if self.op is not None else None, self.sleep.waking)

    def _settle(self, p: Plan, now: float) -> float:
        """An empty plan: nothing waits any more; returns the seconds until the next look."""
        self.release.reset()
        self.track.exited_at, self.track.exited = None, ()  # nothing waits for that release
        self.outage.settled()
        report(self.ctx, self.desired, p, now)
        return next_look(p, now, self.ctx.settings.resync_s)

    # ------------------------------------------------------------- gating

    def gate(self, ev: StartEvent) -> None:
        """A managed workload of this GPU started (``gating.StartGate`` tells
        whether it was vramctl's own). Anyone else's start is frozen at once,
        before it can allocate; a heavy one becomes the desired model and the
        plan hands over."""
        self.hands.gate(ev, self.spec, self.desired, self.op)

    def _pause(self, ev: StartEvent) -> None:
        self.hands.pause(ev, self.spec, self.desired)
