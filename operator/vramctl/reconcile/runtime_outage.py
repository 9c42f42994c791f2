"""The runtime (docker engine, process table, API server) cannot be asked.

Owned by one worker's loop. A transient error (``errors.classify``) starts an
outage: said once (progress, the RuntimeUnavailable condition, and the phase
``Unknown`` with the engine named: what runs is not known, so the models are
shown unknown), retried with back-off (``errors.Outage``), while nothing is
changed. When the runtime answers, the phase is the loop's again (Switching
until the next settled state says Ready, Failed or Blocked). Any other error is reported and retried at
the resync. When the runtime answers again the condition clears; until the
next settled state the loop then knows that the engine may have restarted
containers by their restart policies on its own: it looks for a moment
before it starts anything (``ENGINE_SETTLE_S``), and such a start never
changes the desired state (``engine_restarted``).
"""

from __future__ import annotations

import logging

from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.errors import Classified, ErrorClass, Outage
from vramctl.runtimes.base import Runtime
from vramctl.spec.models import DeploymentSpec

log = logging.getLogger("vramctl.worker.supervisor")

# After an engine outage, how long to look before starting anything: the
# engine restarts containers by their restart policies right after it answers.
ENGINE_SETTLE_S = 2.0

# What each runtime asks, as the status names it.
ENGINES = {"docker": "the Docker engine", "kubernetes": "the Kubernetes API server", "process": "the process table"}


def engine_of(kind: str) -> str:
    return ENGINES.get(kind, f"the {kind} runtime")


def is_transient(c: Classified) -> bool:
    return c.kind is ErrorClass.TRANSIENT


class RuntimeOutage:
    """An outage of the runtime, and the moment after it (see the module's docstring)."""

    def __init__(self, ctx: LoopContext, runtime: Runtime) -> None:
        self.ctx, self.runtime = ctx, runtime
        self.outage: Outage | None = None
        self.after_outage = False  # the runtime answers again; until the next settled state
        self.reachable_at = 0.0

    def retry_in(self, now: float) -> float | None:
        """Seconds until the runtime is tried again, None when it may be asked now."""
        if self.outage is not None and now < self.outage.retry_at:
            return self.outage.retry_at - now
        return None

    def error(self, spec: DeploymentSpec, c: Classified, now: float) -> tuple[float, bool]:
        """The runtime could not be asked: transient errors are an outage
        (said once, retried with back-off, the switch stays in progress);
        anything else is reported and retried at the resync. Returns the
        tick's (seconds until the next look, settled)."""
        if not is_transient(c):
            log.error("gpu%d: observing the %s runtime failed: %s", spec.gpu, self.runtime.kind, c.message)
            self.ctx.phase("Failed", c.reason, f"observing the {self.runtime.kind} runtime failed: {c.message}")
            return self.ctx.settings.resync_s, True
        if self.outage is None:
            self.outage = Outage(c, now)
            msg = (
                f"{engine_of(self.runtime.kind)} is unreachable ({c.message}); the models are unknown until it answers; "
                "vramctl keeps retrying and changes nothing meanwhile"
            )
            self.ctx.note("runtime-unavailable", None, msg)
            self.ctx.condition("RuntimeUnavailable", True, c.reason, msg)
            self.ctx.phase("Unknown", "RuntimeUnavailable", msg)
        return self.outage.again(c, now), True

    def reachable(self, now: float) -> bool:
        """The runtime answered: an outage, if any, is over (True when one was)."""
        if self.outage is None:
            return False
        gone = now - self.outage.since
        self.outage = None
        self.after_outage = True  # until the next settled state
        self.reachable_at = now
        msg = f"{engine_of(self.runtime.kind)} answers again after {gone:.1f}s; reconciling"
        self.ctx.note("runtime-available", None, msg)
        self.ctx.condition("RuntimeUnavailable", False, "Reachable", msg)
        self.ctx.phase("Switching", "RuntimeAvailable", msg)  # until the next settled state says how it is
        return True

    def settling(self, now: float) -> float | None:
        """Seconds to look before a start or wake, None when it may go now.
        An engine that just came back restarts containers by their restart
        policies for a moment after it answers: look again before starting
        anything beside them."""
        if self.after_outage and now - self.reachable_at < ENGINE_SETTLE_S:
            return ENGINE_SETTLE_S - (now - self.reachable_at)
        return None

    def engine_restarted(self) -> bool:
        """During an outage or after it until the next settled state: a start
        seen now may be the engine's own (restart policies)."""
        return self.outage is not None or self.after_outage

    def settled(self) -> None:
        """The desired state is reached again: the outage is behind."""
        self.after_outage = False
