"""``sleep.prewarm``: one sleep and wake while nothing waits, so that the
first warm switch a user waits for only copies.

A model's first sleep pays one-time costs that later ones do not: vLLM pins
its host buffers at the first level-1 sleep (8-9 s for 14 GiB measured, 0.3 s
once the pinned pool exists). With ``sleep.prewarm`` the loop pays them when
the model is ready, awake and wanted, has never slept, and nothing waits in
the GPU's queue (no demand, no hold, no request in flight): instead of
settling it puts the model to sleep; the next plan wakes it (it is still
wanted), and the loop settles after. Meanwhile the queue keeps new demands
waiting (``LoopContext.hold_off_demands``): nobody is served by a sleeping
server. Once per model per worker: a sleep that fails goes the cold way and
is not tried again.
"""

from __future__ import annotations

from collections.abc import Callable

from vramctl.observed import Desired, Observed, WorkloadState
from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.warm import SleepBook
from vramctl.spec.models import DeploymentSpec


class Prewarm:
    """Which model to prewarm now (loop thread only)."""

    def __init__(self, ctx: LoopContext, sleep: SleepBook) -> None:
        self.ctx, self.sleep = ctx, sleep
        self.done: set[str] = set()  # tried once already

    def due(
        self, spec: DeploymentSpec, desired: Desired, observed: Observed, would_sleep: Callable[[str], bool] = lambda _m: True
    ) -> str | None:
        """A wanted model with ``sleep.prewarm`` that is ready and awake, has
        never slept, was not prewarmed and would go away by a sleep
        (``would_sleep``: an auto model whose sleep does not fit is stopped,
        so its first sleep never comes); None when there is none."""
        for m in desired.members:
            ms = spec.models.get(m)
            if ms is None or not ms.heavy or not ms.warm_switch or not ms.sleep_settings.prewarm or m in self.done:
                continue
            w = observed.workloads.get(m)
            if w is None or w.state is not WorkloadState.RUNNING or not w.ready or w.asleep or w.drifted:
                continue
            if m in self.sleep.cold or m in self.sleep.waking or self.sleep.cycles.get(m, 0) > 0 or not would_sleep(m):
                continue
            return m
        return None

    def begin(
        self, spec: DeploymentSpec, desired: Desired, observed: Observed, would_sleep: Callable[[str], bool] = lambda _m: True
    ) -> str | None:
        """The model to put to sleep now for its prewarm, when one is due and
        the queue agreed to hold new demands off; None otherwise (nothing
        due, or something waits: asked again at the next settled look)."""
        m = self.due(spec, desired, observed, would_sleep)
        if m is None or not self.ctx.hold_off_demands():
            return None
        self.done.add(m)
        if spec.models[m].switch_strategy == "auto":
            self.sleep.ways[m] = "sleep"  # the prewarm is of its server's sleep, never the driver's checkpoint
        self.ctx.note(
            "prewarm",
            m,
            f"{m!r} sleeps and wakes once while nothing waits (sleep.prewarm): its first sleep's one-time costs "
            "are paid now, not on a user's switch",
        )
        return m
