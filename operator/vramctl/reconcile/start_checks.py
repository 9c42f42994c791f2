"""Before a start: can the model run at all, and is its health its own?

Owned by one worker's loop. ``unrunnable``: before anything is stopped for
them, the models a plan starts must be runnable (image present, executable
found: the runtime's preflight; their health port not answered by a
foreign server: ``squatted``); if one is not, nothing of the plan is done,
the models that run keep running, and the phase says why, once per desired
generation, until the desired state or the spec changes. ``port_taken``:
health must come from the workload vramctl starts, so a health port that
answers right before the start is served by something else: a failure.
A port shared with a live model of the spec (one runs at a time) answers
for that model: no verdict until it is stopped.
"""

from __future__ import annotations

from collections.abc import Set

from vramctl.observed import Desired, Observed
from vramctl.planner import Plan, Start
from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.model_watch import ModelWatch
from vramctl.runtimes.base import Runtime
from vramctl.runtimes.health import LocalResourceError, http_ready
from vramctl.spec.models import DeploymentSpec


def squatted(spec: DeploymentSpec, m: str, live: Set[str]) -> str | None:
    """Why ``m`` cannot start because a foreign server answers its health
    port (None: free, no HTTP health, shared with a live model of ``live``,
    or this machine cannot tell)."""
    h = spec.health_of(m)
    if h is None or h.path is None or h.port is None:
        return None
    for other in live:
        oh = spec.health_of(other) if other != m and other in spec.models else None
        if oh is not None and oh.port == h.port:
            return None
    try:
        answered = http_ready(h.host, h.port, h.path, timeout=0.5)
    except LocalResourceError:
        return None
    if not answered:
        return None
    return f"port {h.port} ({h.host}) already answers {h.path} before {m!r} runs: something else serves it (PortInUse)"


class StartChecks:
    """The checks before a start (see the module's docstring)."""

    def __init__(self, ctx: LoopContext, runtime: Runtime, watch: ModelWatch) -> None:
        self.ctx, self.runtime, self.watch = ctx, runtime, watch
        self.refused: tuple[int, str, str] | None = None  # (generation, model, problem) last said
        # The models whose health port was found free for the desired generation ``port_free_generation``.
        self.port_free: set[str] = set()
        self.port_free_generation = -1

    def unrunnable(self, spec: DeploymentSpec, desired: Desired, observed: Observed, p: Plan, now: float) -> tuple[float, bool] | None:
        """None when every model the plan starts can run; else the tick's
        (seconds until the next look, settled)."""
        live = {m for m, w in observed.workloads.items() if w.state.live}
        if self.port_free_generation != desired.generation:
            self.port_free, self.port_free_generation = set(), desired.generation
        for a in p.actions:
            if not isinstance(a, Start) or observed.state(a.model).live:
                continue
            reason = "NotRunnable"
            try:
                problem = self.runtime.preflight(spec, a.model)
            except Exception:
                problem = None  # cannot tell (an outage): the start itself will say
            if problem is None and a.model not in self.port_free:
                problem, reason = squatted(spec, a.model, live), "PortInUse"
                if problem is None:
                    self.port_free.add(a.model)
            if problem is not None:
                key = (desired.generation, a.model, problem)
                if self.refused != key:
                    self.refused = key
                    msg = f"{a.model!r} cannot start: {problem}; nothing was stopped for it"
                    self.ctx.note("failed", a.model, msg)
                    self.watch.fail_switch(reason, msg, now)
                return self.ctx.settings.resync_s, True
        self.refused = None
        return None

    def port_taken(self, spec: DeploymentSpec, observed: Observed, m: str, now: float) -> bool:
        """True (and ``m`` failed) when its health port already answers before it runs."""
        if observed.state(m).live:
            return False
        live = {o for o, w in observed.workloads.items() if w.state.live}
        problem = squatted(spec, m, live)
        if problem is None:
            return False
        self.watch.fail(m, "PortInUse", f"{problem}; not started", [], now)
        return True
