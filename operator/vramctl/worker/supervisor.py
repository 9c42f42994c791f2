"""All workers of this host, and the watcher that gates starts made behind
vramctl's back.

The per-GPU worker (an actor) lives in ``vramctl.worker.actor``, its loop-owned
state machine in ``vramctl.reconcile.reconciler``, and the pure parts beside the
planner: ``memory_gate`` (is the GPU really free), ``backoff``,
``status_book`` (phase, conditions, progress), ``errors`` (transient or
permanent). This module re-exports the names its users import.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential

from vramctl.costs import switch_seconds
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.observed import WorkloadState
from vramctl.placement import Site, place
from vramctl.reconcile.gpu_claims import GpuClaims
from vramctl.runtimes import sleepctl
from vramctl.runtimes.base import Runtime, StartEvent
from vramctl.spec.models import DeploymentSpec
from vramctl.status.events import EventJournal
from vramctl.worker.actor import GpuWorker, Metrics

log = logging.getLogger("vramctl.worker.supervisor")


# Model states in which a model holds its memory on a simulated GPU.
_HOLDING = frozenset({"running", "starting", "stopping", "sleeping", "waking"})


def holders_of(
    states: Callable[[], Mapping[str, str]], deployment: Callable[[], DeploymentSpec], total_mib: int | None = None
) -> Callable[[], Mapping[str, int]]:
    """For the simulated GPU: the models holding memory by the worker's last
    look (its published model states), and what they hold. Unlike
    ``holders_from`` this asks the runtime nothing: a ``/metrics`` scrape
    reads the simulated GPU, and a scrape must not reach the engine."""

    residue = sleepctl.asleep_residue(deployment, timeout=0.2)

    def holders() -> Mapping[str, int]:
        spec = deployment()
        out = {m: spec.reservation_mib(m, total_mib) or 0 for m, st in states().items() if st in _HOLDING and m in spec.models}
        for m, st in states().items():
            if st == "asleep" and m in spec.models:
                # What its server says it keeps (a stand-in's residue_mib), else its maxResidueMiB.
                kept = residue(m)
                out[m] = kept if kept is not None else spec.models[m].sleep_settings.max_residue_mib
        return out

    return holders


def _site(w: GpuWorker, model: str) -> Site:
    """What the placement rule knows of ``model`` on ``w``'s GPU, from the worker's published reads."""
    states = w.model_states()
    awake = states.get(model) in ("running", "starting", "waking") or model in w.desired.members
    asleep = [m for m, st in states.items() if st == "asleep"]
    try:
        cost: float | None = switch_seconds(w.reporter.costs, w.spec, w.desired.active, model, asleep, w.total_mib())
    except Exception:  # a cost that cannot be estimated does not decide
        cost = None
    return Site(w.gpu, awake=awake, switch_seconds=cost, last_used=w.lane.last_used)


class _WatchEnded(Exception):
    """The runtime's event stream ended while the supervisor still runs."""


def holders_from(
    runtime: Runtime, deployment: Callable[[], DeploymentSpec], total_mib: int | None = None
) -> Callable[[], Mapping[str, int]]:
    """For the simulated GPU: the models running right now and what they hold
    (their reservation: vramMiB, or gpuMemoryUtilization x ``total_mib`` for vLLM)."""

    def holders() -> Mapping[str, int]:
        spec = deployment()
        out = {}
        for name, w in runtime.observe(spec).items():
            if w.state is WorkloadState.RUNNING:
                out[name] = (spec.reservation_mib(name, total_mib) or 0) if name in spec.models else 0
        return out

    return holders


class Supervisor:
    """All workers of this host plus the watcher that gates starts made behind our back.

    ``workers`` is replaced whole on every change (kopf threads add and
    remove workers while the API and the collector iterate it).
    """

    def __init__(self, workers: list[GpuWorker], runtime: Runtime, metrics: Metrics, notes: list[str] | None = None) -> None:
        self._workers: Mapping[int, GpuWorker] = MappingProxyType({w.gpu: w for w in workers})
        self._change = threading.Lock()
        self.runtime = runtime
        self.metrics = metrics
        self.notes = notes or []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.journal = EventJournal()  # what every worker publishes, for GET /events
        # The GPUs' heavy slots across workers: a model on several GPUs (reconcile.gpu_claims).
        self.claims = GpuClaims()
        for w in workers:
            w.book.journal = self.journal
            self._join(w)

    @property
    def workers(self) -> Mapping[int, GpuWorker]:
        return self._workers

    def _join(self, w: GpuWorker) -> None:
        """``w`` takes part in the cross-GPU claims; a simulated GPU also
        counts the models of other workers that hold it (a model on several GPUs)."""
        w.share_gpus(self.claims)
        if isinstance(w.probe, SimulatedGpu):
            gpu = w.gpu
            w.probe.add_holders(lambda: self.held_from_elsewhere(gpu))

    def held_from_elsewhere(self, gpu: int) -> Mapping[str, int]:
        """The models on several GPUs that hold ``gpu`` but are run by another
        GPU's worker (by its last look), and what each holds here (its reservation)."""
        out: dict[str, int] = {}
        for other in list(self._workers.values()):
            if other.gpu == gpu:
                continue
            spec = other.spec
            for m, st in other.model_states().items():
                if st in _HOLDING and m in spec.models and spec.models[m].gpus is not None and gpu in spec.gpus_of(m):
                    out[m] = spec.reservation_mib(m, other.total_mib()) or 0
        return out

    def worker_for(self, model: str) -> GpuWorker:
        """The worker that serves ``model`` (KeyError: none declares it). A
        model with ``placement: any`` declared on several GPUs is placed by
        ``vramctl.placement.place``: where it is awake or being switched to,
        else where the switch is cheapest, else the GPU least recently used."""
        found = [w for w in list(self._workers.values()) if model in w.spec.models]
        if not found:
            raise KeyError(model)
        if len(found) == 1 or found[0].spec.models[model].placement != "any":
            return found[0]
        by_gpu = {w.gpu: w for w in found if w.spec.models[model].placement == "any"}
        return by_gpu[place([_site(w, model) for w in by_gpu.values()])]

    def start(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="vramctl-events", daemon=True)
        self._watcher.start()
        for w in self._workers.values():
            w.start()

    def add_worker(self, worker: GpuWorker) -> None:
        """Adopt a worker for a GPU that appeared at run time (a ModelDeployment
        was created); started at once when the supervisor already runs."""
        with self._change:
            if worker.gpu in self._workers:
                raise ValueError(f"gpu {worker.gpu} already has a worker")
            worker.book.journal = self.journal
            self._join(worker)
            self._workers = MappingProxyType({**self._workers, worker.gpu: worker})
        if self._watcher is not None:
            worker.start()

    def remove_worker(self, gpu: int) -> GpuWorker | None:
        """Stop and forget the worker of ``gpu``; its models keep running."""
        with self._change:
            w = self._workers.get(gpu)
            self._workers = MappingProxyType({g: x for g, x in self._workers.items() if g != gpu})
        if w is not None:
            w.stop()
            self.journal.forget(gpu)
            self.claims.forget(gpu)
        return w

    def _watch(self) -> None:
        """Follow the runtime's start events; reconnect with back-off when the
        engine goes away (a daemon restart), and have every worker re-observe
        at once when it is back: the daemon may have restarted containers."""
        if self.runtime.kind != "docker":
            self.runtime.watch_starts(self._on_start, self._stop.is_set)
            return

        def again(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome else None
            # Once per outage, not at every retry.
            level = logging.WARNING if state.attempt_number == 1 else logging.DEBUG
            log.log(level, "docker event stream: %s; reconnecting with back-off", err or "ended")

        retrying = Retrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=0.2, max=1.0),
            stop=stop_when_event_set(self._stop),
            before_sleep=again,
            reraise=False,
            retry_error_callback=lambda _: None,
        )
        retrying(self._watch_once)

    def _watch_once(self) -> None:
        for w in self._workers.values():
            w.poke()  # (re)connected: look again now, not at the next resync
        self.runtime.watch_starts(self._on_start, self._stop.is_set)
        if not self._stop.is_set():
            raise _WatchEnded("the event stream ended")

    def _on_start(self, ev: StartEvent) -> None:
        w = self._workers.get(ev.gpu)
        if w is None:
            return
        if ev.action in ("start", "kill", "die", "restart"):
            w.gate_start(ev)  # the loop tells a stop or restart by hand from a crash
        else:
            w.poke()

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers.values():
            w.stop()
        if self._watcher is not None:
            self._watcher.join(5)
        self.runtime.close()

    def status(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime.kind,
            "notes": list(self.notes),
            "gpus": {str(g): w.status() for g, w in sorted(self._workers.items())},
        }
