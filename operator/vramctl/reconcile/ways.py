"""switchStrategy auto: the way each model leaving the GPU takes, at each switch.

A model with ``switchStrategy: auto`` may sleep or be stopped; with
``sleep.checkpoint`` it may also be checkpointed by the NVIDIA driver, where
the driver's checkpoint API is available (loaded at the worker's start) and
no checkpoint of it was refused or fell back since vramctl started
(``SleepBook.no_checkpoint``). When the desired state no longer wants it
while it is awake and ready, ``WayChoices`` asks the cost book
(``costs.choose_way``) for the cheapest way away and back that fits what is
left beside the other sleepers (``costs.budgets_for``: host memory, shared by
sleepers and checkpoints, a checkpoint needing about 1.1x its VRAM; residue
on the GPU; the pinned-memory ceiling; its sleep cycles). A stop is handed
to the planner as a ``cold`` model; a sleep or a checkpoint needs nothing
more (the planner puts a warm model to sleep; the sleeper routes it by
``SleepBook.ways``). The progress says the way and why, with the estimates,
once per switch away (step ``way``).

The sleepers' eviction order comes from the same book
(``costs.eviction_order``): the one cheapest to bring back cold goes first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vramctl.costs import Choice, CostBook, WayNeeds, budgets_for, checkpoint_host_mib, choose_way, eviction_order, ways_of
from vramctl.observed import Desired, Observed, WorkloadState
from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.warm import SleepBook
from vramctl.runtimes.checkpoint import StrategySleeper
from vramctl.spec.models import DeploymentSpec


@dataclass(frozen=True)
class Limits:
    """What a way's budgets are drawn from (``costs.budgets_for``): the GPU's
    total memory and the planner's margin, the host memory budget and the
    pinned-memory ceiling probed at start (None: unknown, no limit); the
    spec's own budgets come first where it sets them."""

    total_mib: int | None
    margin_mib: int
    host_budget_mib: int | None
    pinned_ceiling_mib: int | None


class WayChoices:
    """The loop's choice of ways (loop thread only): ``cold`` before each plan.
    ``sleeper``: the actuator's sleeper now (a ``StrategySleeper`` offers the
    driver's checkpoint and routes each auto model by ``SleepBook.ways``)."""

    def __init__(self, ctx: LoopContext, sleep: SleepBook, costs: CostBook, sleeper: Callable[[], object] | None = None) -> None:
        self.ctx, self.sleep, self.costs = ctx, sleep, costs
        self.sleeper = sleeper or (lambda: None)
        self.said: dict[str, str] = {}  # model -> the way last said for its switch away in progress

    def _strategy_sleeper(self) -> StrategySleeper | None:
        s = self.sleeper()
        if not isinstance(s, StrategySleeper):
            return None
        s.ways = self.sleep.ways  # one record of the ways taken: the loop writes it, the sleeper routes by it
        return s

    def checkpoint_offered(self, spec: DeploymentSpec, model: str) -> bool:
        """``model`` may be checkpointed now: auto with ``sleep.checkpoint``, the
        driver available, and no checkpoint of it refused or fallen back."""
        ms = spec.models.get(model)
        if ms is None or not ms.auto_checkpoint or model in self.sleep.no_checkpoint:
            return False
        s = self._strategy_sleeper()
        return s is not None and s.checkpoint_available()

    def ways_of(self, spec: DeploymentSpec, model: str, total_mib: int | None) -> tuple[WayNeeds, ...]:
        return ways_of(self.costs, spec, model, self.checkpoint_offered(spec, model), total_mib)

    def host_held(self, spec: DeploymentSpec, sleepers: list[str], total_mib: int | None) -> dict[str, int]:
        """The auto sleepers held by the driver's checkpoint: their host memory (not their sleep's)."""
        return {
            m: checkpoint_host_mib(spec, m, total_mib)
            for m in sleepers
            if m in spec.models and spec.models[m].auto_checkpoint and self.sleep.ways.get(m) == "checkpoint"
        }

    def cold(self, spec: DeploymentSpec, desired: Desired, observed: Observed, limits: Limits) -> frozenset[str]:
        """The auto models leaving the GPU now whose cheapest fitting way is a
        stop (the planner's ``cold``); each choice is said once."""
        choices = self.choices(spec, desired, observed, limits)
        for m in list(self.said):
            if m not in choices:
                del self.said[m]  # gone, asleep or wanted again: the next switch away is said anew
        for m, c in sorted(choices.items()):
            if c.way != "stop":
                self.sleep.ways[m] = c.way  # the sleeper goes this way; the measurement is this way's
            if self.said.get(m) != c.way:
                self.said[m] = c.way
                self.ctx.note("way", m, f"{m!r} goes away by {c.why}")
        return frozenset(m for m, c in choices.items() if c.way == "stop")

    def choices(self, spec: DeploymentSpec, desired: Desired, observed: Observed, limits: Limits) -> dict[str, Choice]:
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
        held = self.host_held(spec, sleepers, limits.total_mib)
        return {
            m: self._choose(spec, m, sleepers, desired.members, held, limits)
            for m in sorted(leaving)
            if spec.models[m].switch_strategy == "auto" and m not in self.sleep.cold
        }

    def _choose(
        self, spec: DeploymentSpec, model: str, sleepers: list[str], awake_next: Iterable[str], held: dict[str, int], limits: Limits
    ) -> Choice:
        """``model``'s cheapest way that fits what ``limits`` leave beside ``sleepers`` while ``awake_next`` run."""
        budgets = budgets_for(
            spec,
            model,
            sleepers=sleepers,
            awake_next=awake_next,
            cycles_left=not self.sleep.cycles_reached(spec, model),
            total_mib=limits.total_mib,
            margin_mib=limits.margin_mib,
            host_budget_mib=limits.host_budget_mib,
            pinned_ceiling_mib=limits.pinned_ceiling_mib,
            host_held=held,
        )
        return choose_way(self.costs, spec, model, self.ways_of(spec, model, limits.total_mib), budgets, limits.total_mib)

    def would_sleep(self, spec: DeploymentSpec, observed: Observed, model: str, limits: Limits) -> bool:
        """Whether ``model`` would go away by its server's sleep now (an auto
        model's cheapest fitting way, beside the sleepers there are: not a
        stop, nor a checkpoint); any other warm model: True (it sleeps as its
        spec says)."""
        ms = spec.models.get(model)
        if ms is None or not ms.warm_switch:
            return False
        if ms.switch_strategy != "auto":
            return True
        asleep = [w.model for w in observed.workloads.values() if w.state.live and w.asleep and w.model != model]
        return self._choose(spec, model, asleep, (), self.host_held(spec, asleep, limits.total_mib), limits).way == "sleep"

    def eviction_order(self, spec: DeploymentSpec, total_mib: int | None) -> list[str]:
        """Every model that may sleep, in the order sleepers are stopped when room is needed."""
        warm = [m for m, ms in spec.models.items() if ms.warm_switch]
        return eviction_order(self.costs, spec, warm, self.sleep.last_used, total_mib)
