"""What the world looks like right now: plain, frozen values.

Runtimes and GPU probes produce these; the planner consumes them. Nothing
here performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class WorkloadState(StrEnum):
    ABSENT = "absent"  # no container / process at all
    CREATED = "created"  # exists, never started (or compose-created)
    RUNNING = "running"
    PAUSED = "paused"  # docker-paused: holds no new GPU memory, cannot allocate
    RESTARTING = "restarting"
    EXITED = "exited"

    @property
    def live(self) -> bool:
        """Could hold, or be about to take, GPU memory."""
        return self in (WorkloadState.RUNNING, WorkloadState.PAUSED, WorkloadState.RESTARTING)


@dataclass(frozen=True)
class Workload:
    """One model's container or process as observed."""

    model: str
    state: WorkloadState
    ref: str = ""  # container id or pid, for logs and messages
    drifted: bool = False  # spec hash differs from the current spec: recreate
    ready: bool = False  # health check passed (filled in by the supervisor)
    exit_code: int | None = None
    heavy: bool = True  # from the vramctl.io/class label, for workloads no longer in the spec
    # Exited, but left processes of its group running (process runtime), or a
    # record still to settle: a planned Cleanup removes them (observation
    # itself never acts).
    leftover: bool = False
    # Running, but its server says it sleeps (``is_sleeping``): it holds only
    # its residue on the GPU and is not awake for the exclusivity rule.
    asleep: bool = False


@dataclass(frozen=True)
class GpuMemory:
    total_mib: int
    used_mib: int
    reserved_mib: int = 0

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib - self.reserved_mib


@dataclass(frozen=True)
class GpuProcess:
    """A process holding GPU memory; ``model`` is set when it is one of ours."""

    pid: int
    used_mib: int | None
    model: str | None = None
    container: str | None = None
    pod: str | None = None  # Kubernetes: "namespace/name" (or "uid <uid>" when the Pod cannot be named)


@dataclass(frozen=True)
class GpuSnapshot:
    """One reading of a GPU. Every field after ``processes`` is optional
    telemetry: None means the probe cannot report it (simulated GPU, WSL2,
    a field NVML does not support on this card), never zero."""

    memory: GpuMemory
    processes: tuple[GpuProcess, ...] | None = None  # None: the probe cannot tell per process
    utilization: float | None = None  # fraction 0..1 of the sample period a kernel ran (NVML utilization.gpu / 100)
    temperature_celsius: float | None = None  # GPU core temperature
    power_watts: float | None = None  # board power draw (NVML power usage mW / 1000)


@dataclass(frozen=True)
class Desired:
    """Which heavy model should hold the GPU, and which light ones sit beside it."""

    active: str | None
    companions: tuple[str, ...] = ()
    generation: int = 0
    # Nothing desired: False frees the GPU (sleeping models are stopped too);
    # True puts the models that can sleep to sleep and keeps them so (idle
    # action ``sleep``). Ignored while a model is desired.
    keep_asleep: bool = False

    @property
    def members(self) -> tuple[str, ...]:
        return ((self.active,) if self.active else ()) + self.companions


@dataclass(frozen=True)
class Observed:
    workloads: dict[str, Workload] = field(default_factory=dict)

    def state(self, model: str) -> WorkloadState:
        w = self.workloads.get(model)
        return w.state if w else WorkloadState.ABSENT
