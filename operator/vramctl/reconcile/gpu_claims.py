"""The heavy slot of each GPU of a host, shared by its workers: how a model on
several GPUs (``gpus: [0, 1]``) keeps the invariant on each of them.

A model on several GPUs is declared in the entry of one of them and run by
that GPU's worker (its lead); the other GPUs' workers do not run it but must
not start a heavy model beside it, and it must not start beside theirs.
Each worker's loop, at every look, publishes the heavy models it has live
and the GPUs each holds (``publish``: level-triggered, from observation, so
a supervisor restarted mid-switch rebuilds the table from what runs). Before
a heavy start or wake, the loop takes the GPUs the model needs (``take``):
all of them or none, in one step under one lock, so two workers can never
both win a GPU and no worker holds one while it waits for another (no
deadlock: nothing waits holding anything). A GPU counts as taken by another
worker while that worker published a heavy model on it or took it for a
start that it has not yet observed. A model on several GPUs also needs each
other GPU's memory free (its probe: a stopped model's memory comes back
late), and waits while a worker that may run a model on one of its GPUs has
not looked yet (after a restart).

A config with no model on several GPUs takes every GPU at once: one worker
per GPU, and no other worker's model is on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from vramctl.spec.models import DeploymentSpec


class GpuClaims:
    """Thread-safe; every method takes one lock (the probes are read under it:
    a probe must not call back into this table)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[int, DeploymentSpec] = {}  # worker's gpu -> its newest spec
        self._free: dict[int, Callable[[], int | None]] = {}  # gpu -> free MiB now (its probe)
        self._held: dict[int, dict[str, tuple[int, ...]]] = {}  # worker's gpu -> heavy model -> the GPUs it holds
        self._looked: set[int] = set()  # workers that published at least once

    def register(self, spec: DeploymentSpec, free_mib: Callable[[], int | None]) -> None:
        """A worker of ``spec.gpu`` joins (before its loop starts); ``free_mib`` reads its GPU."""
        with self._lock:
            self._specs[spec.gpu] = spec
            self._free[spec.gpu] = free_mib
            self._held.pop(spec.gpu, None)
            self._looked.discard(spec.gpu)

    def forget(self, gpu: int) -> None:
        """The worker of ``gpu`` left: what it runs is nobody's to guard any more."""
        with self._lock:
            for table in (self._specs, self._free, self._held):
                table.pop(gpu, None)
            self._looked.discard(gpu)

    def publish(self, spec: DeploymentSpec, live_heavy: Iterable[str]) -> None:
        """What the worker of ``spec.gpu`` observed live: its heavy models (their GPUs by ``spec``)."""
        held = {m: spec.gpus_of(m) for m in live_heavy if m in spec.models}
        with self._lock:
            self._specs[spec.gpu] = spec
            self._held[spec.gpu] = held
            self._looked.add(spec.gpu)

    def take(self, spec: DeploymentSpec, model: str, need_mib: int) -> str | None:
        """Take the GPUs ``model`` needs for the worker of ``spec.gpu``: None
        when taken (until that worker's next ``publish``), else why not (nothing
        is taken). ``need_mib``: what the model holds on each GPU."""
        me, gpus = spec.gpu, spec.gpus_of(model)
        with self._lock:
            for g in gpus:
                why = self._why_not(me, g)
                if why is not None:
                    return why
            for g in gpus:
                if g == me:
                    continue  # the worker's own plan waits for its GPU's memory
                read = self._free.get(g)
                if read is None:
                    return f"{model} needs gpu {g}, which has no worker here: give gpu {g} an entry (a ModelDeployment) on this node"
                free = read()
                if free is not None and free < need_mib:
                    return f"{model} needs {need_mib} MiB on gpu {g}, which has {free} MiB free: waiting for its memory"
            self._held.setdefault(me, {})[model] = gpus
            return None

    def _why_not(self, me: int, g: int) -> str | None:
        """Why GPU ``g`` cannot be taken by the worker of ``me`` now; lock held."""
        for other, spec in sorted(self._specs.items()):
            if other == me:
                continue
            if other not in self._looked and (other == g or any(g in spec.gpus_of(m) for m in spec.models)):
                return f"gpu {g}: waiting for gpu {other}'s worker to look at what runs"
            for m, held in sorted(self._held.get(other, {}).items()):
                if g in held:
                    shared = f" (a model on gpus {', '.join(map(str, held))}, run by gpu {other}'s worker)" if len(held) > 1 else ""
                    return f"gpu {g} is held by {m}{shared}"
        return None
