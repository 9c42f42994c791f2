"""vramctl.status.conditions.set_condition: lastTransitionTime moves only on flips (table)."""

from __future__ import annotations

import pytest

from vramctl.status.conditions import Condition, rfc3339, set_condition

T0, T1 = 1_800_000_000.0, 1_800_000_100.0
READY = Condition("Ready", "True", "Ready", "llm is serving", T0, 1)


@pytest.mark.parametrize(
    ("before", "value", "reason", "message", "generation", "want_status", "want_since"),
    [
        # new condition: now
        (None, True, "Ready", "up", 1, "True", T1),
        (None, None, "Initializing", "", 0, "Unknown", T1),
        # same status: kept, whatever else changes
        (READY, True, "Ready", "llm is serving", 1, "True", T0),
        (READY, True, "Switched", "sdxl is serving", 2, "True", T0),
        # flips: now
        (READY, False, "Switching", "llm -> sdxl", 2, "False", T1),
        (READY, None, "RuntimeUnavailable", "engine gone", 2, "Unknown", T1),
        (Condition("Ready", "Unknown", "Initializing", "", T0, 0), True, "Ready", "", 1, "True", T1),
    ],
)
def test_transition_time_moves_only_on_flips(
    before: Condition | None, value: bool | None, reason: str, message: str, generation: int, want_status: str, want_since: float
) -> None:
    start = {"Ready": before} if before is not None else {}
    after = set_condition(start, "Ready", value, reason, message, generation, T1)
    c = after["Ready"]
    assert (c.status, c.reason, c.message, c.observed_generation, c.last_transition_time) == (
        want_status,
        reason,
        message,
        generation,
        want_since,
    )


def test_the_input_is_not_changed_and_other_types_are_kept() -> None:
    degraded = Condition("Degraded", "False", "AsExpected", "", T0, 1)
    start = {"Ready": READY, "Degraded": degraded}
    after = set_condition(start, "Ready", False, "Failed", "boom", 2, T1)
    assert start["Ready"] is READY and after["Degraded"] is degraded and after["Ready"].status == "False"


def test_as_dict_is_metav1_condition_shaped() -> None:
    assert READY.as_dict() == {
        "type": "Ready",
        "status": "True",
        "reason": "Ready",
        "message": "llm is serving",
        "lastTransitionTime": "2027-01-15T08:00:00Z",
        "observedGeneration": 1,
    }
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
