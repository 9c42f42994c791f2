"""A ModelDeployment's ``.status``, rendered from one snapshot. Pure.

Everything the document says comes in through ``StatusSnapshot``: the
worker's published status, the desired state as it was handed over (with the
``metadata.generation`` it came from), the spec's problems, the GPU figures,
the conditions as last published and the time. Nothing here reads a clock,
a worker or the API; ``tests/unit/test_kubernetes_status.py`` is its table.

Conditions go through ``vramctl.status.conditions.set_condition``, so
lastTransitionTime moves only when a condition's status flips, also across
operator restarts (the published conditions are read back as the starting
point, see ``conditions_from``).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vramctl.observed import Desired
from vramctl.status.book import PHASE_FAILED
from vramctl.status.conditions import Condition, set_condition

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "ConfigWarnings")
CONDITION_MESSAGE_MAX = 4096
_STATUS = {"True": True, "False": False}


@dataclass(frozen=True)
class HandedDesired:
    """The desired state as handed to the worker, carrying the
    ``metadata.generation`` of the spec it came from.

    The worker counts its own generations (``desired.generation``); what it
    has settled (its ``observedGeneration``) is this spec's generation once
    it reaches ``desired.generation``, and ``before`` (what was settled when
    this was handed over) until then.
    """

    desired: Desired
    generation: int | None
    before: int | None = None

    def generation_at(self, worker_generation: Any) -> int | None:
        """The metadata.generation settled when the worker reached ``worker_generation``."""
        if not isinstance(worker_generation, int) or isinstance(worker_generation, bool) or worker_generation < 0:
            return None
        return self.generation if worker_generation >= self.desired.generation else self.before


@dataclass(frozen=True)
class Conflict:
    """Another ModelDeployment holds this one's node and GPU (it is older)."""

    namespace: str
    name: str
    gpu: int


@dataclass(frozen=True)
class StatusSnapshot:
    node_name: str
    now: float  # wall clock, unix seconds
    worker: Mapping[str, Any] | None = None  # the worker's published status; None: no worker runs it
    handed: HandedDesired | None = None
    problems: tuple[tuple[str, str], ...] = ()  # (field path, message) of the newest spec, when invalid
    problem_generation: int | None = None
    conflict: Conflict | None = None
    conflict_generation: int | None = None
    gpu: Mapping[str, Any] | None = None
    last_switch: Mapping[str, Any] | None = None  # as published before this process started
    conditions: Mapping[str, Condition] = field(default_factory=dict)  # as last published


@dataclass(frozen=True)
class RenderedStatus:
    status: dict[str, Any]
    conditions: dict[str, Condition]  # the snapshot's next ``conditions``


def parse_rfc3339(text: Any) -> float | None:
    """Kubernetes' time format (seconds, UTC, "Z") as a unix time; None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def conditions_from(status: Mapping[str, Any] | None) -> dict[str, Condition]:
    """The conditions of a published ``.status`` (an operator restart is no flip)."""
    out: dict[str, Condition] = {}
    for c in (status or {}).get("conditions") or []:
        if not isinstance(c, Mapping) or not isinstance(c.get("type"), str):
            continue
        since = parse_rfc3339(c.get("lastTransitionTime"))
        if since is None:
            continue
        gen = c.get("observedGeneration")
        out[c["type"]] = Condition(
            c["type"],
            str(c.get("status") or "Unknown"),
            str(c.get("reason") or "Unknown"),
            str(c.get("message") or ""),
            since,
            gen if isinstance(gen, int) else 0,
        )
    return out


def render_status(snap: StatusSnapshot) -> RenderedStatus:
    """The ``.status`` document of one ModelDeployment, and its conditions."""
    st: Mapping[str, Any] = snap.worker or {}
    handed = snap.handed

    def k8s_gen(worker_generation: Any) -> int | None:
        return handed.generation_at(worker_generation) if handed is not None else None

    observed = k8s_gen(st.get("observedGeneration"))
    wanted: dict[str, tuple[bool | None, str, str, int | None]] = {}
    for c in st.get("conditions") or []:
        if c.get("type") in CONDITION_TYPES:
            wanted[c["type"]] = (
                _STATUS.get(str(c.get("status"))),
                str(c.get("reason") or "Unknown"),
                str(c.get("message") or ""),
                k8s_gen(c.get("observedGeneration")),
            )
    phase, message = str(st.get("phase", PHASE_FAILED)), str(st.get("message") or "")
    running = snap.worker is not None
    if snap.conflict is not None:
        other = f"{snap.conflict.namespace}/{snap.conflict.name}"
        message = (
            f"gpu {snap.conflict.gpu} of node {snap.node_name} is already managed by ModelDeployment {other} (older): "
            f"nothing runs for this one; delete one of them or change spec.gpu / spec.nodeName"
        )
        phase = PHASE_FAILED
        for ctype in ("Ready", "Progressing"):
            wanted[ctype] = (False, "Conflict", message, snap.conflict_generation)
        wanted["Degraded"] = (True, "Conflict", message, snap.conflict_generation)
    elif snap.problems:
        detail = "; ".join(f"{p}: {m}" for p, m in snap.problems)[:CONDITION_MESSAGE_MAX]
        if not running:
            phase, message = PHASE_FAILED, f"invalid spec: {detail}"
            for ctype in ("Ready", "Progressing"):
                wanted[ctype] = (False, "InvalidSpec", message, None)
        else:
            message = f"invalid spec (generation {snap.problem_generation}), not applied; running generation {observed}: {detail}"
        wanted["Degraded"] = (True, "InvalidSpec", message, snap.problem_generation)

    conditions = dict(snap.conditions)
    out_conditions = []
    for ctype in CONDITION_TYPES:
        value, reason, text, gen = wanted.get(ctype, (None, "Initializing", "", None))
        conditions = set_condition(conditions, ctype, value, reason, text[:CONDITION_MESSAGE_MAX], gen or 0, snap.now)
        doc = conditions[ctype].as_dict()
        if gen is None:
            del doc["observedGeneration"]
        out_conditions.append(doc)

    last = st.get("lastSwitch")
    last_switch = (
        dict(snap.last_switch)
        if not last and snap.last_switch is not None
        else None
        if not last
        else {
            "from": last.get("from"),
            "to": last.get("to"),
            "durationSeconds": last.get("durationSeconds"),
            "outcome": last.get("outcome"),
            "finishedAt": last.get("finishedAt"),
            "generation": k8s_gen(last.get("generation")),
        }
    )
    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "nodeName": snap.node_name,
        "activeModel": st.get("activeModel"),
        "companions": list(st.get("companions") or []),
        "runningModels": list(st.get("runningModels") or []),
        "asleepModels": list(st.get("asleepModels") or []),
        "models": " ".join(f"{m}:{state}" for m, state in sorted((st.get("modelStates") or {}).items())),
        "observedGeneration": observed,
        "conditions": out_conditions,
        "gpu": dict(snap.gpu) if snap.gpu is not None else None,
        "lastSwitch": last_switch,
    }
    return RenderedStatus(status, conditions)
