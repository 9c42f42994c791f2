"""The runtime port: what the supervisor asks of a place that runs models.

Contract for every adapter:
- Idempotent: stopping something already stopped or absent, starting something
  already running, are successes.
- Only workloads that carry vramctl's ownership marks (docker labels
  ``app.kubernetes.io/managed-by=vramctl`` + ``vramctl.io/instance``; the
  process runtime's own pid records) are ever observed, stopped or started.
- ``stop`` returns only once the workload has exited (signal, grace period,
  then SIGKILL).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vramctl.observed import Workload
from vramctl.spec.models import DeploymentSpec

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "vramctl"
LABEL_INSTANCE = "vramctl.io/instance"
LABEL_MODEL = "vramctl.io/model"
LABEL_GPU = "vramctl.io/gpu"
LABEL_CLASS = "vramctl.io/class"
LABEL_SPEC_HASH = "vramctl.io/spec-hash"
LABEL_DEPLOYMENT = "vramctl.io/deployment"


# An instance name is part of container names and record file names.
INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_instance(instance: str) -> None:
    if not INSTANCE_RE.match(instance):
        raise ValueError(f"instance {instance!r} is invalid: use letters, digits, '_', '.' and '-' (at most 63; it is part of names)")


class RuntimeFailure(Exception):
    """A runtime operation failed in a way worth reporting (not 'already done')."""


class TransientError(RuntimeFailure):
    """The engine or API could not be reached, or timed out: retry with back-off; the switch stays in progress."""


class PermanentError(RuntimeFailure):
    """Retrying cannot help until the spec changes (image missing, not ours, invalid rendered spec)."""


class StartError(PermanentError):
    """The model could not be started (no command, no image, executable not found)."""


@dataclass(frozen=True)
class StopOutcome:
    model: str
    was_running: bool
    killed: bool  # SIGKILL was needed after the grace period
    seconds: float
    exit_code: int | None = None


@dataclass(frozen=True)
class StartEvent:
    """A managed workload started (docker 'start' event), possibly behind our back, or changed state."""

    model: str
    gpu: int
    ref: str
    heavy: bool
    # "start" (gated); "kill", "die", "restart" (a stop or restart by hand is told from a crash);
    # or "destroy", "pause", "unpause": the worker only looks again at once.
    action: str = "start"
    # Started only because every `docker compose up` starts it (a compose
    # service without a profile), not because someone asked for it by name.
    incidental: bool = False
    exit_code: int | None = None  # of a "die"


@runtime_checkable
class Runtime(Protocol):
    kind: str  # "docker" | "process"

    def observe(self, deployment: DeploymentSpec) -> dict[str, Workload]:
        """All of vramctl's workloads of this deployment's GPU, by model name
        (also ones whose model is no longer in the spec). ``ready`` is left False."""
        ...

    def start(self, deployment: DeploymentSpec, model: str) -> str:
        """Create (or recreate on spec-hash drift) and start the model, or unpause
        it when paused. Returns the workload ref. Raises StartError with a reason."""
        ...

    def stop(self, deployment: DeploymentSpec, model: str) -> StopOutcome:
        """Stop signal, wait the model's grace period, then SIGKILL; return once exited."""
        ...

    def preflight(self, deployment: DeploymentSpec, model: str) -> str | None:
        """Why ``model`` cannot start here (image missing, compose service or
        executable not found), checked before anything is stopped for it; None
        when nothing known stands in the way. Cheap and read-only."""
        ...

    def cleanup(self, deployment: DeploymentSpec, model: str) -> None:
        """Remove what an exited workload left behind (a Workload observed with
        ``leftover``): processes still in its group, its record. Observation
        never does this itself. Idempotent."""
        ...

    def pause(self, deployment: DeploymentSpec, model: str) -> None:
        """Freeze a running workload at once (docker pause / SIGSTOP)."""
        ...

    def check_health(self, deployment: DeploymentSpec, model: str) -> bool:
        """One readiness probe: HTTP health path, docker health status, or 'running'."""
        ...

    def logs_tail(self, deployment: DeploymentSpec, model: str, lines: int = 20) -> list[str]: ...

    def remove(self, deployment: DeploymentSpec, model: str) -> None:
        """Stop and delete the workload entirely (finalizers, cleanup). Idempotent."""
        ...

    def validate(self, deployment: DeploymentSpec) -> list[tuple[str, str]]:
        """Problems that make this deployment unrunnable on this runtime, as
        (field path, message); e.g. a model with neither image nor command."""
        ...

    def owners(self, deployment: DeploymentSpec) -> Mapping[str, str]:
        """What of this deployment's GPU is ours, for attributing GPU processes:
        ``{container id or pid (decimal text): model}`` for each live workload
        (a process workload lists its pid and its process group). Called by the
        NVML probe when an unknown pid appears on the GPU, so it should be
        cheap (one listing). Runtimes that cannot tell return {}."""
        ...

    def watch_starts(self, on_start: Callable[[StartEvent], None], stop: Callable[[], bool]) -> None:
        """Blocking: call ``on_start`` for each managed workload start until ``stop()``.
        Runtimes that cannot be started behind vramctl's back return at once."""
        ...

    def close(self) -> None: ...
