"""The placement rule of a model allowed on several GPUs (placement: any): a table."""

from __future__ import annotations

import pytest

from tests.support.builders import deployment, heavy
from tests.support.fakes import FakeGpu, FakeRuntime
from vramctl.placement import Site, place
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings
from vramctl.worker.supervisor import Supervisor

CASES = [
    # awake (or being switched to) wins over everything
    ("awake on 1", [Site(0, switch_seconds=0.1), Site(1, awake=True, switch_seconds=50)], 1),
    ("awake on both: the lowest", [Site(1, awake=True), Site(0, awake=True)], 0),
    # else the cheapest switch
    ("cheaper on 1", [Site(0, switch_seconds=30), Site(1, switch_seconds=5)], 1),
    ("cheaper on 0", [Site(0, switch_seconds=2, last_used=1), Site(1, switch_seconds=20, last_used=0)], 0),
    ("unknown cost loses to a known one", [Site(0), Site(1, switch_seconds=90)], 1),
    # ties (within 0.25 s) go to the least recently used GPU
    ("tie within 0.25 s: least recently used", [Site(0, switch_seconds=1.0, last_used=10), Site(1, switch_seconds=1.2, last_used=5)], 1),
    ("equal: least recently used", [Site(0, switch_seconds=16, last_used=3), Site(1, switch_seconds=16, last_used=9)], 0),
    ("a stop to pay for is not a tie", [Site(0, switch_seconds=17.5, last_used=3), Site(1, switch_seconds=16.1, last_used=9)], 1),
    ("never used before used", [Site(0, switch_seconds=3, last_used=1), Site(1, switch_seconds=3)], 1),
    # nothing known: least recently used, then the lowest index
    ("nothing known: lowest", [Site(1), Site(0)], 0),
    ("nothing known: least recently used", [Site(0, last_used=7), Site(1, last_used=2)], 1),
    ("one site", [Site(3)], 3),
]


@pytest.mark.parametrize(("sites", "gpu"), [(s, g) for _, s, g in CASES], ids=[c[0] for c in CASES])
def test_place(sites: list[Site], gpu: int) -> None:
    assert place(sites) == gpu


def test_no_site_is_an_error() -> None:
    with pytest.raises(ValueError, match="no GPU"):
        place([])


# -- the supervisor's use of it: Supervisor.worker_for (the gateway's worker lookup) --------


def _supervisor(active0: str | None, active1: str | None, placement: str = "any") -> Supervisor:
    rt = FakeRuntime()
    workers = []
    for gpu, active in ((0, active0), (1, active1)):
        d = deployment({f"a{gpu}": heavy(8000), "x": heavy(6000, placement=placement)}, gpu=gpu, activeModel=active)
        workers.append(GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(baseline_mib=0)))
    return Supervisor(workers, rt, Metrics())


@pytest.mark.parametrize(
    ("active0", "active1", "placement", "gpu"),
    [
        ("x", None, "any", 0),  # being switched to on 0 (in its desired state)
        ("a0", "x", "any", 1),  # on 1
        ("a0", None, "any", 1),  # nowhere: 1 is free, no stop of a0 to pay for
        (None, "a1", "any", 0),
        ("a0", None, "pinned", 0),  # pinned: the first entry that declares it
        (None, None, "any", 0),  # the same cost, never used: the lowest
    ],
)
def test_the_gateway_places_a_model_of_placement_any(active0: str | None, active1: str | None, placement: str, gpu: int) -> None:
    sup = _supervisor(active0, active1, placement)
    assert sup.worker_for("x").gpu == gpu
    assert sup.worker_for("a1").gpu == 1
    with pytest.raises(KeyError):
        sup.worker_for("nope")
