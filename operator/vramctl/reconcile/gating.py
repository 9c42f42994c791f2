"""Which managed starts were vramctl's own? Pure, owned by a worker's loop.

vramctl's own start is known by the ref (container id, pid) that the
runtime's start returned: its one start event is ignored, once. Every other
start of a model of this GPU (``docker compose --profile ... up -d``, a
restart policy, a daemon restart) is gated: frozen, then decided by the
plan. An event that arrives while vramctl's own start of the same model is
still in flight (docker may report the start before the call returns) waits
until that start returns its ref. No time window is involved, and a model
that vramctl stopped has no own start left to ignore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from vramctl.runtimes.base import StartEvent


class GateDecision(StrEnum):
    IGNORE = "ignore"  # vramctl's own start, or not a model of this GPU's spec
    WAIT = "wait"  # vramctl's start of that model is in flight: decided when it returns
    PAUSE = "pause"  # someone else's start: freeze it
    RESTARTED = "restarted"  # vramctl's own container started again (a restart policy): the model crashed


@dataclass
class StartGate:
    own: dict[str, str] = field(default_factory=dict)  # model -> ref of vramctl's start, until its event is seen
    refs: dict[str, str] = field(default_factory=dict)  # model -> ref vramctl started, until it stops the model
    pending: list[StartEvent] = field(default_factory=list)

    def decide(self, ev: StartEvent, in_spec: bool, starting: str | None) -> GateDecision:
        """``starting``: the model whose start vramctl has in flight, if any."""
        if not in_spec:
            return GateDecision.IGNORE
        if self.own.get(ev.model) == ev.ref:
            del self.own[ev.model]  # seen once: a later start of the same ref is not ours
            return GateDecision.IGNORE
        if self.refs.get(ev.model) == ev.ref:
            return GateDecision.RESTARTED
        if starting == ev.model:
            self.pending.append(ev)
            return GateDecision.WAIT
        return GateDecision.PAUSE

    def started(self, model: str, ref: str) -> list[StartEvent]:
        """vramctl's start of ``model`` returned ``ref``. Returns the events
        held back for it that were not that start (to be paused)."""
        self.own[model] = self.refs[model] = ref
        held = [ev for ev in self.pending if ev.model == model]
        self.pending = [ev for ev in self.pending if ev.model != model]
        others = []
        for ev in held:
            if ev.ref == ref and self.own.get(model) == ref:
                del self.own[model]
            elif ev.ref != ref:
                others.append(ev)
        return others

    def forget(self, model: str) -> None:
        """The model was stopped (or failed): no start of it is vramctl's any more."""
        self.own.pop(model, None)
        self.refs.pop(model, None)
