"""switchStrategy auto: the way a switch away takes, and what it may take.

``costs.budgets_for`` (what is left beside the other sleepers), the pinned
ceiling's probe, ``reconcile.ways.WayChoices`` (the loop's choice, said once
per switch away, a stop handed to the planner as cold) and the property:
the chosen way never exceeds a budget.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.support.builders import desired, obs, simulate, wl
from tests.support.clock import ManualClock
from tests.support.draws import cost_book, host_fields, limits
from tests.support.fakes import FakeGpu, FakeRuntime, FakeSleeper
from vramctl.costs import Budgets, CostBook, budgets_for, choose_way, ways_of
from vramctl.host.memory import VIRTUALIZED_PINNED_CEILING_MIB, probe_pinned_ceiling
from vramctl.observed import Desired, Observed, Workload, WorkloadState
from vramctl.planner import Sleep, Stop, plan
from vramctl.reconcile.warm import SleepBook
from vramctl.reconcile.ways import Limits, WayChoices
from vramctl.spec.models import Config, DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING


def auto(
    vram: int = 14000, host: int = 14000, residue: int = 600, level: int = 1, health: dict[str, Any] | None = None, **sleep: Any
) -> dict[str, Any]:
    return {
        "image": "i",
        "vramMiB": vram,
        "health": health or {"path": "/health", "port": 18000},
        "switchStrategy": "auto",
        "sleep": {"level": level, "hostMemoryMiB": host, "maxResidueMiB": residue, "path": "/sleep", "wakePath": "/wake_up", **sleep},
    }


def slept(vram: int = 11000, host: int = 7000, residue: int = 800) -> dict[str, Any]:
    return {**auto(vram, host, residue), "switchStrategy": "sleep", "health": {"path": "/health", "port": 17860}}


def spec(**fields: Any) -> DeploymentSpec:
    models = {"llm": auto(), "sdxl": slept(), "flux": {"image": "i", "vramMiB": 13000}}
    return DeploymentSpec.model_validate({"models": models, **fields})


def asleep(name: str) -> Workload:
    return replace(wl(name, ready=False), asleep=True)


# -- the spec ---------------------------------------------------------------------


def test_auto_uses_the_servers_sleep_api_and_its_checks() -> None:
    s = spec()
    assert s.models["llm"].warm_switch and s.models["llm"].sleeps_by_api and s.models["llm"].sleep_api is not None
    with pytest.raises(ValueError, match="hostMemoryMiB"):
        DeploymentSpec.model_validate({"models": {"llm": {**auto(), "sleep": {"level": 1, "path": "/s", "wakePath": "/w"}}}})
    with pytest.raises(ValueError, match="cannot sleep"):
        DeploymentSpec.model_validate({"models": {"tts": {"engine": "sovits", "image": "i", "switchStrategy": "auto"}}})


# -- budgets_for --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "sleepers", "awake", "kw", "expected"),
    [
        # Nothing known: no limit.
        ({}, [], ["flux"], {}, Budgets(None, None, None, True)),
        # Host: the budget less the other sleepers' host memory (sdxl: 7000); the model itself never counts.
        ({}, ["sdxl", "llm"], ["flux"], {"host_budget_mib": 20000}, Budgets(13000, None, None, True)),
        # The spec's hostMemoryBudgetMiB wins over the default read at start.
        ({"hostMemoryBudgetMiB": 9000}, ["sdxl"], [], {"host_budget_mib": 20000}, Budgets(2000, None, None, True)),
        # Residue: total less margin, less the next awake models, less the other sleepers' residues.
        ({}, ["sdxl"], ["flux"], {"total_mib": 16000, "margin_mib": 256}, Budgets(None, 16000 - 256 - 13000 - 800, None, True)),
        ({"vramBudgetMiB": 15000}, [], ["flux"], {"total_mib": 16000}, Budgets(None, 2000, None, True)),
        # Pinned: the probe's ceiling less what level-1 sleepers pin; the spec's ceiling wins.
        ({}, ["sdxl"], [], {"pinned_ceiling_mib": 768}, Budgets(None, None, 768 - 7000, True)),
        ({"pinnedMemoryCeilingMiB": 64000}, ["sdxl"], [], {"pinned_ceiling_mib": 768}, Budgets(None, None, 57000, True)),
        ({}, [], [], {"cycles_left": False}, Budgets(None, None, None, False)),
    ],
)
def test_budgets_for(fields: dict[str, Any], sleepers: list[str], awake: list[str], kw: dict[str, Any], expected: Budgets) -> None:
    assert budgets_for(spec(**fields), "llm", sleepers=sleepers, awake_next=awake, **kw) == expected


@pytest.mark.parametrize(
    ("version", "ceiling"),
    [
        ("Linux version 5.15.167.4-microsoft-standard-WSL2 (root@...) #1 SMP", VIRTUALIZED_PINNED_CEILING_MIB),
        ("Linux version 6.10.14-linuxkit (root@buildkitsandbox) #1 SMP", VIRTUALIZED_PINNED_CEILING_MIB),
        ("Linux version 6.8.0-49-generic (buildd@lcy02-amd64-103) #49-Ubuntu SMP", None),
    ],
)
def test_the_pinned_ceiling_is_probed_from_the_kernel(tmp_path: Path, version: str, ceiling: int | None) -> None:
    f = tmp_path / "version"
    f.write_text(version)
    got, why = probe_pinned_ceiling(f)
    assert got == ceiling and why
    assert probe_pinned_ceiling(tmp_path / "missing") == (None, f"unknown: {tmp_path / 'missing'} unreadable")


# -- the loop's choice ------------------------------------------------------------


class Notes:
    def __init__(self) -> None:
        self.notes: list[tuple[str, str | None, str]] = []

    def note(self, step: str, model: str | None, message: str) -> None:
        self.notes.append((step, model, message))


def chooser(costs: CostBook | None = None) -> tuple[WayChoices, Notes, SleepBook]:
    notes, book = Notes(), SleepBook()
    return WayChoices(notes, book, costs or CostBook()), notes, book  # type: ignore[arg-type]


def cold(ways: WayChoices, s: DeploymentSpec, d: Desired, o: Observed, **kw: Any) -> frozenset[str]:
    args: dict[str, Any] = {"total_mib": 16000, "margin_mib": 256, "host_budget_mib": 60000, "pinned_ceiling_mib": None, **kw}
    return ways.cold(s, d, o, Limits(**args))


def test_auto_sleeps_when_sleeping_is_cheaper_and_fits_and_says_so_once() -> None:
    ways, notes, _ = chooser()
    s = spec()
    assert cold(ways, s, desired("flux"), obs(llm="running")) == frozenset()
    assert [(step, m) for step, m, _ in notes.notes] == [("way", "llm")]
    assert notes.notes[0][2].startswith("'llm' goes away by sleep: ") and "(against stop " in notes.notes[0][2]
    cold(ways, s, desired("flux"), obs(llm="running"))
    assert len(notes.notes) == 1  # said once per switch away
    # The planner puts it to sleep.
    assert Sleep("llm", "not desired") in plan(s, desired("flux"), obs(llm="running"), 0.0, total_mib=16000).actions


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"pinned_ceiling_mib": 768}, "14000 MiB of pinned memory, over the ceiling of 768 MiB"),
        ({"host_budget_mib": 10000}, "14000 MiB of host memory, 10000 MiB left"),
        ({"total_mib": 13500}, "a residue of 600 MiB on the GPU, 244 MiB left"),
    ],
)
def test_auto_stops_when_its_sleep_does_not_fit(kw: dict[str, Any], why: str) -> None:
    ways, notes, _ = chooser()
    s = spec()
    got = cold(ways, s, desired("flux"), obs(llm="running"), **kw)
    assert got == {"llm"}
    assert notes.notes[-1][2].startswith("'llm' goes away by stop: ") and f"sleep does not fit ({why})" in notes.notes[-1][2]
    p = plan(s, desired("flux"), obs(llm="running"), 0.0, total_mib=kw.get("total_mib", 16000), cold=got)
    assert Stop("llm", "not desired") in p.actions and not any(isinstance(a, Sleep) for a in p.actions)


def test_auto_stops_when_the_book_says_stopping_is_cheaper() -> None:
    costs = CostBook()
    for _ in range(3):  # a sleep that pins each time, a server that starts fast
        costs.record("llm", "sleep-l1", 9.0)
        costs.record("llm", "wake-l1", 2.0)
        costs.record("llm", "stop", 0.5)
        costs.record("llm", "start", 3.0)
    ways, notes, _ = chooser(costs)
    assert cold(ways, spec(), desired("flux"), obs(llm="running")) == {"llm"}
    assert notes.notes[-1][2] == (
        "'llm' goes away by stop: 3.5 s away and back (against sleep 11.0 s); stop 0.5 s (median of 3) + start 3.0 s (median of 3)"
    )


def test_auto_stops_when_its_cycles_are_used_up_and_leaves_the_others_alone() -> None:
    ways, notes, book = chooser()
    s = spec(models={"llm": auto(maxCycles=2), "sdxl": slept(), "flux": {"image": "i", "vramMiB": 13000}})
    book.cycles["llm"] = 2
    assert cold(ways, s, desired("flux"), obs(llm="running")) == {"llm"}
    assert "its sleep.maxCycles are used up" in notes.notes[-1][2]
    # sleep (not auto), a model wanted, one not ready, one asleep, freeing the GPU: no choice to make.
    ways, notes, book = chooser()
    assert cold(ways, s, desired("flux"), obs(sdxl="running")) == frozenset()
    assert cold(ways, s, desired("llm"), obs(llm="running")) == frozenset()
    assert cold(ways, s, desired("flux"), obs(wl("llm", ready=False))) == frozenset()
    assert cold(ways, s, desired("flux"), obs(asleep("llm"))) == frozenset()
    assert cold(ways, s, desired(None), obs(llm="running")) == frozenset()
    assert notes.notes == []


def test_the_eviction_order_puts_the_cheapest_to_bring_back_cold_first() -> None:
    costs = CostBook()
    costs.record("llm", "start", 60.0)  # a vLLM cold start
    costs.record("sdxl", "start", 20.0)
    ways, _, book = chooser(costs)
    book.last_used.update({"llm": 1.0, "sdxl": 9.0})  # recency alone would evict llm first
    order = ways.eviction_order(spec(), 16000)
    assert order == ["sdxl", "llm"]
    p = plan(
        spec(), desired("flux"), obs(asleep("llm"), asleep("sdxl")), 0.0, total_mib=14500, last_used=book.last_used, eviction_order=order
    )
    assert p.actions[0] == Stop("sdxl", "evicted: its residue does not fit beside the next model")


# -- the property: the chosen way never exceeds a budget ------------------------------


@st.composite
def situations(draw: st.DrawFn) -> tuple[DeploymentSpec, list[str], list[str], dict[str, Any], CostBook]:
    models: dict[str, Any] = {}
    for name in ("a", "b", "c"):
        models[name] = auto(
            vram=draw(st.integers(1000, 40000)),
            host=draw(st.integers(0, 40000)),
            residue=draw(st.integers(0, 3000)),
            level=draw(st.sampled_from([1, 2])),
        )
        models[name]["health"] = {"path": "/health", "port": 18000 + len(models)}
    s = DeploymentSpec.model_validate({"models": models, **host_fields(draw, 80000)})
    sleepers = draw(st.lists(st.sampled_from(["b", "c"]), unique=True))
    awake = draw(st.lists(st.sampled_from(["b", "c"]), max_size=1))
    kw = limits(draw)
    costs = cost_book(draw, ("start", "stop", "sleep-l1", "wake-l1", "sleep-l2", "wake-l2"))
    return s, sleepers, [m for m in awake if m not in sleepers], kw, costs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(situations())
def test_the_chosen_way_never_exceeds_a_budget(situation: tuple[DeploymentSpec, list[str], list[str], dict[str, Any], CostBook]) -> None:
    s, sleepers, awake, kw, costs = situation
    b = budgets_for(s, "a", sleepers=sleepers, awake_next=awake, **kw)
    c = choose_way(costs, s, "a", ways_of(costs, s, "a"), b, kw["total_mib"])
    note(f"budgets {b}; choice {c.why}")
    if c.way == "stop":
        return
    # The model asleep beside the others: every total within what the spec and the machine allow.
    after = [*sleepers, "a"]
    host_budget = s.host_memory_budget_mib if s.host_memory_budget_mib is not None else kw["host_budget_mib"]
    if host_budget is not None:
        assert sum(s.models[m].host_memory_asleep_mib for m in after) <= host_budget
    if kw["total_mib"] is not None:
        used = sum(s.models[m].sleep_settings.max_residue_mib for m in after) + sum(
            s.reservation_mib(m, kw["total_mib"]) or 0 for m in awake
        )
        assert used <= kw["total_mib"] - kw["margin_mib"]
    ceiling = s.pinned_memory_ceiling_mib if s.pinned_memory_ceiling_mib is not None else kw["pinned_ceiling_mib"]
    if ceiling is not None:
        assert sum(s.models[m].host_memory_asleep_mib for m in after if s.models[m].sleep_settings.level == 1) <= ceiling
    assert kw["cycles_left"]


# -- through the worker ----------------------------------------------------------------


def worker_spec(**fields: Any) -> DeploymentSpec:
    models = {"llm": auto(health={"path": "/health", "port": 19021}), "flux": {"image": "i", "vramMiB": 13000, "startTimeoutSeconds": 1}}
    return DeploymentSpec.model_validate({"gpu": 0, "activeModel": "llm", "models": models, **fields})


def run_switch(d: DeploymentSpec, pinned_ceiling_mib: int | None) -> tuple[FakeRuntime, list[tuple[str, str | None, str]]]:
    rt = FakeRuntime(states={"llm": RUN}, residue={"llm": 500})
    clock = ManualClock()
    s = WorkerSettings(
        poll_interval_s=0.01, memory_timeout_s=5, backoff_initial_s=30, baseline_mib=0, pinned_ceiling_mib=pinned_ceiling_mib
    )
    w = GpuWorker(d, rt, FakeGpu(rt, d), s, sleeper=FakeSleeper(rt), clock=clock, sleep=clock.sleep)
    w.reconcile_once()
    w.request("flux", ())
    w.reconcile_once()
    return rt, [(p["step"], p.get("model"), p["message"]) for p in w.progress()]


def test_the_worker_sleeps_an_auto_model_that_fits_and_says_why() -> None:
    rt, progress = run_switch(worker_spec(), None)
    assert rt.calls[:2] == [("sleep", "llm"), ("start", "flux")]
    ways = [msg for step, m, msg in progress if step == "way"]
    assert len(ways) == 1 and ways[0].startswith("'llm' goes away by sleep: ")


def test_the_worker_stops_an_auto_model_over_the_probed_pinned_ceiling_and_the_spec_overrides_it() -> None:
    rt, progress = run_switch(worker_spec(), 768)  # WSL2: 14000 MiB cannot be pinned
    assert ("sleep", "llm") not in rt.calls and rt.calls[:2] == [("stop", "llm"), ("start", "flux")]
    ways = [msg for step, m, msg in progress if step == "way"]
    assert ways == [
        "'llm' goes away by stop: 32.7 s away and back; sleep does not fit (14000 MiB of pinned memory, over the ceiling of 768 MiB); "
        "stop 1.7 s (prior from its size) + start 31.0 s (prior from its size)"
    ]
    rt, _ = run_switch(worker_spec(pinnedMemoryCeilingMiB=32000), 768)
    assert rt.calls[:2] == [("sleep", "llm"), ("start", "flux")]


def test_the_status_says_the_pinned_ceiling_in_use_and_where_it_comes_from(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("Linux version 5.15.167.4-microsoft-standard-WSL2")
    config = Config.model_validate({"gpus": [{"gpu": 0, "models": {"a": {"image": "i", "vramMiB": 1}}}]})
    s = WorkerSettings.from_config(config, proc_version=version)
    assert s.pinned_ceiling_mib == VIRTUALIZED_PINNED_CEILING_MIB and s.pinned_ceiling_source.startswith("WSL2")
    for d, expected in (
        (worker_spec(), {"mib": 768, "source": f"probed at start: {s.pinned_ceiling_source}"}),
        (worker_spec(pinnedMemoryCeilingMiB=32000), {"mib": 32000, "source": "pinnedMemoryCeilingMiB"}),
    ):
        rt = FakeRuntime(states={"llm": RUN})
        w = GpuWorker(d, rt, FakeGpu(rt, d), s, sleeper=FakeSleeper(rt))
        assert w.status()["pinnedMemoryCeiling"] == expected
    plain = DeploymentSpec.model_validate({"gpu": 0, "models": {"a": {"image": "i", "vramMiB": 1}}})
    rt = FakeRuntime()
    assert "pinnedMemoryCeiling" not in GpuWorker(plain, rt, FakeGpu(rt, plain), s).status()  # no auto model: not said


# -- the property through the planner: auto's choices keep the planner's promise ------


@st.composite
def auto_worlds(draw: st.DrawFn) -> tuple[DeploymentSpec, Desired, Observed, dict[str, Any]]:
    models: dict[str, Any] = {}
    for i, name in enumerate(("a", "b", "c")):
        strategy = draw(st.sampled_from(["auto", "auto", "sleep"]))
        m = auto(
            vram=draw(st.integers(2000, 14000)),
            host=draw(st.integers(100, 20000)),
            residue=draw(st.integers(100, 1500)),
            level=draw(st.sampled_from([1, 2])),
            health={"path": "/health", "port": 18100 + i},
        )
        models[name] = {**m, "switchStrategy": strategy}
    fields: dict[str, Any] = {"models": models}
    if draw(st.booleans()):
        fields["pinnedMemoryCeilingMiB"] = draw(st.integers(0, 30000))
    try:
        s = DeploymentSpec.model_validate(fields)
    except ValueError:
        s = DeploymentSpec.model_validate({"models": {n: {**m, "switchStrategy": "auto"} for n, m in models.items()}})
    awake = draw(st.sampled_from(["a", "b", "c"]))
    ws = {awake: wl(awake)}
    for n in ("a", "b", "c"):
        if n != awake and draw(st.booleans()):
            ws[n] = asleep(n)
    target = draw(st.sampled_from(["a", "b", "c"]))
    kw = {
        "total_mib": draw(st.sampled_from([16000, 24000, 80000])),
        "margin_mib": 256,
        "host_budget_mib": draw(st.none() | st.integers(0, 60000)),
        "pinned_ceiling_mib": draw(st.none() | st.integers(0, 4000)),
    }
    return s, desired(target), Observed(ws), kw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(auto_worlds())
def test_auto_choices_keep_one_heavy_awake_and_the_pinned_ceiling(world: tuple[DeploymentSpec, Desired, Observed, dict[str, Any]]) -> None:
    s, d, o, kw = world
    ways, notes, _ = chooser()
    cold_now = ways.cold(s, d, o, Limits(**kw))
    p = plan(
        s,
        d,
        o,
        0.0,
        margin_mib=kw["margin_mib"],
        total_mib=kw["total_mib"],
        cold=cold_now,
        host_budget_mib=kw["host_budget_mib"],
        eviction_order=ways.eviction_order(s, kw["total_mib"]),
    )
    note(f"cold {sorted(cold_now)}; notes {notes.notes}; plan {p.describe()}")
    after = simulate(s, o, p)
    awake = [m for m, w in after.workloads.items() if w.state.live and not w.asleep]
    assert len(awake) <= 1, awake
    sleepers = [m for m, w in after.workloads.items() if w.state.live and w.asleep]
    used = sum(s.models[m].sleep_settings.max_residue_mib for m in sleepers) + sum(
        s.reservation_mib(m, kw["total_mib"]) or 0 for m in awake
    )
    assert used <= kw["total_mib"] - kw["margin_mib"]
    ceiling = s.pinned_memory_ceiling_mib if s.pinned_memory_ceiling_mib is not None else kw["pinned_ceiling_mib"]
    put_to_sleep = [a.model for a in p.actions if isinstance(a, Sleep) and s.models[a.model].switch_strategy == "auto"]
    if put_to_sleep and ceiling is not None:
        pinned = sum(s.models[m].host_memory_asleep_mib for m in sleepers if s.models[m].sleep_settings.level == 1)
        assert pinned <= ceiling, (put_to_sleep, pinned, ceiling)
    # Every auto model that leaves awake is said once, with its way.
    leaving = [m for m in o.workloads if m not in d.members and not o.workloads[m].asleep and s.models[m].switch_strategy == "auto"]
    assert sorted(m for step, m, _ in notes.notes if step == "way") == sorted(leaving)
