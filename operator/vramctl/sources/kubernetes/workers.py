"""The GPU workers of ModelDeployments: built, handed specs, kept to them, retired.

Why: the handlers never act; the GPU's ``GpuWorker`` does, so the invariant
(one heavy model per GPU) keeps a single owner. This module is the only
place that talks to the workers on a ModelDeployment's behalf:

- ``hand_over`` gives a valid spec to the entry's worker (building one for a
  new entry), level-triggered: a request equal to what the worker already
  wants is not made, so a spec delivered twice bumps nothing;
- ``admit`` is the worker's admission check: when another writer of
  desired state (a container started by hand) asks for something else, the
  spec's desired state is admitted in its place (with a Warning Event), as
  a check inside the worker's own admission, never a request of its own;
- ``retire`` stops a worker and removes its GPU's models (slow: the caller
  does it outside the controller's lock), ``bare`` finds them for a
  ModelDeployment this process never ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from vramctl.observed import Desired
from vramctl.runtimes.base import Runtime
from vramctl.runtimes.kubernetes import Forbidden, PodOwner, PodRuntime
from vramctl.sources.kubernetes.entries import Entry, Retiring
from vramctl.sources.kubernetes.outbox import Outbox
from vramctl.sources.kubernetes.specs import InvalidSpec, spec_path
from vramctl.sources.kubernetes.status import HandedDesired
from vramctl.spec.models import DeploymentSpec, DesiredStateError
from vramctl.worker.actor import Admission, DesiredSink, GpuWorker, StatusSink
from vramctl.worker.supervisor import Supervisor

log = logging.getLogger("vramctl.kubernetes")

SOURCE = "kubernetes"  # the `source` of the requests made from a ModelDeployment's spec

WorkerFactory = Callable[[DeploymentSpec, StatusSink, DesiredSink, Admission], GpuWorker]


def _shape(spec: DeploymentSpec | None) -> dict[str, Any] | None:
    """The spec without the desired state: what a plain switch leaves alone."""
    if spec is None:
        return None
    return spec.model_dump(exclude={"active_model", "companions"})


class EntrySink:
    """One ModelDeployment's StatusSink, DesiredSink and Admission. Called on
    worker threads, possibly with the worker's request lock held: never takes
    the controller's lock (the controller takes it before the worker's) and
    never calls back into the worker."""

    def __init__(self, workers: EntryWorkers, entry: Entry) -> None:
        self.workers, self.entry = workers, entry

    def write_status(self, gpu: int, status: dict[str, Any]) -> None:
        self.workers.outbox.mark(self.entry)

    def write_desired(self, gpu: int, desired: Desired, source: str, config_default: dict[str, Any] | None = None) -> None:
        """Nothing to record: the ModelDeployment's spec is the record."""

    def admit(self, gpu: int, desired: Desired, source: str) -> Desired:
        return self.workers.admit(self.entry, desired, source)


class EntryWorkers:
    """Builds, updates and retires the workers of this node's ModelDeployments."""

    def __init__(self, node_name: str, supervisor: Supervisor, runtime: Runtime, make_worker: WorkerFactory, outbox: Outbox) -> None:
        self.node_name, self.supervisor, self.runtime = node_name, supervisor, runtime
        self.make_worker, self.outbox = make_worker, outbox

    def hand_over(self, entry: Entry, spec: DeploymentSpec, generation: int | None) -> None:
        """Give ``spec`` (at ``generation``) to the entry's worker (lock held).
        Raises InvalidSpec when the worker refuses the desired state."""
        want = (spec.active_model, tuple(spec.companions))
        worker = entry.worker
        if worker is None:
            self._start(entry, spec, generation)
            return
        current = worker.desired
        desired_changed = (current.active, current.companions) != want
        if spec.switching.mode == "onDemand" and entry.spec is not None:
            # Holds and the gateway decide; spec.activeModel is only the model to begin with (and idle's default).
            desired_changed = False
        shape_changed = _shape(entry.spec) != _shape(spec)
        if shape_changed:
            self._own(entry, spec)
            worker.update_spec(spec)  # before the request: it may name a model only the new spec has
        if desired_changed:
            try:
                worker.request(want[0], want[1], source=SOURCE)
            except DesiredStateError as err:
                raise InvalidSpec([(spec_path(err.field or "activeModel"), str(err))]) from None
        elif not shape_changed and spec != worker.spec:
            worker.update_spec(spec)  # only activeModel/companions moved back: nothing to plan
        if shape_changed or desired_changed or generation != entry.generation:
            before = entry.handed.generation_at(worker.published_status().get("observedGeneration")) if entry.handed else None
            entry.handed = HandedDesired(worker.desired, generation, before)
        entry.spec, entry.generation = spec, generation

    def _start(self, entry: Entry, spec: DeploymentSpec, generation: int | None) -> None:
        """A new worker for ``entry``'s GPU, added to the supervisor."""
        self._own(entry, spec)
        sink = EntrySink(self, entry)
        worker = self.make_worker(spec, sink, sink, sink)
        entry.worker, entry.spec, entry.generation = worker, spec, generation
        entry.handed = HandedDesired(worker.desired, generation)
        self.supervisor.add_worker(worker)
        log.info("%s/%s: gpu %d handed to a worker, desired %s", entry.namespace, entry.name, spec.gpu, spec.active_model or "(none)")

    def _own(self, entry: Entry, spec: DeploymentSpec) -> None:
        """The Pod runtime makes the ModelDeployment its Pods' owner."""
        if isinstance(self.runtime, PodRuntime):
            self.runtime.own(spec.gpu, PodOwner(entry.namespace, entry.name, entry.uid))

    def admit(self, entry: Entry, desired: Desired, source: str) -> Desired:
        """The worker's admission check for ``desired`` asked by ``source``:
        another source (e.g. a container started by hand) is overruled, since
        the ModelDeployment's spec is the desired state here; the spec's is
        admitted in its place before the worker acts, and a Warning Event says
        how to switch instead. Called with the worker's request lock held,
        on the worker's thread or a caller's."""
        spec, worker = entry.spec, entry.worker
        if source == SOURCE or spec is None or worker is None or entry.gone or spec.switching.mode == "onDemand":
            return desired  # onDemand: the clients' holds decide, not the spec
        want = (spec.active_model, tuple(spec.companions))
        if (desired.active, desired.companions) == want:
            return desired
        self.outbox.event(
            entry.ref(),
            "Warning",
            "Overruled",
            f"{desired.active or '(no model)'} was asked for by {source}, but spec.activeModel is {want[0] or '(none)'}: "
            f"kept. To switch, edit the ModelDeployment: kubectl -n {entry.namespace} patch md {entry.name} --type merge "
            f'-p \'{{"spec":{{"activeModel":"{desired.active or ""}"}}}}\'',
        )
        return Desired(want[0], want[1], desired.generation)

    def bare(self, name: str, raw: dict[str, Any], entries: Iterable[Entry]) -> Retiring:
        """A ModelDeployment this process never ran (its spec was never valid
        here): its GPU's models, from before a restart, still go, unless
        another ModelDeployment (of ``entries``) holds that GPU. Lock held."""
        gpu = raw.get("gpu", 0)
        if raw.get("nodeName") != self.node_name or not isinstance(gpu, int) or gpu < 0:
            return Retiring(None, None)
        if any(e.worker is not None and e.worker.gpu == gpu for e in entries):
            return Retiring(None, None)
        return Retiring(None, DeploymentSpec.model_construct(name=name, gpu=gpu, models={}, env={}, companions=[]))

    def retire(self, r: Retiring) -> None:
        """Stop the worker, then stop and remove every model of its GPU (slow: outside the lock)."""
        if r.worker is not None and self.supervisor.workers.get(r.worker.gpu) is r.worker:
            self.supervisor.remove_worker(r.worker.gpu)
        if r.spec is not None:
            try:
                models = self.runtime.observe(r.spec)
            except Forbidden as err:
                # No rights on Pods there: nothing of ours can have started since
                # they were taken, and the Pods it owns go with the ModelDeployment
                # (owner references: the cluster's garbage collector).
                log.warning("%s: %s; leaving its Pods to the garbage collector", r.spec.display_name, err)
                return
            for model in models:
                self.runtime.remove(r.spec, model)
