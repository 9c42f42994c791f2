"""The cost book fed by the worker's own switches (recording fakes, a clock
that moves only while a runtime call runs): every start, stop, sleep and
wake is timed from its progress steps, shown in /status (``costs``) and as
vramctl_switch_cost_seconds, handed to a restarted worker, and passed to
the queue as what serving each other model would cost (and one switch, for
Retry-After)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.support.fakes import FakeClock, FakeGpu, FakeRuntime, FakeSleeper
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec
from vramctl.telemetry import VramctlCollector
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings

RUN = WorkloadState.RUNNING
# Seconds each runtime call takes on the test's clock.
TAKES = {
    ("start", "llm"): 20.0,
    ("start", "sdxl"): 30.0,
    ("stop", "llm"): 2.0,
    ("stop", "sdxl"): 3.0,
    ("sleep", "llm"): 0.5,
    ("wake", "llm"): 0.25,
}


def spec(llm_sleeps: bool = False) -> DeploymentSpec:
    llm: dict[str, Any] = {"image": "i", "vramMiB": 12000, "startTimeoutSeconds": 100}
    if llm_sleeps:
        llm |= {
            "health": {"port": 19001, "path": "/health"},
            "switchStrategy": "sleep",
            "sleep": {"level": 1, "hostMemoryMiB": 9000, "path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"},
        }
    return DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "llm",
            "vramBudgetMiB": 15500,
            "models": {"llm": llm, "sdxl": {"image": "i", "vramMiB": 11000, "startTimeoutSeconds": 100}},
        }
    )


def rig(d: DeploymentSpec, costs: Any = None, metrics: Metrics | None = None) -> tuple[GpuWorker, FakeRuntime]:
    clock = FakeClock()
    rt = FakeRuntime()

    def takes(verb: str, model: str) -> None:
        clock.t += TAKES.get((verb, model), 0.0)

    rt.on_call = takes
    s = WorkerSettings(poll_interval_s=0.001, memory_timeout_s=5, backoff_initial_s=30, resync_s=5, baseline_mib=0)
    w = GpuWorker(
        d,
        rt,
        FakeGpu(rt, d),
        s,
        metrics=metrics or Metrics(CollectorRegistry()),
        sleeper=FakeSleeper(rt),
        clock=clock,
        sleep=lambda _: None,
        costs=costs,
    )
    return w, rt


def switch(w: GpuWorker, model: str) -> None:
    w.request(model, ())
    w.reconcile_once()


def test_starts_and_stops_are_measured_and_shown_per_model() -> None:
    w, rt = rig(spec())
    w.reconcile_once()  # llm starts cold
    switch(w, "sdxl")  # llm stops, sdxl starts
    switch(w, "llm")
    assert rt.calls == [("start", "llm"), ("stop", "llm"), ("start", "sdxl"), ("stop", "sdxl"), ("start", "llm")]
    costs = w.status()["costs"]
    assert costs["llm"]["start"] == {"seconds": 20.0, "source": "measured", "recent": [20.0, 20.0]}
    assert costs["llm"]["stop"] == {"seconds": 2.0, "source": "measured", "recent": [2.0]}
    assert costs["sdxl"]["start"]["recent"] == [30.0]
    assert costs["sdxl"]["stop"]["recent"] == [3.0]


def test_sleeps_and_wakes_are_measured_with_their_residue() -> None:
    w, rt = rig(spec(llm_sleeps=True))
    w.reconcile_once()
    switch(w, "sdxl")  # llm sleeps
    switch(w, "llm")  # sdxl stops, llm wakes
    assert [c for c in rt.calls if c[0] in ("sleep", "wake")] == [("sleep", "llm"), ("wake", "llm")]
    costs = w.status()["costs"]["llm"]
    assert costs["sleep-l1"] == {"seconds": 0.5, "source": "measured", "recent": [0.5], "residueMiB": 500, "hostMemoryMiB": 9000}
    assert costs["wake-l1"]["recent"] == [0.25]
    assert costs["start"]["recent"] == [20.0]  # the wake's "healthy" is not a cold start


def test_the_gauge_reads_the_published_costs() -> None:
    registry = CollectorRegistry()
    w, _ = rig(spec(), metrics=Metrics(registry))
    registry.register(VramctlCollector(lambda: [w]))
    w.reconcile_once()

    def gauge(model: str, path: str) -> float | None:
        return registry.get_sample_value("vramctl_switch_cost_seconds", {"gpu": "0", "model": model, "path": path})

    assert gauge("llm", "start") == 20.0
    assert gauge("sdxl", "start") == pytest.approx(5.0 + 1.9 * 11000 / 1024, abs=1e-3)  # a prior until measured
    assert gauge("sdxl", "sleep-l1") is None  # sdxl cannot sleep


def test_a_restarted_worker_keeps_what_was_learned() -> None:
    w, _ = rig(spec())
    w.reconcile_once()
    switch(w, "sdxl")
    again, _ = rig(spec(), costs=w.status()["costs"])  # what the state file kept with the status
    assert again.status()["costs"] == w.status()["costs"]


def test_the_queue_is_told_what_serving_each_other_model_costs() -> None:
    w, _ = rig(spec())
    w.reconcile_once()
    switch(w, "sdxl")
    switch(w, "llm")
    w.queue.step()
    # llm stops (2) and sdxl starts (30), then sdxl stops (3) and llm starts (20).
    assert w.queue.desk.state.switch_costs == (("sdxl", 55.0),)
    # Retry-After counts one switch: llm stops (2), sdxl starts (30).
    assert w.queue.desk.state.switch_estimate_seconds == 32.0
