"""switchStrategy auto with ``sleep.checkpoint``: the driver's checkpoint is a
third way away, beside the server's sleep and a stop.

The spec's field and its checks, the host memory a checkpoint needs
(1.1x the VRAM), the loop's choice (``WayChoices``: offered only where the
driver is available and never refused for the model), the sleeper that
routes each auto model by the way chosen, the measurements booked under
that way, and the property: the chosen way never exceeds a budget. The
figures of the tables are the H100 run through vramctl
(benchmarks/results/warm_proof-checkpoint-h100.json).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.support.builders import desired, obs
from tests.support.draws import cost_book, host_fields, limits
from tests.support.fake_cuda import FakeCu
from vramctl.costs import (
    CHECKPOINT_HOST_FACTOR,
    CostBook,
    WayNeeds,
    budgets_for,
    checkpoint_host_mib,
    choose_way,
    path_of,
    paths_of,
    ways_of,
)
from vramctl.observed import GpuMemory, GpuSnapshot
from vramctl.reconcile.warm import SleepBook, WarmSwitches
from vramctl.reconcile.ways import Limits, WayChoices
from vramctl.runtimes.checkpoint import Availability, StrategySleeper, open_driver
from vramctl.spec.models import DeploymentSpec

LLM_MIB = 19 * 1024  # the LLM stand-in of the H100 run: 19 GiB
SDXL_MIB = 10547  # the SDXL server: 10.3 GiB


def auto(vram: int, host: int, checkpoint: bool = True, port: int = 18000, **sleep: Any) -> dict[str, Any]:
    return {
        "image": "i",
        "vramMiB": vram,
        "health": {"path": "/health", "port": port},
        "switchStrategy": "auto",
        "sleep": {"level": 1, "hostMemoryMiB": host, "path": "/sleep", "wakePath": "/wake_up", "checkpoint": checkpoint, **sleep},
    }


def spec(**fields: Any) -> DeploymentSpec:
    models = {
        "llm": auto(LLM_MIB, 16000, port=18001),
        "sdxl": auto(SDXL_MIB, 7000, port=18002),
        "flux": {"image": "i", "vramMiB": 13000},
    }
    return DeploymentSpec.model_validate({"models": models, **fields})


def h100() -> CostBook:
    """The H100 figures, measured five times each (medians as measured)."""
    b = CostBook()
    figures = {
        "llm": {"start": 3.8, "stop": 0.6, "checkpoint": 9.1, "restore": 3.7, "sleep-l1": 0.25, "wake-l1": 0.25},
        "sdxl": {"start": 14.7, "stop": 0.3, "checkpoint": 4.9, "restore": 1.8, "sleep-l1": 0.25, "wake-l1": 0.25},
    }
    for model, paths in figures.items():
        for path, seconds in paths.items():
            for _ in range(5):
                b.record(model, path, seconds)  # type: ignore[arg-type]
    return b


# -- the spec ------------------------------------------------------------------------


def test_sleep_checkpoint_is_for_auto_and_needs_a_size() -> None:
    s = spec()
    assert s.models["llm"].auto_checkpoint and not s.models["flux"].auto_checkpoint
    assert not DeploymentSpec.model_validate({"models": {"m": auto(8000, 8000, checkpoint=False)}}).models["m"].auto_checkpoint
    with pytest.raises(ValueError, match="use switchStrategy auto"):
        DeploymentSpec.model_validate({"models": {"m": {**auto(8000, 8000), "switchStrategy": "sleep"}}})
    with pytest.raises(ValueError, match=r"remove sleep\.checkpoint"):
        DeploymentSpec.model_validate(
            {"models": {"m": {"image": "i", "switchStrategy": "checkpoint", "sleep": {"hostMemoryMiB": 9000, "checkpoint": True}}}}
        )
    no_size = {"image": "i", "health": {"path": "/h", "port": 1}, "switchStrategy": "auto"}
    no_size["sleep"] = {"level": 2, "path": "/sleep", "wakePath": "/wake_up", "checkpoint": True}
    with pytest.raises(ValueError, match=r"set vramMiB or sleep\.hostMemoryMiB"):
        DeploymentSpec.model_validate({"models": {"m": no_size}})


# -- costs: the paths, the host memory, the ways ----------------------------------------


def test_an_auto_model_that_may_checkpoint_has_the_checkpoint_paths() -> None:
    s = spec()
    assert paths_of(s, "llm") == ("start", "stop", "sleep-l1", "wake-l1", "checkpoint", "restore")
    s2 = DeploymentSpec.model_validate({"models": {"m": auto(8000, 8000, checkpoint=False)}})
    assert paths_of(s2, "m") == ("start", "stop", "sleep-l1", "wake-l1")


@pytest.mark.parametrize(
    ("kind", "way", "path"),
    [("sleep", "checkpoint", "checkpoint"), ("wake", "checkpoint", "restore"), ("sleep", "sleep", "sleep-l1"), ("wake", None, "wake-l1")],
)
def test_a_measured_step_is_booked_under_the_way_the_auto_model_went(kind: str, way: str | None, path: str) -> None:
    assert path_of(spec(), "llm", kind, way) == path  # type: ignore[arg-type]


def test_a_checkpoint_needs_1_1x_the_vram_in_host_memory() -> None:
    s = spec()
    assert checkpoint_host_mib(s, "llm") == math.ceil(CHECKPOINT_HOST_FACTOR * LLM_MIB) == 21402
    big_host = DeploymentSpec.model_validate({"models": {"m": auto(4000, 6000)}})
    assert checkpoint_host_mib(big_host, "m") == 6000  # never less than what it declares


def test_ways_of_offer_the_checkpoint_only_where_the_driver_does() -> None:
    s = spec()
    assert [w.way for w in ways_of(CostBook(), s, "sdxl")] == ["stop", "sleep"]
    ways = ways_of(CostBook(), s, "sdxl", checkpoint=True)
    assert ways[2] == WayNeeds("checkpoint", "checkpoint", "restore", host_mib=math.ceil(1.1 * SDXL_MIB), cycles=True)


def test_a_checkpointed_sleeper_holds_its_checkpoint_in_host_memory_and_leaves_no_residue() -> None:
    s = spec()
    plain = budgets_for(s, "llm", sleepers=["sdxl"], awake_next=["flux"], total_mib=81559, host_budget_mib=100000, pinned_ceiling_mib=None)
    held = budgets_for(
        s,
        "llm",
        sleepers=["sdxl"],
        awake_next=["flux"],
        total_mib=81559,
        host_budget_mib=100000,
        host_held={"sdxl": checkpoint_host_mib(s, "sdxl")},
    )
    assert plain.host_mib == 100000 - 7000 and held.host_mib == 100000 - math.ceil(1.1 * SDXL_MIB)
    assert plain.residue_mib is not None and held.residue_mib == plain.residue_mib + 1536  # no residue on the GPU


# -- the loop's choice, with the H100's figures -------------------------------------------


class Notes:
    def __init__(self) -> None:
        self.notes: list[tuple[str, str | None, str]] = []

    def note(self, step: str, model: str | None, message: str) -> None:
        self.notes.append((step, model, message))


class Server:
    """The servers' own sleep API, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def sleep(self, spec: DeploymentSpec, model: str) -> int | None:
        self.calls.append(("sleep", model))
        return 100

    def wake(self, spec: DeploymentSpec, model: str) -> None:
        self.calls.append(("wake", model))

    def is_sleeping(self, spec: DeploymentSpec, model: str) -> bool | None:
        return None


def strategy(available: bool = True) -> StrategySleeper:
    def snapshot() -> GpuSnapshot:
        return GpuSnapshot(GpuMemory(81559, 0, 81559), processes=[])

    def load() -> Any:
        return open_driver(FakeCu(), "fake-bindings") if available else (None, Availability(False, "no cuda-bindings"))

    return StrategySleeper(Server(), snapshot, lambda _spec: {}, load=load)


def chooser(costs: CostBook, sleeper: StrategySleeper | None) -> tuple[WayChoices, Notes, SleepBook]:
    notes, book = Notes(), SleepBook()
    return WayChoices(notes, book, costs, lambda: sleeper), notes, book  # type: ignore[arg-type]


def choose(ways: WayChoices, active: str, target: str, **kw: Any) -> frozenset[str]:
    args: dict[str, Any] = {"total_mib": 81559, "margin_mib": 256, "host_budget_mib": 120000, "pinned_ceiling_mib": None, **kw}
    return ways.cold(spec(), desired(target), obs(**{active: "running"}), Limits(**args))


@pytest.mark.parametrize(
    ("model", "kw", "available", "way", "why"),
    [
        # Sleep fits: 0.5 s away and back beats everything.
        ("sdxl", {}, True, "sleep", "sleep: 0.5 s away and back (against checkpoint 6.7 s, stop 15.0 s)"),
        # WSL2-like pinned ceiling: no level-1 sleep. SDXL: checkpoint 4.9 + 1.8 = 6.7 s against stop 0.3 + start 14.7 = 15.0 s.
        ("sdxl", {"pinned_ceiling_mib": 768}, True, "checkpoint", "checkpoint: 6.7 s away and back (against stop 15.0 s)"),
        # The LLM stand-in starts in 3.8 s: stop 0.6 + 3.8 = 4.4 s against checkpoint 9.1 + 3.7 = 12.8 s.
        ("llm", {"pinned_ceiling_mib": 768}, True, "stop", "stop: 4.4 s away and back (against checkpoint 12.8 s)"),
        # No driver: not offered at all.
        ("sdxl", {"pinned_ceiling_mib": 768}, False, "stop", "stop: 15.0 s away and back; sleep does not fit"),
        # A checkpoint needs 1.1 x 10547 = 11602 MiB of host memory; 10000 are left.
        ("sdxl", {"pinned_ceiling_mib": 768, "host_budget_mib": 10000}, True, "stop", "checkpoint does not fit (11602 MiB of host"),
    ],
)
def test_auto_takes_the_cheapest_of_sleep_checkpoint_and_stop_that_fits(
    model: str, kw: dict[str, Any], available: bool, way: str, why: str
) -> None:
    ways, notes, book = chooser(h100(), strategy(available))
    other = "llm" if model == "sdxl" else "sdxl"
    assert choose(ways, model, other, **kw) == (frozenset({model}) if way == "stop" else frozenset())
    [(step, m, msg)] = notes.notes
    assert (step, m) == ("way", model) and msg.startswith(f"{model!r} goes away by {way}: ") and why in msg, msg
    assert "(median of 5)" in msg  # the estimates behind it
    assert book.ways.get(model) == (None if way == "stop" else way)


def test_until_measured_the_priors_from_the_size_decide() -> None:
    # 19 GiB by the priors: checkpoint 0.1 + 0.47 x 19 = 9.0 s, restore 0.1 + 0.19 x 19 = 3.7 s (the H100's 9.1 and 3.7),
    # a cold start 5 + 1.9 x 19 = 41.1 s: checkpoint, until the book learns that this server starts in 3.8 s.
    ways, notes, _ = chooser(CostBook(), strategy())
    choose(ways, "llm", "sdxl", pinned_ceiling_mib=768)
    assert notes.notes[-1][2].startswith("'llm' goes away by checkpoint: 12.7 s away and back (against stop 43.1 s)")
    assert "checkpoint 9.0 s (prior from its size) + restore 3.7 s (prior from its size)" in notes.notes[-1][2]


def test_a_checkpoint_refused_or_fallen_back_is_not_offered_again_until_restarted() -> None:
    costs, sleeper = h100(), strategy()
    ways, notes, book = chooser(costs, sleeper)
    choose(ways, "sdxl", "llm", pinned_ceiling_mib=768)
    assert book.ways["sdxl"] == "checkpoint" and ways.checkpoint_offered(spec(), "sdxl")
    warm = WarmSwitches(notes, book)  # type: ignore[arg-type]
    warm.fallback(spec(), "sdxl", "CheckpointRefused", "checkpointing 'sdxl': CUDA_ERROR_NOT_SUPPORTED", 0.0)
    assert "not offered to it again until vramctl restarts" in notes.notes[-1][2]
    book.gone("sdxl")  # stopped and started cold: still not offered
    assert "sdxl" in book.no_checkpoint and not ways.checkpoint_offered(spec(), "sdxl")
    assert choose(ways, "sdxl", "llm", pinned_ceiling_mib=768) == {"sdxl"}
    # A fresh worker (vramctl restarted) offers it again.
    fresh, _, _ = chooser(costs, sleeper)
    assert fresh.checkpoint_offered(spec(), "sdxl")


def test_a_max_cycles_fall_back_is_no_refusal_of_the_checkpoint() -> None:
    _, notes, book = chooser(h100(), strategy())
    book.ways["sdxl"] = "checkpoint"
    WarmSwitches(notes, book).fallback(spec(), "sdxl", "MaxCycles", "slept 3 times", 0.0)  # type: ignore[arg-type]
    assert "sdxl" not in book.no_checkpoint


def test_the_sleeper_routes_each_auto_model_by_the_way_chosen() -> None:
    s = spec()
    sleeper = strategy()
    server = sleeper.server
    assert isinstance(server, Server)
    ways, _, book = chooser(h100(), sleeper)
    choose(ways, "llm", "sdxl")  # sleep fits: the server's sleep API
    sleeper.sleep(s, "llm")
    assert server.calls == [("sleep", "llm")] and sleeper.ways is book.ways
    book.ways["llm"] = "checkpoint"
    # The driver's way: no CUDA process of it in NVML's list, so the checkpoint refuses (and never calls the server).
    with pytest.raises(Exception, match="no CUDA process"):
        sleeper.sleep(s, "llm")
    assert server.calls == [("sleep", "llm")]


# -- the property -------------------------------------------------------------------------


@st.composite
def situations(draw: st.DrawFn) -> tuple[DeploymentSpec, list[str], dict[str, str], list[str], dict[str, Any], CostBook]:
    models: dict[str, Any] = {}
    for i, name in enumerate(("a", "b", "c")):
        models[name] = auto(
            draw(st.integers(1000, 40000)),
            draw(st.integers(0, 40000)),
            checkpoint=draw(st.booleans()),
            port=18000 + i,
            maxResidueMiB=draw(st.integers(0, 3000)),
        )
    s = DeploymentSpec.model_validate({"models": models, **host_fields(draw, 120000)})
    sleepers = draw(st.lists(st.sampled_from(["b", "c"]), unique=True))
    went = {m: draw(st.sampled_from(["sleep", "checkpoint"])) for m in sleepers if s.models[m].auto_checkpoint}
    awake = [m for m in draw(st.lists(st.sampled_from(["b", "c"]), max_size=1)) if m not in sleepers]
    kw = limits(draw)
    costs = cost_book(draw, ("start", "stop", "sleep-l1", "wake-l1", "checkpoint", "restore"))
    return s, sleepers, went, awake, kw, costs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(situations(), st.booleans())
def test_the_chosen_way_never_exceeds_a_budget(
    situation: tuple[DeploymentSpec, list[str], dict[str, str], list[str], dict[str, Any], CostBook], offered: bool
) -> None:
    s, sleepers, went, awake, kw, costs = situation
    total = kw["total_mib"]
    held = {m: checkpoint_host_mib(s, m, total) for m, w in went.items() if w == "checkpoint"}
    b = budgets_for(s, "a", sleepers=sleepers, awake_next=awake, host_held=held, **kw)
    c = choose_way(costs, s, "a", ways_of(costs, s, "a", offered, total), b, total)
    note(f"budgets {b}; choice {c.why}")
    if c.way == "checkpoint":
        assert offered and s.models["a"].auto_checkpoint
    if c.way == "stop":
        return
    assert kw["cycles_left"]
    mine = {"a": checkpoint_host_mib(s, "a", total)} if c.way == "checkpoint" else {}
    checkpointed = {**held, **mine}
    after = [*sleepers, "a"]

    def host(m: str) -> int:
        return checkpointed.get(m, s.models[m].host_memory_asleep_mib)

    host_budget = s.host_memory_budget_mib if s.host_memory_budget_mib is not None else kw["host_budget_mib"]
    if host_budget is not None:
        assert sum(host(m) for m in after) <= host_budget
    if total is not None:
        residues = sum(s.models[m].sleep_settings.max_residue_mib for m in after if m not in checkpointed)
        assert residues + sum(s.reservation_mib(m, total) or 0 for m in awake) <= total - kw["margin_mib"]
    ceiling = s.pinned_memory_ceiling_mib if s.pinned_memory_ceiling_mib is not None else kw["pinned_ceiling_mib"]
    if ceiling is not None:
        # What level-1 sleepers pin (a checkpointed one keeps what its server pinned at load); a checkpoint pins nothing more.
        pinned = [m for m in after if s.models[m].sleep_settings.level == 1 and not (m == "a" and c.way == "checkpoint")]
        assert sum(s.models[m].host_memory_asleep_mib for m in pinned) <= ceiling
