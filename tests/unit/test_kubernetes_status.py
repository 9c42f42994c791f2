"""render_status (vramctl.sources.kubernetes.status): a ModelDeployment's
``.status`` from one snapshot, as a table. Pure: no worker, no clock, no API."""

from __future__ import annotations

from typing import Any

import pytest

from vramctl.observed import Desired
from vramctl.sources.kubernetes.status import (
    Conflict,
    HandedDesired,
    StatusSnapshot,
    conditions_from,
    parse_rfc3339,
    render_status,
)
from vramctl.status.conditions import Condition

NOW = 1_800_000_000.0
EARLIER = NOW - 3600


def worker(phase: str = "Ready", observed: int = 3, **kw: Any) -> dict[str, Any]:
    ready = phase in ("Ready", "Idle")
    conds = [
        {"type": "Ready", "status": str(ready), "reason": phase, "message": "", "observedGeneration": observed},
        {"type": "Progressing", "status": str(phase == "Switching"), "reason": phase, "message": "", "observedGeneration": observed},
        {"type": "Degraded", "status": str(phase in ("Failed", "Blocked")), "reason": phase, "message": "", "observedGeneration": observed},
        {"type": "RuntimeUnavailable", "status": "False", "reason": "Reachable", "message": ""},
    ]
    st = {
        "phase": phase,
        "message": kw.pop("message", ""),
        "activeModel": "llm",
        "companions": [],
        "runningModels": ["llm"],
        "observedGeneration": observed,
        "conditions": conds,
        "lastSwitch": None,
    }
    st.update(kw)
    return st


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == ctype)


HANDED = HandedDesired(Desired("llm", (), 3), generation=7, before=6)


@pytest.mark.parametrize(
    ("snap", "phase", "observed", "degraded"),
    [
        # no worker yet, nothing known: Failed with Unknown conditions, no generation
        (StatusSnapshot("n", NOW), "Failed", None, ("Unknown", "Initializing")),
        # the worker settled what was handed over: the spec's generation
        (StatusSnapshot("n", NOW, worker(observed=3), HANDED), "Ready", 7, ("False", "Ready")),
        # not yet: what was settled before the hand-over
        (StatusSnapshot("n", NOW, worker("Switching", observed=2), HANDED), "Switching", 6, ("False", "Switching")),
        # invalid newest spec, the last valid one runs on
        (
            StatusSnapshot("n", NOW, worker(observed=3), HANDED, problems=(("spec.gpu", "bad"),), problem_generation=8),
            "Ready",
            7,
            ("True", "InvalidSpec"),
        ),
        # invalid from the start
        (
            StatusSnapshot("n", NOW, problems=(("spec.activeModel", "no such model"),), problem_generation=1),
            "Failed",
            None,
            ("True", "InvalidSpec"),
        ),
        # a conflict: nothing runs, the other one named
        (StatusSnapshot("n", NOW, conflict=Conflict("ai", "older", 0), conflict_generation=2), "Failed", None, ("True", "Conflict")),
    ],
)
def test_render_table(snap: StatusSnapshot, phase: str, observed: int | None, degraded: tuple[str, str]) -> None:
    out = render_status(snap).status
    assert out["phase"] == phase and out["observedGeneration"] == observed and out["nodeName"] == "n"
    d = cond(out, "Degraded")
    assert (d["status"], d["reason"]) == degraded
    assert [c["type"] for c in out["conditions"]] == ["Ready", "Progressing", "Degraded", "ConfigWarnings"]
    for c in out["conditions"]:
        assert set(c) <= {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}


def test_conflict_names_the_other_and_its_generation() -> None:
    out = render_status(StatusSnapshot("n", NOW, conflict=Conflict("ai", "older", 0), conflict_generation=2)).status
    d = cond(out, "Degraded")
    assert "ai/older" in d["message"] and d["observedGeneration"] == 2 and "ai/older" in out["message"]


def test_transition_times_survive_a_restart_and_move_on_flips() -> None:
    published = render_status(StatusSnapshot("n", EARLIER, worker(observed=3), HANDED)).status
    seeded = conditions_from(published)
    assert seeded["Degraded"].last_transition_time == EARLIER
    same = render_status(StatusSnapshot("n", NOW, worker(observed=3), HANDED, conditions=seeded)).status
    assert cond(same, "Degraded")["lastTransitionTime"] == cond(published, "Degraded")["lastTransitionTime"]
    flipped = render_status(StatusSnapshot("n", NOW, worker("Failed", observed=3), HANDED, conditions=seeded)).status
    assert cond(flipped, "Degraded")["lastTransitionTime"] == "2027-01-15T08:00:00Z"
    assert cond(flipped, "Ready")["lastTransitionTime"] == "2027-01-15T08:00:00Z"


def test_last_switch_generation_is_the_specs_and_an_old_one_is_kept() -> None:
    last = {"from": "llm", "to": "sdxl", "durationSeconds": 1.5, "outcome": "success", "finishedAt": "x", "generation": 3}
    out = render_status(StatusSnapshot("n", NOW, worker(observed=3, lastSwitch=last), HANDED)).status
    assert out["lastSwitch"]["generation"] == 7 and out["lastSwitch"]["to"] == "sdxl"
    kept = {"from": "a", "to": "b", "generation": 2}
    out = render_status(StatusSnapshot("n", NOW, worker(observed=3), HANDED, last_switch=kept)).status
    assert out["lastSwitch"] == kept


@pytest.mark.parametrize(
    ("text", "want"),
    [("2027-01-15T08:00:00Z", NOW), ("", None), (None, None), ("yesterday", None), (5, None)],
)
def test_parse_rfc3339(text: Any, want: float | None) -> None:
    assert parse_rfc3339(text) == want


def test_a_published_condition_without_a_time_is_not_seeded() -> None:
    assert conditions_from({"conditions": [{"type": "Ready", "status": "True"}, "junk"]}) == {}
    assert conditions_from(None) == {}
    assert isinstance(
        conditions_from({"conditions": [{"type": "Ready", "lastTransitionTime": "2027-01-15T08:00:00Z"}]})["Ready"], Condition
    )


def test_the_model_list_shows_each_models_state_including_asleep() -> None:
    w = worker(
        runningModels=["llm"],
        asleepModels=["sdxl"],
        modelStates={"llm": "running", "sdxl": "asleep", "tts": "waking"},
    )
    st = render_status(StatusSnapshot("n", NOW, w, HANDED)).status
    assert st["models"] == "llm:running sdxl:asleep tts:waking"  # the `kubectl get md` Models column
    assert st["asleepModels"] == ["sdxl"] and st["runningModels"] == ["llm"]
    empty = render_status(StatusSnapshot("n", NOW)).status
    assert empty["models"] == "" and empty["asleepModels"] == []
