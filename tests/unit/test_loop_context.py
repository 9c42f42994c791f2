"""The reconciler's parts ask only ``LoopContext`` of their worker, the
loop's own wishes never take the public ``request`` path, and an admission
check (the Kubernetes spec's overrule) replaces a desired state as it is
admitted, without a request of its own.

- a part runs on a recording fake of the Protocol (no worker at all);
- a gated start and the hold queue's switch become the desired state with
  ``request`` made to fail: they go through the loop's ``want``, applied at
  once (no second trip through the inbox, no lost wish);
- an admission that overrules is asked once per desired state, under the
  worker's (non re-entrant) lock, and the recorded and applied state is the
  admitted one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.fakes import FakeGpu, FakeRuntime
from tests.support.workers import queued, three_heavy, wait_for
from vramctl.demand.desk import InboxHolder
from vramctl.observed import Desired, Observed, Workload, WorkloadState
from vramctl.reconcile.backoff import Backoff
from vramctl.reconcile.context import LoopSettings
from vramctl.reconcile.model_watch import ModelWatch, Tracking
from vramctl.runtimes.base import StartEvent
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING


@dataclass
class RecordingContext:
    """A ``LoopContext`` that records what a part asked."""

    settings: LoopSettings = field(default_factory=WorkerSettings)
    now: float = 100.0
    asked: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    switch_in_progress: bool = False
    current_phase: str = "Ready"

    @property
    def clock(self) -> Callable[[], float]:
        return lambda: self.now

    def _rec(self, name: str, *args: Any) -> None:
        self.asked.append((name, args))

    def note(self, step: str, model: str | None, message: str) -> None:
        self._rec("note", step, model)

    def phase(self, phase: str, reason: str, message: str) -> None:
        self._rec("phase", phase, reason)

    def condition(self, ctype: str, value: bool, reason: str, message: str) -> None:
        self._rec("condition", ctype, value)

    def begin_switch(self, source: str | None, target: str | None, now: float) -> None:
        self._rec("begin_switch", source, target)

    def finish_switch(self, outcome: str, now: float) -> None:
        self._rec("finish_switch", outcome)

    def settled(self, now: float, ok: bool) -> None:
        self._rec("settled", ok)

    def violation(self, heavy_live: list[str]) -> None:
        self._rec("violation", tuple(heavy_live))

    def gated(self, ev: StartEvent, not_adopted: str | None = None) -> None:
        self._rec("gated", ev.model, not_adopted)

    def want(self, active: str | None, companions: tuple[str, ...] | None, source: str) -> None:
        self._rec("want", active, companions, source)

    def publish(self) -> None:
        self._rec("publish")

    def logs(self, spec: DeploymentSpec, model: str) -> list[str]:
        return ["last line"]

    def has_commands(self) -> bool:
        return False

    def total_mib(self) -> int | None:
        return 16000


def release_spec() -> DeploymentSpec:
    d = three_heavy()
    return DeploymentSpec.model_validate({**d.model_dump(by_alias=True, exclude_none=True), "onRemoved": "release"})


def test_a_part_runs_on_a_recording_context_and_asks_the_loop_for_its_wishes() -> None:
    ctx = RecordingContext()
    track = Tracking()
    watch = ModelWatch(ctx, Backoff(), track, lambda: None)
    d = release_spec()
    desired = Desired("llm", (), 1)
    track.healthy.add("llm")
    watch.account(d, desired, Observed({}), ctx.now)  # llm removed outside vramctl (compose down)
    assert ("want", (None, (), "removed-outside")) in ctx.asked
    two = Observed({m: Workload(m, RUN, heavy=True, ready=True) for m in ("llm", "sdxl")})
    watch.account(d, desired, two, ctx.now)
    assert ("violation", (("llm", "sdxl"),)) in ctx.asked


def rig(d: DeploymentSpec | None = None, **kw: Any) -> tuple[GpuWorker, FakeRuntime]:
    d = d or three_heavy()
    rt = FakeRuntime(states={"llm": RUN})
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.001, baseline_mib=0, backoff_initial_s=30), **kw)
    return w, rt


def refuse_request(w: GpuWorker, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    called: list[str] = []

    def request(*args: Any, **kw: Any) -> Desired:
        called.append(str(kw.get("source")))
        raise AssertionError("the loop called its own public request()")

    monkeypatch.setattr(w, "request", request)
    return called


def test_a_gated_start_becomes_the_desired_state_without_the_public_request(monkeypatch: pytest.MonkeyPatch) -> None:
    w, rt = rig()
    w.reconcile_once()
    called = refuse_request(w, monkeypatch)
    rt.states["sdxl"] = RUN  # `docker compose --profile sdxl up -d`
    w.gate_start(StartEvent(model="sdxl", gpu=0, ref="hand", heavy=True))
    w.reconcile_once()
    assert called == []
    assert w.desired.active == "sdxl" and w.status()["activeModel"] == "sdxl" and w.status()["phase"] == "Ready"
    assert rt.states["llm"] is not RUN and rt.states["sdxl"] is RUN
    assert [p["message"] for p in w.progress() if p["step"] == "requested"][-1].endswith("(docker-start)")


def test_the_queues_switch_is_applied_by_the_loop_without_the_public_request(monkeypatch: pytest.MonkeyPatch) -> None:
    w, rt = rig(queued())
    called = refuse_request(w, monkeypatch)
    w.start()
    holder = InboxHolder(lambda _gpu, cmd: w.post(cmd), gpu_of=lambda _m: "0", clock=w.clock)
    try:
        assert wait_for(lambda: w.status()["phase"] == "Ready")
        g = asyncio.run(asyncio.wait_for(holder.demand("sdxl", ttl_seconds=30), 5))
        assert g.model == "sdxl" and rt.states["sdxl"] is RUN and w.desired.active == "sdxl"
        assert called == []
    finally:
        w.stop()


@dataclass
class SpecDecides:
    """An admission that keeps ``want`` unless the source is ``owner`` (the Kubernetes source's rule)."""

    want: Desired
    owner: str = "kubernetes"
    asked: list[tuple[str | None, str]] = field(default_factory=list)
    worker: GpuWorker | None = None

    def admit(self, gpu: int, desired: Desired, source: str) -> Desired:
        self.asked.append((desired.active, source))
        if self.worker is not None:
            assert not self.worker._request_lock.acquire(blocking=False)  # called under the worker's lock
        return desired if source == self.owner else self.want


def test_an_admission_overrules_a_request_once_without_a_request_of_its_own() -> None:
    adm = SpecDecides(Desired("llm", (), 0))
    w, rt = rig(admission=adm)
    adm.worker = w
    w.reconcile_once()
    got = w.request("sdxl", (), source="api")
    assert got.active == "llm" and got.generation == 1  # the spec's state, at the request's generation
    assert adm.asked == [("sdxl", "api")]
    w.reconcile_once()
    assert rt.states.get("sdxl") is None and rt.states["llm"] is RUN
    assert [p["message"] for p in w.progress() if p["step"] == "requested"][-1] == "desired: llm (api, overruled)"
    assert w.request("sdxl", (), source="kubernetes").active == "sdxl"  # the owner's own request passes
    w.reconcile_once()
    assert rt.states["sdxl"] is RUN


def test_a_gated_start_is_overruled_by_the_admission_on_the_loop_thread() -> None:
    adm = SpecDecides(Desired("llm", (), 0))
    w, rt = rig(admission=adm)
    adm.worker = w
    w.reconcile_once()
    rt.states["sdxl"] = RUN
    w.gate_start(StartEvent(model="sdxl", gpu=0, ref="hand", heavy=True))
    w.reconcile_once()
    assert adm.asked == [("sdxl", "docker-start")]
    assert w.desired.active == "llm" and rt.states["sdxl"] is not RUN and rt.states["llm"] is RUN
