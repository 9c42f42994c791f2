"""Starts made behind vramctl's back: gated on the worker's loop.

A managed workload of this GPU started; ``gating.StartGate`` tells whether
it was vramctl's own. Anyone else's start (``docker compose --profile sdxl up
-d``, a restart policy after an engine restart) is paused at once, before it
can allocate, and handed to the worker (``ctx.gated``), which makes a heavy
one the desired model so that the plan hands the GPU over; unless it is not
adopted (``not_adopted`` says why). vramctl's own container started again by
its restart policy is a crash: a failure with back-off, and stopped. Started
again right after a stop by hand (a ``kill`` event from the engine, or an
exit without a crash's code: ``docker compose restart``, stop then start),
it is the user's restart: it is let come back, and its health is waited for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vramctl.observed import Desired
from vramctl.planner import Start, Stop
from vramctl.reconcile.actuator import Op
from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.gating import GateDecision
from vramctl.reconcile.model_view import ModelView
from vramctl.reconcile.model_watch import ModelWatch, Tracking
from vramctl.reconcile.runtime_outage import RuntimeOutage
from vramctl.runtimes.base import Runtime, StartEvent
from vramctl.spec.models import DeploymentSpec

log = logging.getLogger("vramctl.worker.supervisor")

# Exit codes of a stop, not a crash: clean, SIGINT, SIGTERM.
_CLEAN_EXITS = (0, 130, 143)


class HandStarts:
    """The gating of starts that were not vramctl's (see the module's docstring).
    ``stop`` submits a stop as the loop's step (the op in flight)."""

    def __init__(
        self,
        ctx: LoopContext,
        runtime: Runtime,
        track: Tracking,
        watch: ModelWatch,
        outage: RuntimeOutage,
        view: ModelView,
        stop: Callable[[Stop], None],
    ) -> None:
        self.ctx, self.runtime, self.track, self.watch = ctx, runtime, track, watch
        self.outage, self.view, self.stop = outage, view, stop

    def gate(self, ev: StartEvent, spec: DeploymentSpec, desired: Desired, op: Op | None) -> None:
        """A managed workload of this GPU started (``op``: the action in flight).
        Anyone else's start is frozen at once, before it can allocate; a heavy
        one becomes the desired model and the plan hands over."""
        if ev.action in ("kill", "die"):
            self._stopped(ev, op)
            return
        if ev.action != "start":
            return  # the next tick (this one's poke) observes the change
        starting = op.action.model if op is not None and isinstance(op.action, Start) else None
        decision = self.track.gate.decide(ev, ev.model in spec.models, starting)
        if decision is GateDecision.PAUSE:
            self.pause(ev, spec, desired)
        elif decision is GateDecision.RESTARTED:
            self._restarted(ev, spec, desired, op)

    def _stopped(self, ev: StartEvent, op: Op | None) -> None:
        """A model vramctl runs was signalled by the engine (``kill``: ``docker
        stop``, ``docker restart``) or exited without a crash's code, and not by
        vramctl's own stop: a stop by hand, maybe a restart."""
        m = ev.model
        if m not in self.track.healthy | self.track.starting or (op is not None and op.action.model == m):
            return
        if ev.action == "kill" or ev.exit_code in _CLEAN_EXITS:
            self.track.stopped_by_hand.setdefault(m, self.ctx.clock())

    def _restarted(self, ev: StartEvent, spec: DeploymentSpec, desired: Desired, op: Op | None) -> None:
        """vramctl's own container of ``ev.model`` was started again by its
        restart policy: the model crashed. Wanted: a failure (crash loop,
        back-off) and stopped, never taken for an intruder; not wanted: frozen."""
        m = ev.model
        if m not in desired.members or op is not None:
            self.pause(ev, spec, desired)
            return
        now = self.ctx.clock()
        if self.track.restart_pending(m, now):
            del self.track.stopped_by_hand[m]
            self.track.forget(m)
            self.track.gate.refs[m] = ev.ref  # still vramctl's container
            self.track.started_at[m], self.track.starting = now, self.track.starting | {m}
            self.ctx.note(
                "restarted-outside", m, f"{m!r} was restarted outside vramctl (docker compose restart): waiting until it is healthy"
            )
            return
        logs = self.ctx.logs(spec, m)
        self.track.forget(m)
        self.watch.fail(m, "CrashLoop", f"{m!r} crashed and its restart policy started it again", logs, now)
        self.stop(Stop(m, "crash loop: its restart policy restarted it"))

    def pause(self, ev: StartEvent, spec: DeploymentSpec, desired: Desired) -> None:
        """Freeze a start that was not vramctl's, and hand it to the worker."""
        try:
            self.runtime.pause(spec, ev.model)
        except Exception as err:  # it may have exited already: the next tick sees it
            log.warning("gpu%d: could not pause %r: %s", spec.gpu, ev.model, err)
        else:
            self.view.show(ev.model, "paused")
        self.ctx.gated(ev, self._not_adopted(ev, desired))

    def _not_adopted(self, ev: StartEvent, desired: Desired) -> str | None:
        """Why a gated start does not become the desired state (None: it does).

        - After an engine outage the daemon restarts containers on its own
          (restart policies): an engine restart never changes the desired state.
        - One `docker compose --profile X up -d` also starts every service
          without a profile: such an incidental start never takes the GPU from
          a heavy model that is desired; a service named by a profile does
          (of several, the last one started).
        """
        if self.outage.engine_restarted():
            return "it was started by the engine after its restart; the desired state stays"
        active = desired.active
        if ev.incidental and ev.heavy and active is not None and active != ev.model:
            return f"`docker compose up` starts it with any profile (it has none); {active!r} keeps the GPU"
        return None
