"""Status conditions shaped like Kubernetes' metav1.Condition.

The one place where "lastTransitionTime moves only when the status flips"
lives (cluster-api's ``conditions.Set``): the supervisor's status book and
the Kubernetes status writer both go through ``set_condition``. Pure: the
time is passed in.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


def rfc3339(ts: float) -> str:
    """A unix time as Kubernetes writes times (RFC 3339, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class Condition:
    type: str
    status: str = "Unknown"  # "True" | "False" | "Unknown"
    reason: str = "Initializing"
    message: str = ""
    last_transition_time: float = 0.0
    observed_generation: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": rfc3339(self.last_transition_time),
            "observedGeneration": self.observed_generation,
        }


def set_condition(
    conditions: Mapping[str, Condition],
    ctype: str,
    value: bool | None,
    reason: str,
    message: str,
    generation: int,
    now: float,
) -> dict[str, Condition]:
    """A copy of ``conditions`` with ``ctype`` set; ``value`` None means Unknown.

    lastTransitionTime is ``now`` only when the status flips (or the
    condition is new); a change of reason, message or generation alone keeps it.
    """
    status = "Unknown" if value is None else ("True" if value else "False")
    old = conditions.get(ctype)
    if old is None:
        new = Condition(ctype, status, reason, message, now, generation)
    else:
        moved = now if old.status != status else old.last_transition_time
        new = replace(old, status=status, reason=reason, message=message, last_transition_time=moved, observed_generation=generation)
    return {**conditions, ctype: new}
