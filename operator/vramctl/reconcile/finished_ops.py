"""What a finished op (stop, start, cleanup, sleep, wake) means for the loop.

Owned by one worker's loop, which hands each op over once its future is
done. A success is recorded: a stop's or cleanup's exit time (the release
the memory wait times), a start's ref (its own start event is then ignored,
and the events held back for it are gated), a sleep or wake in the sleep
book. A failure is classified, in one place:

- a sleep or wake that failed goes the cold way (``WarmSwitches.fallback``);
- a transient error (``errors.classify``) is a runtime outage;
- a start that failed is the model's failure, with back-off (or, permanent,
  not retried until the spec changes);
- a stop or cleanup that failed is retried after a back-off of its own
  (``stop_retry_at``); the model stays where it is and nothing is started meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vramctl.planner import Cleanup, Sleep, Start, Stop, Wake
from vramctl.reconcile.actuator import Op, OpAction
from vramctl.reconcile.backoff import Backoff
from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.errors import Classified, ErrorClass, classify
from vramctl.reconcile.model_view import ModelView
from vramctl.reconcile.model_watch import ModelWatch, Tracking
from vramctl.reconcile.runtime_outage import RuntimeOutage, is_transient
from vramctl.reconcile.warm import SleepBook, WarmSwitches
from vramctl.runtimes import sleepctl
from vramctl.runtimes.base import StartEvent, StopOutcome
from vramctl.spec.models import DeploymentSpec


def describe_error(c: Classified) -> str:
    return f"{c.reason}: {c.message}"


def stop_message(out: StopOutcome) -> str:
    how = "killed after its grace period" if out.killed else "stopped"
    return f"{out.model!r} {how} in {out.seconds:.2f}s"


class FinishedOps:
    """The loop's reading of finished ops (see the module's docstring).
    ``pause`` gates a start event held back for vramctl's own start;
    ``changed`` republishes the model states."""

    def __init__(
        self,
        ctx: LoopContext,
        track: Tracking,
        backoff: Backoff,
        sleep: SleepBook,
        warm: WarmSwitches,
        watch: ModelWatch,
        outage: RuntimeOutage,
        view: ModelView,
        pause: Callable[[StartEvent], None],
        changed: Callable[[], None],
    ) -> None:
        self.ctx, self.track, self.backoff, self.sleep, self.warm = ctx, track, backoff, sleep, warm
        self.watch, self.outage, self.view, self.pause, self.changed = watch, outage, view, pause, changed
        self.stop_retry_at = 0.0  # a failed stop or cleanup is retried from then on

    def done(self, op: Op, spec: DeploymentSpec, now: float) -> None:
        """``op`` finished (its future is done); ``spec``: the loop's spec now."""
        try:
            result = op.future.result()
        except Exception as err:
            if isinstance(op.action, (Sleep, Wake)):
                self._warm_failed(op.action, spec, err, now)
            else:
                self._failed(op, spec, classify(err), now)
            return
        self._succeeded(op.action, result, now)
        self.changed()

    def _succeeded(self, action: OpAction, result: Any, now: float) -> None:
        match action:
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
                self.view.kept = self.view.kept | {m}  # it stays live through the plan: not a leftover for a companion's wait
                self.ctx.note("started", m, f"{m!r} started ({ref[:12]})")
                for ev in self.track.gate.started(m, ref):
                    self.pause(ev)
            case Cleanup(model=m):
                self.track.exited_at = now
                self.track.exited = (*self.track.exited, m)
                self.ctx.note("cleaned-up", m, f"what {m!r} left behind is gone")
            case Sleep(model=m):
                self.sleep.slept(m, now)
                self.view.slept(m)
                self.track.healthy.discard(m)
                self.track.exited_at, self.track.exited = now, (*self.track.exited, m)
            case Wake(model=m):
                self.sleep.woke(m, now)
                self.track.started_at[m] = now
                self.track.starting.add(m)
                self.track.healthy.discard(m)
                self.view.kept = self.view.kept | {m}

    def _warm_failed(self, action: Sleep | Wake, spec: DeploymentSpec, err: Exception, now: float) -> None:
        """A sleep or wake that failed: the model goes the cold way."""
        waking = isinstance(action, Wake)
        default = "WakeFailed" if waking else "SleepFailed"
        reason = sleepctl.fallback_reason(err, waking) if isinstance(err, sleepctl.SleepCallError) else default
        self.warm.fallback(spec, action.model, reason, str(err), now)
        self.changed()

    def _failed(self, op: Op, spec: DeploymentSpec, c: Classified, now: float) -> None:
        m = op.action.model
        if is_transient(c):
            self.outage.error(spec, c, now)
            self.view.runtime_unreachable()
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
