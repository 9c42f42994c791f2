"""What the reconcile loop's parts may ask of the worker that owns them.

The parts (``model_watch``, ``finished_ops``, ``release_wait``, ...) decide;
the worker reports and records. ``LoopContext`` is the whole of what a part
may ask: progress notes, the phase and conditions, the switch in progress,
a settled state, a violation, a gated start, a desired state of the loop's
own (``want``), the published snapshot, the clock and the settings. A test
gives a recording fake of it; the worker gives its loop port. Nothing here
is thread-safe: only the worker's loop thread calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from vramctl.host.memory import HostMemoryReading
from vramctl.runtimes.base import StartEvent
from vramctl.spec.models import DeploymentSpec


class LoopSettings(Protocol):
    """The worker's settings the loop reads (``worker.actor.WorkerSettings``)."""

    @property
    def poll_interval_s(self) -> float: ...
    @property
    def margin_mib(self) -> int: ...
    @property
    def memory_timeout_s(self) -> float: ...
    @property
    def backoff_initial_s(self) -> float: ...
    @property
    def backoff_max_s(self) -> float: ...
    @property
    def resync_s(self) -> float: ...
    @property
    def baseline_mib(self) -> int | None: ...
    @property
    def foreign_grace_s(self) -> float: ...
    @property
    def stable_s(self) -> float: ...
    @property
    def host_memory(self) -> HostMemoryReading | None: ...
    @property
    def pinned_ceiling_mib(self) -> int | None: ...
    @property
    def pinned_ceiling_source(self) -> str: ...


class LoopContext(Protocol):
    """What the reconciler's parts may ask of their worker (loop thread only)."""

    @property
    def settings(self) -> LoopSettings: ...

    @property
    def clock(self) -> Callable[[], float]:
        """Monotonic seconds: the loop's ``now``."""

    @property
    def switch_in_progress(self) -> bool: ...

    @property
    def current_phase(self) -> str: ...

    def note(self, step: str, model: str | None, message: str) -> None:
        """A progress entry (and a log line)."""

    def phase(self, phase: str, reason: str, message: str) -> None: ...

    def condition(self, ctype: str, value: bool, reason: str, message: str) -> None: ...

    def begin_switch(self, source: str | None, target: str | None, now: float) -> None: ...

    def finish_switch(self, outcome: str, now: float) -> None:
        """The desired generation is answered: ``outcome`` of the switch in progress, if any."""

    def settled(self, now: float, ok: bool) -> None:
        """The desired state is reached (``ok``) or its models are backing off."""

    def violation(self, heavy_live: list[str]) -> None: ...

    def gated(self, ev: StartEvent, not_adopted: str | None = None) -> None:
        """A start behind vramctl's back was paused; it becomes the desired state unless ``not_adopted`` says why not."""

    def want(self, active: str | None, companions: tuple[str, ...] | None, source: str) -> None:
        """A desired state of the loop's own (a removal outside vramctl, a gated
        start): validated, admitted and applied at once, on the loop thread.
        Raises ``DesiredStateError`` when it is refused."""

    def publish(self) -> None:
        """Render the snapshot readers see (before a step that takes its time)."""

    def logs(self, spec: DeploymentSpec, model: str) -> list[str]:
        """The model's last log lines; empty when the runtime cannot tell."""

    def has_commands(self) -> bool:
        """A command waits in the worker's inbox: apply it before acting."""

    def total_mib(self) -> int | None: ...

    def hold_off_demands(self) -> bool:
        """If nothing waits, is held or is in flight in the GPU's queue: keep
        new demands waiting (the fast lane shut) until the loop next settles,
        and True; else False (sleep.prewarm's cycle runs only then)."""
