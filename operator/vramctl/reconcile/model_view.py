"""What one GPU's loop sees of its models, and what its readers are shown.

``observe`` asks the runtime for its workloads and adds a health verdict to
each running model of the spec (and, for a sleepable one, whether it
sleeps). ``ModelView`` keeps the last observation with what the loop derives
from it for its steps (the models the plan keeps live) and for readers
(running, asleep, and each model's state as ``MODEL_STATES`` names it,
overlaid with the action in flight). Readers get ``states`` replaced whole,
never mutated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Set
from dataclasses import replace

from vramctl.observed import Observed, Workload, WorkloadState
from vramctl.planner import Cleanup, Plan, Sleep, Start, Stop, Wake
from vramctl.reconcile.model_watch import Tracking
from vramctl.reconcile.warm import SleepBook, Sleeper, sleepable
from vramctl.runtimes.base import Runtime
from vramctl.runtimes.health import LocalResourceError
from vramctl.spec.models import DeploymentSpec

log = logging.getLogger("vramctl.worker.supervisor")

# A model's state as its worker knows it (vramctl_model_state).
# "unknown": the runtime cannot be asked (an outage); what was seen may no longer run.
MODEL_STATES = ("running", "starting", "paused", "stopping", "stopped", "failed", "absent", "asleep", "sleeping", "waking", "unknown")

# A model's state while an action on it is in flight, by the action's kind.
OP_STATES = {"Stop": "stopping", "Start": "starting", "Cleanup": "stopping", "Sleep": "sleeping", "Wake": "waking"}


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


def states_of(spec: DeploymentSpec, observed: Mapping[str, Workload], failed: Set[str]) -> dict[str, str]:
    """Each model's state: those of the spec, and any other workload observed."""
    states = {m: model_state(observed.get(m), m in failed, True) for m in spec.models}
    states.update({m: model_state(w, False, False) for m, w in observed.items() if m not in spec.models})
    return states


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


class ModelView:
    """The last observation and what is derived from it. Owned by the
    worker's loop; ``states``, ``running`` and ``asleep`` are what readers see."""

    def __init__(self) -> None:
        self.observed = Observed()
        self.kept: frozenset[str] = frozenset()  # live and not stopped by the plan: their memory stays in use
        self.running: list[str] = []
        self.asleep: list[str] = []
        self.states: Mapping[str, str] = {}
        self.unknown = False  # the runtime cannot be asked: nothing is shown running

    def runtime_unreachable(self) -> None:
        """The runtime cannot be asked: every model seen is ``unknown``, none
        running or asleep, until the next observation."""
        self.unknown = True
        self.running, self.asleep = [], []
        self.states = {m: "unknown" for m, s in self.states.items() if s != "absent"}

    def update(self, observed: Observed, p: Plan) -> None:
        """A new observation and the plan made from it."""
        self.unknown = False
        stopped = {a.model for a in p.actions if isinstance(a, (Stop, Cleanup))}
        self.kept = frozenset(m for m, w in observed.workloads.items() if w.state.live and m not in stopped)
        self.running = sorted(m for m, w in observed.workloads.items() if w.state is WorkloadState.RUNNING and not w.asleep)
        self.asleep = sorted(m for m, w in observed.workloads.items() if w.state is WorkloadState.RUNNING and w.asleep)
        self.observed = observed

    def publish(
        self, spec: DeploymentSpec, failed: Set[str], in_flight: Cleanup | Stop | Start | Sleep | Wake | None, waking: Set[str]
    ) -> None:
        """Model states for readers: the last observation, overlaid with the
        action in flight (``failed``: models whose last start failed)."""
        if self.unknown:
            return
        states = states_of(spec, self.observed.workloads, failed)
        if in_flight is not None:
            states[in_flight.model] = OP_STATES[type(in_flight).__name__]
        for m in waking:
            if states.get(m) == "starting":
                states[m] = "waking"
        self.states = states

    def show(self, model: str, state: str) -> None:
        """One model's state changed before the next observation says so."""
        self.states = {**self.states, model: state}

    def slept(self, model: str) -> None:
        """``model`` went to sleep: observed asleep until the next look."""
        self.observed = Observed({**self.observed.workloads, model: replace(self.observed.workloads[model], asleep=True)})

    def holder(self) -> str | None:
        """The heavy model awake on the GPU, if any (a switch's source)."""
        for w in self.observed.workloads.values():
            if w.state.live and w.heavy and not w.asleep:
                return w.model
        return None
