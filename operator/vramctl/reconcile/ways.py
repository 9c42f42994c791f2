"""switchStrategy auto: the way each model leaving the GPU takes, at each switch.

A model with ``switchStrategy: auto`` may sleep or be stopped. When the
desired state no longer wants it while it is awake and ready, ``WayChoices``
asks the cost book (``costs.choose_way``) for the cheapest way away and back
that fits what is left beside the other sleepers (``costs.budgets_for``:
host memory, residue on the GPU, the pinned-memory ceiling, its sleep
cycles). A stop is handed to the planner as a ``cold`` model; a sleep needs
nothing more (the planner puts a warm model to sleep). The progress says
the way and why, once per switch away (step ``way``).

The sleepers' eviction order comes from the same book
(``costs.eviction_order``): the one cheapest to bring back cold goes first.
"""

from __future__ import annotations

from vramctl.costs import Choice, CostBook, budgets_for, choose_way, eviction_order, ways_of
from vramctl.observed import Desired, Observed, WorkloadState
from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.warm import SleepBook
from vramctl.spec.models import DeploymentSpec


class WayChoices:
    """The loop's choice of ways (loop thread only): ``cold`` before each plan."""

    def __init__(self, ctx: LoopContext, sleep: SleepBook, costs: CostBook) -> None:
        self.ctx, self.sleep, self.costs = ctx, sleep, costs
        self.said: dict[str, str] = {}  # model -> the way last said for its switch away in progress

    def cold(
        self,
        spec: DeploymentSpec,
        desired: Desired,
        observed: Observed,
        total_mib: int | None,
        margin_mib: int,
        host_budget_mib: int | None,
        pinned_ceiling_mib: int | None,
    ) -> frozenset[str]:
        """The auto models leaving the GPU now whose cheapest fitting way is a
        stop (the planner's ``cold``); each choice is said once."""
        choices = self.choices(spec, desired, observed, total_mib, margin_mib, host_budget_mib, pinned_ceiling_mib)
        for m in list(self.said):
            if m not in choices:
                del self.said[m]  # gone, asleep or wanted again: the next switch away is said anew
        for m, c in sorted(choices.items()):
            if self.said.get(m) != c.way:
                self.said[m] = c.way
                self.ctx.note("way", m, f"{m!r} goes away by {c.why}")
        return frozenset(m for m, c in choices.items() if c.way == "stop")

    def choices(
        self,
        spec: DeploymentSpec,
        desired: Desired,
        observed: Observed,
        total_mib: int | None,
        margin_mib: int,
        host_budget_mib: int | None,
        pinned_ceiling_mib: int | None,
    ) -> dict[str, Choice]:
        wanted = set(desired.members)
        if not wanted and not desired.keep_asleep:
            return {}  # the GPU is freed: every model is stopped, sleepers too
        leaving = [
            w.model
            for w in observed.workloads.values()
            if w.model in spec.models
            and w.model not in wanted
            and w.state is WorkloadState.RUNNING
            and w.ready
            and not w.asleep
            and not w.drifted
            and spec.models[w.model].heavy
            and spec.models[w.model].warm_switch
        ]
        asleep = [w.model for w in observed.workloads.values() if w.state.live and w.asleep and w.model not in wanted]
        sleepers = [*asleep, *(m for m in leaving if spec.models[m].switch_strategy != "auto" and m not in self.sleep.cold)]
        out: dict[str, Choice] = {}
        for m in sorted(leaving):
            if spec.models[m].switch_strategy != "auto" or m in self.sleep.cold:
                continue
            budgets = budgets_for(
                spec,
                m,
                sleepers=sleepers,
                awake_next=desired.members,
                cycles_left=not self.sleep.cycles_reached(spec, m),
                total_mib=total_mib,
                margin_mib=margin_mib,
                host_budget_mib=host_budget_mib,
                pinned_ceiling_mib=pinned_ceiling_mib,
            )
            out[m] = choose_way(self.costs, spec, m, ways_of(self.costs, spec, m), budgets, total_mib)
        return out

    def would_sleep(
        self,
        spec: DeploymentSpec,
        observed: Observed,
        model: str,
        total_mib: int | None,
        margin_mib: int,
        host_budget_mib: int | None,
        pinned_ceiling_mib: int | None,
    ) -> bool:
        """Whether ``model`` would go away by a sleep now (an auto model's
        cheapest fitting way, beside the sleepers there are); any other
        warm model: True (it sleeps as its spec says)."""
        ms = spec.models.get(model)
        if ms is None or not ms.warm_switch:
            return False
        if ms.switch_strategy != "auto":
            return True
        asleep = [w.model for w in observed.workloads.values() if w.state.live and w.asleep and w.model != model]
        budgets = budgets_for(
            spec,
            model,
            sleepers=asleep,
            awake_next=(),
            cycles_left=not self.sleep.cycles_reached(spec, model),
            total_mib=total_mib,
            margin_mib=margin_mib,
            host_budget_mib=host_budget_mib,
            pinned_ceiling_mib=pinned_ceiling_mib,
        )
        return choose_way(self.costs, spec, model, ways_of(self.costs, spec, model), budgets, total_mib).way != "stop"

    def eviction_order(self, spec: DeploymentSpec, total_mib: int | None) -> list[str]:
        """Every model that may sleep, in the order sleepers are stopped when room is needed."""
        warm = [m for m, ms in spec.models.items() if ms.warm_switch]
        return eviction_order(self.costs, spec, warm, self.sleep.last_used, total_mib)
