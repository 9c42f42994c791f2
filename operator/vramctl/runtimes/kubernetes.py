"""The Pod runtime: each model runs as a Pod that this node's vramctl creates.

For clusters without a Docker socket (k3s, containerd): models run as Pods
through the Kubernetes API, the way KubeAI and LLMKube run them, while
vramctl keeps what they lack (stop, confirm the memory is free, then start).

- A Pod per model: ``<deployment>-<model>`` in the ModelDeployment's
  namespace, bound to this node (``spec.nodeName``: no scheduler involved),
  owned by the ModelDeployment (``ownerReferences``: deleting it
  garbage-collects the Pods), labelled like the Docker containers, and
  annotated with the spec hash: a Pod whose hash differs is deleted and
  created again on the next start.
- The GPU: ``runtimeClass`` (default; ``runtimeClassName: nvidia`` plus
  ``NVIDIA_VISIBLE_DEVICES`` set to the GPU's UUID, so light companions can
  share the card), ``resource`` (``nvidia.com/gpu: 1``, the heavy model
  only), or ``none``. A model with ``gpuRequest: never`` gets none.
- Start = create, then wait until the Pod runs (or fails: ImagePullBackOff,
  CrashLoopBackOff, OOMKilled, Unschedulable, with its last log lines). The
  health check is vramctl's own, at the Pod's IP.
- Stop = delete with the model's grace period, then wait until the Pod object
  is gone: the kubelet removes it only once its containers have exited.
- Kubernetes cannot pause a Pod, and nothing starts our Pods behind our back:
  ``watch_starts`` returns at once.

Only this module and ``sources.kubernetes`` talk to the API. It takes a
small client (``KubeRequests``: one ``request`` method) so that it needs
neither kopf nor the official client; ``sources.kubernetes.client.KubeApi``
is the real one. Errors: the server not reached, 429 and 5xx are
``TransientError``; what the spec must fix is ``StartError``.

RBAC: Pods are read, watched and written only in the namespaces of the
ModelDeployments this node runs (never cluster-wide), so a Role in each of
those namespaces is enough (the chart's ``rbac.podNamespaces``). Where RBAC
refuses, the call raises ``Forbidden``: a ``PermanentError`` that names the
namespace and what to add, which the ModelDeployment's status then shows.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential

from vramctl.observed import Workload, WorkloadState
from vramctl.runtimes.base import (
    LABEL_CLASS,
    LABEL_DEPLOYMENT,
    LABEL_GPU,
    LABEL_INSTANCE,
    LABEL_MODEL,
    LABEL_SPEC_HASH,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    PermanentError,
    RuntimeFailure,
    StartError,
    StartEvent,
    StopOutcome,
    TransientError,
    check_instance,
)
from vramctl.runtimes.health import http_ready
from vramctl.spec.models import DeploymentSpec, image_reference_problem

log = logging.getLogger(__name__)

GpuMode = Literal["runtimeClass", "resource", "none"]
GPU_MODES: tuple[str, ...] = ("runtimeClass", "resource", "none")
GPU_RESOURCE = "nvidia.com/gpu"
LABEL_NODE = "vramctl.io/node"
ANNOTATION_SPEC_HASH = LABEL_SPEC_HASH
OWNER_API_VERSION = "vramctl.io/v1alpha1"
OWNER_KIND = "ModelDeployment"

# Waiting reasons of a container (or Pod reasons) that do not go away by waiting.
_STUCK = {
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
}
_GONE_WAIT_EXTRA_S = 30.0  # beyond the grace period: the kubelet's own work
_LOG_LINES = 15


class KubeApiError(RuntimeFailure):
    """An API call failed: ``status`` is the HTTP status, 0 when the server was not reached."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500


# What the runtime asks of the API server in a ModelDeployment's namespace
# (verb, resource): what its Role must grant there (``vramctl doctor --kubernetes`` checks it).
POD_ACCESS: tuple[tuple[str, str], ...] = (
    ("get", "pods"),
    ("list", "pods"),
    ("watch", "pods"),
    ("create", "pods"),
    ("delete", "pods"),
    ("get", "pods/log"),
)
# The API server's RBAC denial ('pods is forbidden: User "..." cannot list
# resource "pods" in API group "" in the namespace "ai"'); admission
# refusals (Pod Security, quotas) are 403s too, without these words. The
# quotes may be JSON-escaped (a watch's error is the Status object's text).
_RBAC_DENIED = re.compile(r'cannot (?P<verb>[a-z]+) resource \\?"(?P<resource>[^"\\]+)\\?"')
# Two admission refusals of a Pod create (403s too) that are not RBAC. The
# ServiceAccount admission plugin refuses Pods while the namespace's
# `default` ServiceAccount does not exist yet: a race of a few hundred ms
# after the namespace was created, which passes on its own. The RuntimeClass
# plugin refuses a Pod naming a RuntimeClass that does not exist: nothing
# changes until someone creates it or asks for the GPU another way.
_NO_SERVICE_ACCOUNT = re.compile(r'error looking up service account (?P<sa>[^:]+): serviceaccount \\?"[^"\\]+\\?" not found')
_NO_RUNTIME_CLASS = re.compile(r'RuntimeClass \\?"(?P<name>[^"\\]+)\\?" not found')
_NAMESPACED = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/?]+)/")


def forbidden_fix(namespace: str) -> str:
    """What to do when vramctl may not run Pods in ``namespace``."""
    return (
        f"add {namespace} to rbac.podNamespaces (Helm chart) or apply the Role and RoleBinding "
        f"of manifests/rbac.yaml in namespace {namespace}"
    )


class Forbidden(KubeApiError, PermanentError):
    """RBAC refused a Pod call in ``namespace``: vramctl has no Role there.
    Permanent: nothing changes until someone grants it."""

    def __init__(self, namespace: str, verb: str, resource: str) -> None:
        RuntimeFailure.__init__(self, f"forbidden to {verb} {resource} in namespace {namespace}: {forbidden_fix(namespace)}")
        self.status = 403
        self.namespace = namespace


def _explained(err: KubeApiError, path: str) -> KubeApiError:
    """``err``, or a ``Forbidden`` naming the namespace when RBAC refused a namespaced call."""
    if err.status != 403 or isinstance(err, Forbidden):
        return err
    denied, namespaced = _RBAC_DENIED.search(str(err)), _NAMESPACED.match(path)
    if denied is None or namespaced is None:
        return err
    return Forbidden(urllib.parse.unquote(namespaced["ns"]), denied["verb"], denied["resource"])


def _admission_refusal(err: KubeApiError, namespace: str, runtime_class: str) -> TransientError | str | None:
    """A Pod create refused by an admission plugin, said with its fix: the
    missing `default` ServiceAccount as a TransientError (retried), the
    missing RuntimeClass as the message of a StartError; None otherwise."""
    if err.status != 403:
        return None
    text = str(err)
    if (sa := _NO_SERVICE_ACCOUNT.search(text)) is not None:
        return TransientError(
            f"the API server refused the Pod: ServiceAccount {sa['sa']} does not exist yet (a namespace just created "
            "gets it within a second); retrying"
        )
    if (rc := _NO_RUNTIME_CLASS.search(text)) is not None:
        return (
            f"RuntimeClass {rc['name']!r} does not exist, so the API server refuses the model's Pod in {namespace}: create it "
            "(the NVIDIA GPU Operator or nvidia-container-toolkit does; k3s creates `nvidia` when it finds the toolkit), "
            "or give the GPU another way: the operator's --pod-gpu resource (the device plugin's nvidia.com/gpu) or none, "
            "or the model's gpuRequest: resource | none" + (f" (--runtime-class names {runtime_class!r})" if rc["name"] != runtime_class else "")
        )
    return None


class KubeRequests(Protocol):
    """What the runtime needs of an API client. Raises KubeApiError."""

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json", raw: bool = False) -> Any: ...

    def stream(self, path: str, timeout: float) -> WatchEvents:
        """A watch's events, one per line, until the server ends it."""
        ...


class WatchEvents(Protocol):
    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None:
        """Ends the read at once, from any thread."""
        ...


class _WatchEnded(Exception):
    """The watch must start again from a fresh listing (410 Gone, an ERROR event)."""


class PodCache:
    """Our Pods on this node in one namespace, kept by one listing and a
    watch (an informer). One per namespace of the ModelDeployments this node
    runs: a namespaced Role allows that, where a cluster-wide watch would
    need a ClusterRole.

    Why: the worker observes at every tick, and a switch's first action
    should not wait behind a listing; reading a local copy costs nothing.
    Why it stays safe: the copy is used only while the watch is up (after a
    failure the runtime lists directly until a new listing succeeded), our
    own writes are applied to it at once, and a stop still waits for the
    Pod object to be gone by asking the API server itself.

    The watch is resumed from the last resourceVersion when the server ends
    it; on errors it lists again, with back-off (tenacity) until ``close``.
    """

    def __init__(
        self,
        api: KubeRequests,
        node: str,
        instance: str,
        namespace: str,
        watch_timeout_s: int = 60,
        on_listed: Callable[[list[dict[str, Any]]], None] | None = None,
        on_new: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.api, self.node, self.instance, self.namespace = api, node, instance, namespace
        self.watch_timeout_s = watch_timeout_s
        # ``on_listed``: the Pods of the first listing (there before vramctl
        # looked). ``on_new``: each Pod first seen after it, by a
        # watch event or a later listing, on the watch's thread.
        self.on_listed, self.on_new = on_listed, on_new
        self._listed_once = False
        self._pods: dict[str, dict[str, Any]] = {}  # uid -> Pod
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: WatchEvents | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"vramctl-pod-watch-{self.namespace}", daemon=True)
            self._thread.start()

    def close(self, wait_s: float = 5.0) -> None:
        self._stop.set()
        self.synced.clear()
        stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None and wait_s > 0:
            self._thread.join(wait_s)

    def _query(self, **extra: str) -> str:
        return urllib.parse.urlencode(
            {
                "labelSelector": f"{MANAGED_BY}={MANAGED_BY_VALUE},{LABEL_INSTANCE}={self.instance}",
                "fieldSelector": f"spec.nodeName={self.node}",
                **extra,
            }
        )

    def _ours(self, pod: Mapping[str, Any]) -> bool:
        labels = _meta(pod).get("labels") or {}
        return (
            labels.get(MANAGED_BY) == MANAGED_BY_VALUE
            and labels.get(LABEL_INSTANCE) == self.instance
            and (pod.get("spec") or {}).get("nodeName") == self.node
        )

    def _run(self) -> None:
        def again(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome else None
            level = logging.WARNING if state.attempt_number == 1 else logging.DEBUG
            log.log(level, "Pod watch in %s: %s; listing again with back-off (direct reads meanwhile)", self.namespace, err)

        Retrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=0.1, max=10.0),
            stop=stop_when_event_set(self._stop),
            sleep=self._pause,  # close() ends a back-off at once
            before_sleep=again,
            reraise=False,
            retry_error_callback=lambda _: None,
        )(self._list_and_watch)

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _list_and_watch(self) -> None:
        self.synced.clear()
        path = f"/api/v1/namespaces/{urllib.parse.quote(self.namespace)}/pods"
        try:
            listing = self.api.request("GET", f"{path}?{self._query()}") or {}
        except KubeApiError as err:
            raise _explained(err, path) from None
        rv = str((listing.get("metadata") or {}).get("resourceVersion") or "")
        listed = {str(_meta(p).get("uid")): p for p in listing.get("items") or [] if self._ours(p)}
        with self._lock:
            before, self._pods = self._pods, listed
        if not self._listed_once:
            self._listed_once = True
            if self.on_listed is not None:
                self.on_listed(list(listed.values()))
        elif self.on_new is not None:
            for uid, pod in listed.items():
                if uid not in before:
                    self.on_new(pod)
        self.synced.set()
        while not self._stop.is_set():
            query = self._query(
                watch="true",
                timeoutSeconds=str(self.watch_timeout_s),
                allowWatchBookmarks="true",
                **({"resourceVersion": rv} if rv else {}),
            )
            self._stream = self.api.stream(f"{path}?{query}", timeout=self.watch_timeout_s + 30)
            if self._stop.is_set():
                self._stream.close()
                return
            for ev in self._stream:
                if self._stop.is_set():
                    return
                kind, obj = ev.get("type"), ev.get("object") or {}
                if kind == "ERROR":
                    raise _WatchEnded(f"the watch ended: {obj.get('message') or obj}")
                rv = str(_meta(obj).get("resourceVersion") or rv)
                if kind == "BOOKMARK" or not self._ours(obj):
                    continue
                uid = str(_meta(obj).get("uid"))
                with self._lock:
                    new = kind != "DELETED" and uid not in self._pods
                    if kind == "DELETED":
                        self._pods.pop(uid, None)
                    else:
                        self._pods[uid] = obj
                if new and self.on_new is not None:
                    self.on_new(obj)

    def pods(self) -> list[dict[str, Any]] | None:
        """Our Pods of the namespace as last seen; None while the watch is not up."""
        if not self.synced.is_set():
            return None
        with self._lock:
            return [p for p in self._pods.values() if _meta(p).get("namespace") == self.namespace]

    def put(self, pod: Mapping[str, Any]) -> None:
        """Our own write (or read), applied before the watch brings it; a Pod
        first seen this way is judged like one the watch brings."""
        uid = _meta(pod).get("uid")
        if uid and self._ours(pod) and _meta(pod).get("namespace") == self.namespace:
            with self._lock:
                new = str(uid) not in self._pods
                self._pods[str(uid)] = dict(pod)
            if new and self._listed_once and self.on_new is not None:
                self.on_new(dict(pod))

    def forget(self, name: str) -> None:
        """The API server said the Pod is gone."""
        with self._lock:
            for uid, p in list(self._pods.items()):
                if _meta(p).get("name") == name:
                    del self._pods[uid]


@dataclass(frozen=True)
class PodOwner:
    """The ModelDeployment whose Pods these are (namespace, and the owner reference)."""

    namespace: str
    name: str
    uid: str


def _dns_label(text: str) -> str:
    out = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return out or "x"


def pod_name(deployment: str, model: str) -> str:
    """``<deployment>-<model>`` as a DNS label (at most 63 characters)."""
    name = f"{_dns_label(deployment)}-{_dns_label(model)}"
    return name[:63].rstrip("-")


def _volumes(specs: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``SRC:DST[:ro]``: an absolute SRC is a hostPath, any other a PersistentVolumeClaim's name."""
    volumes, mounts = [], []
    for i, v in enumerate(specs):
        parts = v.split(":")
        src, dst, mode = parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"
        name = f"vol{i}"
        if src.startswith("/"):
            volumes.append({"name": name, "hostPath": {"path": src}})
        else:
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": src, "readOnly": mode == "ro"}})
        mounts.append({"name": name, "mountPath": dst, "readOnly": mode == "ro"})
    return volumes, mounts


def render_pod(
    deployment: DeploymentSpec,
    model: str,
    owner: PodOwner,
    node: str,
    instance: str,
    gpu_mode: GpuMode = "runtimeClass",
    runtime_class: str = "nvidia",
    gpu_uuid: str | None = None,
) -> dict[str, Any]:
    """The Pod of ``model``. Pure: tests read it, ``start`` creates it."""
    m = deployment.models[model]
    labels = {
        MANAGED_BY: MANAGED_BY_VALUE,
        LABEL_INSTANCE: instance,
        LABEL_MODEL: _dns_label(model),
        LABEL_GPU: str(deployment.gpu),
        LABEL_CLASS: m.model_class,
        LABEL_DEPLOYMENT: _dns_label(deployment.display_name),
        LABEL_NODE: node[:63],
    }
    env = deployment.merged_env(model)
    per_model: dict[str, GpuMode] = {"never": "none", "none": "none", "runtimeClass": "runtimeClass", "resource": "resource"}
    mode: GpuMode = per_model.get(m.gpu_request, gpu_mode)  # the model's own gpuRequest, else the operator's --pod-gpu
    resources: dict[str, Any] = {}
    if mode == "runtimeClass":
        env.setdefault("NVIDIA_VISIBLE_DEVICES", gpu_uuid or str(deployment.gpu))
    elif mode == "resource" and m.heavy:
        resources = {"limits": {GPU_RESOURCE: 1}}
    elif mode == "none":
        env.setdefault("NVIDIA_VISIBLE_DEVICES", "void")
    volumes, mounts = _volumes(list(m.volumes))
    container: dict[str, Any] = {
        "name": "model",
        "image": m.image,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
    }
    command = deployment.container_command(model)
    if command:
        container["args"] = command  # like docker's command: the image's entrypoint stays
    if mounts:
        container["volumeMounts"] = mounts
    if resources:
        container["resources"] = resources
    host_network = m.network_mode == "host"
    if not host_network:
        container["ports"] = [{"containerPort": int(p.split(":")[1]), "hostPort": int(p.split(":")[0])} for p in m.ports]
    pod_spec: dict[str, Any] = {
        "nodeName": node,
        "restartPolicy": "Never",  # vramctl restarts, with its own back-off and exclusivity
        "terminationGracePeriodSeconds": math.ceil(m.stop.grace_period_seconds),
        "hostNetwork": host_network,
        "enableServiceLinks": False,
        "containers": [container],
    }
    if host_network:
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if m.ipc_mode == "host":
        pod_spec["hostIPC"] = True
    if mode == "runtimeClass":
        pod_spec["runtimeClassName"] = runtime_class
    if volumes:
        pod_spec["volumes"] = volumes
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(deployment.display_name, model),
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_SPEC_HASH: deployment.spec_hash(model), "vramctl.io/model-name": model},
            "ownerReferences": [
                {
                    "apiVersion": OWNER_API_VERSION,
                    "kind": OWNER_KIND,
                    "name": owner.name,
                    "uid": owner.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }


# ----------------------------------------------------------------- reading Pods


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return pod.get("metadata") or {}


def _container_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def pod_state(pod: Mapping[str, Any]) -> tuple[WorkloadState, int | None]:
    """The workload state of a Pod, and its container's exit code when it ended.

    A Pod being deleted, or still pending, counts as live: its containers may
    hold, or be about to take, GPU memory until the object is gone.
    """
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    term = (_container_status(pod).get("state") or {}).get("terminated")
    code = term.get("exitCode") if isinstance(term, Mapping) else None
    code = int(code) if isinstance(code, int) else None
    if _meta(pod).get("deletionTimestamp"):
        return (WorkloadState.EXITED, code) if phase in ("Succeeded", "Failed") else (WorkloadState.RUNNING, None)
    if phase == "Running":
        return WorkloadState.RUNNING, None
    if phase in ("Succeeded", "Failed"):
        return WorkloadState.EXITED, code
    if failure_reason(pod) is not None:
        return WorkloadState.EXITED, code  # will not run until vramctl replaces it
    return WorkloadState.RESTARTING, None  # Pending: being created, about to run


def failure_reason(pod: Mapping[str, Any]) -> str | None:
    """Why this Pod cannot run, in Kubernetes' words (reason: message), or None."""
    status = pod.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return f"Unschedulable: {c.get('message') or 'the Pod cannot be placed on its node'}"
    state = _container_status(pod).get("state") or {}
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in _STUCK:
        return f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
    term = state.get("terminated") or {}
    if term:
        reason = term.get("reason") or "Error"
        detail = f"exit code {term.get('exitCode')}"
        if term.get("message"):
            detail += f": {term['message']}"
        return f"{reason}: {detail}"
    last = (_container_status(pod).get("lastState") or {}).get("terminated") or {}
    if last.get("reason") == "OOMKilled":
        return "OOMKilled: the container ran out of memory"
    if status.get("phase") == "Failed":
        return f"{status.get('reason') or 'Failed'}: {status.get('message') or 'the kubelet rejected the Pod'}"
    return None


_PERMANENT_REASONS = (
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "Unschedulable",
)


class PodRuntime:
    """Runs each model as a Pod bound to this node (see the module docstring)."""

    kind = "kubernetes"

    def __init__(
        self,
        api: KubeRequests,
        node: str,
        instance: str = "default",
        *,
        gpu_mode: GpuMode = "runtimeClass",
        runtime_class: str = "nvidia",
        gpu_uuid: Callable[[int], str | None] | None = None,
        poll_s: float = 0.05,
        watch: bool = True,
    ) -> None:
        check_instance(instance)
        if not node:
            raise ValueError("the Pod runtime needs the node's name")
        if gpu_mode not in GPU_MODES:
            raise ValueError(f"gpu mode {gpu_mode!r}: use one of {', '.join(GPU_MODES)}")
        self.api, self.node, self.instance = api, node, instance
        self.gpu_mode: GpuMode = gpu_mode
        self.runtime_class = runtime_class
        self.gpu_uuid = gpu_uuid
        self.poll_s = poll_s
        self._owners: dict[int, PodOwner] = {}
        # (namespace, Pod name) -> uid of our Pods as last listed or created: a
        # stop deletes with a uid precondition without reading the Pod first.
        self._known: dict[tuple[str, str], str] = {}
        self.watch = watch
        self.caches: dict[str, PodCache] = {}  # namespace -> our Pods there (one watch per namespace)
        self._caches_lock = threading.Lock()
        self._names: dict[str, str] = {}  # pod uid -> "namespace/name", for naming foreign GPU processes
        self._names_at = float("-inf")
        # Intruders: the uids of the Pods vramctl created or found at its
        # first listing, and the Pods it is creating now (their uid is not
        # known until the API server answers, and the watch may be faster).
        self._mine: set[str] = set()
        self._creating: set[tuple[str, str]] = set()
        self._mine_lock = threading.Lock()
        self.intruders_deleted = 0

    # -------------------------------------------------------------- owners

    def own(self, gpu: int, owner: PodOwner) -> None:
        """The ModelDeployment of ``gpu`` on this node: its namespace holds the Pods, it owns them."""
        self._owners[gpu] = owner
        if not self.watch:
            return
        with self._caches_lock:
            namespaces = {o.namespace for o in self._owners.values()}
            for namespace in namespaces - set(self.caches):
                cache = self.caches[namespace] = PodCache(
                    self.api, self.node, self.instance, namespace, on_listed=self._adopt, on_new=self._judge
                )
                cache.start()
            for namespace in set(self.caches) - namespaces:  # no ModelDeployment of this node is there any more
                self.caches.pop(namespace).close(wait_s=0)

    def _owner(self, deployment: DeploymentSpec) -> PodOwner | None:
        return self._owners.get(deployment.gpu)

    # ----------------------------------------------------------- intruders

    def _adopt(self, pods: list[dict[str, Any]]) -> None:
        """The Pods there before vramctl looked (a restart): judged like a new
        one (an earlier vramctl's are adopted by their shape, a hand-made one
        is deleted: a stop would never remove it, it deletes vramctl's name for
        the model's Pod). A Pod of a GPU whose ModelDeployment in that
        namespace this process does not own yet cannot be told from an earlier
        vramctl's: adopted."""
        owned = {(o.namespace, str(gpu)) for gpu, o in list(self._owners.items())}
        for pod in pods:
            meta = _meta(pod)
            if (meta.get("namespace"), (meta.get("labels") or {}).get(LABEL_GPU)) in owned:
                self._judge(pod)
            else:
                with self._mine_lock:
                    self._mine.add(str(meta.get("uid")))

    def _judge(self, pod: dict[str, Any]) -> None:
        """A Pod with vramctl's labels on this node, first seen now. One that
        vramctl did not create is an intruder: a heavy model started beside the
        holder behind vramctl's back. It is deleted at once (grace 0: its
        containers get SIGKILL) and an Event on the ModelDeployment names it;
        waiting for the next resync let it run for seconds."""
        meta = _meta(pod)
        uid, namespace, name = str(meta.get("uid")), str(meta.get("namespace")), str(meta.get("name"))
        with self._mine_lock:
            if uid in self._mine:
                return
            if (namespace, name) in self._creating:
                self._mine.add(uid)  # the watch was faster than the answer to our own create
                return
        if meta.get("deletionTimestamp"):
            return  # on its way out already
        labels = meta.get("labels") or {}
        if self._made_by_vramctl(meta, labels):
            with self._mine_lock:
                self._mine.add(uid)
            return
        what = f"Pod {namespace}/{name} (model {labels.get(LABEL_MODEL, '?')}, gpu {labels.get(LABEL_GPU, '?')})"
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.api.request("DELETE", self._pods_path(namespace, name), body)
        except KubeApiError as err:
            if err.status not in (404, 409):  # gone already, or another Pod of that name by now
                log.warning("%s carries vramctl's labels but was not created by it; deleting it failed: %s", what, err)
            return
        if (cache := self.caches.get(namespace)) is not None:
            cache.forget(name)  # gone at once (grace 0); a watch begun after the deletion never says so
        self.intruders_deleted += 1
        message = (
            f"{what} carries vramctl's labels but was not created by vramctl: deleted at once (grace 0), "
            "so that it cannot run beside the GPU's holder; ask vramctl for the model instead (activeModel, POST /switch)"
        )
        log.warning("%s", message)
        self._event(namespace, labels.get(LABEL_GPU), "IntruderPodDeleted", message)

    def _made_by_vramctl(self, meta: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
        """A Pod that an earlier vramctl process of this instance created: its
        create may reach the API server after this process listed the Pods (a
        restart while the create was in flight). It bears what ``render_pod``
        gives: vramctl's name for its model's Pod and the controller reference
        to one of this node's ModelDeployments (by uid). A Pod made by hand
        from one of vramctl's keeps the labels but not both of these."""
        model = str(labels.get(LABEL_MODEL) or "")
        refs = [r for r in meta.get("ownerReferences") or () if isinstance(r, Mapping) and r.get("controller")]
        for owner in self._owners.values():
            if owner.namespace != meta.get("namespace"):
                continue
            if any(r.get("uid") == owner.uid and r.get("kind") == OWNER_KIND for r in refs):
                name = str(meta.get("name"))
                return name.endswith("-" + model) or name == pod_name(owner.name, model)
        return False

    def _event(self, namespace: str, gpu: str | None, reason: str, message: str) -> None:
        """A Warning Event on the ModelDeployment of ``gpu`` in ``namespace`` (best effort)."""
        owners = [(g, o) for g, o in self._owners.items() if o.namespace == namespace]
        owner = next((o for g, o in owners if str(g) == gpu), owners[0][1] if owners else None)
        if owner is None:
            return
        now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{owner.name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {"apiVersion": OWNER_API_VERSION, "kind": OWNER_KIND, "namespace": namespace, "name": owner.name, "uid": owner.uid},
            "type": "Warning",
            "reason": reason,
            "message": message,
            "source": {"component": "vramctl", "host": self.node},
            "reportingComponent": "vramctl.io/operator",
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.api.request("POST", f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/events", event)
        except KubeApiError as err:
            log.warning("event %s on %s/%s not recorded: %s", reason, namespace, owner.name, err)

    def pod_of_uid(self, uid: str) -> str | None:
        """"namespace/name" of the Pod ``uid`` on this node, ours or not: a GPU
        process that is not vramctl's is named by its Pod (the cgroup gives
        the uid). One list of the node's Pods per namespace vramctl runs Pods
        in (its Roles allow no more; a Pod of another namespace stays known
        by its uid), remembered for a few seconds."""
        now = time.monotonic()
        if uid not in self._names or now - self._names_at > 5.0:
            query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={self.node}"})
            names: dict[str, str] = {}
            for namespace in sorted({o.namespace for o in self._owners.values()}):
                try:
                    listed = self._call("GET", f"{self._pods_path(namespace)}?{query}") or {}
                except Forbidden:
                    continue
                names.update(
                    {
                        str(_meta(p).get("uid")): f"{_meta(p).get('namespace')}/{_meta(p).get('name')}"
                        for p in listed.get("items") or []
                        if _meta(p).get("uid") and (p.get("spec") or {}).get("nodeName") == self.node  # also where selectors are ignored
                    }
                )
            self._names, self._names_at = names, now
        return self._names.get(uid)

    # ---------------------------------------------------------------- API

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json", raw: bool = False) -> Any:
        try:
            return self.api.request(method, path, body, content_type, raw)
        except KubeApiError as err:
            if err.transient:
                raise TransientError(f"the Kubernetes API: {err}") from None
            raise _explained(err, path) from None

    @staticmethod
    def _pods_path(namespace: str, name: str | None = None) -> str:
        path = f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/pods"
        return f"{path}/{urllib.parse.quote(name)}" if name else path

    def _get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Pod as the API server has it now (never the cache), which the cache then takes."""
        try:
            pod: dict[str, Any] = self._call("GET", self._pods_path(namespace, name))
        except KubeApiError as err:
            if err.status == 404:
                if (cache := self.caches.get(namespace)) is not None:
                    cache.forget(name)
                return None
            raise
        if (cache := self.caches.get(namespace)) is not None:
            cache.put(pod)
        return pod

    def _ours(self, pod: Mapping[str, Any], gpu: int) -> bool:
        labels = _meta(pod).get("labels") or {}
        return (
            labels.get(MANAGED_BY) == MANAGED_BY_VALUE
            and labels.get(LABEL_INSTANCE) == self.instance
            and labels.get(LABEL_GPU) == str(gpu)
            and (pod.get("spec") or {}).get("nodeName") == self.node
        )

    def _pods(self, deployment: DeploymentSpec) -> dict[str, dict[str, Any]]:
        """Our Pods of this deployment's GPU, by model name."""
        owner = self._owner(deployment)
        if owner is None:
            return {}
        cache = self.caches.get(owner.namespace)
        items = cache.pods() if cache is not None else None
        if items is None:
            selector = f"{MANAGED_BY}={MANAGED_BY_VALUE},{LABEL_INSTANCE}={self.instance},{LABEL_GPU}={deployment.gpu}"
            query = urllib.parse.urlencode({"labelSelector": selector})
            items = (self._call("GET", f"{self._pods_path(owner.namespace)}?{query}") or {}).get("items") or []
        out: dict[str, dict[str, Any]] = {}
        for pod in items:
            if not self._ours(pod, deployment.gpu):
                continue  # the selector is a hint: the labels are checked here
            meta = _meta(pod)
            model = (meta.get("annotations") or {}).get("vramctl.io/model-name") or (meta.get("labels") or {}).get(LABEL_MODEL)
            if model:
                out[str(model)] = pod
                if meta.get("uid") and meta.get("name"):
                    self._known[(owner.namespace, str(meta["name"]))] = str(meta["uid"])
        return out

    # ------------------------------------------------------------ observe

    def observe(self, deployment: DeploymentSpec) -> dict[str, Workload]:
        out: dict[str, Workload] = {}
        for model, pod in self._pods(deployment).items():
            state, code = pod_state(pod)
            labels = _meta(pod).get("labels") or {}
            spec_model = deployment.models.get(model)
            drifted = spec_model is not None and (_meta(pod).get("annotations") or {}).get(ANNOTATION_SPEC_HASH) != deployment.spec_hash(
                model
            )
            out[model] = Workload(
                model=model,
                state=state,
                ref=str(_meta(pod).get("uid") or _meta(pod).get("name")),
                drifted=drifted,
                exit_code=code,
                heavy=labels.get(LABEL_CLASS) != "light" if labels.get(LABEL_CLASS) else (spec_model.heavy if spec_model else True),
            )
        return out

    # -------------------------------------------------------------- start

    def start(self, deployment: DeploymentSpec, model: str) -> str:
        m = deployment.models.get(model)
        if m is None:
            raise StartError(f"model {model!r} is not in the spec of {deployment.display_name}")
        if m.image is None:
            raise StartError(f"model {model!r} has no image: the Pod runtime needs one")
        owner = self._owner(deployment)
        if owner is None:
            raise TransientError(f"gpu {deployment.gpu}: no ModelDeployment owns it on this node yet")
        name = pod_name(deployment.display_name, model)
        pod = self._get(owner.namespace, name)
        if pod is not None and not self._ours(pod, deployment.gpu):
            raise PermanentError(
                f"Pod {owner.namespace}/{name} exists and is not vramctl's ({self.instance}, node {self.node}): not touched"
            )
        if pod is not None:
            state, _ = pod_state(pod)
            hash_now = (_meta(pod).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
            if state is WorkloadState.RUNNING and not _meta(pod).get("deletionTimestamp") and hash_now == deployment.spec_hash(model):
                return str(_meta(pod).get("uid") or name)
            if state is WorkloadState.RESTARTING and hash_now == deployment.spec_hash(model):
                return self._wait_running(deployment, model, owner, name, m.start_timeout_seconds)
            log.info(
                "%s: replacing Pod %s/%s (%s)",
                model,
                owner.namespace,
                name,
                "spec changed" if hash_now != deployment.spec_hash(model) else state,
            )
            self._delete_and_wait(owner.namespace, name, m.stop.grace_period_seconds)
        uuid = self.gpu_uuid(deployment.gpu) if self.gpu_uuid is not None else None
        body = render_pod(deployment, model, owner, self.node, self.instance, self.gpu_mode, self.runtime_class, uuid)
        with self._mine_lock:
            self._creating.add((owner.namespace, name))
        try:
            created = self._call("POST", self._pods_path(owner.namespace), body)
            uid = _meta(created or {}).get("uid")
            if uid:
                with self._mine_lock:
                    self._mine.add(str(uid))
                self._known[(owner.namespace, name)] = str(uid)
                if (cache := self.caches.get(owner.namespace)) is not None:
                    cache.put(created)
        except KubeApiError as err:
            if err.status == 409:
                raise TransientError(f"Pod {owner.namespace}/{name} still exists (being deleted?): {err}") from None
            if isinstance(err, Forbidden):
                raise
            refused = _admission_refusal(err, owner.namespace, self.runtime_class)
            if isinstance(refused, TransientError):
                raise refused from None
            raise StartError(refused or f"the Pod of {model!r} could not be created: {err}") from None
        finally:
            with self._mine_lock:
                self._creating.discard((owner.namespace, name))
        return self._wait_running(deployment, model, owner, name, m.start_timeout_seconds)

    def _wait_running(self, deployment: DeploymentSpec, model: str, owner: PodOwner, name: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            pod = self._get(owner.namespace, name)
            if pod is None:
                raise StartError(f"Pod {owner.namespace}/{name} was deleted while it started")
            state, _ = pod_state(pod)
            if state is WorkloadState.RUNNING:
                return str(_meta(pod).get("uid") or name)
            reason = failure_reason(pod)
            if reason is not None:
                tail = self._logs(owner.namespace, name, _LOG_LINES)
                text = f"Pod {owner.namespace}/{name}: {reason}" + ("\nlast log lines:\n" + "\n".join(tail) if tail else "")
                if reason.startswith(_PERMANENT_REASONS):
                    # It will not run as it is: remove it, so nothing lingers pending.
                    self._delete_and_wait(owner.namespace, name, 0)
                raise StartError(text)
            if time.monotonic() >= deadline:
                raise StartError(
                    f"Pod {owner.namespace}/{name} did not run within {timeout:.0f}s (phase {(pod.get('status') or {}).get('phase')})"
                )
            time.sleep(self.poll_s)

    # --------------------------------------------------------------- stop

    def _delete(
        self, namespace: str, name: str, grace: float, expect: Callable[[Mapping[str, Any]], bool] | None = None
    ) -> dict[str, Any] | None:
        """Ask for the Pod's deletion; returns it as the server answered, None when it was already gone.

        ``expect``: the Pod must pass it (ours), checked on the server's copy
        through a precondition on its uid, so a Pod that is not ours is never
        deleted even when it carries our name.
        """
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": math.ceil(grace),
            "propagationPolicy": "Background",
        }
        if expect is not None:
            current = self._get(namespace, name) if self._known.get((namespace, name)) is None else None
            uid = self._known.get((namespace, name)) or (_meta(current).get("uid") if current is not None and expect(current) else None)
            if uid is None:
                if current is not None:
                    log.warning("Pod %s/%s is not vramctl's: not deleted", namespace, name)
                return None
            body["preconditions"] = {"uid": uid}
        try:
            answer = self._call("DELETE", self._pods_path(namespace, name), body)
        except KubeApiError as err:
            if err.status in (404, 409):  # gone, or replaced by another Pod of that name (the uid precondition)
                self._known.pop((namespace, name), None)
                return None
            raise
        return answer if isinstance(answer, dict) else {}

    def _wait_gone(self, namespace: str, name: str, grace: float) -> tuple[bool, int | None]:
        """Wait until the Pod object is gone. Returns (it was there, its last exit code)."""
        deadline = time.monotonic() + grace + _GONE_WAIT_EXTRA_S
        code: int | None = None
        while True:
            pod = self._get(namespace, name)
            if pod is None:
                self._known.pop((namespace, name), None)
                return True, code
            code = pod_state(pod)[1] if pod_state(pod)[1] is not None else code
            if time.monotonic() >= deadline:
                raise TransientError(f"Pod {namespace}/{name} is still there {grace + _GONE_WAIT_EXTRA_S:.0f}s after its deletion")
            time.sleep(self.poll_s)

    def _delete_and_wait(self, namespace: str, name: str, grace: float) -> tuple[bool, int | None]:
        """Delete, then wait until the object is gone. Returns (was there, last exit code)."""
        if self._delete(namespace, name, grace) is None:
            return False, None
        return self._wait_gone(namespace, name, grace)

    def stop(self, deployment: DeploymentSpec, model: str) -> StopOutcome:
        """Delete at once (no listing first: the first action of a switch
        should reach the API server without a round trip before it), then wait
        until the Pod object is gone."""
        t0 = time.monotonic()
        owner = self._owner(deployment)
        if owner is None:
            return StopOutcome(model, False, False, time.monotonic() - t0)
        m = deployment.models.get(model)
        grace = m.stop.grace_period_seconds if m is not None else 10.0
        name = pod_name(deployment.display_name, model)
        pod = self._delete(owner.namespace, name, grace, expect=lambda p: self._ours(p, deployment.gpu))
        if pod is None:
            return StopOutcome(model, False, False, time.monotonic() - t0)
        live = pod_state(pod)[0].live
        _, code = self._wait_gone(owner.namespace, name, grace)
        return StopOutcome(model, live, code == 137, time.monotonic() - t0, code)

    def remove(self, deployment: DeploymentSpec, model: str) -> None:
        self.stop(deployment, model)

    def preflight(self, deployment: DeploymentSpec, model: str) -> str | None:
        """What can be known before anything is stopped: the model and its
        image are named, and a ModelDeployment owns the GPU. Whether the node
        can pull the image only the kubelet finds out (ImagePullBackOff)."""
        m = deployment.models.get(model)
        if m is None:
            return f"{model!r} is not in the spec"
        if m.image is None:
            return f"{model!r} has no image: the Pod runtime needs one"
        return image_reference_problem(m.image)

    def cleanup(self, deployment: DeploymentSpec, model: str) -> None:
        """Nothing to do: an ended Pod's containers are gone; ``start`` replaces it."""

    def pause(self, deployment: DeploymentSpec, model: str) -> None:
        raise PermanentError("Kubernetes cannot pause a Pod")

    # ------------------------------------------------------- health, logs

    def check_health(self, deployment: DeploymentSpec, model: str) -> bool:
        pod = self._pods(deployment).get(model)
        if pod is None or pod_state(pod)[0] is not WorkloadState.RUNNING or _meta(pod).get("deletionTimestamp"):
            return False
        health = deployment.health_of(model) if model in deployment.models else None
        if health is None:
            return True
        if health.path is not None and health.port is not None:
            host = (pod.get("status") or {}).get("podIP") or health.host
            return http_ready(host, health.port, health.path, timeout=1.0)
        ready = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
        return bool(ready) and ready[0].get("status") == "True"

    def _logs(self, namespace: str, name: str, lines: int) -> list[str]:
        try:
            text = self._call("GET", f"{self._pods_path(namespace, name)}/log?tailLines={int(lines)}", raw=True)
        except (KubeApiError, TransientError):
            return []
        return str(text or "").splitlines()[-lines:]

    def logs_tail(self, deployment: DeploymentSpec, model: str, lines: int = 20) -> list[str]:
        owner = self._owner(deployment)
        if owner is None or lines <= 0:
            return []
        return self._logs(owner.namespace, pod_name(deployment.display_name, model), lines)

    # ------------------------------------------------------------ the rest

    def validate(self, deployment: DeploymentSpec) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for name, m in deployment.models.items():
            if m.image is None:
                problems.append(
                    (f"models.{name}.image", "the Pod runtime needs an image (composeService and command are for docker and process)")
                )
        return problems

    def owners(self, deployment: DeploymentSpec) -> dict[str, str]:
        """Live models by container id (``containerd://<id>`` without its scheme) and Pod UID."""
        out: dict[str, str] = {}
        for model, pod in self._pods(deployment).items():
            if not pod_state(pod)[0].live:
                continue
            uid = _meta(pod).get("uid")
            if uid:
                out[str(uid)] = model
            cid = str(_container_status(pod).get("containerID") or "")
            if "://" in cid:
                out[cid.split("://", 1)[1]] = model
        return out

    def watch_starts(self, on_start: Callable[[StartEvent], None], stop: Callable[[], bool]) -> None:
        return None

    def close(self) -> None:
        with self._caches_lock:
            caches = list(self.caches.values())
        for cache in caches:
            cache.close()
