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
- Status and Events leave through one writer thread (``_Writer``) with the
  blocking client of ``client.py``. The workers never wait for the API
  server: their sink only marks the object dirty. ``.status`` is PATCHed
  (merge patch) only when the document changed.
- Another writer of desired state on the node (a container started by hand,
  seen on the docker event stream) is overruled at once: the spec is the
  desired state here, so the worker is sent back to it before it acts, and a
  Warning Event says how to switch instead (``kubectl patch``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from vramctl.conditions import Condition, rfc3339
from vramctl.observed import Desired
from vramctl.runtimes.base import Runtime
from vramctl.runtimes.kubernetes import Forbidden, KubeApiError, PodOwner, PodRuntime
from vramctl.sources.kubernetes.client import API_VERSION, KIND, Session, StatusApi
from vramctl.sources.kubernetes.status import Conflict, HandedDesired, StatusSnapshot, conditions_from, render_status
from vramctl.spec import ConfigError, DeploymentSpec, DesiredStateError, problems_from
from vramctl.supervisor import PHASE_BLOCKED, DesiredSink, GpuWorker, StatusSink, Supervisor

log = logging.getLogger("vramctl.kubernetes")

SOURCE = "kubernetes"  # the `source` of the requests made from a ModelDeployment's spec

GPU_REFRESH_S = 10.0  # usedMiB in .status is refreshed at least this often
_WRITER_PERIOD_S = 2.0  # the writer looks for new progress notes at least this often
# After a poke the writer waits this long, so that a burst (a request, then
# the switch's first notes) is one write, and so that it does not compete
# with the worker for the CPU while a switch begins.
_WRITER_DEBOUNCE_S = 0.1
_EVENT_ATTEMPTS = 3
_EVENT_MESSAGE_MAX = 1024  # Kubernetes truncates longer Event messages

# Worker progress steps that become Kubernetes Events: (type, reason).
EVENT_STEPS: dict[str, tuple[str, str]] = {
    "switch-started": ("Normal", "SwitchStarted"),
    "switch-success": ("Normal", "SwitchFinished"),
    "switch-failed": ("Warning", "SwitchFailed"),
    "switch-blocked": ("Warning", "SwitchBlocked"),
    "failed": ("Warning", "ModelFailed"),
    "gated": ("Warning", "StartGated"),
    "rejected": ("Warning", "StartRejected"),
    "violation": ("Warning", "ExclusivityViolation"),
}

WorkerFactory = Callable[[DeploymentSpec, StatusSink, DesiredSink], GpuWorker]


def _plain(obj: Any) -> Any:
    """kopf's bodies are read-only views; take a plain deep copy."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


class InvalidSpec(Exception):
    """The spec cannot be acted on; ``problems`` are (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


@dataclass
class _Entry:
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


@dataclass(frozen=True)
class _Retiring:
    worker: GpuWorker | None
    spec: DeploymentSpec | None


def _shape(spec: DeploymentSpec | None) -> dict[str, Any] | None:
    """The spec without the desired state: what a plain switch leaves alone."""
    if spec is None:
        return None
    return spec.model_dump(exclude={"active_model", "companions"})


class _Sink:
    """One ModelDeployment's StatusSink and DesiredSink. Called on worker
    threads, possibly with the worker's request lock held: never takes the
    controller's lock (the controller takes it before the worker's)."""

    def __init__(self, controller: ModelDeployments, entry: _Entry) -> None:
        self.controller, self.entry = controller, entry

    def write_status(self, gpu: int, status: dict[str, Any]) -> None:
        self.controller.mark(self.entry)

    def write_desired(self, gpu: int, desired: Desired, source: str, config_default: dict[str, Any] | None = None) -> None:
        if source != SOURCE:
            self.controller.overrule(self.entry, desired, source)


class ModelDeployments:
    """The bridge between kopf's handlers and this node's GPU workers.

    Thread-safe: kopf runs the handlers on its executor threads, the writer
    has its own thread, the workers theirs.
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
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._events: deque[tuple[dict[str, Any], str, str, str, int]] = deque(maxlen=1000)
        self._writer = _Writer(self)

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
        raw = _plain(raw_spec)
        key = (namespace, name)
        if raw.get("nodeName") != self.node_name:
            self._let_go(key)
            return
        problems: list[tuple[str, str]] = []
        try:
            spec: DeploymentSpec | None = self._parse(name, raw)
        except InvalidSpec as err:
            spec, problems = None, err.problems
        retiring: list[_Retiring] = []
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(namespace, name, uid)
                entry.conditions = conditions_from(status)
                last = (status or {}).get("lastSwitch")
                entry.last_switch = _plain(last) if isinstance(last, Mapping) else None
            entry.uid = uid or entry.uid
            entry.created = created or entry.created
            entry.raw, entry.raw_generation = raw, generation
            if spec is not None and entry.spec is not None and entry.worker is not None and entry.spec.gpu != spec.gpu:
                retiring.append(self._detach(entry))  # a GPU index change: the old GPU's models go
            if spec is not None:
                holder = self._holder(entry, spec.gpu)
                if holder is not None and holder.age_key() < entry.age_key():
                    self._conflicted(entry, holder, spec.gpu, generation)
                    retiring.append(self._detach(entry))
                    spec = None
                elif holder is not None:
                    # This one is older (seen second, e.g. after a restart): it takes the GPU.
                    self._conflicted(holder, entry, spec.gpu, holder.raw_generation)
                    retiring.append(self._detach(holder))
        for r in retiring:
            self._retire(r)
        if spec is None and not problems:
            return  # conflicted: reported, nothing runs
        with self._lock:
            try:
                if spec is None:
                    raise InvalidSpec(problems)
                entry.conflict = None
                self._hand_over(entry, spec, generation)
            except InvalidSpec as err:
                self._invalid(entry, generation, err.problems)
                raise
            if entry.problems:
                entry.problems, entry.problem_generation, entry.reported = [], None, None
            self.mark(entry)

    def refresh(self, namespace: str, name: str, uid: str, generation: int | None, raw_spec: Mapping[str, Any], created: str = "") -> None:
        """The timer: apply again (a no-op when nothing changed) and let the
        writer refresh the GPU figures."""
        with contextlib.suppress(InvalidSpec):
            self.apply(namespace, name, uid, generation, raw_spec, created=created)
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
                retiring = self._detach(entry)
            else:
                retiring = self._bare(name, _plain(raw_spec))
        self._retire(retiring)
        with self._lock:
            self._entries.pop(key, None)
        log.info("%s/%s deleted: its models are removed", namespace, name)
        self._hand_over_waiting()

    # -------------------------------------------------------- internals

    def _parse(self, name: str, raw: dict[str, Any]) -> DeploymentSpec:
        try:
            spec = DeploymentSpec.model_validate({**raw, "name": name})
        except ValidationError as err:
            raise InvalidSpec([(_spec_path(p), m) for p, m in problems_from(err)]) from None
        problems = self.runtime.validate(spec)
        if problems:
            raise InvalidSpec([(_spec_path(p), m) for p, m in problems])
        return spec

    def _holder(self, entry: _Entry, gpu: int) -> _Entry | None:
        for other in self._entries.values():
            if other is not entry and not other.gone and other.worker is not None and other.worker.gpu == gpu:
                return other
        return None

    def _conflicted(self, entry: _Entry, holder: _Entry, gpu: int, generation: int | None) -> None:
        conflict = Conflict(holder.namespace, holder.name, gpu)
        if entry.conflict != conflict:
            self.event(
                entry.ref(),
                "Warning",
                "Conflict",
                f"gpu {gpu} of node {self.node_name} is already managed by ModelDeployment {holder.namespace}/{holder.name} "
                "(older): nothing runs for this one until that one is deleted or moved",
            )
            log.warning("%s/%s: gpu %d is held by %s/%s: conflict", entry.namespace, entry.name, gpu, holder.namespace, holder.name)
        entry.conflict, entry.problem_generation = conflict, generation
        entry.problems, entry.reported = [], None
        self.mark(entry)

    def _hand_over_waiting(self) -> None:
        """Apply the conflicted ModelDeployments again: one may now take its GPU."""
        with self._lock:
            waiting = sorted((e for e in self._entries.values() if e.conflict is not None and e.raw is not None), key=_Entry.age_key)
        for e in waiting:
            with contextlib.suppress(InvalidSpec):
                self.apply(e.namespace, e.name, e.uid, e.raw_generation, e.raw or {}, created=e.created)

    def _hand_over(self, entry: _Entry, spec: DeploymentSpec, generation: int | None) -> None:
        want = (spec.active_model, tuple(spec.companions))
        worker = entry.worker
        if worker is None:
            self._own(entry, spec)
            sink = _Sink(self, entry)
            worker = self.make_worker(spec, sink, sink)
            entry.worker, entry.spec, entry.generation = worker, spec, generation
            entry.handed = HandedDesired(worker.desired, generation)
            self.supervisor.add_worker(worker)
            log.info("%s/%s: gpu %d handed to a worker, desired %s", entry.namespace, entry.name, spec.gpu, want[0] or "(none)")
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
                raise InvalidSpec([(_spec_path(err.field or "activeModel"), str(err))]) from None
        elif not shape_changed and spec != worker.spec:
            worker.update_spec(spec)  # only activeModel/companions moved back: nothing to plan
        if shape_changed or desired_changed or generation != entry.generation:
            before = entry.handed.generation_at(worker.published_status().get("observedGeneration")) if entry.handed else None
            entry.handed = HandedDesired(worker.desired, generation, before)
        entry.spec, entry.generation = spec, generation

    def _own(self, entry: _Entry, spec: DeploymentSpec) -> None:
        """The Pod runtime makes the ModelDeployment its Pods' owner."""
        if isinstance(self.runtime, PodRuntime):
            self.runtime.own(spec.gpu, PodOwner(entry.namespace, entry.name, entry.uid))

    def _invalid(self, entry: _Entry, generation: int | None, problems: list[tuple[str, str]]) -> None:
        entry.problems, entry.problem_generation = problems, generation
        rendered = ConfigError(f"{KIND} {entry.namespace}/{entry.name}", problems).render()
        if entry.reported != (generation, rendered):
            entry.reported = (generation, rendered)
            what = "not applied; the models keep running as before" if entry.worker is not None else "nothing is started"
            msg = "invalid spec, " + what + ": " + "; ".join(f"{p}: {m}" for p, m in problems)
            self.event(entry.ref(), "Warning", "InvalidSpec", msg)
            log.warning("%s/%s: %s", entry.namespace, entry.name, rendered)
        self.mark(entry)

    def _detach(self, entry: _Entry) -> _Retiring:
        retiring = _Retiring(entry.worker, entry.spec if entry.worker is not None else None)
        entry.worker, entry.handed = None, None
        if retiring.spec is not None:
            entry.spec = None
        return retiring

    def _bare(self, name: str, raw: dict[str, Any]) -> _Retiring:
        """A ModelDeployment this process never ran (its spec was never valid
        here): its GPU's models, from before a restart, still go, unless
        another ModelDeployment holds that GPU."""
        gpu = raw.get("gpu", 0)
        if raw.get("nodeName") != self.node_name or not isinstance(gpu, int) or gpu < 0:
            return _Retiring(None, None)
        if any(e.worker is not None and e.worker.gpu == gpu for e in self._entries.values()):
            return _Retiring(None, None)
        return _Retiring(None, DeploymentSpec.model_construct(name=name, gpu=gpu, models={}, env={}, companions=[]))

    def _retire(self, r: _Retiring) -> None:
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

    def _let_go(self, key: tuple[str, str]) -> None:
        """spec.nodeName moved to another node: our models go, the other node's instance takes over."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            entry.gone = True
            retiring = self._detach(entry)
        log.info("%s/%s moved to another node: removing its models here", *key)
        self._retire(retiring)
        self._hand_over_waiting()

    # ------------------------------------------------- worker-thread side

    def mark(self, entry: _Entry) -> None:
        """The status of ``entry`` may have changed (never blocks, takes no lock)."""
        entry.dirty = True
        self._writer.poke()

    def overrule(self, entry: _Entry, desired: Desired, source: str) -> None:
        """Another source asked the worker for ``desired`` (e.g. a container
        started by hand): the ModelDeployment's spec is the desired state, so
        send the worker back to it before it acts. Called with the worker's
        request lock held, on the worker's or the event watcher's thread."""
        spec, worker = entry.spec, entry.worker
        if spec is None or worker is None or entry.gone or spec.switching.mode == "onDemand":
            return  # onDemand: the clients' holds decide, not the spec
        want = (spec.active_model, tuple(spec.companions))
        if (desired.active, desired.companions) == want:
            return
        try:
            worker.request(want[0], want[1], source=SOURCE)
        except DesiredStateError as err:
            log.warning("%s/%s: could not restore the spec's desired state: %s", entry.namespace, entry.name, err)
        self.event(
            entry.ref(),
            "Warning",
            "Overruled",
            f"{desired.active or '(no model)'} was asked for by {source}, but spec.activeModel is {want[0] or '(none)'}: "
            f"kept. To switch, edit the ModelDeployment: kubectl -n {entry.namespace} patch md {entry.name} --type merge "
            f'-p \'{{"spec":{{"activeModel":"{desired.active or ""}"}}}}\'',
        )

    def event(self, ref: dict[str, Any], etype: str, reason: str, message: str) -> None:
        self._events.append((ref, etype, reason, message, 0))
        self._writer.poke()

    # --------------------------------------------------- the writer's side

    def flush(self) -> bool:
        """Write what changed; False when something must be retried."""
        ok = True
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            try:
                ok = self._flush_entry(entry) and ok
            except Exception:
                log.exception("%s/%s: status not written", entry.namespace, entry.name)
                ok = False
        return self._flush_events() and ok

    def _flush_entry(self, entry: _Entry) -> bool:
        worker = entry.worker
        if worker is not None:
            for p in worker.progress(entry.progress_seq):
                entry.progress_seq = max(entry.progress_seq, int(p["seq"]))
                kind = EVENT_STEPS.get(str(p["step"]))
                if kind is not None:
                    message = str(p["message"])
                    if p["step"] == "switch-blocked":
                        st = worker.published_status()
                        if st.get("phase") == PHASE_BLOCKED and st.get("message"):
                            message += f": {st['message']}"
                    self.event(entry.ref(), kind[0], kind[1], message)
            if entry.dirty or self.clock() - entry.gpu_at >= GPU_REFRESH_S:
                gpu = _gpu_info(worker)
                entry.dirty = entry.dirty or gpu != entry.gpu
                entry.gpu, entry.gpu_at = gpu, self.clock()
        if not entry.dirty or entry.gone:
            return True
        entry.dirty = False
        with self._lock:
            status = self.render(entry)
        if status == entry.last_written:
            return True
        try:
            self.api.patch_status(entry.namespace, entry.name, status)
        except KubeApiError as err:
            if err.status == 404:
                return True  # deleted meanwhile: the delete handler cleans up
            entry.dirty = True
            log.warning("%s/%s: status not written (%s); retrying", entry.namespace, entry.name, err)
            return False
        entry.last_written = status
        return True

    def _flush_events(self) -> bool:
        ok = True
        for _ in range(len(self._events)):
            try:
                ref, etype, reason, message, attempts = self._events.popleft()
            except IndexError:
                break
            try:
                self.api.create_event(ref["namespace"], self._event_body(ref, etype, reason, message))
            except KubeApiError as err:
                if attempts + 1 < _EVENT_ATTEMPTS and err.status != 404:
                    self._events.append((ref, etype, reason, message, attempts + 1))
                    ok = False
                else:
                    log.warning("event %s on %s/%s dropped: %s", reason, ref["namespace"], ref["name"], err)
        return ok

    def _event_body(self, ref: dict[str, Any], etype: str, reason: str, message: str) -> dict[str, Any]:
        now = rfc3339(self.wall())
        if len(message) > _EVENT_MESSAGE_MAX:
            message = message[: _EVENT_MESSAGE_MAX - 3] + "..."
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{ref['name']}.{uuid.uuid4().hex[:16]}", "namespace": ref["namespace"]},
            "involvedObject": ref,
            "type": etype,
            "reason": reason,
            "message": message,
            "source": {"component": "vramctl", "host": self.node_name},
            "reportingComponent": "vramctl.io/operator",
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }

    def render(self, entry: _Entry) -> dict[str, Any]:
        """The ``.status`` document of ``entry`` (lock held); remembers its conditions."""
        worker = entry.worker
        rendered = render_status(
            StatusSnapshot(
                node_name=self.node_name,
                now=self.wall(),
                worker=worker.published_status() if worker is not None else None,
                handed=entry.handed,
                problems=tuple(entry.problems),
                problem_generation=entry.problem_generation,
                conflict=entry.conflict,
                conflict_generation=entry.problem_generation,
                gpu=entry.gpu,
                last_switch=entry.last_switch,
                conditions=entry.conditions,
            )
        )
        entry.conditions = rendered.conditions
        return rendered.status

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


def _spec_path(path: str) -> str:
    return "spec" if path in ("", "(top level)") else f"spec.{path}"


def _gpu_info(worker: GpuWorker) -> dict[str, Any] | None:
    try:
        info = worker.probe.info()
        used = worker.probe.snapshot().memory.used_mib
    except Exception as err:  # the GPU figures are optional; the status is not
        log.debug("gpu %d: no GPU figures for the status: %s", worker.gpu, err)
        return None
    return {"uuid": info.uuid or None, "name": info.name or None, "totalMiB": max(0, info.total_mib), "usedMiB": max(0, used)}


class _Writer:
    """The one thread that talks to the API server on the workers' behalf."""

    def __init__(self, controller: ModelDeployments) -> None:
        self.controller = controller
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vramctl-k8s-writer", daemon=True)
            self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.0  # after a failed round: 1, 2, 4 ... 30 s, pokes or not
        while not self._stop.is_set():
            if backoff:
                self._stop.wait(backoff)
            elif self._wake.wait(_WRITER_PERIOD_S):
                self._stop.wait(_WRITER_DEBOUNCE_S)
            self._wake.clear()
            try:
                ok = self.controller.flush()
            except Exception:  # never die: the next round retries
                log.exception("status writer round failed")
                ok = False
            backoff = 0.0 if ok else min(30.0, max(1.0, backoff * 2))
        with contextlib.suppress(Exception):
            self.controller.flush()
