"""The planner's warm switching: table cases and the property.

At most one heavy model awake or waking per GPU after any plan; residues plus
the awake model never exceed the budget; a sleepable model that is not wanted
sleeps, a wanted one that sleeps is woken behind a memory wait; sleepers are
evicted in the order given (the cost book's), else least recently used
first; ``cold`` models are stopped instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.support.builders import desired, obs, simulate, wl
from vramctl.observed import Desired, Observed, Workload, WorkloadState
from vramctl.planner import Plan, Sleep, Start, Stop, WaitForMemory, WaitHealthy, Wake, plan
from vramctl.spec.models import DeploymentSpec

BASE, MARGIN = 300, 256


def sleepy(vram: int, residue: int = 1000, port: int = 18000) -> dict[str, Any]:
    return {
        "image": "i",
        "vramMiB": vram,
        "health": {"path": "/health", "port": port},
        "startTimeoutSeconds": 60,
        "switchStrategy": "sleep",
        "sleep": {"level": 2, "maxResidueMiB": residue, "path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"},
    }


SPEC = DeploymentSpec.model_validate(
    {
        "models": {
            "llm": sleepy(12000, 1000, 18000),
            "sdxl": sleepy(11000, 800, 17860),
            "flux": {"image": "i", "vramMiB": 13000},
            "tts": {"class": "light", "image": "i", "vramMiB": 1000},
        }
    }
)


def asleep(name: str) -> Workload:
    return replace(wl(name, ready=False), asleep=True)


def run(d: Desired, o: Observed, total: int | None = 16000, **kw: Any) -> Plan:
    return plan(SPEC, d, o, 0.0, {}, BASE, MARGIN, total, **kw)


def test_an_unwanted_sleepable_model_sleeps_and_the_next_one_starts_behind_its_residue() -> None:
    p = run(desired("sdxl"), obs(llm="running"))
    assert p.actions == (
        Sleep("llm", "not desired"),
        WaitForMemory((), 11000, BASE + MARGIN + 1000, (("llm", 1000),)),
        Start("sdxl", "desired"),
        WaitHealthy("sdxl", 60.0),
    )


def test_a_wanted_model_that_sleeps_is_woken_for_its_reservation_less_its_residue() -> None:
    p = run(desired("llm"), obs(wl("sdxl"), asleep("llm")))
    assert p.actions == (
        Sleep("sdxl", "not desired"),
        WaitForMemory((), 12000 - 1000, BASE + MARGIN + 1000 + 800, (("llm", 1000), ("sdxl", 800))),
        Wake("llm"),
        WaitHealthy("llm", 60.0),
    )


def test_an_asleep_model_not_wanted_stays_asleep() -> None:
    assert run(desired("llm"), obs(wl("llm"), asleep("sdxl"))).actions == ()


def test_nothing_desired_frees_the_gpu_unless_asked_to_keep_models_asleep() -> None:
    world = obs(wl("llm"), asleep("sdxl"))
    freed = run(Desired(None), world).actions
    assert set(freed) == {Stop("llm", "not desired"), Stop("sdxl", "not desired")}
    assert run(Desired(None, (), 0, keep_asleep=True), world).actions == (Sleep("llm", "not desired"),)


def test_a_model_that_is_not_ready_or_not_sleepable_is_stopped() -> None:
    assert run(desired("sdxl"), obs(wl("llm", ready=False))).actions[0] == Stop("llm", "not desired")
    assert run(desired("llm"), obs(flux="running")).actions[0] == Stop("flux", "not desired")


def test_cold_models_are_stopped_asleep_or_awake() -> None:
    assert run(desired("sdxl"), obs(llm="running"), cold={"llm"}).actions[0] == Stop("llm", "not desired")
    p = run(desired("llm"), obs(asleep("llm")), cold={"llm"})
    assert p.actions[:3] == (
        Stop("llm", "cold: not kept asleep"),
        WaitForMemory(("llm",), 12000, BASE + MARGIN, ()),
        Start("llm", "desired"),
    )


def test_sleepers_are_evicted_least_recently_used_first_when_the_next_model_would_not_fit() -> None:
    # flux 13000 + llm 1000 + sdxl 800 = 14800 > 15000 - 256 (the budget: total less the margin)
    assert run(desired("flux"), obs(asleep("llm"), asleep("sdxl")), 16000).actions[0] == WaitForMemory(
        (), 13000, 2356, (("llm", 1000), ("sdxl", 800))
    )
    p = run(desired("flux"), obs(asleep("llm"), asleep("sdxl")), 15000, last_used={"llm": 5.0, "sdxl": 9.0})
    assert p.actions[0] == Stop("llm", "evicted: its residue does not fit beside the next model")
    assert not any(isinstance(a, Stop) and a.model == "sdxl" for a in p.actions)
    p = run(desired("flux"), obs(asleep("llm"), asleep("sdxl")), 15000, last_used={"llm": 9.0, "sdxl": 5.0})
    assert p.actions[0] == Stop("sdxl", "evicted: its residue does not fit beside the next model")


def test_an_eviction_order_overrides_recency_and_the_model_put_to_sleep_now_goes_last() -> None:
    # llm was used last, but the order says it is the cheapest to bring back cold: it goes first.
    recent = {"llm": 9.0, "sdxl": 5.0}
    p = run(desired("flux"), obs(asleep("llm"), asleep("sdxl")), 15000, last_used=recent, eviction_order=["llm", "sdxl"])
    assert p.actions[0] == Stop("llm", "evicted: its residue does not fit beside the next model")
    assert not any(isinstance(a, Stop) and a.model == "sdxl" for a in p.actions)
    # A model the order does not name goes after those it names.
    p = run(desired("flux"), obs(asleep("llm"), asleep("sdxl")), 15000, last_used=recent, eviction_order=["sdxl"])
    assert p.actions[0] == Stop("sdxl", "evicted: its residue does not fit beside the next model")
    # The model put to sleep by this plan was awake until now: evicted last, whatever the order.
    p = run(desired("flux"), obs(asleep("llm"), sdxl="running"), 15000, last_used=recent, eviction_order=["sdxl", "llm"])
    assert Stop("llm", "evicted: its residue does not fit beside the next model") in p.actions
    assert Sleep("sdxl", "not desired") in p.actions


def test_drifted_asleep_model_is_stopped() -> None:
    w = replace(asleep("llm"), drifted=True)
    assert run(desired("llm"), obs(w)).actions[0] == Stop("llm", "spec changed")


# ------------------------------------------------------------------ property

NAMES = ["llm", "sdxl", "flux", "tts"]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Desired, Observed, dict[str, float], frozenset[str], int | None, list[str] | None]:
    heavies = ["llm", "sdxl", "flux"]
    active = draw(st.none() | st.sampled_from(heavies))
    companions = ("tts",) if draw(st.booleans()) else ()
    ws: dict[str, Workload] = {}
    awake_heavy = draw(st.none() | st.sampled_from(heavies))  # a world vramctl left: at most one heavy awake
    for n in NAMES:
        if not draw(st.booleans()) and n != awake_heavy:
            continue
        state = draw(st.sampled_from([WorkloadState.RUNNING, WorkloadState.EXITED, WorkloadState.ABSENT]))
        sleeps = n in ("llm", "sdxl") and n != awake_heavy and state is WorkloadState.RUNNING
        if n in heavies and n != awake_heavy and not sleeps:
            state = WorkloadState.EXITED
        if n == awake_heavy:
            state = WorkloadState.RUNNING
        ws[n] = Workload(n, state, ready=draw(st.booleans()) and not sleeps, drifted=draw(st.booleans()), asleep=sleeps)
    last_used = {n: float(draw(st.integers(0, 9))) for n in NAMES if draw(st.booleans())}
    cold = frozenset(draw(st.lists(st.sampled_from(["llm", "sdxl"]), unique=True)))
    total = draw(st.sampled_from([None, 16000, 15000, 20000]))
    order = draw(st.none() | st.permutations(["llm", "sdxl"]).map(list) | st.just(["sdxl"]))
    return Desired(active, companions, 0, draw(st.booleans())), Observed(ws), last_used, cold, total, order


def awake_heavies(o: Observed) -> list[str]:
    return sorted(m for m, w in o.workloads.items() if w.state.live and SPEC.models[m].heavy and not w.asleep)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_at_most_one_heavy_awake_or_waking_and_residues_fit(
    world: tuple[Desired, Observed, dict[str, float], frozenset[str], int | None, list[str] | None],
) -> None:
    d, o, last_used, cold, total, order = world
    p = run(d, o, total, cold=cold, last_used=last_used, eviction_order=order)
    note(f"plan: {p.describe()}")
    # While the plan runs: a Start or Wake of a heavy model only when no other heavy is awake
    awake = set(awake_heavies(o))
    for a in p.actions:
        match a:
            case Stop(model=m) | Sleep(model=m):
                awake.discard(m)
            case Start(model=m) | Wake(model=m) if SPEC.models[m].heavy:
                assert not awake - {m}, f"{m} started or woken while {awake} awake"
                awake.add(m)
    after = simulate(SPEC, o, p)
    assert len(awake_heavies(after)) <= 1, awake_heavies(after)
    # Residues plus the awake models within the budget (when one is known)
    if total is not None:
        used = sum(
            SPEC.models[m].sleep_settings.max_residue_mib if w.asleep else SPEC.models[m].vram_mib or 0
            for m, w in after.workloads.items()
            if w.state.live
        )
        assert used <= total - MARGIN, f"{used} MiB after {p.describe()}"
    # And the plan converges: nothing left to do
    assert run(d, after, total, cold=cold, last_used=last_used, eviction_order=order).actions == ()
