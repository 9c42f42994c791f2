"""Table tests for the pure planner, plus a reconcile-twice check per case.

Each case is run twice: once comparing the plan to the expected actions, and
once applying the plan's effects to the observed state with a tiny simulator
(Stop -> exited, Start -> running and ready) and planning again, which must
give an empty plan (a reconciler's pass must be idempotent).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from tests.support.builders import PAUSED, RESTARTING, RUNNING, demo, deployment, desired, heavy, is_heavy, light, obs, simulate, wl
from vramctl.observed import Desired, Observed, WorkloadState
from vramctl.planner import Plan, Start, Stop, WaitForMemory, WaitHealthy, plan
from vramctl.spec.models import DeploymentSpec

BASELINE = 300
MARGIN = 256
FLOOR = BASELINE + MARGIN  # max_used_mib when nothing is kept

SPEC = demo()  # llm 12000 (heavy), sdxl 11000 (heavy), tts 3500 (light)
LLM_T, SDXL_T, TTS_T = 60.0, 90.0, 30.0


@dataclass
class Case:
    id: str
    desired: Desired
    observed: Observed
    expected: list[object]
    spec: DeploymentSpec = SPEC
    now: float = 1000.0
    backoff: Mapping[str, float] = field(default_factory=dict)
    deferred: Mapping[str, float] = field(default_factory=dict)


def _plan(c: Case, observed: Observed | None = None) -> Plan:
    return plan(c.spec, c.desired, c.observed if observed is None else observed, c.now, c.backoff, BASELINE, MARGIN)


ORDER_SPEC = deployment(
    {
        "a-voice": light(1000),
        "b-embed": light(500),
        "y-image": heavy(9000),
        "z-chat": heavy(8000),
    }
)

CASES = [
    Case(
        "switch-llm-to-sdxl",
        desired("sdxl"),
        obs(llm="running"),
        [
            Stop("llm", "not desired"),
            WaitForMemory(released=("llm",), need_free_mib=11000, max_used_mib=FLOOR),
            Start("sdxl", "desired"),
            WaitHealthy("sdxl", SDXL_T),
        ],
    ),
    Case("converged", desired("sdxl"), obs(sdxl="running"), []),
    Case("converged-with-companion", desired("llm", "tts"), obs(llm="running", tts="running"), []),
    Case("running-not-ready", desired("sdxl"), obs(wl("sdxl", RUNNING, ready=False)), [WaitHealthy("sdxl", SDXL_T)]),
    Case("restarting-not-ready", desired("llm"), obs(wl("llm", RESTARTING, ready=False)), [WaitHealthy("llm", LLM_T)]),
    Case(
        "drifted-desired-recreated",
        desired("llm"),
        obs(wl("llm", RUNNING, drifted=True)),
        [
            Stop("llm", "spec changed"),
            WaitForMemory(released=("llm",), need_free_mib=12000, max_used_mib=FLOOR),
            Start("llm", "desired"),
            WaitHealthy("llm", LLM_T),
        ],
    ),
    Case(
        "paused-gated-desired-unpaused-after-other-heavy-stops",
        desired("sdxl"),
        obs(wl("llm", RUNNING), wl("sdxl", PAUSED)),
        [
            Stop("llm", "not desired"),
            # The paused sdxl is frozen before it allocated: it counts in need_free, not as kept memory.
            WaitForMemory(released=("llm",), need_free_mib=11000, max_used_mib=FLOOR),
            Start("sdxl", "unpause (gated)"),
            WaitHealthy("sdxl", SDXL_T),
        ],
    ),
    Case(
        "companion-kept-across-heavy-switch",
        desired("sdxl", "tts"),
        obs(llm="running", tts="running"),
        [
            Stop("llm", "not desired"),
            WaitForMemory(released=("llm",), need_free_mib=11000, max_used_mib=FLOOR + 3500),
            Start("sdxl", "desired"),
            WaitHealthy("sdxl", SDXL_T),
        ],
    ),
    Case(
        "companion-kept-without-size-gives-no-max-used",
        desired("b", "tts"),
        obs(a="running", tts="running"),
        [
            Stop("a", "not desired"),
            WaitForMemory(released=("a",), need_free_mib=9000, max_used_mib=None),
            Start("b", "desired"),
            WaitHealthy("b", 300.0),
        ],
        spec=deployment({"a": heavy(8000), "b": heavy(9000), "tts": light()}),
    ),
    Case("companion-removed", desired("llm"), obs(llm="running", tts="running"), [Stop("tts", "not desired")]),
    Case(
        "unknown-workload-stopped",
        desired("llm"),
        obs(wl("llm"), wl("old-model", RUNNING, heavy=True)),
        [Stop("old-model", "not in the spec")],
    ),
    Case(
        "unknown-paused-workload-stopped",
        desired("llm"),
        obs(wl("llm"), wl("gone", PAUSED, heavy=False)),
        [Stop("gone", "not in the spec")],
    ),
    Case(
        "active-none-stops-everything",
        desired(None),
        obs(llm="running", tts="running"),
        [Stop("llm", "not desired"), Stop("tts", "not desired")],
    ),
    Case(
        "active-none-stops-paused-and-restarting",
        desired(None),
        obs(wl("sdxl", PAUSED), wl("llm", RESTARTING, ready=False)),
        [Stop("llm", "not desired"), Stop("sdxl", "not desired")],
    ),
    Case("exited-and-created-need-no-stop", desired(None), obs(llm="exited", sdxl="created", tts="absent"), []),
    Case(
        "cold-start-heavy-then-companion",
        desired("llm", "tts"),
        obs(llm="exited"),
        [
            WaitForMemory(released=(), need_free_mib=12000, max_used_mib=FLOOR),
            Start("llm", "desired"),
            WaitHealthy("llm", LLM_T),
            WaitForMemory(released=(), need_free_mib=3500, max_used_mib=None),
            Start("tts", "desired"),
            WaitHealthy("tts", TTS_T),
        ],
    ),
    Case(
        "companion-added-beside-running-heavy",
        desired("llm", "tts"),
        obs(llm="running"),
        [
            WaitForMemory(released=(), need_free_mib=3500, max_used_mib=FLOOR + 12000),
            Start("tts", "desired"),
            WaitHealthy("tts", TTS_T),
        ],
    ),
    Case(
        "backoff-deferred",
        desired("llm"),
        obs(llm="exited"),
        [],
        now=100.0,
        backoff={"llm": 110.0},
        deferred={"llm": 110.0},
    ),
    Case(
        "backoff-deferred-other-heavy-still-stopped",
        desired("llm"),
        obs(sdxl="running"),
        [Stop("sdxl", "not desired")],
        now=100.0,
        backoff={"llm": 110.0},
        deferred={"llm": 110.0},
    ),
    Case(
        "backoff-expired-at-deadline",
        desired("llm"),
        obs(llm="exited"),
        [
            WaitForMemory(released=(), need_free_mib=12000, max_used_mib=FLOOR),
            Start("llm", "desired"),
            WaitHealthy("llm", LLM_T),
        ],
        now=110.0,
        backoff={"llm": 110.0},
    ),
    Case(
        "backoff-of-heavy-does-not-block-companion",
        desired("llm", "tts"),
        obs(sdxl="running"),
        [
            Stop("sdxl", "not desired"),
            WaitForMemory(released=("sdxl",), need_free_mib=3500, max_used_mib=FLOOR),
            Start("tts", "desired"),
            WaitHealthy("tts", TTS_T),
        ],
        now=100.0,
        backoff={"llm": 500.0},
        deferred={"llm": 500.0},
    ),
    Case(
        "two-heavies-at-startup-undesired-one-stopped",
        desired("llm"),
        obs(llm="running", sdxl="running"),
        [Stop("sdxl", "not desired")],
    ),
    Case(
        "heavy-stops-before-light-stops",
        desired(None),
        obs(**{"a-voice": "running", "b-embed": "running", "y-image": "running", "z-chat": "paused"}),
        [
            Stop("y-image", "not desired"),
            Stop("z-chat", "not desired"),
            Stop("a-voice", "not desired"),
            Stop("b-embed", "not desired"),
        ],
        spec=ORDER_SPEC,
    ),
    Case(
        "unknown-heavy-label-ordered-with-heavies",
        desired(None),
        obs(wl("a-voice"), wl("old-heavy", heavy=True), wl("old-light", heavy=False)),
        [Stop("old-heavy", "not in the spec"), Stop("a-voice", "not desired"), Stop("old-light", "not in the spec")],
        spec=ORDER_SPEC,
    ),
    Case(
        "spec-class-wins-over-workload-label",
        desired(None),
        # tts is light in the spec even though its (stale) label says heavy.
        obs(wl("tts", heavy=True), wl("llm")),
        [Stop("llm", "not desired"), Stop("tts", "not desired")],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan_table(case: Case) -> None:
    p = _plan(case)
    assert list(p.actions) == case.expected
    assert p.deferred == dict(case.deferred)
    assert p.empty is (not case.expected)


# ----------------------------------------------------------------- reconcile twice


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan_then_replan_is_empty(case: Case) -> None:
    first = _plan(case)
    after = simulate(case.spec, case.observed, first)
    second = _plan(case, after)
    assert second.actions == (), second.describe()
    assert second.deferred == first.deferred
    # And the world the plan leads to holds at most one heavy workload.
    live_heavy = [m for m, w in after.workloads.items() if w.state.live and is_heavy(case.spec, w)]
    assert len(live_heavy) <= 1


def test_backoff_then_retry_after_deadline() -> None:
    d, o = desired("llm"), obs(llm="exited")
    waiting = plan(SPEC, d, o, 100.0, {"llm": 110.0}, BASELINE, MARGIN)
    assert waiting.empty and waiting.deferred == {"llm": 110.0}
    assert not any(isinstance(a, Start) for a in waiting.actions)
    retry = plan(SPEC, d, o, 110.5, {"llm": 110.0}, BASELINE, MARGIN)
    assert Start("llm", "desired") in retry.actions
    assert retry.deferred == {}


def test_backoff_of_a_running_model_is_ignored() -> None:
    p = plan(SPEC, desired("llm"), obs(llm="running"), 100.0, {"llm": 500.0}, BASELINE, MARGIN)
    assert p.empty and p.deferred == {}


def test_unknown_desired_model_is_not_started() -> None:
    # The planner trusts the caller's validation, but never starts a model it cannot describe.
    p = plan(SPEC, Desired("ghost"), obs(llm="running"), 0.0)
    assert p.actions == (Stop("llm", "not desired"),)


def test_defaults_of_backoff_baseline_and_margin() -> None:
    p = plan(SPEC, desired("llm"), Observed(), 0.0)
    assert p.actions[0] == WaitForMemory(released=(), need_free_mib=12000, max_used_mib=256)


def test_model_without_vram_needs_zero_free() -> None:
    spec = deployment({"a": heavy()})
    p = plan(spec, desired("a"), Observed(), 0.0, None, 100, 50)
    assert p.actions[0] == WaitForMemory(released=(), need_free_mib=0, max_used_mib=150)


def test_plan_does_not_mutate_its_inputs() -> None:
    o = obs(llm="running", tts="running")
    before = dict(o.workloads)
    backoff = {"sdxl": 1.0}
    plan(SPEC, desired("sdxl"), o, 0.0, backoff, BASELINE, MARGIN)
    assert o.workloads == before and backoff == {"sdxl": 1.0}


# ----------------------------------------------------------------- Plan helpers


def test_describe_switch() -> None:
    p = plan(SPEC, desired("sdxl"), obs(llm="running"), 0.0, None, BASELINE, MARGIN)
    assert p.describe() == [
        "stop llm (not desired)",
        "wait for memory (released: llm; need 11000 MiB free)",
        "start sdxl (desired)",
        "wait until sdxl is healthy",
    ]


def test_describe_cold_start_and_unpause() -> None:
    cold = plan(SPEC, desired("llm"), Observed(), 0.0)
    assert cold.describe() == ["wait for memory (released: -; need 12000 MiB free)", "start llm (desired)", "wait until llm is healthy"]
    unpause = plan(SPEC, desired("sdxl"), obs(sdxl="paused"), 0.0)
    assert unpause.describe()[1] == "start sdxl (unpause (gated))"


def test_describe_several_released_and_drift() -> None:
    p = plan(SPEC, desired("sdxl"), obs(wl("llm"), wl("tts"), wl("sdxl", drifted=True)), 0.0)
    assert p.describe() == [
        "stop llm (not desired)",
        "stop sdxl (spec changed)",
        "stop tts (not desired)",
        "wait for memory (released: llm, sdxl, tts; need 11000 MiB free)",
        "start sdxl (desired)",
        "wait until sdxl is healthy",
    ]


def test_describe_empty_and_flags() -> None:
    converged = plan(SPEC, desired("llm"), obs(llm="running"), 0.0)
    assert converged.describe() == [] and converged.empty and not converged.switching
    waiting = plan(SPEC, desired("llm"), obs(wl("llm", RUNNING, ready=False)), 0.0)
    assert waiting.describe() == ["wait until llm is healthy"] and not waiting.empty and not waiting.switching
    switch = plan(SPEC, desired("sdxl"), obs(llm="running"), 0.0)
    assert switch.switching
    stop_only = plan(SPEC, desired(None), obs(llm="running"), 0.0)
    assert stop_only.switching and stop_only.describe() == ["stop llm (not desired)"]


def test_states_enum_liveness() -> None:
    assert {s for s in WorkloadState if s.live} == {RUNNING, PAUSED, RESTARTING}
