"""Kubernetes: ModelDeployment resources in; ``.status`` and Events out.

Why it is shaped like this:

- kopf handlers never act. create/update/resume, and a timer every ~10 s,
  parse ``.spec`` with the same pydantic ``DeploymentSpec`` as the config
  file and hand the desired state to the GPU's ``GpuWorker``
  (``update_spec`` + ``request``). The worker thread does everything else,
  so the invariant (one heavy model per GPU) keeps a single owner whatever
  kopf delivers, twice or out of order. Level-triggered: a request equal to
  what the worker already wants is not made at all, so a spec delivered
  twice (resume, timer, re-listing) bumps nothing and restarts no switch.
- Each instance sees only the ModelDeployments whose ``spec.nodeName`` is its
  node: a kopf ``when=`` filter, so kopf itself stores nothing on the others
  (no annotations, no status, no events). The finalizer names the node,
  because kopf strips its own finalizer from every object it is blind to:
  a shared name would let one node's instance release another node's object.
- An invalid spec becomes a Degraded condition and one Warning Event naming
  the field, then ``kopf.PermanentError``: no retry loop, the next edit is
  handled afresh, and nothing that runs is stopped (the worker keeps the last
  valid spec).
- Status and Events leave through one writer thread (``_Writer``) with a
  small blocking client (urllib) that uses the credentials kopf logged in
  with. The workers never wait for the API server: their sink only marks the
  object dirty. ``.status`` is PATCHed (merge patch) only when the document
  changed. kopf's own API client is not public, and a thread with a blocking
  client is simpler and safer than handing coroutines to kopf's event loop
  from the worker threads.
- Another writer of desired state on the node (a container started by hand,
  seen on the docker event stream) is overruled at once: the spec is the
  desired state here, so the worker is sent back to it before it acts, and a
  Warning Event says how to switch instead (``kubectl patch``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import kopf
from pydantic import ValidationError

from vramctl.observed import Desired
from vramctl.runtimes.base import Runtime
from vramctl.spec import ConfigError, DeploymentSpec, DesiredStateError, problems_from
from vramctl.supervisor import PHASE_BLOCKED, PHASE_FAILED, DesiredSink, GpuWorker, StatusSink, Supervisor, rfc3339

log = logging.getLogger("vramctl.kubernetes")

GROUP = "vramctl.io"
VERSION = "v1alpha1"
PLURAL = "modeldeployments"
KIND = "ModelDeployment"
API_VERSION = f"{GROUP}/{VERSION}"
SOURCE = "kubernetes"  # the `source` of the requests made from a ModelDeployment's spec

TIMER_INTERVAL_S = 10.0
GPU_REFRESH_S = 10.0  # usedMiB in .status is refreshed at least this often
_WRITER_PERIOD_S = 2.0  # the writer looks for new progress notes at least this often
# After a poke the writer waits this long, so that a burst (a request, then
# the switch's first notes) is one write, and so that it does not compete
# with the worker for the CPU and the Docker engine while a switch begins.
_WRITER_DEBOUNCE_S = 0.1
_EVENT_ATTEMPTS = 3
_EVENT_MESSAGE_MAX = 1024  # Kubernetes truncates longer Event messages
_CONDITION_MESSAGE_MAX = 4096

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


def finalizer_for(node: str) -> str:
    """This node's finalizer: ``vramctl.io/node.<node>`` (a qualified name, at most 63 characters after the slash)."""
    name = f"node.{node}"
    if len(name) > 63:
        name = f"node.{node[:40]}-{hashlib.sha256(node.encode()).hexdigest()[:12]}"
    return f"{GROUP}/{name}"


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


# ------------------------------------------------------------------ API client


class KubeApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class StatusApi(Protocol):
    """Where status and Events go (``KubeApi``; a recording fake in tests)."""

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...

    def create_event(self, namespace: str, event: dict[str, Any]) -> None: ...


class KubeApi:
    """Blocking JSON requests with kopf's credentials (``kopf.ConnectionInfo``).

    ``credentials`` is read at every request, so a fresh login (kopf calls the
    login handler again when a token expires) is used at once; on HTTP 401 it
    calls ``relogin`` once and retries.
    """

    def __init__(
        self,
        credentials: Callable[[], kopf.ConnectionInfo | None],
        relogin: Callable[[], kopf.ConnectionInfo | None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._credentials = credentials
        self._relogin = relogin
        self._timeout = timeout
        self._ssl: tuple[kopf.ConnectionInfo, ssl.SSLContext | None] | None = None

    def _opener(self, info: kopf.ConnectionInfo) -> urllib.request.OpenerDirector:
        if self._ssl is None or self._ssl[0] is not info:
            ctx = info.as_ssl_context() if info.server.startswith("https") else None
            self._ssl = (info, ctx)
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler(None if info.trust_env else {})]
        if self._ssl[1] is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self._ssl[1]))
        return urllib.request.build_opener(*handlers)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        for attempt in (1, 2):
            info = self._credentials()
            if info is None:
                raise KubeApiError(0, "not logged in to the Kubernetes API yet")
            req = urllib.request.Request(
                info.server.rstrip("/") + path, data=json.dumps(body).encode() if body is not None else None, method=method
            )
            req.add_header("Content-Type", content_type)
            req.add_header("Accept", "application/json")
            req.add_header("User-Agent", "vramctl")
            for k, v in info.as_http_headers().items():
                req.add_header(k, v)
            try:
                with self._opener(info).open(req, timeout=self._timeout) as resp:
                    raw = resp.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as err:
                text = err.read().decode("utf-8", "replace")
                if err.code == 401 and attempt == 1 and self._relogin is not None:
                    self._relogin()
                    continue
                with contextlib.suppress(ValueError, AttributeError):
                    text = json.loads(text).get("message") or text
                raise KubeApiError(err.code, text[:500]) from None
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise KubeApiError(0, f"{method} {path}: {err}") from None
        raise KubeApiError(401, "unauthorized after a fresh login")

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.request("PATCH", path, {"status": status}, "application/merge-patch+json")

    def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        self.request("POST", f"/api/v1/namespaces/{namespace}/events", event)


def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """A kubeconfig when KUBECONFIG is set, else the pod's service account, else ~/.kube/config."""
    order = (
        (kopf.login_with_kubeconfig, kopf.login_with_service_account)
        if os.environ.get("KUBECONFIG")
        else (kopf.login_with_service_account, kopf.login_with_kubeconfig)
    )
    for fn in order:
        info: kopf.ConnectionInfo | None = fn(settings=settings, **kwargs)
        if info is not None:
            return info
    return None


# ------------------------------------------------------------ the controller


@dataclass
class _Entry:
    """What this instance knows about one ModelDeployment of its node."""

    namespace: str
    name: str
    uid: str = ""
    spec: DeploymentSpec | None = None  # the last valid spec, handed to the worker
    generation: int | None = None  # metadata.generation of ``spec``
    worker: GpuWorker | None = None
    # (worker's desired generation, metadata.generation) at each hand-over:
    # maps what the worker has settled to the spec it came from.
    handoffs: list[tuple[int, int | None]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    problem_generation: int | None = None
    reported: tuple[int | None, str] | None = None  # the problems last sent as an Event
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)  # condition -> (status, lastTransitionTime)
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
    threads, possibly with the worker's lock held: never takes the
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
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not node_name:
            raise ValueError("the node name is required: pass --node-name or set NODE_NAME (the downward API's spec.nodeName)")
        self.node_name = node_name
        self.supervisor = supervisor
        self.runtime = runtime
        self.make_worker = make_worker
        self.credentials: kopf.ConnectionInfo | None = None
        self.settings: kopf.OperatorSettings | None = None
        self.api: StatusApi = api or KubeApi(lambda: self.credentials, self._relogin)
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

    def _relogin(self) -> kopf.ConnectionInfo | None:
        if self.settings is not None:
            self.credentials = login(settings=self.settings)
        return self.credentials

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
    ) -> None:
        """Hand this spec to its GPU's worker. Raises InvalidSpec; then nothing
        was changed or stopped."""
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
        retiring = None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(namespace, name, uid)
                self._seed_transitions(entry, status)
            entry.uid = uid or entry.uid
            if spec is not None and entry.spec is not None and entry.worker is not None and entry.spec.gpu != spec.gpu:
                retiring = self._detach(entry)  # a GPU index change: the old GPU's models go
        if retiring is not None:
            self._retire(retiring)
        with self._lock:
            try:
                if spec is None:
                    raise InvalidSpec(problems)
                self._check_gpu_free(entry, spec)
                self._hand_over(entry, spec, generation)
            except InvalidSpec as err:
                self._invalid(entry, generation, err.problems)
                raise
            if entry.problems:
                entry.problems, entry.problem_generation, entry.reported = [], None, None
            self.mark(entry)

    def refresh(self, namespace: str, name: str, uid: str, generation: int | None, raw_spec: Mapping[str, Any]) -> None:
        """The timer: apply again (a no-op when nothing changed) and let the
        writer refresh the GPU figures."""
        with contextlib.suppress(InvalidSpec):
            self.apply(namespace, name, uid, generation, raw_spec)
        with self._lock:
            entry = self._entries.get((namespace, name))
            if entry is not None:
                entry.gpu_at = 0.0
                self.mark(entry)

    def delete(self, namespace: str, name: str, raw_spec: Mapping[str, Any]) -> None:
        """Stop and remove this ModelDeployment's containers, nothing else.
        Raises the runtime's error when a container could not be removed."""
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
        log.info("%s/%s deleted: its containers are removed", namespace, name)

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

    def _check_gpu_free(self, entry: _Entry, spec: DeploymentSpec) -> None:
        for other in self._entries.values():
            if other is not entry and other.worker is not None and other.worker.gpu == spec.gpu:
                raise InvalidSpec(
                    [
                        (
                            "spec.gpu",
                            f"gpu {spec.gpu} of node {self.node_name} is already managed by ModelDeployment "
                            f"{other.namespace}/{other.name}: one ModelDeployment per GPU",
                        )
                    ]
                )

    def _hand_over(self, entry: _Entry, spec: DeploymentSpec, generation: int | None) -> None:
        want = (spec.active_model, tuple(spec.companions))
        worker = entry.worker
        if worker is None:
            sink = _Sink(self, entry)
            worker = self.make_worker(spec, sink, sink)
            entry.worker, entry.spec, entry.generation = worker, spec, generation
            entry.handoffs = [(worker.desired.generation, generation)]
            self.supervisor.add_worker(worker)
            log.info("%s/%s: gpu %d handed to a worker, desired %s", entry.namespace, entry.name, spec.gpu, want[0] or "(none)")
            return
        current = worker.desired
        desired_changed = (current.active, current.companions) != want
        shape_changed = _shape(entry.spec) != _shape(spec)
        if shape_changed:
            worker.update_spec(spec)  # before the request: it may name a model only the new spec has
        if desired_changed:
            try:
                worker.request(want[0], want[1], source=SOURCE)
            except DesiredStateError as err:
                raise InvalidSpec([(_spec_path(err.field or "activeModel"), str(err))]) from None
        elif not shape_changed and spec != worker.spec:
            worker.update_spec(spec)  # only activeModel/companions moved back: nothing to plan
        if shape_changed or desired_changed or generation != entry.generation:
            entry.handoffs = [*entry.handoffs[-19:], (worker.desired.generation, generation)]
        entry.spec, entry.generation = spec, generation

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
        retiring = _Retiring(entry.worker, entry.spec)
        entry.worker, entry.handoffs = None, []
        return retiring

    def _bare(self, name: str, raw: dict[str, Any]) -> _Retiring:
        """A ModelDeployment this process never ran (its spec was never valid
        here): its GPU's containers, from before a restart, still go, unless
        another ModelDeployment holds that GPU."""
        gpu = raw.get("gpu", 0)
        if raw.get("nodeName") != self.node_name or not isinstance(gpu, int) or gpu < 0:
            return _Retiring(None, None)
        if any(e.worker is not None and e.worker.gpu == gpu for e in self._entries.values()):
            return _Retiring(None, None)
        return _Retiring(None, DeploymentSpec.model_construct(name=name, gpu=gpu, models={}, env={}, companions=[]))

    def _retire(self, r: _Retiring) -> None:
        """Stop the worker, then stop and remove every container of its GPU (slow: outside the lock)."""
        if r.worker is not None and self.supervisor.workers.get(r.worker.gpu) is r.worker:
            self.supervisor.remove_worker(r.worker.gpu)
        if r.spec is not None:
            for model in self.runtime.observe(r.spec):
                self.runtime.remove(r.spec, model)

    def _let_go(self, key: tuple[str, str]) -> None:
        """spec.nodeName moved to another node: our models go, the other node's instance takes over."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            entry.gone = True
            retiring = self._detach(entry)
        log.info("%s/%s moved to another node: removing its containers here", *key)
        self._retire(retiring)

    def _seed_transitions(self, entry: _Entry, status: Mapping[str, Any] | None) -> None:
        """Keep what was already published: transition times (an operator
        restart is no flip) and the last switch (a new worker has none yet)."""
        for c in (status or {}).get("conditions") or []:
            if isinstance(c, Mapping) and c.get("type") and c.get("lastTransitionTime"):
                entry.transitions[str(c["type"])] = (str(c.get("status")), str(c["lastTransitionTime"]))
        last = (status or {}).get("lastSwitch")
        if isinstance(last, Mapping):
            entry.last_switch = _plain(last)

    # ------------------------------------------------- worker-thread side

    def mark(self, entry: _Entry) -> None:
        """The status of ``entry`` may have changed (never blocks, takes no lock)."""
        entry.dirty = True
        self._writer.poke()

    def overrule(self, entry: _Entry, desired: Desired, source: str) -> None:
        """Another source asked the worker for ``desired`` (e.g. a container
        started by hand): the ModelDeployment's spec is the desired state, so
        send the worker back to it before it acts. Called with the worker's
        lock held, on the worker's or the event watcher's thread."""
        spec, worker = entry.spec, entry.worker
        if spec is None or worker is None or entry.gone:
            return
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
                        st = worker.status()
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
        """The ``.status`` document of ``entry`` (lock held)."""
        worker = entry.worker
        st = worker.status() if worker is not None else {}
        observed = self._k8s_generation(entry, st.get("observedGeneration"))
        conditions: dict[str, dict[str, Any]] = {}
        for c in st.get("conditions") or []:
            conditions[c["type"]] = {
                "type": c["type"],
                "status": c["status"],
                "reason": c["reason"] or "Unknown",
                "message": str(c.get("message") or "")[:_CONDITION_MESSAGE_MAX],
                "observedGeneration": self._k8s_generation(entry, c.get("observedGeneration")),
            }
        phase, message = st.get("phase", PHASE_FAILED), str(st.get("message") or "")
        if entry.problems:
            detail = "; ".join(f"{p}: {m}" for p, m in entry.problems)[:_CONDITION_MESSAGE_MAX]
            if worker is None:
                phase, message = PHASE_FAILED, f"invalid spec: {detail}"
                for ctype in ("Ready", "Progressing"):
                    conditions[ctype] = {"type": ctype, "status": "False", "reason": "InvalidSpec", "message": message}
            else:
                message = f"invalid spec (generation {entry.problem_generation}), not applied; running generation {observed}: {detail}"
            conditions["Degraded"] = {
                "type": "Degraded",
                "status": "True",
                "reason": "InvalidSpec",
                "message": message,
                "observedGeneration": entry.problem_generation,
            }
        now = rfc3339(self.wall())
        out_conditions = []
        for ctype in ("Ready", "Progressing", "Degraded", "ConfigWarnings"):
            c = conditions.get(ctype) or {"type": ctype, "status": "Unknown", "reason": "Initializing", "message": ""}
            before = entry.transitions.get(ctype)
            if before is None or before[0] != c["status"]:
                entry.transitions[ctype] = (c["status"], now)
            c["lastTransitionTime"] = entry.transitions[ctype][1]
            out_conditions.append({k: v for k, v in c.items() if v is not None})
        last = st.get("lastSwitch")
        status: dict[str, Any] = {
            "phase": phase,
            "message": message,
            "nodeName": self.node_name,
            "activeModel": st.get("activeModel"),
            "companions": list(st.get("companions") or []),
            "runningModels": list(st.get("runningModels") or []),
            "observedGeneration": observed,
            "conditions": out_conditions,
            "gpu": entry.gpu,
            "lastSwitch": entry.last_switch
            if not last
            else {
                "from": last.get("from"),
                "to": last.get("to"),
                "durationSeconds": last.get("durationSeconds"),
                "outcome": last.get("outcome"),
                "finishedAt": last.get("finishedAt"),
                "generation": self._k8s_generation(entry, last.get("generation")),
            },
        }
        return status

    def _k8s_generation(self, entry: _Entry, worker_generation: Any) -> int | None:
        """The metadata.generation whose desired state the worker had settled
        when it reached ``worker_generation``."""
        if not isinstance(worker_generation, int):
            return None
        gens = [g for wg, g in entry.handoffs if wg <= worker_generation and g is not None]
        return max(gens) if gens else None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """For tests and debugging: each entry's state."""
        with self._lock:
            return {
                f"{e.namespace}/{e.name}": {
                    "gpu": e.worker.gpu if e.worker else None,
                    "generation": e.generation,
                    "problems": list(e.problems),
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
        backoff = 0.0  # after a failed write: 1, 2, 4 ... 30 s, pokes or not
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


# ------------------------------------------------------------ kopf's wiring


def build_registry(
    controller: ModelDeployments, *, clusterwide: bool = True, timer_interval: float = TIMER_INTERVAL_S
) -> kopf.OperatorRegistry:
    """kopf's handlers for ``controller``'s node. They only hand state over.

    Namespaced (not ``clusterwide``): the namespaces are exact names, and kopf
    does not scan the cluster (no list/watch of namespaces and CRDs), so a
    namespaced Role is enough; the CRD must exist when the operator starts.
    """
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    def concerns(spec: kopf.Spec, namespace: str | None = None, name: str | None = None, **_: Any) -> bool:
        return controller.concerns(namespace, name, spec)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = finalizer_for(controller.node_name)
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
        # Our own Events say what happened; kopf's "Handler succeeded" ones would drown them.
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = "vramctl.io/operator"
        settings.scanning.disabled = not clusterwide
        controller.settings = settings
        controller.start()

    @kopf.on.login(registry=registry)
    def log_in(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
        info = login(settings=settings, **kwargs)
        controller.credentials = info
        return info

    @kopf.on.resume(*resource, id="reconcile", registry=registry, when=concerns)
    @kopf.on.create(*resource, id="reconcile", registry=registry, when=concerns)
    @kopf.on.update(*resource, id="reconcile", registry=registry, when=concerns)
    def reconcile(
        spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, namespace: str | None, name: str | None, uid: str | None, **_: Any
    ) -> None:
        try:
            controller.apply(namespace or "", name or "", uid or "", meta.get("generation"), spec, status)
        except InvalidSpec as err:
            raise kopf.PermanentError(f"invalid spec: {err}") from None

    @kopf.timer(*resource, id="resync", registry=registry, interval=timer_interval, when=concerns)
    def resync(spec: kopf.Spec, meta: kopf.Meta, namespace: str | None, name: str | None, uid: str | None, **_: Any) -> None:
        controller.refresh(namespace or "", name or "", uid or "", meta.get("generation"), spec)

    @kopf.on.delete(*resource, id="remove", registry=registry, when=concerns)
    def remove(spec: kopf.Spec, namespace: str | None, name: str | None, **_: Any) -> None:
        try:
            controller.delete(namespace or "", name or "", spec)
        except Exception as err:
            raise kopf.TemporaryError(f"the containers could not be removed yet: {err}", delay=5) from err

    @kopf.on.cleanup(registry=registry)
    def stop_writing(**_: Any) -> None:
        controller.close()

    return registry


def run(
    controller: ModelDeployments,
    *,
    clusterwide: bool,
    namespaces: Collection[str] = (),
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
    timer_interval: float = TIMER_INTERVAL_S,
) -> None:
    """Run kopf in this thread until SIGINT/SIGTERM (main thread) or ``stop_flag``.

    Standalone: every node runs its own instance, each acting on other
    objects, so kopf's peering (one active operator per cluster) must not
    pause them.
    """
    kopf.run(
        registry=build_registry(controller, clusterwide=clusterwide, timer_interval=timer_interval),
        standalone=True,
        clusterwide=clusterwide,
        namespaces=list(namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
