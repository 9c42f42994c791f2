"""The worker's status book: phase, conditions, progress, the switch record.

Owned by the worker's loop (its only writer); ``render`` gives the
immutable status the loop publishes for readers. Pure but for the wall
clock, which is passed in, and its ``journal``: each note and each rendered
status is published there as it happens (``status.events``, GET /events).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vramctl.status.conditions import Condition, rfc3339, set_condition
from vramctl.status.events import EventJournal

PHASE_IDLE = "Idle"
PHASE_SWITCHING = "Switching"
PHASE_READY = "Ready"
PHASE_BLOCKED = "Blocked"
PHASE_FAILED = "Failed"
# The runtime (the Docker engine, the API server) cannot be asked: what runs is not known.
PHASE_UNKNOWN = "Unknown"
PHASES = (PHASE_IDLE, PHASE_SWITCHING, PHASE_READY, PHASE_BLOCKED, PHASE_FAILED, PHASE_UNKNOWN)
SWITCH_OUTCOMES = ("success", "failed", "blocked")
CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "ConfigWarnings", "RuntimeUnavailable")
# Progress steps logged as warnings.
WARNING_STEPS = frozenset({"failed", "violation", "gated", "rejected", "runtime-unavailable", "removed-outside"})


@dataclass
class SwitchRecord:
    source: str | None
    target: str | None
    started: float  # monotonic


@dataclass
class StatusBook:
    gpu: int
    wall_start: float
    phase: str = PHASE_IDLE
    message: str = ""
    conditions: dict[str, Condition] = field(default_factory=dict)
    progress: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=300))
    seq: int = 0
    last_switch: dict[str, Any] | None = None
    observed_generation: int = -1  # the desired generation the last settled outcome answers
    switch: SwitchRecord | None = None
    journal: EventJournal | None = None  # where notes and rendered statuses are published as events (GET /events)

    def __post_init__(self) -> None:
        # Unknown since the worker started: lastTransitionTime must be a real time (RFC 3339), never "".
        for t in CONDITION_TYPES:
            self.conditions.setdefault(t, Condition(t, last_transition_time=self.wall_start))
        self.conditions = set_condition(self.conditions, "RuntimeUnavailable", False, "Reachable", "", 0, self.wall_start)

    def note(self, step: str, model: str | None, message: str, wall: float) -> dict[str, Any]:
        self.seq += 1
        entry = {"seq": self.seq, "time": wall, "gpu": self.gpu, "step": step, "model": model, "message": message}
        self.progress.append(entry)
        if self.journal is not None:
            self.journal.publish_note(self.gpu, entry)
        return entry

    def set_phase(self, phase: str, reason: str, message: str, generation: int, wall: float) -> None:
        self.phase, self.message = phase, message
        c = self.conditions
        c = set_condition(c, "Ready", phase in (PHASE_READY, PHASE_IDLE), reason, message, generation, wall)
        c = set_condition(c, "Progressing", phase == PHASE_SWITCHING, reason, message, generation, wall)
        c = set_condition(c, "Degraded", phase in (PHASE_FAILED, PHASE_BLOCKED), reason, message, generation, wall)
        warn = c["ConfigWarnings"]
        # The spec in use is checked for pitfalls as a whole: that verdict is as current as the phase.
        c = set_condition(c, "ConfigWarnings", warn.status == "True", warn.reason, warn.message, generation, wall)
        self.conditions = c

    def set_condition(self, ctype: str, value: bool, reason: str, message: str, generation: int, wall: float) -> None:
        self.conditions = set_condition(self.conditions, ctype, value, reason, message, generation, wall)

    def finish_switch(self, outcome: str, duration: float, generation: int, wall: float) -> SwitchRecord | None:
        """Close the switch in progress (if any) with its outcome; returns it."""
        sw, self.switch = self.switch, None
        if sw is None:
            return None
        self.last_switch = {
            "from": sw.source,
            "to": sw.target,
            "durationSeconds": round(duration, 3),
            "outcome": outcome,
            "finishedAt": rfc3339(wall),
            "generation": generation,
        }
        return sw

    def render(self, **live: Any) -> MappingProxyType[str, Any]:
        """The status readers see: the book's part plus the loop's ``live`` values."""
        status: dict[str, Any] = {
            "gpu": self.gpu,
            "phase": self.phase,
            "message": self.message,
            "conditions": [c.as_dict() for c in self.conditions.values()],
            "lastSwitch": self.last_switch,
            "progressSeq": self.seq,
            **live,
        }
        rendered = MappingProxyType(status)
        if self.journal is not None:
            self.journal.publish_status(self.gpu, rendered)
        return rendered
