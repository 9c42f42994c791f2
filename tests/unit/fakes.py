"""Recording fakes for the supervisor's ports (pure-logic tests only).

They record what was asked, in order, and move state instantly; the real
adapters are tested against a real Docker engine and real processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vramctl.gpu.base import GpuInfo
from vramctl.observed import GpuMemory, GpuProcess, GpuSnapshot, Workload, WorkloadState
from vramctl.runtimes.base import StartError, StartEvent, StopOutcome
from vramctl.spec import DeploymentSpec


@dataclass
class FakeRuntime:
    kind: str = "fake"
    states: dict[str, WorkloadState] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    crash_on_start: set[str] = field(default_factory=set)
    fail_start: dict[str, str] = field(default_factory=dict)
    never_healthy: set[str] = field(default_factory=set)
    on_call: Callable[[str, str], None] | None = None

    def _rec(self, verb: str, model: str) -> None:
        self.calls.append((verb, model))
        if self.on_call:
            self.on_call(verb, model)

    def observe(self, deployment: DeploymentSpec) -> dict[str, Workload]:
        out = {}
        for m, s in self.states.items():
            spec = deployment.models.get(m)
            out[m] = Workload(m, s, ref=m, heavy=spec.heavy if spec else True, exit_code=3 if s is WorkloadState.EXITED else None)
        return out

    def start(self, deployment: DeploymentSpec, model: str) -> str:
        self._rec("start", model)
        if model in self.fail_start:
            raise StartError(self.fail_start[model])
        self.states[model] = WorkloadState.EXITED if model in self.crash_on_start else WorkloadState.RUNNING
        return model

    def stop(self, deployment: DeploymentSpec, model: str) -> StopOutcome:
        self._rec("stop", model)
        was = self.states.get(model, WorkloadState.ABSENT).live
        if model in self.states:
            self.states[model] = WorkloadState.EXITED
        return StopOutcome(model, was, False, 0.0)

    def pause(self, deployment: DeploymentSpec, model: str) -> None:
        self._rec("pause", model)
        self.states[model] = WorkloadState.PAUSED

    def check_health(self, deployment: DeploymentSpec, model: str) -> bool:
        return self.states.get(model) is WorkloadState.RUNNING and model not in self.never_healthy

    def logs_tail(self, deployment: DeploymentSpec, model: str, lines: int = 20) -> list[str]:
        return [f"{model}: boom"]

    def remove(self, deployment: DeploymentSpec, model: str) -> None:
        self._rec("remove", model)
        self.states.pop(model, None)

    def validate(self, deployment: DeploymentSpec) -> list[tuple[str, str]]:
        return []

    def watch_starts(self, on_start: Callable[[StartEvent], None], stop: Callable[[], bool]) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class FakeGpu:
    """Memory follows the runtime's running models; ``foreign`` MiB can be injected."""

    runtime: FakeRuntime
    deployment: DeploymentSpec
    total_mib: int = 16000
    foreign: dict[int, int] = field(default_factory=dict)
    snapshots: int = 0
    kind: str = "fake"

    def info(self) -> GpuInfo:
        return GpuInfo(0, "GPU-fake", "Fake", "0", self.total_mib)

    def snapshot(self) -> GpuSnapshot:
        self.snapshots += 1
        procs = [
            GpuProcess(pid=100 + i, used_mib=self.deployment.models[m].vram_mib or 0, model=m)
            for i, (m, s) in enumerate(sorted(self.runtime.states.items()))
            if s is WorkloadState.RUNNING and m in self.deployment.models
        ]
        procs += [GpuProcess(pid=pid, used_mib=mib, container="stranger") for pid, mib in self.foreign.items()]
        used = sum(p.used_mib or 0 for p in procs)
        return GpuSnapshot(GpuMemory(self.total_mib, used), tuple(procs))


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t
