"""The HTTP face of a supervisor on loopback, as ``vramctl up`` starts it
(``vramctl.web.server.serve``), for in-process tests."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from tests.support.fakes import FakeGpu, FakeRuntime
from tests.support.workers import spec
from vramctl.observed import WorkloadState
from vramctl.web.api import StateStore
from vramctl.web.server import Face, FaceOptions, Limits, serve
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings
from vramctl.worker.supervisor import Supervisor


def running(**spec_fields: Any) -> tuple[Supervisor, GpuWorker, FakeRuntime]:
    """A supervisor of one settled worker with ``llm`` running, on recording
    fakes: what the HTTP face tests serve."""
    rt = FakeRuntime(states={"llm": WorkloadState.RUNNING})
    d = spec(**spec_fields)
    metrics = Metrics()
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.001, baseline_mib=0), metrics=metrics)
    w.reconcile_once()
    return Supervisor([w], rt, metrics), w, rt


@dataclass
class Served:
    """A started face: ``port`` is the API's, ``gateway_port`` the gateway's (0: none)."""

    face: Face

    @property
    def port(self) -> int:
        return self.face.api.port

    @property
    def gateway_port(self) -> int:
        return self.face.gateway.port if self.face.gateway is not None else 0

    def stop(self) -> None:
        self.face.stop()


def serve_face(
    sup: Supervisor,
    *,
    host: str = "127.0.0.1",
    token: str | None = None,
    allowed_hosts: Collection[str] = (),
    state: StateStore | None = None,
    gateway: bool = False,
    switch_refusal: str | None = None,
    max_connections: int | None = None,
    idle_timeout: float = 15.0,
    body_timeout: float = 10.0,
) -> Served:
    limits = Limits(max_connections=max_connections, idle_timeout=idle_timeout, body_timeout=body_timeout)
    options = FaceOptions(
        api=(host, 0),
        gateway=(host, 0) if gateway else None,
        token=token,
        allowed_hosts=tuple(allowed_hosts),
        switch_refusal=switch_refusal,
        limits=limits,
    )
    face = serve(sup, options, state=state)
    face.start()
    return Served(face)
