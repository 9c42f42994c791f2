"""A GPU probe for machines without an NVIDIA GPU: memory follows the models.

The simulated GPU has no memory of its own to measure. It is told which models
are running (``holders``, which the supervisor wires to the runtime's
observation) and what each holds (their declared ``vramMiB``), and it adds the
one behaviour that makes switching interesting: memory is not free the
moment a model exits, but ``release_delay_seconds`` later, like a real driver
tearing down a CUDA context.

Timing contract: the probe learns that a model left when it looks at
``holders()`` and the model is missing. Its memory counts as used from that
look until ``release_delay_seconds`` later by ``clock`` (at exactly
``noticed + delay`` it is free). So the delay runs from the first look that
sees the model gone, never from the model's real exit time, which the probe
cannot know.

A look is a snapshot, or a sample: with ``sample_seconds`` the probe also
looks by itself that often (a thread of its own), as a real GPU's memory
follows its processes whether or not anyone reads it. Without samples, a
model that came and went between two snapshots was never seen and its
departure freed nothing: a worker that reads the GPU only while it waits for
memory then started the next model at once. ``vramctl up`` samples (its
holders are the worker's published states: cheap to read); tests that drive
the probe by a fake clock do not.

What ``snapshot`` reports:

- used = baseline + the holders' MiB + the still-releasing MiB + foreign MiB.
  It is not capped at the total: an over-committed config shows up as
  ``used > total`` (negative free) instead of being hidden.
- processes: one ``GpuProcess(pid=0, model=name)`` per holder and per
  still-releasing model (the simulation has no real pids), and one
  ``GpuProcess(pid, model=None)`` per foreign process (``add_foreign``), which
  is how tests make memory held by "someone else" appear.

Sleeping models: ``with_residues`` wraps ``holders`` so that a model whose
server says it sleeps holds only its residue. A holder whose memory shrinks
(a model going to sleep) releases the difference ``release_delay_seconds``
after the snapshot that first sees it smaller, as for a departure; growth (a
wake) counts at once.

Thread-safe: every method (and the sampler) takes one lock. ``holders`` is called with that lock
held, so that "noticing" a departure and reading the clock happen as one step;
it must therefore never call back into this probe.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vramctl.gpu.base import GpuInfo
from vramctl.observed import GpuMemory, GpuProcess, GpuSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Releasing:
    model: str
    mib: int
    since: float  # clock() of the snapshot that first saw the model gone


class SimulatedGpu:
    """GpuProbe whose memory is the declared size of what runs on it."""

    kind = "simulated"

    def __init__(
        self,
        index: int,
        total_mib: int,
        baseline_mib: int,
        release_delay_seconds: float,
        holders: Callable[[], Mapping[str, int]],
        clock: Callable[[], float] = time.monotonic,
        sample_seconds: float | None = None,
    ) -> None:
        if total_mib < 1:
            raise ValueError(f"total_mib must be at least 1, got {total_mib}")
        if baseline_mib < 0:
            raise ValueError(f"baseline_mib must not be negative, got {baseline_mib}")
        if release_delay_seconds < 0:
            raise ValueError(f"release_delay_seconds must not be negative, got {release_delay_seconds}")
        if sample_seconds is not None and not 0 < sample_seconds <= 60:
            raise ValueError(f"sample_seconds must be in (0, 60], got {sample_seconds}")
        self.index = index
        self.total_mib = total_mib
        self.baseline_mib = baseline_mib
        self.release_delay_seconds = release_delay_seconds
        self._holders = holders
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}  # holders seen at the previous snapshot
        # A list, not a dict by model: a model that leaves, comes back and
        # leaves again within the delay has two allocations being torn down.
        self._releasing: list[_Releasing] = []
        self._foreign: dict[int, int] = {}
        self._more: list[Callable[[], Mapping[str, int]]] = []  # add_holders
        self._closed = threading.Event()
        if sample_seconds is not None:
            # The thread holds the probe weakly: a probe nobody uses any more
            # is collected, and its sampler ends with it.
            weakref.finalize(self, self._closed.set)
            threading.Thread(
                target=_sample_while_alive,
                args=(weakref.ref(self), self._closed, sample_seconds),
                name=f"vramctl-simgpu{index}",
                daemon=True,
            ).start()

    def close(self) -> None:
        """End the sampler (a no-op without one)."""
        self._closed.set()

    def sample(self) -> None:
        """Look at the holders now: departures are noticed, nothing is reported."""
        with self._lock:
            self._notice(self._read_holders(), self._clock())

    def info(self) -> GpuInfo:
        return GpuInfo(index=self.index, uuid=f"SIM-GPU-{self.index}", name="Simulated GPU", driver="simulated", total_mib=self.total_mib)

    def snapshot(self) -> GpuSnapshot:
        """Memory and processes now; also the moment departures are noticed."""
        with self._lock:
            current = self._read_holders()
            now = self._clock()
            self._notice(current, now)

            procs = [GpuProcess(pid=0, used_mib=mib, model=model) for model, mib in sorted(current.items())]
            procs += [GpuProcess(pid=0, used_mib=r.mib, model=r.model) for r in self._releasing]
            procs += [GpuProcess(pid=pid, used_mib=mib, model=None) for pid, mib in sorted(self._foreign.items())]
            used = self.baseline_mib + sum(current.values()) + sum(r.mib for r in self._releasing) + sum(self._foreign.values())
            return GpuSnapshot(memory=GpuMemory(total_mib=self.total_mib, used_mib=used), processes=tuple(procs))

    def add_holders(self, more: Callable[[], Mapping[str, int]]) -> None:
        """Also count what ``more`` says holds memory here: a model on several
        GPUs, run by another GPU's worker. Called with the lock held, like ``holders``."""
        with self._lock:
            self._more.append(more)

    def add_foreign(self, pid: int, mib: int) -> None:
        """Pretend process ``pid`` (not vramctl's) holds ``mib`` MiB; replaces an earlier amount."""
        if mib < 0:
            raise ValueError(f"mib must not be negative, got {mib}")
        with self._lock:
            self._foreign[pid] = mib

    def remove_foreign(self, pid: int) -> None:
        """Drop a foreign process; its memory is free at once (no release
        delay: tests use this to unblock a switch at a moment they choose)."""
        with self._lock:
            self._foreign.pop(pid, None)

    def _notice(self, current: dict[str, int], now: float) -> None:
        """Departures (and shrinks) since the last look start releasing now; releases past the delay end. Lock held."""
        for model, mib in self._last.items():
            freed = mib - current.get(model, 0)
            if freed > 0:
                self._releasing.append(_Releasing(model, freed, now))
        self._last = current
        # Strictly less: at exactly since + delay the memory is free.
        self._releasing = [r for r in self._releasing if now - r.since < self.release_delay_seconds]

    def _read_holders(self) -> dict[str, int]:
        try:
            read = dict(self._holders())
            for more in self._more:
                read.update(more())
            return {str(m): max(0, int(mib)) for m, mib in read.items()}
        except Exception as err:
            # Keep the last known holders: reporting their memory as freed
            # because the runtime could not be asked would let a heavy model
            # start beside one that may still be running.
            log.warning("simulated gpu %d: could not read the running models (%s); keeping the last known ones", self.index, err)
            return dict(self._last)


def _sample_while_alive(ref: weakref.ref[SimulatedGpu], closed: threading.Event, every: float) -> None:
    """The sampler's loop: one look per ``every`` seconds until the probe is closed or gone."""
    while not closed.wait(every):
        gpu = ref()
        if gpu is None:
            return
        try:
            gpu.sample()
        except Exception:  # never end the sampler: the next look may work
            log.exception("simulated gpu %d: a sample failed", gpu.index)
        del gpu


def with_residues(holders: Callable[[], Mapping[str, int]], residue: Callable[[str], int | None]) -> Callable[[], Mapping[str, int]]:
    """``holders`` where each model for which ``residue(model)`` answers a
    number (it sleeps) holds that number instead (never more than before).

    ``residue`` is ``sleepctl.asleep_residue(spec_of)`` in ``vramctl up``:
    it asks the model's server, so a server that answers its /sleep but keeps
    its memory (or reports a growing residue) shows that here, as NVML would.
    Called with the probe's lock held: it must answer quickly (the stand-ins
    answer in a millisecond; the default timeout is 0.5 s) and must never
    call back into the probe. A ``residue`` that raises counts as awake.
    """

    def sleep_aware() -> Mapping[str, int]:
        out = dict(holders())
        for model, mib in out.items():
            try:
                kept = residue(model)
            except Exception as err:
                log.warning("simulated gpu: could not ask whether %s sleeps (%s); counting all of its memory", model, err)
                kept = None
            if kept is not None:
                out[model] = min(mib, max(0, kept))
        return out

    return sleep_aware
