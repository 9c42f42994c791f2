"""The bridge between kopf's handlers and this node's GPU workers.

Why it is shaped like this:

- The handlers never act. They hand a ModelDeployment's spec to
  ``ModelDeployments.apply``, which parses it with the same pydantic
  ``DeploymentSpec`` as the config file and gives the desired state to the
  GPU's ``GpuWorker`` (``update_spec`` + ``request``). The worker's loop does
  everything else, so the invariant (one heavy model per GPU) keeps a single
  owner whatever kopf delivers, twice or out of order. Level-triggered: a
  request equal to what the worker already wants is not made at all, so a
  spec delivered twice (resume, timer, re-listing) bumps nothing.
- The desired state handed over carries the spec's ``metadata.generation``
  (``status.HandedDesired``), so ``observedGeneration`` is read off it.
- An invalid spec becomes a Degraded condition and one Warning Event naming
  the field; nothing that runs is stopped (the worker keeps the last valid
  spec).
- Two ModelDeployments naming this node and the same GPU: the older (by
  creationTimestamp) keeps the GPU, the newer gets Degraded, reason Conflict,
  naming the other, and one Event; nothing runs for it. When the older goes
  (deleted, moved), the newer is applied at once from its last spec.
- Status and Events leave through one writer thread (``writer.Writer``)
  with the blocking client of ``client.py``. The workers never wait for the API
  server: their sink only marks the object dirty. ``.status`` is PATCHed
  (merge patch) only when the document changed.
- Another writer of desired state on the node (a container started by hand,
  seen on the docker event stream) is overruled at once: the spec is the
  desired state here, so the worker's admission check puts the spec's in
  its place before it acts, and a Warning Event says how to switch instead
  (``kubectl patch``).

The parts, each a module of this package: ``entries`` (what is known about
each ModelDeployment), ``specs`` (parse, validate, report problems),
``claims`` (conflicts over a GPU), ``workers`` (build, hand over, admit,
retire), ``outbox`` (dirty marks and Events, never blocking) and ``writer``
(the thread that writes them). ``ModelDeployments`` coordinates them under
one lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from vramctl.runtimes.base import Runtime
from vramctl.sources.kubernetes.claims import GpuClaims
from vramctl.sources.kubernetes.client import Session, StatusApi
from vramctl.sources.kubernetes.entries import Entry, Key, Retiring, plain
from vramctl.sources.kubernetes.outbox import Outbox
from vramctl.sources.kubernetes.specs import InvalidSpec, parse_spec, report_invalid
from vramctl.sources.kubernetes.status import conditions_from
from vramctl.sources.kubernetes.workers import EntryWorkers, WorkerFactory
from vramctl.sources.kubernetes.writer import StatusPublisher, Writer
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.supervisor import Supervisor

log = logging.getLogger("vramctl.kubernetes")


class ModelDeployments:
    """The bridge between kopf's handlers and this node's GPU workers.

    Thread-safe: kopf runs the handlers on its executor threads, the writer
    has its own thread, the workers theirs. One lock guards the entries;
    the slow parts (retiring workers, API calls) run outside it.
    """

    def __init__(
        self,
        node_name: str,
        supervisor: Supervisor,
        runtime: Runtime,
        make_worker: WorkerFactory,
        *,
        api: StatusApi | None = None,
        session: Session | None = None,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not node_name:
            raise ValueError("the node name is required: pass --node-name or set NODE_NAME (the downward API's spec.nodeName)")
        self.node_name = node_name
        self.supervisor = supervisor
        self.runtime = runtime
        self.make_worker = make_worker
        self.session = session or Session()
        self.api: StatusApi = api or self.session.api
        self.wall, self.clock = wall, clock
        self._lock = threading.RLock()
        self._entries: dict[Key, Entry] = {}
        self._writer = Writer(lambda: self.flush())
        self._outbox = Outbox(self.api, node_name, wall, self._writer.poke)
        self._claims = GpuClaims(self._entries, self._outbox, node_name)
        self._workers = EntryWorkers(node_name, supervisor, runtime, make_worker, self._outbox)
        self._publisher = StatusPublisher(self.api, self._outbox, node_name, self._lock, wall, clock)

    # -------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._writer.start()

    def close(self) -> None:
        """Stop writing (one last flush); the workers belong to the supervisor."""
        self._writer.stop()

    def logged_in(self, settings: kopf.OperatorSettings, info: kopf.ConnectionInfo | None) -> None:
        """kopf logged in (at start, and again when a token expired)."""
        self.session.settings, self.session.info = settings, info

    # ------------------------------------------------------- kopf's side

    def concerns(self, namespace: str | None, name: str | None, spec: Mapping[str, Any]) -> bool:
        """Ours: its spec names this node, or it did and we still hold it."""
        if spec.get("nodeName") == self.node_name:
            return True
        with self._lock:
            return (namespace or "", name or "") in self._entries

    def apply(
        self,
        namespace: str,
        name: str,
        uid: str,
        generation: int | None,
        raw_spec: Mapping[str, Any],
        status: Mapping[str, Any] | None = None,
        created: str = "",
    ) -> None:
        """Hand this spec to its GPU's worker. Raises InvalidSpec; then nothing
        was changed or stopped. A conflict (another, older ModelDeployment
        holds the GPU) is reported on the status, not raised."""
        raw = plain(raw_spec)
        key = (namespace, name)
        if raw.get("nodeName") != self.node_name:
            self._let_go(key)
            return
        problems: list[tuple[str, str]] = []
        try:
            spec: DeploymentSpec | None = parse_spec(name, raw, self.runtime)
        except InvalidSpec as err:
            spec, problems = None, err.problems
        with self._lock:
            entry = self._record(key, uid, generation, raw, status, created)
            spec, retiring = self._place(entry, spec, generation)
        for r in retiring:
            self._workers.retire(r)
        if spec is None and not problems:
            return  # conflicted: reported, nothing runs
        with self._lock:
            self._hand(entry, spec, generation, problems)

    def refresh(
        self,
        namespace: str,
        name: str,
        uid: str,
        generation: int | None,
        raw_spec: Mapping[str, Any],
        created: str = "",
        status: Mapping[str, Any] | None = None,
    ) -> None:
        """The timer: apply again (a no-op when nothing changed) and let the
        writer refresh the GPU figures. After a restart the timer may be the
        first to deliver an object: its ``status`` (what the last operator
        published: conditions, lastSwitch) seeds the entry as ``apply``'s does."""
        with contextlib.suppress(InvalidSpec):
            self.apply(namespace, name, uid, generation, raw_spec, status, created=created)
        with self._lock:
            entry = self._entries.get((namespace, name))
            if entry is not None:
                entry.gpu_at = 0.0
                self.mark(entry)

    def delete(self, namespace: str, name: str, raw_spec: Mapping[str, Any]) -> None:
        """Stop and remove this ModelDeployment's models, nothing else; then a
        ModelDeployment that waited for its GPU (a conflict) takes over.
        Raises the runtime's error when a model could not be removed."""
        key = (namespace, name)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.gone = True
                retiring = entry.detach()
            else:
                retiring = self._workers.bare(name, plain(raw_spec), self._entries.values())
        self._workers.retire(retiring)
        with self._lock:
            self._entries.pop(key, None)
        log.info("%s/%s deleted: its models are removed", namespace, name)
        self._hand_over_waiting()

    # -------------------------------------------------------- internals

    def _record(
        self, key: Key, uid: str, generation: int | None, raw: dict[str, Any], status: Mapping[str, Any] | None, created: str
    ) -> Entry:
        """The entry of ``key``, created on first sight from its published
        status, updated with the newest spec (lock held)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = Entry(*key, uid)
            entry.conditions = conditions_from(status)
            last = (status or {}).get("lastSwitch")
            entry.last_switch = plain(last) if isinstance(last, Mapping) else None
        entry.uid = uid or entry.uid
        entry.created = created or entry.created
        entry.raw, entry.raw_generation = raw, generation
        return entry

    def _place(self, entry: Entry, spec: DeploymentSpec | None, generation: int | None) -> tuple[DeploymentSpec | None, list[Retiring]]:
        """Where ``spec`` may run (lock held): the spec, or None when an older
        ModelDeployment holds its GPU; and the workers that must retire."""
        retiring: list[Retiring] = []
        if spec is not None and entry.spec is not None and entry.worker is not None and entry.spec.gpu != spec.gpu:
            retiring.append(entry.detach())  # a GPU index change: the old GPU's models go
        if spec is not None:
            may, other = self._claims.claim(entry, spec.gpu, generation)
            if other is not None:
                retiring.append(other)
            if not may:
                spec = None
        return spec, retiring

    def _hand(self, entry: Entry, spec: DeploymentSpec | None, generation: int | None, problems: list[tuple[str, str]]) -> None:
        """Hand ``spec`` to the worker, or report ``problems`` and raise InvalidSpec (lock held)."""
        try:
            if spec is None:
                raise InvalidSpec(problems)
            entry.conflict = None
            self._workers.hand_over(entry, spec, generation)
        except InvalidSpec as err:
            report_invalid(self._outbox, entry, generation, err.problems)
            raise
        if entry.problems:
            entry.problems, entry.problem_generation, entry.reported = [], None, None
        self.mark(entry)

    def _hand_over_waiting(self) -> None:
        """Apply the conflicted ModelDeployments again: one may now take its GPU."""
        with self._lock:
            waiting = self._claims.waiting()
        for e in waiting:
            with contextlib.suppress(InvalidSpec):
                self.apply(e.namespace, e.name, e.uid, e.raw_generation, e.raw or {}, created=e.created)

    def _let_go(self, key: Key) -> None:
        """spec.nodeName moved to another node: our models go, the other node's instance takes over."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            entry.gone = True
            retiring = entry.detach()
        log.info("%s/%s moved to another node: removing its models here", *key)
        self._workers.retire(retiring)
        self._hand_over_waiting()

    # ------------------------------------------------- worker-thread side

    def mark(self, entry: Entry) -> None:
        """The status of ``entry`` may have changed (never blocks, takes no lock)."""
        self._outbox.mark(entry)

    def event(self, ref: dict[str, Any], etype: str, reason: str, message: str) -> None:
        self._outbox.event(ref, etype, reason, message)

    # --------------------------------------------------- the writer's side

    def flush(self) -> bool:
        """Write what changed; False when something must be retried."""
        ok = True
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            try:
                ok = self._publisher.flush_entry(entry) and ok
            except Exception:
                log.exception("%s/%s: status not written", entry.namespace, entry.name)
                ok = False
        return self._outbox.flush_events() and ok

    def render(self, entry: Entry) -> dict[str, Any]:
        """The ``.status`` document of ``entry`` (lock held); remembers its conditions."""
        return self._publisher.render(entry)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """For tests and debugging: each entry's state."""
        with self._lock:
            return {
                f"{e.namespace}/{e.name}": {
                    "gpu": e.worker.gpu if e.worker else None,
                    "generation": e.generation,
                    "problems": list(e.problems),
                    "conflict": e.conflict,
                }
                for e in self._entries.values()
            }
