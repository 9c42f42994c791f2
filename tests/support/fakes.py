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
from vramctl.runtimes.sleepctl import SleepCallError
from vramctl.spec.models import DeploymentSpec


@dataclass
class FakeRuntime:
    kind: str = "fake"
    states: dict[str, WorkloadState] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    crash_on_start: set[str] = field(default_factory=set)
    fail_start: dict[str, str] = field(default_factory=dict)
    never_healthy: set[str] = field(default_factory=set)
    unrunnable: set[str] = field(default_factory=set)  # preflight says fail_start[model]
    on_call: Callable[[str, str], None] | None = None
    asleep: set[str] = field(default_factory=set)  # models whose server sleeps (FakeSleeper)
    residue: dict[str, int] = field(default_factory=dict)  # MiB an asleep model keeps (default 500)

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
        self.asleep.discard(model)
        return StopOutcome(model, was, False, 0.0)

    def preflight(self, deployment: DeploymentSpec, model: str) -> str | None:
        return self.fail_start.get(model) if model in self.unrunnable else None

    def cleanup(self, deployment: DeploymentSpec, model: str) -> None:
        self._rec("cleanup", model)

    def pause(self, deployment: DeploymentSpec, model: str) -> None:
        self._rec("pause", model)
        self.states[model] = WorkloadState.PAUSED

    def check_health(self, deployment: DeploymentSpec, model: str) -> bool:
        return self.states.get(model) is WorkloadState.RUNNING and model not in self.never_healthy and model not in self.asleep

    def logs_tail(self, deployment: DeploymentSpec, model: str, lines: int = 20) -> list[str]:
        return [f"{model}: boom"]

    def remove(self, deployment: DeploymentSpec, model: str) -> None:
        self._rec("remove", model)
        self.states.pop(model, None)

    def validate(self, deployment: DeploymentSpec) -> list[tuple[str, str]]:
        return []

    def owners(self, deployment: DeploymentSpec) -> dict[str, str]:
        """Live models by their ref (the model's name doubles as its ref here)."""
        return {m: m for m, s in self.states.items() if s.live}

    def watch_starts(self, on_start: Callable[[StartEvent], None], stop: Callable[[], bool]) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class FakeGpu:
    """Memory follows the runtime's running models; ``foreign`` MiB can be injected.

    Telemetry knobs (all off by default): ``per_process=False`` reports no
    per-process data (like WSL2); ``error`` is raised by ``info`` and
    ``snapshot``; ``baseline_mib`` is added to used memory; ``utilization``,
    ``temperature_celsius`` and ``power_watts`` are passed through.
    """

    runtime: FakeRuntime
    deployment: DeploymentSpec
    total_mib: int = 16000
    foreign: dict[int, int] = field(default_factory=dict)
    snapshots: int = 0
    kind: str = "fake"
    per_process: bool = True
    error: Exception | None = None
    baseline_mib: int = 0
    utilization: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None

    def info(self) -> GpuInfo:
        if self.error is not None:
            raise self.error
        return GpuInfo(self.deployment.gpu, f"GPU-fake-{self.deployment.gpu}", "Fake", "0", self.total_mib)

    def snapshot(self) -> GpuSnapshot:
        self.snapshots += 1
        if self.error is not None:
            raise self.error
        procs = [
            GpuProcess(
                pid=100 + i,
                used_mib=self.runtime.residue.get(m, 500) if m in self.runtime.asleep else self.deployment.models[m].vram_mib or 0,
                model=m,
            )
            for i, (m, s) in enumerate(sorted(self.runtime.states.items()))
            if s is WorkloadState.RUNNING and m in self.deployment.models
        ]
        procs += [GpuProcess(pid=pid, used_mib=mib, container="stranger") for pid, mib in self.foreign.items()]
        used = self.baseline_mib + sum(p.used_mib or 0 for p in procs)
        return GpuSnapshot(
            GpuMemory(self.total_mib, used),
            tuple(procs) if self.per_process else None,
            utilization=self.utilization,
            temperature_celsius=self.temperature_celsius,
            power_watts=self.power_watts,
        )


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeSleeper:
    """The sleep API of FakeRuntime's models: moves them in and out of ``runtime.asleep``.

    ``fail_sleep`` / ``fail_wake``: model -> SleepCallError reason raised;
    ``grow``: MiB added to the model's residue by each sleep.
    """

    runtime: FakeRuntime
    fail_sleep: dict[str, str] = field(default_factory=dict)
    fail_wake: dict[str, str] = field(default_factory=dict)
    grow: dict[str, int] = field(default_factory=dict)

    def sleep(self, deployment: DeploymentSpec, model: str) -> int | None:
        self.runtime._rec("sleep", model)
        if model in self.fail_sleep:
            raise SleepCallError(f"sleep of {model} failed", self.fail_sleep[model])  # type: ignore[arg-type]
        self.runtime.asleep.add(model)
        if model in self.grow:
            self.runtime.residue[model] = self.runtime.residue.get(model, 500) + self.grow[model]
        return None

    def wake(self, deployment: DeploymentSpec, model: str) -> None:
        self.runtime._rec("wake", model)
        if model in self.fail_wake:
            raise SleepCallError(f"wake of {model} failed", self.fail_wake[model])  # type: ignore[arg-type]
        self.runtime.asleep.discard(model)

    def is_sleeping(self, deployment: DeploymentSpec, model: str) -> bool | None:
        return model in self.runtime.asleep and self.runtime.states.get(model) is WorkloadState.RUNNING
