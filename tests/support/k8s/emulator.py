"""A Kubernetes API on 127.0.0.1 for tests and benchmarks: kmock's emulator,
plus the few behaviours of a real API server that kopf and kubectl rely on.

kmock's ``KubernetesEmulator`` (PyPI ``kmock``, by kopf's author) keeps
objects in memory and serves list/watch/get/create/patch/delete, but it is
deliberately simplistic. What this subclass adds, and why:

- ``metadata.uid``, ``resourceVersion`` and ``creationTimestamp`` on create,
  and a new ``resourceVersion`` on every write: kopf removes its finalizer
  with a JSON patch that starts with ``test /metadata/resourceVersion``,
  which fails (HTTP 500) against plain kmock, so deletion never completes.
- ``metadata.generation``: 1 on create, +1 when anything but metadata and
  status changes, as for a custom resource with a status subresource. The
  operator reports ``status.observedGeneration`` from it.
- status subresource semantics: a write to ``.../status`` changes only
  ``.status``; a write to the object itself never changes ``.status``.
- ``metadata.generateName`` (kopf names its Events that way; plain kmock would
  store them all under the name ``None`` and answer 409 from the second on).
- ``kind``/``apiVersion`` on lists (``kubectl get`` refuses a list without them).
- a failed JSON-patch ``test`` answers 422 like the real server (kopf then
  retries on the next event), not 500.
- Pod deletion as a real API server does it: a graceful delete of a Pod bound
  to a node (``gracePeriodSeconds`` from the DeleteOptions or the query, else
  the Pod's ``terminationGracePeriodSeconds``, else 30) only marks it
  Terminating (``deletionTimestamp``, ``deletionGracePeriodSeconds``); the
  object stays, whatever its finalizers, until a delete with grace 0 (the
  kubelet's final delete, once its containers are gone) and its finalizers
  are gone. A Pod on no node, or deleted with grace 0, goes at once. A
  ``preconditions.uid`` that does not match answers 409.
- two admission refusals of a Pod create, in the API server's words (403),
  when a test asks for them: ``no_service_account`` (namespaces whose
  ``default`` ServiceAccount does not exist yet, the race after a namespace
  is created) and ``runtime_classes`` (when set, the RuntimeClasses that
  exist; a Pod naming another is refused).

- a bounded request log (see ``_forget_old_requests``): kmock keeps every
  request and routes each new one by scanning them all.
- ``/api/v1/namespaces`` answers 403, as an API server whose RBAC does not
  let the operator list namespaces. kmock 0.8 cannot serve that path at all
  (its path parser reads "namespaces" as the start of a namespaced path and
  fails with HTTP 500), and kopf, run with ``--namespace``, lists and watches
  namespaces; on 403 it falls back to the exact namespaces it was given.
  Namespace objects therefore cannot be created; the emulator accepts objects
  in any namespace without one.
- RBAC for vramctl and kopf (their User-Agent): every request they make is
  recorded as the access it needs (``recorded``: namespace, group,
  resource, verb; see tests/k8s/rbac.py), and with ``rbac`` set (the grants
  of the chart's rendered objects) a request it does not allow is answered
  403 in the API server's words and kept in ``denied``. The tests' own
  clients (kubectl, ``KubeClient``, the test kubelet) act as cluster admins.
  ``SelfSubjectAccessReview`` answers from the same grants (every
  authenticated client may ask it: ``system:basic-user``).

``EmulatorThread`` runs it on its own event loop in a background thread, so
synchronous tests, the ``vramctl operator`` subprocess and ``kubectl`` all
talk to it over HTTP, like a real cluster. ``KubeClient`` is the tests' tiny
synchronous HTTP client for it.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import dicts as kmock_dicts  # merge-patch exactly as kmock applies it

from tests.support.k8s.rbac import Access, Grants, access_of

ROOT = Path(__file__).resolve().parents[3]
CRD_FILE = ROOT / "manifests" / "crds" / "modeldeployments.vramctl.io.yaml"
MD = "vramctl.io/v1alpha1/modeldeployments"
MD_POD_RESOURCE = "v1/pods"
_POD_LOG_RE = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log/?$")
_ACCESS_REVIEW = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
_ALL_VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")



def _forbidden(message: str, details: dict[str, str] | None = None) -> aiohttp.web.Response:
    """A 403 as the API server words it (a metav1.Status)."""
    status: dict[str, Any] = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403}
    status["message"] = message
    if details is not None:
        status["details"] = details
    return aiohttp.web.json_response(status, status=403)

class Emulator(kmock.KubernetesEmulator):
    """kmock's stateful emulator with uid, resourceVersion, generation and the
    status subresource (see the module docstring)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = 0
        self._mutations = asyncio.Lock()  # created on the emulator's own loop
        # (namespace, pod name) -> the file holding its container's output (tests/support/k8s/kubelet.py)
        self.pod_logs: dict[tuple[str, str], Path] = {}
        # The access every request of vramctl or kopf needed: (namespace, API group, resource[/subresource], verb) (tests/k8s/test_rbac.py)
        self.recorded: set[Access] = set()
        # With grants: the API server's RBAC for vramctl and kopf; what it refused lands in ``denied``.
        self.rbac: Grants | None = None
        self.denied: list[Access] = []
        # (arrival time, create | delete, path) of vramctl's Pod writes (benchmarks/reconcile_latency.py)
        self.pod_actions: list[tuple[float, str, str]] = []
        # Admission refusals of Pod creates (see the module docstring).
        self.no_service_account: set[str] = set()
        self.runtime_classes: set[str] | None = None

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        self._forget_old_requests()
        agent = raw_request.headers.get("User-Agent", "")
        if raw_request.method == "POST" and raw_request.path.rstrip("/") == _ACCESS_REVIEW:
            return await self._review_access(raw_request)
        if agent.startswith(("vramctl", "kopf/")):
            access = access_of(raw_request.method, raw_request.path, raw_request.query.get("watch"))
            if access is not None:
                self.recorded.add(access)
                if access.resource == "pods" and access.verb in ("create", "delete"):
                    self.pod_actions.append((time.time(), access.verb, raw_request.path))
                if self.rbac is not None and not self.rbac.allows(access):
                    self.denied.append(access)
                    await raw_request.read()
                    named = [p for p in raw_request.path.split("/") if p]
                    name = named[-1] if access.verb in ("get", "update", "patch", "delete") and "/" not in access.resource else None
                    return _forbidden(self.rbac.forbidden_message(access, name), {"kind": access.resource.split("/")[0]})
        log_path = _POD_LOG_RE.match(raw_request.path)
        if log_path is not None and raw_request.method == "GET":
            return self._serve_pod_log(log_path["ns"], log_path["name"], raw_request.query.get("tailLines"))
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            await raw_request.read()
            return _forbidden('namespaces is forbidden: cannot list resource "namespaces" at the cluster scope (emulator)')
        return await super().__call__(raw_request)

    async def _review_access(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """A SelfSubjectAccessReview, answered from ``rbac`` (everything is allowed without it)."""
        review = await raw_request.json()
        attrs = (review.get("spec") or {}).get("resourceAttributes") or {}
        resource = str(attrs.get("resource") or "") + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
        access = Access(attrs.get("namespace") or None, str(attrs.get("group") or ""), resource, str(attrs.get("verb") or ""))
        allowed = self.rbac is None or self.rbac.allows(access)
        review["status"] = {"allowed": allowed, **({} if allowed else {"reason": "no RBAC rule allows it (emulator)"})}
        return aiohttp.web.json_response(review, status=201)

    def _serve_pod_log(self, namespace: str, name: str, tail: str | None) -> aiohttp.web.StreamResponse:
        """``pods/log`` as text, from the file a test kubelet registered (kmock has no subresource routes)."""
        path = self.pod_logs.get((namespace, name))
        if path is None:
            status = {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": f'pods "{name}" not found'}
            return aiohttp.web.json_response(status, status=404)
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        if tail is not None and tail.isdigit():
            lines = lines[-int(tail) :] if int(tail) else []
        return aiohttp.web.Response(text="".join(line + "\n" for line in lines), content_type="text/plain")

    def _forget_old_requests(self, keep: int = 50, limit: int = 300) -> None:
        """kmock logs every request for assertions and routes each new one by
        scanning that log (a request's identity in each reaction's view), so an
        operator that runs for minutes makes every request slower, from about
        1 ms to tens of ms. Only the newest requests can still be routed (the
        ones in flight); the older ones are dropped from the logs."""
        if len(self._requests) <= limit:
            return
        del self._requests[:-keep]
        for payload in self._payloads:
            log = getattr(payload, "_requests", None)
            if isinstance(log, list) and len(log) > keep:
                del log[:-keep]

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is None or request.action not in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            return await super()._handle(request)
        if request.resource == MD_POD_RESOURCE and request.action == kmock.action.CREATE:
            refused = self._admission(request)
            if refused is not None:
                return refused
        if request.resource == MD_POD_RESOURCE and request.name is not None and request.action != kmock.action.CREATE:
            async with self._mutations:
                try:
                    if request.action == kmock.action.DELETE:
                        return await self._delete_pod(request)
                    if self._gracefully_terminating(request):
                        return await self._update_terminating_pod(request)
                except kmock.KubernetesError as err:
                    return await self._render_error(err)
            return await self._handle_mutation(request)
        return await self._handle_mutation(request)

    def _admission(self, request: kmock.Request) -> aiohttp.web.Response | None:
        """A Pod create refused as the ServiceAccount or RuntimeClass admission plugin refuses it, else None."""
        data = request.data if isinstance(request.data, dict) else {}
        namespace = request.namespace or (data.get("metadata") or {}).get("namespace") or ""
        name = (data.get("metadata") or {}).get("name") or ""
        if namespace in self.no_service_account:
            message = f'pods "{name}" is forbidden: error looking up service account {namespace}/default: serviceaccount "default" not found'
            return _forbidden(message, {"name": name, "kind": "pods"})
        wanted = (data.get("spec") or {}).get("runtimeClassName")
        if wanted and self.runtime_classes is not None and wanted not in self.runtime_classes:
            return _forbidden(f'pods "{name}" is forbidden: pod rejected: RuntimeClass "{wanted}" not found', {"name": name, "kind": "pods"})
        return None

    def _pod(self, request: kmock.Request) -> Any:
        key = (request.resource, request.namespace, request.name)
        obj = self._objects[key] if key in self._objects else None  # noqa: SIM401 - kmock's array has no get()
        if obj is None or obj.deleted:
            raise kmock.KubernetesError(status=404, reason="NotFound", message=f'pods "{request.name}" not found')
        return obj

    def _gracefully_terminating(self, request: kmock.Request) -> bool:
        key = (request.resource, request.namespace, request.name)
        obj = self._objects[key] if key in self._objects else None  # noqa: SIM401 - kmock's array has no get()
        if obj is None or obj.deleted:
            return False
        meta = obj.raw.get("metadata") or {}
        return bool(meta.get("deletionTimestamp")) and int(meta.get("deletionGracePeriodSeconds") or 0) > 0

    async def _delete_pod(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """A Pod's DELETE (see the module docstring: graceful deletion)."""
        obj = self._pod(request)
        raw = obj.raw
        meta, spec = raw.get("metadata") or {}, raw.get("spec") or {}
        options = request.data if isinstance(request.data, dict) else {}
        uid = ((options.get("preconditions") or {}).get("uid")) or None
        if uid is not None and uid != meta.get("uid"):
            raise kmock.KubernetesError(
                status=409, reason="Conflict", message=f"Precondition failed: UID in precondition: {uid}, UID in object meta: {meta.get('uid')}"
            )
        asked = options.get("gracePeriodSeconds", (request.params or {}).get("gracePeriodSeconds"))
        grace = int(asked) if asked is not None else int(spec.get("terminationGracePeriodSeconds", 30))
        if not spec.get("nodeName"):
            grace = 0  # no kubelet will ever act on it
        if meta.get("deletionTimestamp"):
            grace = min(grace, int(meta.get("deletionGracePeriodSeconds") or 0))  # a delete only shortens the grace
        async with self._lock:
            if grace == 0 and not meta.get("finalizers"):
                obj.delete()
                gone = obj.last.raw
                await self._buses[request.resource].put({"type": "DELETED", "object": gone})
                return aiohttp.web.json_response(gone)
            mark = {"deletionTimestamp": meta.get("deletionTimestamp") or _now(), "deletionGracePeriodSeconds": grace}
            obj.patch({"metadata": {**mark, "resourceVersion": self._next_rv()}})
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
            return aiohttp.web.json_response(obj.raw)

    async def _update_terminating_pod(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """A write to a Pod that is Terminating with grace left: applied, but
        (unlike kmock) the Pod is not dropped when its finalizers go: only the
        kubelet's final delete ends it."""
        obj = self._pod(request)
        request = self._prepare_update(request)
        async with self._lock:
            obj.patch(request.data)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
            return aiohttp.web.json_response(obj.raw)

    async def _handle_mutation(self, request: kmock.Request) -> Any:
        # One mutation at a time: the state read below must be the state the
        # parent class then patches (it takes its own lock only inside).
        async with self._mutations:
            try:
                if request.action == kmock.action.CREATE:
                    request = self._prepare_create(request)
                elif request.action == kmock.action.UPDATE and request.name is not None:
                    request = self._prepare_update(request)
            except kmock.KubernetesError as err:
                return await self._render_error(err)
            return await super()._handle(request)

    def _prepare_create(self, request: kmock.Request) -> kmock.Request:
        data = copy.deepcopy(request.data) if isinstance(request.data, dict) else {}
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), generation=1, creationTimestamp=_now())
        return _with_data(request, data)

    def _prepare_update(self, request: kmock.Request) -> kmock.Request:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return request  # the parent answers 404
        old = copy.deepcopy(self.objects[key].raw)
        try:
            if isinstance(request.data, list):
                new = jsonpatch.apply_patch(old, request.data, in_place=False)
            elif isinstance(request.data, dict):
                new = dict(kmock_dicts.merge_patch_dict(old, request.data))
            else:
                raise kmock.KubernetesError(status=415, reason="UnsupportedMediaType", message="a patch must be JSON")
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"the patch cannot be applied: {err}") from None
        new = copy.deepcopy(new)
        has_status = "status" in self._subresources(request)
        if request.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif has_status:
            new["status"] = old.get("status")
        if new.get("status") is None:
            new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "generation"):
            if field in old.get("metadata", {}):
                meta[field] = old["metadata"][field]
        changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }
        if changed:
            meta["generation"] = int(meta.get("generation") or 0) + 1
        meta["resourceVersion"] = self._next_rv()
        # The parent applies this: replace the whole document with the result.
        return _with_data(request, [{"op": "replace", "path": "", "value": new}])

    def _subresources(self, request: kmock.Request) -> set[str]:
        for res in self.resources:
            if res == request.resource:
                return set(self.resources[res].subresources)
        return set()

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        assert request.resource is not None
        kind = None
        for res in self.resources:
            if res == request.resource:
                kind = self.resources[res].kind
        group, version = request.resource.group, request.resource.version
        payload["apiVersion"] = f"{group}/{version}" if group else str(version)
        payload["kind"] = f"{kind}List" if kind else "List"
        payload["metadata"] = {"resourceVersion": str(self._rv)}
        return payload


def _with_data(request: kmock.Request, data: Any) -> kmock.Request:
    """The same request with another body. kmock routes a request by its
    identity (the object recorded in its request log), so the frozen request is
    changed in place rather than copied."""
    object.__setattr__(request, "data", data)
    return request


def register_resources(emu: Emulator, crd: dict[str, Any] | None) -> None:
    """What kopf needs to start its watchers: CRDs, namespaces, events, and
    the ModelDeployment resource, from the committed CRD when there is one."""
    ResourceInfo = kmock.ResourceInfo
    emu.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False, verbs=_ALL_VERBS
    )
    emu.resources["v1/namespaces"] = ResourceInfo(kind="Namespace", singular="namespace", namespaced=False, verbs=_ALL_VERBS)
    emu.resources["v1/events"] = ResourceInfo(kind="Event", singular="event", namespaced=True, verbs=_ALL_VERBS)
    emu.resources[MD_POD_RESOURCE] = ResourceInfo(
        kind="Pod", singular="pod", namespaced=True, shortnames={"po"}, subresources={"status", "log"}, verbs=_ALL_VERBS
    )
    if crd is None:
        emu.resources[MD] = ResourceInfo(
            kind="ModelDeployment",
            singular="modeldeployment",
            namespaced=True,
            shortnames={"md"},
            categories={"vramctl"},
            subresources={"status"},
            verbs=_ALL_VERBS,
        )
        return
    spec = crd["spec"]
    names = spec["names"]
    for v in spec["versions"]:
        emu.resources[f"{spec['group']}/{v['name']}/{names['plural']}"] = ResourceInfo(
            kind=names["kind"],
            singular=names.get("singular") or names["kind"].lower(),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            shortnames=set(names.get("shortNames") or ()),
            categories=set(names.get("categories") or ()),
            subresources=set((v.get("subresources") or {}).keys()),
            verbs=_ALL_VERBS,
        )


def committed_crd() -> dict[str, Any] | None:
    if not CRD_FILE.exists():
        return None
    doc: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return doc


class EmulatorThread:
    """The emulator served on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, crd: dict[str, Any] | None = None) -> None:
        self.crd = crd if crd is not None else committed_crd()
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self.emu: Emulator | None = None
        self._thread = threading.Thread(target=self._run, name="kmock-emulator", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("the kmock emulator did not start within 20 s")
        if self._error is not None:
            raise RuntimeError(f"the kmock emulator failed to start: {self._error!r}")
        if self.crd is not None:
            KubeClient(self.url).request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", self.crd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # reported by __enter__
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Emulator() as emu, kmock.Server(emu, host="127.0.0.1") as server:
            register_resources(emu, self.crd)
            self.emu = emu
            self.port = server.port
            self._ready.set()
            await self._stop.wait()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "kmock-test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(doc))
        return path


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class KubeClient:
    """Synchronous JSON over HTTP to the emulator (what kubectl would do)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", content_type)
        req.add_header("Accept", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            text = err.read()
            try:
                payload = json.loads(text)
            except ValueError:
                payload = text.decode(errors="replace")
            raise ApiError(err.code, payload) from None
        return json.loads(raw) if raw else None

    # -- ModelDeployments -------------------------------------------------

    @staticmethod
    def md_path(namespace: str, name: str | None = None, sub: str | None = None) -> str:
        p = f"/apis/vramctl.io/v1alpha1/namespaces/{namespace}/modeldeployments"
        if name:
            p += f"/{name}"
        if sub:
            p += f"/{sub}"
        return p

    def create_md(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": "vramctl.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        created: dict[str, Any] = self.request("POST", self.md_path(namespace), body)
        return created

    def get_md(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.request("GET", self.md_path(namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise
        return obj

    def patch_md(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        patched: dict[str, Any] = self.request("PATCH", self.md_path(namespace, name), patch, "application/merge-patch+json")
        return patched

    def delete_md(self, namespace: str, name: str) -> None:
        self.request("DELETE", self.md_path(namespace, name))

    # -- others -------------------------------------------------------------

    def events(self, namespace: str, name: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
        if name is not None:
            items = [e for e in items if (e.get("involvedObject") or {}).get("name") == name]
        return items


def iter_condition(status: dict[str, Any] | None, ctype: str) -> Iterator[dict[str, Any]]:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == ctype:
            yield c
