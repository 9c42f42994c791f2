"""The switch cost book (vramctl.costs): estimates, priors, the stopwatch, a
whole switch's estimate, and the plain dict the state file keeps."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vramctl.costs import (
    DEFAULT_GIB,
    PATHS,
    PRIORS,
    RECENT,
    Budgets,
    CostBook,
    Estimate,
    Stopwatch,
    WayNeeds,
    choose_way,
    declared_gib,
    eviction_order,
    over_budget,
    path_of,
    paths_of,
    switch_seconds,
    turn_seconds,
    ways_of,
)
from vramctl.spec.models import DeploymentSpec


def spec(**models: dict[str, Any]) -> DeploymentSpec:
    return DeploymentSpec.model_validate({"models": models})


def stopper(vram: int | None = 16 * 1024) -> dict[str, Any]:
    return {"image": "x", **({"vramMiB": vram} if vram is not None else {})}


def sleeper(level: int = 1, vram: int = 16 * 1024, host: int | None = 8 * 1024) -> dict[str, Any]:
    sleep: dict[str, Any] = {"level": level, "path": "/sleep", "wakePath": "/wake_up"}
    if host is not None:
        sleep["hostMemoryMiB"] = host
    return {"image": "x", "vramMiB": vram, "switchStrategy": "sleep", "sleep": sleep, "health": {"path": "/health", "port": 18000}}


def checkpointed(vram: int = 16 * 1024, host: int = 18 * 1024) -> dict[str, Any]:
    return {"image": "x", "vramMiB": vram, "switchStrategy": "checkpoint", "sleep": {"hostMemoryMiB": host}}


def book(*records: tuple[str, str, float]) -> CostBook:
    b = CostBook()
    for model, path, seconds in records:
        b.record(model, path, seconds)  # type: ignore[arg-type]
    return b


# -- estimates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], Estimate(PRIORS["start"].seconds(16.0), "prior")),
        ([20.0], Estimate(20.0, "measured", 1)),
        ([20.0, 30.0], Estimate(25.0, "measured", 2)),
        # One outlier (the first sleep pins host memory) does not move the median.
        ([9.0, 0.5, 0.5, 0.6], Estimate(0.55, "measured", 4)),
        ([100.0, 1.0, 1.0], Estimate(1.0, "measured", 3)),
        # Only the last RECENT count: old slow starts age out.
        ([90.0] * 10 + [10.0] * RECENT, Estimate(10.0, "measured", RECENT)),
        # Nonsense is not a measurement.
        ([-1.0, math.nan, math.inf], Estimate(PRIORS["start"].seconds(16.0), "prior")),
    ],
)
def test_estimate_is_the_median_of_the_recent_else_the_prior(records: list[float], expected: Estimate) -> None:
    b = book(*(("llm", "start", s) for s in records))
    assert b.estimate("llm", "start", 16.0) == expected


def test_paths_and_models_are_kept_apart() -> None:
    b = book(("llm", "start", 30.0), ("llm", "wake-l1", 0.4), ("sdxl", "start", 12.0))
    assert b.estimate("llm", "start").seconds == 30.0
    assert b.estimate("llm", "wake-l1").seconds == 0.4
    assert b.estimate("sdxl", "start").seconds == 12.0
    assert b.estimate("sdxl", "wake-l1").source == "prior"


@pytest.mark.parametrize(
    ("path", "gib", "seconds"),
    [
        # SDXL, 16.5 GiB: 30.7 s measured from a cold start to its first image (H100).
        ("start", 16.5, 5.0 + 1.9 * 16.5),
        # Through vramctl on an H100 (results/warm_proof-checkpoint-h100.json): a 19 GiB LLM stand-in
        # checkpointed in 9.1 s and restored in 3.7 s; the 10.3 GiB SDXL server 4.9 s and 1.8 s.
        ("checkpoint", 16.5, 0.1 + 0.47 * 16.5),
        ("restore", 16.5, 0.1 + 0.19 * 16.5),
        # A warm wake is a fraction of a second, a cold start tens of seconds.
        ("wake-l1", 14.0, 0.2 + 0.05 * 14.0),
        (None, None, None),
    ],
)
def test_priors_scale_with_the_declared_size(path: str | None, gib: float | None, seconds: float | None) -> None:
    if path is None:
        # No size declared: DEFAULT_GIB stands in.
        assert CostBook().estimate("m", "start").seconds == pytest.approx(PRIORS["start"].seconds(DEFAULT_GIB))
        return
    assert CostBook().estimate("m", path, gib).seconds == pytest.approx(seconds)  # type: ignore[arg-type]


def test_priors_put_warm_far_below_cold() -> None:
    b = CostBook()
    for gib in (4.0, 14.0, 40.0):
        warm = b.estimate("m", "sleep-l1", gib).seconds + b.estimate("m", "wake-l1", gib).seconds
        cold = b.estimate("m", "stop", gib).seconds + b.estimate("m", "start", gib).seconds
        assert cold > 5 * warm


def test_residue_and_host_memory_are_kept_with_the_path() -> None:
    b = CostBook()
    b.record("llm", "sleep-l1", 0.5, residue_mib=900, host_mib=8192)
    b.record("llm", "sleep-l1", 0.6)  # a measurement without them keeps the last known
    pc = b.costs("llm", "sleep-l1")
    assert pc is not None and (pc.recent, pc.residue_mib, pc.host_mib) == ([0.5, 0.6], 900, 8192)


# -- the model's paths and sizes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "paths"),
    [
        (stopper(), ("start", "stop")),
        (sleeper(level=1), ("start", "stop", "sleep-l1", "wake-l1")),
        (sleeper(level=2, host=None), ("start", "stop", "sleep-l2", "wake-l2")),
        (checkpointed(), ("start", "stop", "checkpoint", "restore")),
    ],
)
def test_paths_of_follow_the_switch_strategy(model: dict[str, Any], paths: tuple[str, ...]) -> None:
    assert paths_of(spec(m=model), "m") == paths


@pytest.mark.parametrize(
    ("model", "path", "gib"),
    [
        (stopper(16 * 1024), "start", 16.0),
        (stopper(None), "start", None),
        (sleeper(vram=20 * 1024, host=6 * 1024), "wake-l1", 6.0),  # the weights copied back, not the KV cache
        (sleeper(vram=20 * 1024, host=6 * 1024), "start", 20.0),
        (checkpointed(vram=16 * 1024, host=18 * 1024), "restore", 18.0),
    ],
)
def test_declared_gib(model: dict[str, Any], path: str, gib: float | None) -> None:
    assert declared_gib(spec(m=model), "m", path) == gib  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "kind", "path"),
    [
        (stopper(), "start", "start"),
        (stopper(), "stop", "stop"),
        (sleeper(level=1), "sleep", "sleep-l1"),
        (sleeper(level=1), "wake", "wake-l1"),
        (sleeper(level=2, host=None), "sleep", "sleep-l2"),
        (sleeper(level=2, host=None), "wake", "wake-l2"),
        (checkpointed(), "sleep", "checkpoint"),
        (checkpointed(), "wake", "restore"),
    ],
)
def test_path_of_a_measured_step(model: dict[str, Any], kind: str, path: str) -> None:
    assert path_of(spec(m=model), "m", kind) == path  # type: ignore[arg-type]


# -- a whole switch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("active", "target", "asleep", "expected"),
    [
        ("llm", "llm", (), 0.0),
        (None, "sdxl", (), 30.0),  # nothing to put away: the cold start
        ("llm", "sdxl", (), 0.3 + 30.0),  # llm sleeps, sdxl starts cold
        ("llm", "sdxl", ("sdxl",), 0.3 + 0.4),  # llm sleeps, sdxl wakes: warm
        ("sdxl", "llm", ("llm",), 2.0 + 0.2),  # sdxl only stops (switchStrategy stop); llm wakes
        ("sdxl", "llm", (), 2.0 + 25.0),
    ],
)
def test_switch_seconds(active: str | None, target: str, asleep: tuple[str, ...], expected: float) -> None:
    s = spec(llm=sleeper(level=1), sdxl=stopper())
    b = book(
        ("llm", "sleep-l1", 0.3),
        ("llm", "wake-l1", 0.2),
        ("llm", "start", 25.0),
        ("sdxl", "start", 30.0),
        ("sdxl", "stop", 2.0),
        ("sdxl", "wake-l1", 0.4),  # never used: sdxl cannot sleep, but a wake would be this
    )
    assert switch_seconds(b, s, active, target, asleep) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("active", "target", "asleep", "expected"),
    [
        (None, "sdxl", (), 30.0),  # nothing to come back to
        ("llm", "llm", (), 0.0),
        # llm sleeps (0.3), sdxl starts (30); sdxl stops (2), llm wakes (0.2).
        ("llm", "sdxl", (), 0.3 + 30.0 + 2.0 + 0.2),
        # sdxl stops (2), llm wakes (0.2); llm sleeps (0.3), sdxl starts cold again (30).
        ("sdxl", "llm", ("llm",), 2.0 + 0.2 + 0.3 + 30.0),
        # Both sleep and are asleep in turn: warm both ways.
        ("a", "b", ("b",), 0.1 + 0.2 + 0.1 + 0.2),
    ],
)
def test_turn_seconds_is_there_and_back(active: str | None, target: str, asleep: tuple[str, ...], expected: float) -> None:
    s = spec(llm=sleeper(level=1), sdxl=stopper(), a=sleeper(level=1), b=sleeper(level=1))
    b = book(
        ("llm", "sleep-l1", 0.3),
        ("llm", "wake-l1", 0.2),
        ("sdxl", "start", 30.0),
        ("sdxl", "stop", 2.0),
        ("a", "sleep-l1", 0.1),
        ("a", "wake-l1", 0.2),
        ("b", "sleep-l1", 0.1),
        ("b", "wake-l1", 0.2),
    )
    assert turn_seconds(b, s, active, target, asleep) == pytest.approx(expected)


def test_a_checkpointed_model_goes_by_checkpoint_and_comes_back_by_restore() -> None:
    s = spec(gs=checkpointed(), llm=stopper())
    b = book(("gs", "checkpoint", 9.0), ("gs", "restore", 4.0), ("llm", "start", 20.0), ("llm", "stop", 1.0))
    assert switch_seconds(b, s, "gs", "llm") == pytest.approx(9.0 + 20.0)
    assert switch_seconds(b, s, "llm", "gs", ("gs",)) == pytest.approx(1.0 + 4.0)
    assert turn_seconds(b, s, "gs", "llm") == pytest.approx(9.0 + 20.0 + 1.0 + 4.0)


def test_switch_seconds_from_priors_alone() -> None:
    s = spec(a=stopper(10 * 1024), b=stopper(20 * 1024))
    expected = PRIORS["stop"].seconds(10.0) + PRIORS["start"].seconds(20.0)
    assert switch_seconds(CostBook(), s, "a", "b") == pytest.approx(expected)


def switched(b: CostBook, *seconds: float) -> CostBook:
    """``b`` after whole switches of ``seconds`` on its GPU."""
    for s in seconds:
        b.record_switch(s)
    return b


def test_a_switch_with_a_part_not_measured_takes_what_the_gpus_switches_took() -> None:
    s = spec(a=stopper(10 * 1024), b=stopper(20 * 1024))
    # Nothing measured: the GPU's recent switches (0.3 s) stand for the
    # whole switch, not the priors' tens of seconds.
    assert switch_seconds(switched(CostBook(), 0.2, 0.3, 0.9), s, "a", "b") == 0.3
    # One part measured, the other not: still the GPU's figure.
    assert switch_seconds(switched(book(("b", "start", 0.2)), 0.3), s, "a", "b") == 0.3
    # Every part measured: the measurements, whatever the GPU's other switches took.
    both = switched(book(("a", "stop", 0.1), ("b", "start", 0.2)), 30.0)
    assert switch_seconds(both, s, "a", "b") == pytest.approx(0.3)
    # No recent switch: the priors.
    assert switch_seconds(CostBook(), s, "a", "b") > 20
    # The queue's serving window (there and back) takes the same figure.
    assert turn_seconds(switched(CostBook(), 0.3), s, "a", "b") == pytest.approx(0.6)


def test_recent_switches_are_bounded_and_bad_durations_dropped() -> None:
    b = switched(CostBook(), *[float(i) for i in range(20)], -1.0, math.nan, math.inf)
    assert b.switches == [float(i) for i in range(13, 20)] and b.switch_median() == 16.0
    assert CostBook().switch_median() is None


# -- the stopwatch: progress steps in, durations out ---------------------------------------------


@pytest.mark.parametrize(
    ("steps", "measured"),
    [
        ([("starting", 0.0), ("started", 1.0), ("healthy", 21.0)], [("start", 21.0)]),
        ([("stopping", 5.0), ("stopped", 6.5)], [("stop", 1.5)]),
        ([("sleeping", 1.0), ("asleep", 1.5)], [("sleep", 0.5)]),
        # A wake is seen healthy before it is awake: the wake ends at awake.
        ([("waking", 2.0), ("healthy", 2.25), ("awake", 2.25)], [("wake", 0.25)]),
        # A failed start or a sleep that went the cold way measures nothing.
        ([("starting", 0.0), ("failed", 3.0), ("healthy", 9.0)], []),
        ([("sleeping", 0.0), ("SleepFallback", 3.0), ("asleep", 4.0)], []),
        # Begun again: timed from the new beginning ("not healthy: stopping it", then the stop is handed over).
        ([("stopping", 0.0), ("stopping", 2.0), ("stopped", 3.0)], [("stop", 1.0)]),
        # An end without its beginning (a model vramctl adopted) measures nothing.
        ([("healthy", 3.0), ("awake", 4.0)], []),
    ],
)
def test_stopwatch(steps: list[tuple[str, float]], measured: list[tuple[str, float]]) -> None:
    sw = Stopwatch()
    out = [r for step, now in steps if (r := sw.step(step, "m", now)) is not None]
    assert out == measured
    assert sw.step("healthy", None, 99.0) is None


def test_stopwatch_keeps_models_apart() -> None:
    sw = Stopwatch()
    sw.step("stopping", "a", 0.0)
    sw.step("starting", "b", 1.0)
    assert sw.step("stopped", "a", 2.0) == ("stop", 2.0)
    assert sw.step("healthy", "b", 11.0) == ("start", 10.0)
    assert sw.pending == {}


# -- the plain dict the state file keeps ----------------------------------------------------------


def test_round_trip_through_json() -> None:
    b = book(("llm", "start", 25.0), ("llm", "start", 27.5), ("sdxl", "stop", 1.25))
    b.record("llm", "sleep-l1", 0.5, residue_mib=800, host_mib=8000)
    again = CostBook.from_dict(json.loads(json.dumps(b.to_dict())))
    assert again.to_dict() == b.to_dict()
    assert again.estimate("llm", "start") == Estimate(26.25, "measured", 2)


def test_the_status_view_reads_back_as_the_same_book() -> None:
    s = spec(llm=sleeper(level=1), sdxl=stopper())
    b = book(("llm", "start", 25.0), ("llm", "wake-l1", 0.25))
    view = b.view(s)
    assert view["llm"]["wake-l1"] == {"seconds": 0.25, "source": "measured", "recent": [0.25]}
    assert view["sdxl"]["start"]["source"] == "prior" and "recent" not in view["sdxl"]["start"]
    assert set(view["sdxl"]) == {"start", "stop"}
    assert set(view["llm"]) == {"start", "stop", "sleep-l1", "wake-l1"}
    assert CostBook.from_dict(view).to_dict() == b.to_dict()


@pytest.mark.parametrize(
    "damaged",
    [
        None,
        [],
        "x",
        {"llm": 3},
        {"llm": {"nope": {"recent": [1.0]}}},
        {"llm": {"start": {"recent": "1.0"}}},
        {"llm": {"start": {"recent": [True, "2", None, -1, float("nan")]}}},
        {7: {"start": {"recent": [1.0]}}},
    ],
)
def test_damaged_input_reads_as_nothing_measured(damaged: Any) -> None:
    assert CostBook.from_dict(damaged).to_dict() == {}


def test_damaged_parts_are_dropped_and_the_rest_kept() -> None:
    data = {"llm": {"start": {"recent": [20.0, "x", 30.0], "residueMiB": -5, "hostMemoryMiB": 100}, "stop": 1}}
    b = CostBook.from_dict(data)
    assert b.to_dict() == {"llm": {"start": {"recent": [20.0, 30.0], "hostMemoryMiB": 100}}}


def test_forget_drops_models_gone_from_the_spec() -> None:
    b = book(("a", "start", 1.0), ("b", "start", 2.0))
    b.forget(["b"])
    assert list(b.to_dict()) == ["b"]


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(PATHS), st.floats(0, 1e4)), max_size=60))
def test_estimate_stays_within_the_recent_measurements(records: list[tuple[str, Any, float]]) -> None:
    b = book(*records)
    for model in ("a", "b"):
        for path in PATHS:
            recent = [s for m, p, s in records if (m, p) == (model, path)][-RECENT:]
            est = b.estimate(model, path, 10.0)
            if recent:
                assert min(recent) <= est.seconds <= max(recent) and est.samples == len(recent)
            else:
                assert est == Estimate(PRIORS[path].seconds(10.0), "prior")
    assert CostBook.from_dict(json.loads(json.dumps(b.to_dict()))).to_dict() == b.to_dict()


# -- the way a switch takes, and who is evicted ---------------------------------------------------

WARM = WayNeeds("sleep", "sleep-l1", "wake-l1", host_mib=8000, residue_mib=900, pinned_mib=8000, cycles=True)
CKPT = WayNeeds("checkpoint", "checkpoint", "restore", host_mib=18000, cycles=True)
STOP = WayNeeds("stop", "stop", "start")


def measured() -> CostBook:
    return book(
        ("m", "stop", 1.0),
        ("m", "start", 30.0),
        ("m", "sleep-l1", 0.3),
        ("m", "wake-l1", 0.2),
        ("m", "checkpoint", 9.0),
        ("m", "restore", 4.0),
    )


@pytest.mark.parametrize(
    ("budgets", "way", "seconds", "why"),
    [
        (Budgets(), "sleep", 0.5, "sleep: 0.5 s away and back (against checkpoint 13.0 s, stop 31.0 s)"),
        (Budgets(pinned_mib=1024), "checkpoint", 13.0, "over the ceiling of 1024 MiB"),  # WSL2: pinned memory under 1 GiB
        (Budgets(host_mib=10000), "sleep", 0.5, "checkpoint does not fit (18000 MiB of host memory, 10000 MiB left)"),
        (Budgets(host_mib=4000), "stop", 31.0, "sleep does not fit (8000 MiB of host memory, 4000 MiB left)"),
        (Budgets(residue_mib=500, host_mib=20000), "checkpoint", 13.0, "a residue of 900 MiB on the GPU, 500 MiB left"),
        (Budgets(cycles_left=False), "stop", 31.0, "its sleep.maxCycles are used up"),
    ],
)
def test_choose_way_takes_the_cheapest_that_fits(budgets: Budgets, way: str, seconds: float, why: str) -> None:
    c = choose_way(measured(), spec(m=stopper()), "m", (STOP, WARM, CKPT), budgets)
    assert (c.way, c.seconds) == (way, pytest.approx(seconds))
    assert why in c.why


def test_choose_way_with_priors_prefers_warm_and_always_has_a_stop() -> None:
    s = spec(m=sleeper(level=1, vram=16 * 1024, host=14 * 1024))
    assert choose_way(CostBook(), s, "m", ways_of(CostBook(), s, "m"), Budgets()).way == "sleep"
    assert choose_way(CostBook(), s, "m", (), Budgets()).way == "stop"


@pytest.mark.parametrize(
    ("model", "ways"),
    [
        (stopper(), [STOP]),
        (sleeper(level=1, host=8000), [STOP, replace(WARM, residue_mib=1536)]),  # residue: sleep.maxResidueMiB until measured
        (sleeper(level=2, host=None), [STOP, WayNeeds("sleep", "sleep-l2", "wake-l2", residue_mib=1536, cycles=True)]),
        (checkpointed(host=18000), [STOP, CKPT]),
    ],
)
def test_ways_of(model: dict[str, Any], ways: list[WayNeeds]) -> None:
    assert list(ways_of(CostBook(), spec(m=model), "m")) == ways


def test_ways_of_use_the_measured_residue() -> None:
    b = CostBook()
    b.record("m", "sleep-l1", 0.3, residue_mib=700)
    assert ways_of(b, spec(m=sleeper(level=1)), "m")[1].residue_mib == 700


def test_eviction_goes_by_the_cost_of_a_cold_start_then_recency() -> None:
    s = spec(big=stopper(40 * 1024), small=stopper(4 * 1024), a=stopper(8 * 1024), b=stopper(8 * 1024))
    b = book(("big", "start", 90.0), ("small", "start", 5.0))
    order = eviction_order(b, s, ["big", "small", "a", "b", "gone"], {"a": 20.0, "b": 10.0})
    # small (5 s) first; a and b tie on their prior (8 GiB): the least recently used (b) first; big (90 s) last.
    assert order == ["small", "b", "a", "big"]


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        (0.52, 0.55, ["a", "b"]),  # noise: a was used less recently, a goes first
        (20.0, 24.0, ["a", "b"]),  # within 25%
        (2.0, 2.9, ["a", "b"]),  # within 1 s
        (26.0, 20.0, ["b", "a"]),  # a is dearer to bring back (over 25%): b goes first
        (1.6, 0.5, ["b", "a"]),  # b is cheaper by more than 1 s and 25%
    ],
)
def test_eviction_treats_near_equal_cold_starts_as_equal(a: float, b: float, order: list[str]) -> None:
    s = spec(a=stopper(), b=stopper())
    assert eviction_order(book(("a", "start", a), ("b", "start", b)), s, ["a", "b"], {"a": 1.0, "b": 9.0}) == order


ways = st.lists(
    st.builds(
        WayNeeds,
        way=st.sampled_from(["stop", "sleep", "checkpoint"]),
        away=st.sampled_from(PATHS),
        back=st.sampled_from(PATHS),
        host_mib=st.integers(0, 40000),
        residue_mib=st.integers(0, 4000),
        pinned_mib=st.integers(0, 40000),
        cycles=st.booleans(),
    ),
    max_size=4,
)
budgets = st.builds(
    Budgets,
    host_mib=st.none() | st.integers(0, 40000),
    residue_mib=st.none() | st.integers(0, 4000),
    pinned_mib=st.none() | st.integers(0, 40000),
    cycles_left=st.booleans(),
)


@given(ways=ways, b=budgets, records=st.lists(st.tuples(st.just("m"), st.sampled_from(PATHS), st.floats(0, 300)), max_size=20))
def test_the_chosen_way_never_exceeds_a_budget_and_nothing_cheaper_fits(
    ways: list[WayNeeds], b: Budgets, records: list[tuple[str, Any, float]]
) -> None:
    cb = book(*records)
    s = spec(m=stopper())
    c = choose_way(cb, s, "m", ways, b)
    assert over_budget(c.needs, b) is None
    assert c.needs in ways or c.needs == STOP
    for w in ways:
        if over_budget(w, b) is None:
            cost = sum(cb.estimate("m", p, declared_gib(s, "m", p)).seconds for p in (w.away, w.back))
            assert c.seconds <= cost + 1e-9
