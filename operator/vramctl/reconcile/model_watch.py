"""What becomes of the models vramctl started or watches, owned by the worker's loop.

``Tracking`` is what the loop remembers between ticks about its own actions
(its starts by ref, which models are starting or were seen healthy, the last
release). ``ModelWatch`` reads each observation against it: a model became
healthy, crashed while starting, exited on its own after it was healthy, or
was removed outside vramctl; and records each failure with its back-off (a
crash loop keeps backing off) and the switch's outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vramctl.observed import Desired, Observed, WorkloadState
from vramctl.reconcile.backoff import Backoff
from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.gating import StartGate
from vramctl.spec.models import DeploymentSpec

# A model stopped by hand (``docker compose restart``, stop then start) that
# starts again within this long was restarted by the user: not a crash.
RESTART_WINDOW_S = 5.0


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
    stopped_by_hand: dict[str, float] = field(default_factory=dict)  # model -> when a stop outside vramctl was seen

    def forget(self, model: str) -> None:
        """vramctl is done with ``model`` (stopped, failed): its start, health and health wait are forgotten."""
        self.gate.forget(model)
        self.started_at.pop(model, None)
        self.starting.discard(model)
        self.healthy.discard(model)
        self.health_since.pop(model, None)

    def restart_pending(self, model: str, now: float) -> bool:
        """``model`` was stopped by hand less than ``RESTART_WINDOW_S`` ago: it may be coming back."""
        at = self.stopped_by_hand.get(model)
        return at is not None and now - at < RESTART_WINDOW_S


class ModelWatch:
    """What becomes of the models vramctl started or watches: healthy,
    crashed while starting, exited on its own; and failures, each with its
    back-off (a crash loop keeps backing off) and the switch's outcome."""

    def __init__(self, ctx: LoopContext, backoff: Backoff, track: Tracking, changed: Callable[[], None]) -> None:
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
        for m, at in list(self.track.stopped_by_hand.items()):
            if now - at >= RESTART_WINDOW_S:
                del self.track.stopped_by_hand[m]  # not started again: it exited (judged below)
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
            if gone is not None and self.track.restart_pending(m, now):
                continue  # stopped by hand a moment ago: a restart (`docker compose restart`) brings it back
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

    def restart_pending(self, desired: Desired, observed: Observed, now: float) -> bool:
        """A wanted model stopped by hand may be on its way back: nothing is
        started in its place until it is, or the window is over."""
        return any(self.track.restart_pending(m, now) and not observed.state(m).live for m in desired.members)

    def _removed(self, spec: DeploymentSpec, desired: Desired, m: str) -> None:
        """A wanted model's workload was removed outside vramctl (``docker
        compose down``, ``docker rm``): said, then recreated or released as
        the spec's onRemoved says. Not a crash: no back-off."""
        what = f"{m!r} was removed outside vramctl (docker compose down or docker rm; run `vramctl switch ''` first to free the GPU)"
        if spec.on_removed == "release" and m == desired.active:
            self.ctx.note("removed-outside", m, f"{what}: freeing the GPU (onRemoved: release)")
            self.ctx.want(None, (), "removed-outside")
        elif spec.on_removed == "release":
            self.ctx.note("removed-outside", m, f"{what}: dropped from the companions (onRemoved: release)")
            self.ctx.want(desired.active, tuple(c for c in desired.companions if c != m), "removed-outside")
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
        """The switch in progress failed: the phase says why."""
        self.ctx.phase("Failed", reason, text)
        self.ctx.finish_switch("failed", now)
