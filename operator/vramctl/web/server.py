"""Every HTTP listener of a vramctl process, on one event-loop thread.

``HttpServer`` binds its listeners when they are added (a taken port is an
``OSError`` before anything starts), builds one aiohttp application per
listener from route-adding callables and the one guards middleware
(``vramctl.web.guards``), and serves them all from one thread with one event
loop. ``serve`` (the composition of the API, ``/holds`` and the gateway over
a supervisor) is what ``vramctl up`` and ``vramctl operator`` start and stop.

What it promises under load and abuse:

- **A door with a count.** The process accepts connections itself (not
  asyncio's accept loop), so a connection over the cap is refused at the door:
  the idlest open connection is closed to admit it, or, when every one is
  busy, the new one is closed at once. The cap (``Limits.max_connections``,
  for all listeners together) leaves ``Limits.reserve_fds`` descriptors, and
  one for each proxied request's backend connection, to the state file, the
  worker's observation and the runtime: a flood of connections is felt by the
  flood, not by the GPU's owner.
- **Timeouts.** A connection that has not sent a whole request head within
  ``idle_timeout`` seconds of connecting or of its last answer (idle, or
  sending its header slowly) is closed; a body must arrive within
  ``body_timeout`` (408).
- **Out of descriptors anyway** (another part of the process took them):
  one spare descriptor is given up to accept and close the waiting
  connection, accepting pauses briefly, and the log says so once per interval
  with a count (``LogLimiter``), never a traceback per attempt.
- **A client that goes away** is counted as 499 in
  ``vramctl_http_requests_total`` and logged as one debug line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from weakref import WeakKeyDictionary

import aiohttp
from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

from vramctl.web.api import Api, StateStore
from vramctl.web.gateway import GATEWAY_MAX_BODY, Gateway
from vramctl.web.guards import API_MAX_BODY, HttpError, Policy, check, dumps, is_loopback, is_public, render, unmatched
from vramctl.web.holds import HoldsApi
from vramctl.web.serving import SupervisorHolder
from vramctl.worker.supervisor import Supervisor

log = logging.getLogger("vramctl.web")

RouteAdder = Callable[[web.Application], None]
BACKLOG = 1024
ACCEPTS_PER_TICK = 64
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
CLIENT_GONE = 499  # nginx's code for "the client closed the connection"


@dataclass(frozen=True)
class Limits:
    """``max_connections``: open connections of all listeners together
    (None: from the descriptor limit, see ``connection_cap``); ``idle_timeout``
    also bounds the time to send a request head."""

    max_connections: int | None = None
    idle_timeout: float = 15.0
    body_timeout: float = 10.0
    reserve_fds: int = 128
    log_interval: float = 10.0

    def connection_cap(self) -> int:
        """Half of what the reserve leaves (a proxied request holds two
        descriptors), between 16 and 4096, unless set."""
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, min(4096, (soft - self.reserve_fds) // 2))


class LogLimiter:
    """One log line per cause per ``interval`` seconds; the next line after a
    quiet spell says how many were left out."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval, self.clock = logger, interval, clock
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, cause: str, message: str, level: int = logging.WARNING, exc_info: BaseException | None = None) -> bool:
        """Log ``message`` unless ``cause`` was logged within the interval; True when logged."""
        now = self.clock()
        with self._lock:
            last = self._seen.get(cause)
            if last is not None and now - last[0] < self.interval:
                self._seen[cause] = (last[0], last[1] + 1)
                return False
            self._seen[cause] = (now, 0)
        left_out = last[1] if last is not None else 0
        more = f" ({left_out} more like it in the last {now - last[0]:.0f} s)" if last is not None and left_out else ""
        self.logger.log(level, "%s%s", message, more, exc_info=exc_info)
        return True


class RequestCounts:
    """``vramctl_http_requests_total`` by listener, route and code: plain
    integers bumped on the event loop (the only writer), exported by a
    collector at scrape time. A prometheus ``Counter`` child takes a lock on
    every request, a few percent of a small read's cost."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(
            "vramctl_http_requests",
            "HTTP requests answered, by listener, route and status (499: the client went away).",
            labels=["listener", "route", "code"],
        )
        for labels, n in list(self.counts.items()):  # one copy, taken whole while the loop may add a key
            family.add_metric(list(labels), n)
        return [family]


_METRICS: WeakKeyDictionary[CollectorRegistry, RequestCounts] = WeakKeyDictionary()


def requests_counter(registry: CollectorRegistry) -> RequestCounts:
    """``vramctl_http_requests_total``, once per registry."""
    counts = _METRICS.get(registry)
    if counts is None:
        counts = _METRICS[registry] = RequestCounts()
        registry.register(counts)
    return counts


@dataclass
class Listener:
    """One bound address and the routes served on it."""

    name: str
    sock: socket.socket
    policy: Policy
    routes: Sequence[RouteAdder]
    runner: web.AppRunner | None = None
    paused: bool = False
    guarded: Any = None  # its guards middleware, once its application is made

    @property
    def host(self) -> str:
        return str(self.sock.getsockname()[0])

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


class _Handler(RequestHandler):
    """aiohttp's connection handler, counted by the door; protocol errors (a
    malformed request line, a bad Content-Length) are JSON 4xx naming the
    problem, logged at debug: they are the client's."""

    door: HttpServer
    answering = False  # a whole request arrived and its handler has not begun yet (then aiohttp's flag says it)
    sock: socket.socket | None = None

    def idle(self) -> bool:
        """No request being answered and none waiting unread in the kernel
        (a client that just sent its request is not idle, though not read yet)."""
        if self.answering or self._request_in_progress or self._messages:
            return False
        if self.sock is None:
            return True
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)  # b"": the peer closed
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:
            self.answering = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.door._opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.door._closed(self)
        super().connection_lost(exc)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        what = getattr(exc, "message", None) or message or HTTPStatus(status).phrase
        if status >= 500:
            self.door.limiter("handler-error", f"error answering {request.method} {request.path}: {what}", logging.ERROR, exc)
        else:
            log.debug("bad request from %s: %s", request.remote, what)
        resp = web.json_response(
            {"error": f"bad request: {what}" if status < 500 else "internal error: see vramctl's log"}, status=status, dumps=dumps
        )
        resp.force_close()
        return resp


class HttpServer:
    """Listeners on one event-loop thread (see the module docstring)."""

    def __init__(self, limits: Limits | None = None, registry: CollectorRegistry | None = None) -> None:
        self.limits = limits or Limits()
        self.cap = self.limits.connection_cap()
        self.limiter = LogLimiter(log, self.limits.log_interval)
        self.listeners: list[Listener] = []
        self._open: dict[_Handler, None] = {}  # oldest first
        self._pending = 0  # accepted, transport not made yet
        self.refused = 0
        self._requests = requests_counter(registry) if registry is not None else None
        self._children: dict[tuple[str, object, int], tuple[str, str, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spare: int | None = None

    # -- building -------------------------------------------------------------------------

    def listen(
        self,
        name: str,
        host: str,
        port: int,
        routes: Sequence[RouteAdder],
        *,
        token: str | None = None,
        allowed_hosts: Collection[str] = (),
        max_body: int = API_MAX_BODY,
    ) -> Listener:
        """Bind ``host:port`` now (OSError when taken); served from ``start()``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError as err:
            sock.close()
            raise OSError(err.errno, f"cannot listen on {host}:{port} ({name}): {err.strerror or err}") from err
        sock.setblocking(False)
        bound = int(sock.getsockname()[1])
        policy = Policy(host, bound, token=token, allowed_hosts=allowed_hosts, max_body=max_body, body_timeout=self.limits.body_timeout)
        listener = Listener(name, sock, policy, routes)
        self.listeners.append(listener)
        return listener

    def app(self, listener: Listener) -> web.Application:
        """The application of one listener: the guards middleware, then its routes."""
        listener.guarded = self._middleware(listener)
        app = web.Application(middlewares=[listener.guarded], client_max_size=listener.policy.max_body)
        for add in listener.routes:
            add(app)
        return app

    @staticmethod
    def _dispatcher(app: web.Application, guarded: Any, routed: Any) -> Callable[[web.BaseRequest], Any]:
        """The request handler of a listener's connections: a public read
        (``GET /status``, ``/metrics``, ``/healthz``, ...) with no body is
        handed to the same guards middleware with its route found by one
        dict lookup of its exact raw path; a request with ``Expect`` is
        routed here and handed to the guards, which answer the expectation
        (aiohttp's own expect handler would say 100 Continue before any guard
        ran); everything else (another method, a body, an encoded or unknown
        path) goes through aiohttp's router and middleware chain (``routed``). The guards are
        the same either way; what the shortcut leaves out is the router's
        walk and aiohttp's per-request middleware plumbing, most of the
        cost of a small answer."""
        reads: dict[str, tuple[Any, UrlMappingMatchInfo]] = {}
        for route in app.router.routes():
            resource = route.resource
            if route.method == "GET" and isinstance(resource, web.PlainResource) and is_public(route.handler):
                info = UrlMappingMatchInfo({}, route)
                info.add_app(app)
                info.freeze()
                reads[resource.canonical] = (route.handler, info)

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            if hdrs.EXPECT in request.headers and isinstance(request, web.Request):
                # Routed here, not by aiohttp, whose expect handler says 100
                # Continue to any routed request before a guard ran: the body
                # check answers the expectation once the head passed them all.
                match = await app.router.resolve(request)
                match.add_app(app)
                match.freeze()
                request._match_info = match
                expecting: web.StreamResponse = await guarded(request, match.handler)
                return expecting
            hit = reads.get(request.raw_path.partition("?")[0]) if request.method == "GET" else None
            if hit is None or request.body_exists or not isinstance(request, web.Request):
                resp: web.StreamResponse = await routed(request)
                return resp
            request._match_info = hit[1]
            resp = await guarded(request, hit[0])
            return resp

        return dispatch

    def _middleware(self, listener: Listener) -> Any:
        policy, requests, name, open_, children = listener.policy, self._requests, listener.name, self._open, self._children

        @web.middleware
        async def guarded(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
            proto = request.protocol
            if proto in open_:  # the least recently used connection is evicted first
                del open_[proto]
                open_[proto] = None
                proto.answering = False  # from here aiohttp's request-in-progress flag says it
            try:
                refused = unmatched(request)
                if refused is not None:
                    raise refused
                await check(policy, request)
                resp: web.StreamResponse = await handler(request)
            except HttpError as err:
                resp = render(request.path, err)
            except web.HTTPException as exc:  # aiohttp's own (a body over client_max_size)
                resp = render(request.path, HttpError(exc.status, exc.reason, close=True))
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                resp = web.Response(status=CLIENT_GONE)  # nobody reads it: aiohttp drops it with the connection
                resp.force_close()
            except asyncio.CancelledError:
                _count(requests, children, name, request, CLIENT_GONE)
                log.debug("client went away during %s %s (cancelled)", request.method, request.path)
                raise
            except Exception as exc:
                self.limiter(f"handler:{request.path}", f"unexpected error answering {request.method} {request.path}", logging.ERROR, exc)
                resp = render(request.path, HttpError(500, "internal error: see vramctl's log", close=True))
            if resp.status == CLIENT_GONE:
                log.debug("client went away during %s %s", request.method, request.path)
            _count(requests, children, name, request, resp.status)
            return resp

        return guarded

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread and serve every listener; RuntimeError when it cannot."""
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            loop.set_exception_handler(self._loop_error)
            try:
                loop.run_until_complete(self._open_all())
            except BaseException as err:
                errors.append(err)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                pending = asyncio.all_tasks(loop)  # connections still being torn down
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="vramctl-http", daemon=True)
        self._thread.start()
        if not started.wait(15):
            raise RuntimeError("the HTTP listeners did not start within 15 s")
        if errors:
            raise RuntimeError(f"the HTTP listeners did not start: {errors[0]}") from errors[0]

    async def _open_all(self) -> None:
        with contextlib.suppress(OSError):
            self._spare = os.open(os.devnull, os.O_RDONLY)
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            runner = web.AppRunner(
                self.app(listener),
                access_log=None,
                keepalive_timeout=self.limits.idle_timeout,
                max_field_size=16 * 1024,
                lingering_time=0.5,  # a refused body is not waited for long
                shutdown_timeout=1.0,
            )
            await runner.setup()
            assert runner.server is not None
            runner.server.request_handler = self._dispatcher(runner.app, listener.guarded, runner.server.request_handler)
            listener.runner = runner
            loop.add_reader(listener.sock.fileno(), self._accept, listener)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError, TimeoutError, Exception):
                asyncio.run_coroutine_threadsafe(self._close_all(), loop).result(15)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        for listener in self.listeners:
            with contextlib.suppress(OSError):
                listener.sock.close()
        if self._spare is not None:
            with contextlib.suppress(OSError):
                os.close(self._spare)
            self._spare = None

    async def _close_all(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(listener.sock.fileno())
        for listener in self.listeners:
            if listener.runner is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listener.runner.cleanup(), 5)

    # -- the door ---------------------------------------------------------------------------

    def _accept(self, listener: Listener) -> None:
        loop = self._loop
        assert loop is not None and listener.runner is not None
        server = listener.runner.server
        assert server is not None
        for _ in range(ACCEPTS_PER_TICK):
            try:
                conn, _addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:
                if err.errno in EXHAUSTED:
                    self._exhausted(listener, err)
                else:
                    self.limiter(f"accept:{err.errno}", f"{listener.name}: accepting a connection failed: {err}")
                return
            # At the cap the idlest open connection makes room. With none idle,
            # connections still being made may be trimmed once made (``_opened``),
            # so a burst is admitted within a small slack; beyond it, refused.
            total = len(self._open) + self._pending
            if total >= self.cap and not self._evict_idlest() and (self._pending == 0 or total >= self.cap + ACCEPTS_PER_TICK):
                conn.close()
                self.refused += 1
                self.limiter(
                    "cap", f"{listener.name}: connection refused: all {self.cap} connections are busy ({self.refused} refused so far)"
                )
                continue
            conn.setblocking(False)
            self._pending += 1
            task = loop.create_task(self._connect(server, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, server: web.Server, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            # aiohttp's Server is the connection factory; its handler arguments are its own.
            kwargs: dict[str, Any] = server._kwargs
            handler = _Handler(server, loop=loop, **kwargs)
            handler.door = self
            handler.sock = conn
            await loop.connect_accepted_socket(lambda: handler, conn)
        except OSError as err:
            conn.close()
            self.limiter("connect", f"an accepted connection could not be served: {err}")
        finally:
            self._pending -= 1

    def _opened(self, handler: _Handler) -> None:
        self._open[handler] = None
        while len(self._open) > self.cap and self._evict_idlest():  # the cap came down while it was being made
            pass

    def _closed(self, handler: _Handler) -> None:
        self._open.pop(handler, None)

    def _evict_idlest(self) -> bool:
        for handler in self._open:
            if handler.idle():  # idle, or its request head is still arriving
                del self._open[handler]
                handler.force_close()
                return True
        return False

    def _exhausted(self, listener: Listener, err: OSError) -> None:
        """Out of descriptors (something else in the process holds them):
        lower the cap below what is open now and close the idlest connections
        above it, so descriptors come back to the worker and the state file;
        give up the spare descriptor to accept and close the waiting
        connection (new connections are the ones refused); say so once per
        interval. Accepting pauses briefly only when no spare is left."""
        loop = self._loop
        assert loop is not None
        lowered = max(16, len(self._open) + self._pending - 32)
        if lowered < self.cap:
            self.cap = lowered
            while len(self._open) > self.cap and self._evict_idlest():
                pass
        self.refused += 1
        self.limiter(
            "descriptors",
            f"{listener.name}: out of file descriptors ({err.strerror}): refusing new connections; "
            f"the connection cap is now {self.cap} ({len(self._open)} open; raise the open-file limit)",
        )
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            with contextlib.suppress(OSError):
                conn, _ = listener.sock.accept()
                conn.close()
            with contextlib.suppress(OSError):
                self._spare = os.open(os.devnull, os.O_RDONLY)
        if self._spare is None and not listener.paused:
            listener.paused = True
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(listener.sock.fileno())
            loop.call_later(0.1, self._resume, listener)

    def _resume(self, listener: Listener) -> None:
        loop = self._loop
        listener.paused = False
        if loop is not None and listener.runner is not None and listener.sock.fileno() >= 0:
            loop.add_reader(listener.sock.fileno(), self._accept, listener)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = context.get("message", "event loop error")
        cause = f"loop:{message}:{type(exc).__name__}"
        self.limiter(
            cause,
            f"{message}: {exc!r}" if exc is not None else str(message),
            logging.ERROR,
            exc if isinstance(exc, BaseException) else None,
        )


def _count(
    requests: RequestCounts | None, children: dict[tuple[str, object, int], tuple[str, str, str]], listener: str, request: web.Request, status: int
) -> None:
    """One more request in ``vramctl_http_requests_total`` (``children``: the series' labels by route object, made once)."""
    if requests is None:
        return
    info = request.match_info
    key = (listener, info.route, status)
    labels = children.get(key)
    if labels is None:
        resource = info.route.resource if info.http_exception is None else None
        route = resource.canonical if resource is not None else "unmatched"
        labels = children[key] = (listener, route, str(status))
    counts = requests.counts
    counts[labels] = counts.get(labels, 0) + 1


# -- the composition: API, holds and gateway over a supervisor -----------------------------------


@dataclass(frozen=True)
class FaceOptions:
    """What ``vramctl up``/``operator`` ask for. ``switch_refusal``: desired
    state comes from elsewhere (Kubernetes): POST /switch answers 409 with
    this text. ``holds_on_api``: serve /holds on the API port too.
    ``api_routes``/``gateway_routes``: more route-adding callables (a status
    page, an event stream), added after the built-in routes."""

    api: tuple[str, int]
    gateway: tuple[str, int] | None = None
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    switch_refusal: str | None = None
    holds_on_api: bool = True
    limits: Limits = field(default_factory=Limits)
    api_routes: tuple[RouteAdder, ...] = ()
    gateway_routes: tuple[RouteAdder, ...] = ()
    # /metrics' text (default: the registry rendered per scrape); one with a ``fresh()`` (telemetry.SharedRendering)
    # is asked that first, on the event loop.
    metrics_body: Callable[[], bytes] | None = None


@dataclass
class Face:
    """The bound listeners of a supervisor's HTTP face."""

    server: HttpServer
    api: Listener
    gateway: Listener | None

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


def serve(supervisor: Supervisor, options: FaceOptions, state: StateStore | None = None) -> Face:
    """Bind the API (and the gateway) of ``supervisor``; ``Face.start()``
    serves them. One ``SupervisorHolder`` serves /holds on both ports, so a
    hold made on either is renewed and released on either. Raises ValueError
    (a listener off loopback without a token) or OSError (a taken port)."""
    host, port = options.api
    if not is_loopback(host) and not options.token and options.switch_refusal is None:
        raise ValueError(f"listening on {host} (not loopback) needs a token: pass --token or set VRAMCTL_TOKEN")
    if options.gateway is not None and not is_loopback(options.gateway[0]) and not options.token:
        raise ValueError(f"the gateway on {options.gateway[0]} (not loopback) needs a token: pass --token or set VRAMCTL_TOKEN")
    registry = supervisor.metrics.registry
    server = HttpServer(options.limits, registry)
    holder = SupervisorHolder(supervisor)
    holds = HoldsApi(holder, holder.names, check=holder.check)
    api = Api(supervisor, state=state, switch_refusal=options.switch_refusal, metrics_body=options.metrics_body)
    api_routes: list[RouteAdder] = [api.add_routes]
    if options.holds_on_api:
        api_routes.append(holds.add_routes)
    api_routes += options.api_routes
    try:
        api_listener = server.listen("api", host, port, api_routes, token=options.token, allowed_hosts=options.allowed_hosts)
        gw_listener = None
        if options.gateway is not None:
            gateway = Gateway(holder, registry, connection_limit=server.cap, strip_authorization=options.token is not None)
            for info in holder.models():  # label sets at zero: rates over the first requests are not NaN
                gateway.metrics.requests.labels(info.gpu, info.name, "200")
                gateway.metrics.duration.labels(info.gpu, info.name)
                gateway.metrics.in_flight.labels(info.gpu, info.name)
            gw_host, gw_port = options.gateway
            gw_routes: list[RouteAdder] = [gateway.add_routes, holds.add_routes, *options.gateway_routes]
            gw_listener = server.listen(
                "gateway", gw_host, gw_port, gw_routes, token=options.token, allowed_hosts=options.allowed_hosts, max_body=GATEWAY_MAX_BODY
            )
    except OSError:
        server.stop()
        raise
    return Face(server, api_listener, gw_listener)
