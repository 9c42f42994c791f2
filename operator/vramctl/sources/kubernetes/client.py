"""A small blocking Kubernetes API client with kopf's credentials.

Why not kopf's own client: it is not public, and it runs on kopf's event
loop; the status writer and the Pod runtime run on their own threads and
want plain blocking calls. Why not the official ``kubernetes`` package: the
few paths used here (status, events, pods, pods/log) are one line each, and
kopf already logs in (service account or kubeconfig) and refreshes tokens.

Retries live here, in one place (tenacity): a request that could not reach
the API server, or that the server answered with 429 or 5xx, is retried with
exponential back-off for a few seconds; anything else (404, 409, 422 ...)
is the caller's to interpret and is raised at once. HTTP 401 triggers one
fresh login and one more try.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import kopf
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from vramctl.runtimes.kubernetes import KubeApiError

log = logging.getLogger("vramctl.kubernetes")

GROUP = "vramctl.io"
VERSION = "v1alpha1"
PLURAL = "modeldeployments"
KIND = "ModelDeployment"
API_VERSION = f"{GROUP}/{VERSION}"

__all__ = ["API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "KubeApi", "KubeApiError", "Session", "StatusApi", "login", "retryable"]


class StatusApi(Protocol):
    """Where status and Events go (``KubeApi``; a recording fake in tests)."""

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...

    def create_event(self, namespace: str, event: dict[str, Any]) -> None: ...


def retryable(err: BaseException) -> bool:
    """Worth another try soon: the server was not reached, or said so (429, 5xx)."""
    return isinstance(err, KubeApiError) and (err.status == 0 or err.status == 429 or err.status >= 500)


def _log_retry(state: RetryCallState) -> None:
    err = state.outcome.exception() if state.outcome else None
    log.debug("kubernetes API: %s; retry %d with back-off", err, state.attempt_number)


class KubeApi:
    """Blocking JSON requests with kopf's credentials (``kopf.ConnectionInfo``).

    ``credentials`` is read at every request, so a fresh login (kopf calls the
    login handler again when a token expires) is used at once; on HTTP 401 it
    calls ``relogin`` once and retries. Transient failures are retried with
    back-off (see the module docstring) for at most ``retry_s`` seconds.
    """

    def __init__(
        self,
        credentials: Callable[[], kopf.ConnectionInfo | None],
        relogin: Callable[[], kopf.ConnectionInfo | None] | None = None,
        timeout: float = 10.0,
        retry_s: float = 5.0,
        attempts: int = 5,
    ) -> None:
        self._credentials = credentials
        self._relogin = relogin
        self._timeout = timeout
        self._ssl: tuple[kopf.ConnectionInfo, ssl.SSLContext | None] | None = None
        self._retrying = Retrying(
            retry=retry_if_exception(retryable),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            stop=stop_after_attempt(attempts) | stop_after_delay(retry_s),
            before_sleep=_log_retry,
            reraise=True,
        )

    def _opener(self, info: kopf.ConnectionInfo) -> urllib.request.OpenerDirector:
        if self._ssl is None or self._ssl[0] is not info:
            ctx = info.as_ssl_context() if info.server.startswith("https") else None
            self._ssl = (info, ctx)
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler(None if info.trust_env else {})]
        if self._ssl[1] is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self._ssl[1]))
        return urllib.request.build_opener(*handlers)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json", raw: bool = False) -> Any:
        """One API call, retried while transient. ``raw``: the body as text (pods/log)."""
        return self._retrying(self._request, method, path, body, content_type, raw)

    def _request(self, method: str, path: str, body: Any, content_type: str, raw: bool) -> Any:
        for attempt in (1, 2):
            info = self._credentials()
            if info is None:
                raise KubeApiError(0, "not logged in to the Kubernetes API yet")
            req = urllib.request.Request(
                info.server.rstrip("/") + path, data=json.dumps(body).encode() if body is not None else None, method=method
            )
            req.add_header("Content-Type", content_type)
            req.add_header("Accept", "*/*" if raw else "application/json")
            req.add_header("User-Agent", "vramctl")
            for k, v in info.as_http_headers().items():
                req.add_header(k, v)
            try:
                with self._opener(info).open(req, timeout=self._timeout) as resp:
                    data = resp.read()
                if raw:
                    return data.decode("utf-8", "replace")
                return json.loads(data) if data else None
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

    def stream(self, path: str, timeout: float) -> WatchStream:
        """A watch: one JSON event per line until the server ends it (``timeoutSeconds``
        in ``path``), or no byte came for ``timeout`` seconds. Not retried here:
        the caller lists again and resumes (see ``runtimes.kubernetes.PodCache``)."""
        info = self._credentials()
        if info is None:
            raise KubeApiError(0, "not logged in to the Kubernetes API yet")
        req = urllib.request.Request(info.server.rstrip("/") + path, method="GET")
        req.add_header("Accept", "application/json")
        req.add_header("User-Agent", "vramctl")
        for k, v in info.as_http_headers().items():
            req.add_header(k, v)
        try:
            resp = self._opener(info).open(req, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 401 and self._relogin is not None:
                self._relogin()
            raise KubeApiError(err.code, err.read().decode("utf-8", "replace")[:500]) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise KubeApiError(0, f"GET {path}: {err}") from None
        return WatchStream(resp, path)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.request("PATCH", path, {"status": status}, "application/merge-patch+json")

    def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        self.request("POST", f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/events", event)


class WatchStream:
    """The events of one watch response; ``close`` (any thread) ends the read at once."""

    def __init__(self, resp: Any, path: str) -> None:
        self._resp, self._path = resp, path

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for line in self._resp:
                if line.strip():
                    yield json.loads(line)
        except (OSError, ValueError, AttributeError) as err:  # AttributeError: closed from another thread
            raise KubeApiError(0, f"watch {self._path}: {err}") from None
        finally:
            self.close()

    def close(self) -> None:
        sock = getattr(getattr(getattr(self._resp, "fp", None), "raw", None), "_sock", None)
        with contextlib.suppress(OSError):
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._resp.close()


class Session:
    """kopf's login, shared by everything that calls the API on this node
    (the status writer, the Pod runtime): the login handler stores it here."""

    def __init__(self) -> None:
        self.info: kopf.ConnectionInfo | None = None
        self.settings: kopf.OperatorSettings | None = None
        self.api = KubeApi(lambda: self.info, self.relogin)

    def relogin(self) -> kopf.ConnectionInfo | None:
        if self.settings is not None:
            self.info = login(settings=self.settings)
        return self.info


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


def node_facts(api: KubeApi, node: str, runtime_class: str) -> tuple[str | None, str | Literal[False] | None, int | Literal[False] | None]:
    """For ``vramctl doctor --kubernetes``: (why the API cannot be reached or
    None, the RuntimeClass's handler / None absent / False unreadable, the
    node's allocatable nvidia.com/gpu / None not advertised / False unreadable)."""
    try:
        rc = api.request("GET", f"/apis/node.k8s.io/v1/runtimeclasses/{urllib.parse.quote(runtime_class)}")
        handler: str | Literal[False] | None = str((rc or {}).get("handler") or "")
    except KubeApiError as err:
        if err.status == 0:
            return str(err), False, False
        handler = None if err.status == 404 else False
    try:
        obj = api.request("GET", f"/api/v1/nodes/{urllib.parse.quote(node)}") or {}
        raw = ((obj.get("status") or {}).get("allocatable") or {}).get("nvidia.com/gpu")
        gpus: int | Literal[False] | None = int(raw) if raw is not None and str(raw).isdigit() else None
    except KubeApiError as err:
        gpus = False if err.status != 404 else None
    return None, handler, gpus


def connect(kubeconfig: str | None = None) -> KubeApi:
    """A client outside kopf's run (``vramctl doctor``): the same login order as the operator."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    settings = kopf.OperatorSettings()
    info = login(settings=settings)
    return KubeApi(lambda: info, retry_s=2.0, attempts=3)
