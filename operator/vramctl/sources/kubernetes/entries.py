"""What the controller knows about each ModelDeployment of its node.

Why a module of its own: the controller's parts (GPU claims, workers, the
status writer) all read and write the same per-object record, ``Entry``.
Keeping it here lets each part import it without importing the controller.
The controller's lock guards these records; each part says which of its
methods expect that lock to be held.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vramctl.sources.kubernetes.client import API_VERSION, KIND
from vramctl.sources.kubernetes.status import Conflict, HandedDesired
from vramctl.spec.models import DeploymentSpec
from vramctl.status.conditions import Condition
from vramctl.worker.actor import GpuWorker

Key = tuple[str, str]  # (namespace, name)


def plain(obj: Any) -> Any:
    """kopf's bodies are read-only views; take a plain deep copy."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Retiring:
    """A worker taken off an entry, and the spec whose models must go with it
    (the slow part, done outside the controller's lock)."""

    worker: GpuWorker | None
    spec: DeploymentSpec | None


@dataclass
class Entry:
    """What this instance knows about one ModelDeployment of its node."""

    namespace: str
    name: str
    uid: str = ""
    created: str = ""  # metadata.creationTimestamp: the older of two conflicting ones keeps the GPU
    raw: dict[str, Any] | None = None  # the newest spec, for a hand-over after a conflict ends
    raw_generation: int | None = None
    spec: DeploymentSpec | None = None  # the last valid spec, handed to the worker
    generation: int | None = None  # metadata.generation of ``spec``
    worker: GpuWorker | None = None
    handed: HandedDesired | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    problem_generation: int | None = None
    reported: tuple[int | None, str] | None = None  # the problems last sent as an Event
    conflict: Conflict | None = None
    conditions: dict[str, Condition] = field(default_factory=dict)  # as last rendered
    last_switch: dict[str, Any] | None = None  # as published before this process started
    last_written: dict[str, Any] | None = None
    progress_seq: int = 0
    gpu: dict[str, Any] | None = None
    gpu_at: float = 0.0
    dirty: bool = True
    gone: bool = False

    def ref(self) -> dict[str, Any]:
        ref = {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "namespace": self.namespace}
        if self.uid:
            ref["uid"] = self.uid
        return ref

    def age_key(self) -> tuple[str, str, str]:
        # RFC 3339 in UTC sorts as text; an unknown time counts as newest.
        return (self.created or "~", self.namespace, self.name)

    def detach(self) -> Retiring:
        """Take the worker off this entry (lock held); ``Retiring`` says what must go."""
        retiring = Retiring(self.worker, self.spec if self.worker is not None else None)
        self.worker, self.handed = None, None
        if retiring.spec is not None:
            self.spec = None
        return retiring
