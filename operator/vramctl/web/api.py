"""The HTTP API: GET /status, POST /switch, GET /healthz, GET /metrics.

Served by aiohttp's low-level server on one event loop thread. Binds
127.0.0.1 by default. Bound anywhere else, mutating endpoints require
``Authorization: Bearer <token>`` and the server refuses to start without a
token: a GPU switch endpoint open to a LAN is a denial-of-service button.

What it promises against hostile or broken clients (a web page in the same
browser, a flood of connections, a half-sent body):

- Mutating requests (POST) are applied only when they are well-formed,
  authorized and same-origin: ``Content-Type: application/json`` (a page's
  no-cors fetch cannot send it), no foreign ``Origin`` or cross-site
  ``Sec-Fetch-Site``, and a ``Host`` that is the bound address (or localhost
  on loopback) or in the configured allow-list (DNS rebinding), even on
  loopback.
- A request is acted on only after its body was read whole (a
  ``Content-Length`` with a declared size, at most ``MAX_BODY``) and the
  desired state was written to the state file; every refusal is a 4xx (or
  507 for a state file that cannot be written) whose JSON names the problem.
  A refused body is never read on as a next request: the connection closes.
- Open connections are bounded (``max_connections``; the idlest is closed to
  admit a new one), idle ones close after ``idle_timeout`` seconds.
- ``/status`` and ``/metrics`` read what the workers published; they never
  take a worker's lock. Concurrent scrapes share one collection.
- Secrets (``--api-key`` values, token env vars) are redacted from
  everything ``/status`` shows; broken pipes are one debug line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import resource
import socket
import threading
from collections.abc import Awaitable, Callable, Collection, Mapping
from http import HTTPStatus
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vramctl.spec.models import DeploymentSpec, DesiredStateError
from vramctl.status.redact import redact_status
from vramctl.worker.actor import GpuWorker
from vramctl.worker.supervisor import Supervisor

log = logging.getLogger("vramctl.web.api")

MAX_BODY = 64 * 1024
BODY_TIMEOUT = 10.0
IDLE_TIMEOUT = 15.0
BACKLOG = 1024
MUTATING = frozenset({"/switch"})
READS = frozenset({"/status", "/healthz", "/metrics"})
SWITCH_FIELDS = ("model", "companions", "gpu", "force")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def default_max_connections() -> int:
    """Half the open-descriptor limit (the other half stays for health checks,
    state writes and the runtime), between 64 and 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, min(4096, soft // 2))


class StateStore(Protocol):
    """Where desired state is recorded before it is acted on (the state file)."""

    def check_writable(self) -> None: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.field, self.close = status, field, close


def _split_host(value: str) -> str:
    """The host part of a Host header ("[::1]:9400" -> "::1"), lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class ApiServer:
    def __init__(
        self,
        supervisor: Supervisor,
        host: str = "127.0.0.1",
        port: int = 9400,
        token: str | None = None,
        switch_refusal: str | None = None,
        *,
        allowed_hosts: Collection[str] = (),
        state: StateStore | None = None,
        max_connections: int | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        """``switch_refusal``: desired state comes from elsewhere (the Kubernetes
        operator's ModelDeployments); POST /switch answers 409 with this text,
        and nothing here mutates, so no token is needed off loopback.
        ``allowed_hosts``: more Host header values POST may carry.
        ``state``: checked writable before each switch (507 when it is not).
        Binds now (OSError when the port is taken); serves from ``start()``."""
        self.switch_refusal = switch_refusal
        if not is_loopback(host) and not token and switch_refusal is None:
            raise ValueError(f"listening on {host} (not loopback) needs a token: pass --token or set VRAMCTL_TOKEN")
        self.supervisor = supervisor
        self.token = token
        self.state = state
        self.max_connections = max_connections or default_max_connections()
        self.idle_timeout, self.body_timeout = idle_timeout, body_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(BACKLOG)
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self.host, self.port = str(self._sock.getsockname()[0]), int(self._sock.getsockname()[1])
        self._bound_any = host in ("0.0.0.0", "::", "")
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._switch_lock: asyncio.Lock | None = None
        self._busy: set[RequestHandler] = set()
        self._server: _Server | None = None
        # Concurrent scrapes share one collection (prometheus' collectors read probes).
        self._metrics_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramctl-metrics")
        self._metrics_inflight: asyncio.Future[bytes] | None = None
        self._status_cache: tuple[tuple[Any, ...], bytes, Any] | None = None
        self._secrets: dict[int, tuple[DeploymentSpec, frozenset[str]]] = {}
        self._mounted: list[tuple[Callable[[str], bool], Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]]] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vramctl-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the HTTP API did not start within 10 s")

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopped.set)
            self._thread.join(10)
        with contextlib.suppress(OSError):
            self._sock.close()
        self._metrics_pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._switch_lock = asyncio.Lock()
        self._server = _Server(self, self._dispatch, keepalive_timeout=self.idle_timeout, access_log=None, max_field_size=8190)
        srv = await loop.create_server(self._server, sock=self._sock, backlog=BACKLOG)
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            srv.close()
            self._server.pre_shutdown()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.shutdown(1.0), 2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2.0)

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        proto = request.protocol
        if isinstance(proto, RequestHandler):
            self._busy.add(proto)
        try:
            return await self._route(request)
        except ApiError as err:
            return self._error(err)
        except (ConnectionError, asyncio.CancelledError) as err:
            log.debug("client went away during %s %r: %s", request.method, request.rel_url.path, type(err).__name__)
            raise
        except Exception:
            log.exception("unexpected error answering %s %r", request.method, request.rel_url.path)
            return self._error(ApiError(500, "internal error: see vramctl's log", close=True))
        finally:
            if isinstance(proto, RequestHandler):
                self._busy.discard(proto)

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.rel_url.path, request.method
        if path in READS:
            if method not in ("GET", "HEAD"):
                raise ApiError(405, f"{path} answers GET only")
            if path == "/healthz":
                return web.Response(text="ok\n", content_type="text/plain")
            if path == "/status":
                return web.Response(body=self._status_body(request.rel_url.query), content_type="application/json")
            return web.Response(body=await self._metrics_body(), headers={"Content-Type": CONTENT_TYPE_LATEST})
        if path in MUTATING:
            if method != "POST":
                raise ApiError(405, f"{path} answers POST only, with a JSON body")
            return await self._switch(request)
        for matches, handle in self._mounted:
            if matches(path):
                if method != "GET":  # holds switch the GPU like POST /switch: the same cross-site rules
                    try:
                        self._check_host(request)
                        self._check_origin(request)
                    except ApiError as err:
                        err.close = True
                        raise
                return await handle(request)
        raise ApiError(404, f"no such endpoint {path!r}: try GET /status, POST /switch, GET /healthz, GET /metrics")

    def mount(self, matches: Callable[[str], bool], handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]) -> None:
        """Serve the paths ``matches`` accepts with ``handle`` (``/holds``), before ``start()``."""
        self._mounted.append((matches, handle))

    def _error(self, err: ApiError) -> web.Response:
        payload: dict[str, Any] = {"error": str(err)}
        if err.field:
            payload["field"] = err.field
        resp = web.json_response(payload, status=err.status, dumps=_dumps)
        if err.status == 405:
            resp.headers["Allow"] = "POST" if str(err).startswith("/switch") else "GET, HEAD"
        if err.close:
            resp.force_close()
        return resp

    # ------------------------------------------------------------ reads

    def _known_secrets(self) -> frozenset[str]:
        out: set[str] = set()
        for w in list(self.supervisor.workers.values()):
            spec = w.spec
            cached = self._secrets.get(w.gpu)
            if cached is None or cached[0] is not spec:
                cached = (spec, spec.secrets())
                self._secrets[w.gpu] = cached
            out |= cached[1]
        return frozenset(out)

    def _status_body(self, query: Mapping[str, str]) -> bytes:
        raw = query.get("since")
        since = -1
        if raw is not None:
            try:
                since = int(raw)
            except ValueError:
                raise ApiError(400, f"since={raw!r} is not a whole number: use the progressSeq of a previous answer") from None
        workers = sorted(self.supervisor.workers.items())
        published = [(g, w.published_status()) for g, w in workers]
        sup = self.supervisor
        key = (tuple((g, id(st)) for g, st in published), tuple((g, id(w.spec)) for g, w in workers), len(sup.notes))
        cache = self._status_cache
        if since < 0 and cache is not None and cache[0] == key:
            return cache[1]
        out: dict[str, Any] = {
            "runtime": sup.runtime.kind,
            "notes": list(sup.notes),
            "gpus": {str(g): dict(st) for g, st in published},
        }
        if since >= 0:
            out["progress"] = [p for _, w in workers for p in w.progress(since)]
        body = _dumps(redact_status(out, self._known_secrets())).encode() + b"\n"
        if since < 0:
            # The cache holds the objects whose ids make its key, so no id can be reused while cached.
            self._status_cache = (key, body, (published, [w.spec for _, w in workers]))
        return body

    async def _metrics_body(self) -> bytes:
        fut = self._metrics_inflight
        if fut is None or fut.done():
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._metrics_pool, generate_latest, self.supervisor.metrics.registry)
            self._metrics_inflight = fut
        return await asyncio.shield(fut)

    # ------------------------------------------------------------ POST /switch

    def _check_host(self, request: web.BaseRequest) -> None:
        header = request.headers.get("Host")
        if not header:
            raise ApiError(400, "the request has no Host header")
        host = _split_host(header)
        ok = (
            host in self.allowed_hosts
            or host == self.host.lower()
            or (is_loopback(self.host) and host in ("localhost", "127.0.0.1", "::1"))
            or (self._bound_any and _is_ip(host))
        )
        if not ok:
            raise ApiError(
                403,
                f"Host {header!r} is not this server's address ({self.host}): a page reached through another name "
                "(DNS rebinding) may not switch the GPU; add the name with --allow-host if it is yours",
                "Host",
            )

    def _check_origin(self, request: web.BaseRequest) -> None:
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            raise ApiError(403, f"a {site} request from a web page may not switch the GPU", "Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        if origin is None:
            return
        allowed = {f"http://{h}:{self.port}" for h in (*self.allowed_hosts, self.host.lower())}
        if is_loopback(self.host):
            allowed |= {f"http://localhost:{self.port}", f"http://127.0.0.1:{self.port}", f"http://[::1]:{self.port}"}
        if origin.lower().rstrip("/") not in allowed:
            raise ApiError(403, f"Origin {origin!r} is not this server: a web page of another site may not switch the GPU", "Origin")

    def _authorize(self, header: str | None) -> None:
        if self.token is None:
            return
        expected = f"Bearer {self.token}"
        if header is None or not hmac.compare_digest(header.encode(), expected.encode()):
            raise ApiError(401, "missing or wrong bearer token: send `Authorization: Bearer <token>`")

    async def _read_json(self, request: web.BaseRequest) -> Any:
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, not {ctype or 'missing'!r}", "Content-Type", close=True)
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked bodies are not taken: send the JSON with a Content-Length", "Transfer-Encoding", close=True)
        length = request.content_length
        if length is None:
            raise ApiError(411, 'a Content-Length is required: send a JSON body like {"model": "sdxl"}', "Content-Length", close=True)
        if length > MAX_BODY:
            raise ApiError(413, f"the body is {length} bytes; at most {MAX_BODY} are taken", "Content-Length", close=True)
        try:
            raw = await asyncio.wait_for(request.content.readexactly(length), self.body_timeout)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.body_timeout:.0f} s (Content-Length {length})", close=True) from None
        except asyncio.IncompleteReadError as err:
            raise ApiError(400, f"the body ended after {len(err.partial)} of {length} bytes", "Content-Length", close=True) from None
        if not raw.strip():
            raise ApiError(400, 'the body is empty: send a JSON object like {"model": "sdxl"}')
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ApiError(400, f"the body is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
        try:
            return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply: send a flat JSON object") from None
        except _DuplicateKey as err:
            raise ApiError(400, f"field {err.key!r} appears twice in the body: send it once", err.key) from None
        except ValueError as err:
            raise ApiError(400, f'the body is not valid JSON ({err}); send {{"model": "sdxl"}}') from None

    async def _switch(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.switch_refusal is not None:
            raise ApiError(409, self.switch_refusal, close=True)
        try:
            self._check_host(request)
            self._check_origin(request)
            self._authorize(request.headers.get("Authorization"))
        except ApiError as err:
            err.close = True
            raise
        body = await self._read_json(request)
        gpu, model, companions = self._switch_fields(body)
        force = body.get("force", False)
        if type(force) is not bool:
            raise ApiError(400, f"field `force` must be true or false, not a JSON {_json_type(force)}", "force")
        worker = self.supervisor.workers[gpu]
        held = worker.holds_against(model)
        if held and not force and model is not None:
            # A demand like any other: it waits for the holds on the running model (drain), then switches.
            worker.demand_switch(model, companions or ())
            log.info("gpu%d: switch to %r queued behind %d hold(s) over HTTP", gpu, model, held)
            queued = {
                "gpu": gpu,
                "activeModel": model,
                "queued": True,
                "holds": held,
                "progressSeq": worker.published_status().get("progressSeq", 0),
            }
            return web.json_response(queued, status=202, dumps=_dumps)
        loop = asyncio.get_running_loop()
        assert self._switch_lock is not None
        async with self._switch_lock:
            if self.state is not None:
                try:
                    await loop.run_in_executor(None, self.state.check_writable)
                except Exception as err:
                    log.warning("gpu%d: switch to %r refused: %s", gpu, model, err)
                    raise ApiError(507, f"the switch was not applied: {err}") from None
            seq = worker.published_status().get("progressSeq", 0)
            try:
                d = await loop.run_in_executor(None, worker.request, model, companions, "api")
            except DesiredStateError as err:
                field = (err.field or "model").replace("activeModel", "model")
                raise ApiError(422, str(err), field.split("[")[0]) from None
            except Exception as err:  # the state write failed after the check above
                log.error("gpu%d: switch to %r could not be recorded: %s", gpu, model, err)
                raise ApiError(507, f"the switch could not be recorded: {err}") from None
        log.info("gpu%d: switch to %r requested over HTTP (generation %d)", gpu, d.active, d.generation)
        payload = {"gpu": gpu, "activeModel": d.active, "companions": list(d.companions), "generation": d.generation, "progressSeq": seq}
        return web.json_response(payload, status=202, dumps=_dumps)

    def _switch_fields(self, body: Any) -> tuple[int, str | None, tuple[str, ...] | None]:
        """(gpu, model or None, companions or None); ApiError names the first wrong field. Strict JSON types."""
        if not isinstance(body, dict):
            raise ApiError(400, f'the body must be a JSON object like {{"model": "sdxl"}}, not a JSON {_json_type(body)}')
        unknown = sorted(set(body) - set(SWITCH_FIELDS))
        if unknown:
            raise ApiError(400, f"unknown field(s) {unknown}: allowed are model, companions, gpu, force", unknown[0])
        if "model" not in body:
            raise ApiError(400, 'field `model` is required (null or "" frees the GPU)', "model")
        model = body["model"]
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"field `model` must be a string or null, not a JSON {_json_type(model)}", "model")
        workers = self.supervisor.workers
        gpu = body.get("gpu")
        if gpu is None:
            if len(workers) != 1:
                raise ApiError(400, f"this host has {len(workers)} GPUs: say which with `gpu`", "gpu")
            gpu = next(iter(workers))
        elif type(gpu) is not int:
            raise ApiError(400, f"field `gpu` must be a whole number (a GPU index), not a JSON {_json_type(gpu)}", "gpu")
        if gpu not in workers:
            raise ApiError(404, f"gpu {gpu} is not managed here; managed: {sorted(workers)}", "gpu")
        companions = body.get("companions")
        if companions is not None and (not isinstance(companions, list) or not all(isinstance(c, str) for c in companions)):
            raise ApiError(400, "field `companions` must be a list of model names", "companions")
        worker: GpuWorker = workers[gpu]
        known = sorted(worker.spec.models)
        for name, field in [(model, "model"), *((c, "companions") for c in companions or ())]:
            if name and name not in worker.spec.models:
                raise ApiError(422, f"unknown model {name!r} on gpu {gpu}: the known models are {', '.join(known)}", field)
        return gpu, model or None, tuple(companions) if companions is not None else None


class _Server(web.Server):
    """aiohttp's low-level server with a bound on open connections: at the
    bound, the connection idle the longest is closed to admit the new one;
    when every connection is busy, the new one is closed at once."""

    def __init__(self, api: ApiServer, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._api = api
        self._open: dict[RequestHandler, None] = {}  # oldest first
        self._refused = 0

    def __call__(self) -> RequestHandler:
        if len(self._open) >= self._api.max_connections and not self._evict_idlest():
            self._refused += 1
            if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                log.warning("%d connection(s) refused: all %d are busy", self._refused, self._api.max_connections)
            return _Refused(self, loop=self._loop)
        return _Handler(self, loop=self._loop, **self._kwargs)

    def _evict_idlest(self) -> bool:
        for handler in self._open:
            if handler not in self._api._busy:
                del self._open[handler]
                handler.force_close()
                return True
        return False

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if not isinstance(handler, _Refused):
            self._open[handler] = None

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._open.pop(handler, None)
        super().connection_lost(handler, exc)


class _Handler(RequestHandler):
    """Protocol errors (a bad Content-Length, a malformed request line) answer
    4xx JSON naming the problem, logged at debug: they are the client's."""

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        what = getattr(exc, "message", None) or message or HTTPStatus(status).phrase
        log.debug("bad request from %s: %s", request.remote, what)
        resp = web.json_response({"error": f"bad request: {what}"}, status=status, dumps=_dumps)
        resp.force_close()
        return resp


class _Refused(RequestHandler):
    """A connection over the bound: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2)
