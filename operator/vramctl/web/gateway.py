"""The gateway: an OpenAI-style reverse proxy that holds a model per request.

A client names the model it wants (the body's ``model`` on the OpenAI
routes, the path on ``/models/NAME/...``); the gateway asks a ``Holder`` for
a ``Lease`` on it -- the worker queues the demand, switches if it must, and
answers once the model is active and healthy -- then forwards the request
unchanged and releases the lease when the answer has been passed on whole:
a streamed answer (Server-Sent Events) holds the model until the stream ends
or the client goes away.

Routes::

    POST /v1/chat/completions | /v1/completions | /v1/embeddings   by the body's model
    POST /v1/images/generations    by the body's model, else the one sdxl model
    GET  /v1/models                every configured model with its state
    ANY  /models/NAME/PATH         passed through to NAME's server as /PATH

Errors have OpenAI's shape (``{"error": {"message", "type", "param",
"code"}}``): an unknown model is a 404 listing the known ones; a bad body a
400 naming the field; a refused hold the holder's status (503 with
``Retry-After``, or 409); a backend that fails before answering a 502, and
one that dies mid-stream ends the stream with an SSE ``error`` event (the
status line has already been sent). A client that goes away while queued
withdraws its demand (the acquire is cancelled), so it causes no switch.

``Gateway.add_routes`` puts these routes on a listener's application
(``vramctl.web.server``); the guards in front of them (token, Host, Origin,
JSON bodies and their limits) are every listener's (``vramctl.web.guards``).
The body's ``model`` is read through ``OpenAIBody`` (the 400 names it).

Nothing here knows the worker: ``Holder`` is the whole contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from yarl import URL

from vramctl.demand.desk import Lease, Refused
from vramctl.web.guards import DOC, RAW, HttpError, body_of, parse_body

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
IMAGES_ROUTE = "/v1/images/generations"
MODELS_ROUTE = "/v1/models"
PASSTHROUGH_PREFIX = "/models/"
GATEWAY_MAX_BODY = 32 * 1024 * 1024  # chat bodies carry base64 images
# Headers that belong to one hop, never forwarded (RFC 9110 7.6.1), plus the
# ones aiohttp sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
DROP_FROM_BACKEND = HOP_BY_HOP | {"server", "date"}
CLIENT_GONE = "499"  # nginx's code for "the client closed the connection"


@dataclass(frozen=True)
class Route:
    """Where a model is served: ``model`` is vramctl's name, ``served_name``
    what its server calls it (the body's model is rewritten to it),
    ``base_url`` like ``http://127.0.0.1:8000``."""

    model: str
    base_url: str
    gpu: str
    served_name: str
    engine: str = "container"


@dataclass(frozen=True)
class ModelInfo:
    """One configured model as ``GET /v1/models`` shows it."""

    name: str
    served_name: str
    gpu: str
    state: str
    engine: str = "container"
    active: bool = False


class Holder(Protocol):
    """What the gateway needs from the worker(s)."""

    def resolve(self, name: str) -> Route | None:
        """A served name or vramctl name -> its route; None: unknown."""

    def models(self) -> Sequence[ModelInfo]:
        """Every configured model, for /v1/models and error messages."""

    def admit(self, model: str) -> Lease | None:
        """The fast path: hold ``model`` at once if that needs no waiting
        (it is served and nothing is queued), else None (then ``acquire``)."""

    async def acquire(self, model: str) -> Lease:
        """Wait until ``model`` is active and healthy and hold it.

        Raises ``Refused`` (queue full, queue timeout, declared mode...).
        Cancellation (the client went away) must withdraw the demand; a
        grant that races the cancellation must be released by the holder.
        """

    def not_ready(self, model: str) -> Refused | None:
        """A 503 when ``model`` is not healthy right now (loading, failed,
        asleep, stopping), else None: a request is sent only to a server
        that is ready now."""

    def backend_failed(self, model: str) -> None:
        """``model``'s server refused or reset a connection: the worker is
        asked to observe now rather than at its next re-check."""

    def taken_away(self, model: str) -> Refused | None:
        """A 503 saying why vramctl no longer wants ``model`` to run (a
        switch away was decided) and when to come back, or None. A request
        is never sent to such a server, and a backend that fails then was
        stopped by vramctl, not broken: the client is told so."""


class GatewayMetrics:
    """The gateway's series, registered in the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "vramctl_gateway_requests_total",
            "Requests the gateway answered, by GPU, model and HTTP status (499: the client went away).",
            ["gpu", "model", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "vramctl_gateway_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (queueing and streams included).",
            ["gpu", "model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.in_flight = Gauge(
            "vramctl_model_in_flight",
            "Requests holding a model right now (granted, not yet answered whole).",
            ["gpu", "model"],
            registry=registry,
        )


class _ClientGone(Exception):
    pass


class OpenAIBody(BaseModel):
    """The part of an OpenAI-style body the gateway reads; the rest passes through."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: StrictStr | None = Field(None, min_length=1, description="a non-empty string (a model of GET /v1/models)")


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status, headers=headers)


class Gateway:
    """The proxy. ``start()`` opens the backend connection pool, ``close()``
    ends it (``add_routes`` ties both to the application's life).

    ``poll_seconds``: how often a waiting or streaming request checks that
    its client is still there. ``connection_limit``: backend connections at
    most (the listener's connection cap: each proxied request holds one).
    ``strip_authorization``: the caller's ``Authorization`` is vramctl's
    token (one is set), not forwarded; else it passes to the backend.
    """

    def __init__(
        self,
        holder: Holder,
        registry: CollectorRegistry,
        *,
        poll_seconds: float = 0.25,
        connect_timeout_seconds: float = 10.0,
        connection_limit: int = 0,
        strip_authorization: bool = False,
    ) -> None:
        self.holder = holder
        self.metrics = GatewayMetrics(registry)
        self.connection_limit = connection_limit
        self.strip_authorization = strip_authorization
        self.poll_seconds = poll_seconds
        self.connect_timeout_seconds = connect_timeout_seconds
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connection_limit),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_seconds),
                auto_decompress=False,  # pass bodies through as the backend encoded them
                cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no cookies
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def add_routes(self, app: web.Application) -> None:
        for path in OPENAI_ROUTES:
            app.router.add_post(path, self.openai)
        app.router.add_post(IMAGES_ROUTE, self.images)
        app.router.add_get(MODELS_ROUTE, self.model_list)
        app.router.add_route("*", PASSTHROUGH_PREFIX + "{name}", self.passthrough)
        app.router.add_route("*", PASSTHROUGH_PREFIX + "{name}/{tail:.*}", self.passthrough)

        async def pool(_: web.Application) -> AsyncIterator[None]:
            await self.start()
            yield
            await self.close()

        app.cleanup_ctx.append(pool)

    # -- routes ----------------------------------------------------------------

    async def model_list(self, _: web.Request) -> web.StreamResponse:
        return web.json_response(self._model_list())

    async def openai(self, request: web.Request) -> web.StreamResponse:
        return await self._by_body(request, images=False)

    async def images(self, request: web.Request) -> web.StreamResponse:
        return await self._by_body(request, images=True)

    async def _by_body(self, request: web.Request, images: bool) -> web.StreamResponse:
        doc = body_of(request)
        body = parse_body(OpenAIBody, doc, '{"model": "...", ...}')
        route = self._route_for(body.model, images)
        raw = request[RAW]
        if body.model != route.served_name:
            doc["model"] = route.served_name
            raw = json.dumps(doc).encode()
        return await self._proxy(request, route, request.raw_path, raw)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        target = self.holder.resolve(name)
        if target is None:
            raise self._unknown(name, "path")
        raw_path, question, query = request.raw_path.partition("?")
        tail = "/" + raw_path[len(PASSTHROUGH_PREFIX) :].partition("/")[2]
        raw = request[RAW] if DOC in request else None
        return await self._proxy(request, target, tail + question + query, raw)

    def _route_for(self, name: str | None, images: bool) -> Route:
        if name is None and images:
            sdxl = [m for m in self.holder.models() if m.engine == "sdxl"]
            if len(sdxl) != 1:
                raise HttpError(400, "model is required: name the image model (more or fewer than one sdxl model is configured)", "model")
            name = sdxl[0].name
        if name is None:
            raise HttpError(400, "model is required: name one of the models of GET /v1/models", "model")
        route = self.holder.resolve(name)
        if route is None:
            raise self._unknown(name, "model")
        return route

    def _unknown(self, name: str, param: str) -> HttpError:
        known = sorted({n for m in self.holder.models() for n in (m.name, m.served_name)})
        return HttpError(
            404, f"The model {name!r} does not exist; known models: {', '.join(known) or '(none)'}", param, code="model_not_found"
        )

    def _model_list(self) -> dict[str, Any]:
        data = []
        for m in self.holder.models():
            data.append(
                {
                    "id": m.served_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "vramctl",
                    "vramctl": {"name": m.name, "gpu": m.gpu, "state": m.state, "engine": m.engine, "active": m.active},
                }
            )
        return {"object": "list", "data": data}

    # -- proxying ------------------------------------------------------------

    async def _proxy(self, request: web.Request, route: Route, path: str, body: bytes | None) -> web.StreamResponse:
        t0 = time.perf_counter()
        code = "500"
        error: str | None = None
        lease: Lease | None = None
        in_flight = self.metrics.in_flight.labels(route.gpu, route.model)
        try:
            try:
                lease = await self._acquire(request, route.model)
            except Refused as exc:
                code = str(exc.status)
                headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
                return _error(exc.status, exc.message, "model_unavailable", "model", None, headers)
            away = self.holder.taken_away(route.model)
            if away is not None:  # a switch away was decided: its server is stopping, never send to it
                code = str(away.status)
                message = f"{route.model} is being switched away ({away.message}); the request was not sent to its server"
                return _error(away.status, message, "model_unavailable", "model", "model_switched", _retry(away))
            unready = self.holder.not_ready(route.model)
            if unready is not None:  # failed, loading again, asleep: only a server ready now gets requests
                code = str(unready.status)
                message = f"{unready.message}; the request was not sent to its server"
                return _error(unready.status, message, "model_unavailable", "model", "model_not_ready", _retry(unready))
            in_flight.inc()
            try:
                response, code, error = await self._forward(request, route, path, body)
                return response
            finally:
                in_flight.dec()
        except _ClientGone:
            code = CLIENT_GONE
            return web.Response(status=499)  # nobody reads it: aiohttp drops it with the connection
        finally:
            if lease is not None:
                lease.release(error)
            self.metrics.requests.labels(route.gpu, route.model, code).inc()
            self.metrics.duration.labels(route.gpu, route.model).observe(time.perf_counter() - t0)

    async def _acquire(self, request: web.BaseRequest, model: str) -> Lease:
        """The holder's acquire, cancelled when the client goes away while it waits."""
        lease = self.holder.admit(model)
        if lease is not None:
            return lease
        task = asyncio.ensure_future(self.holder.acquire(model))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.poll_seconds)
                if done:
                    return task.result()
                if _gone(request):
                    raise _ClientGone
        except BaseException:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            elif not task.cancelled() and task.exception() is None:
                task.result().release()  # granted as we gave up
            raise

    async def _forward(
        self, request: web.BaseRequest, route: Route, path: str, body: bytes | None
    ) -> tuple[web.StreamResponse, str, str | None]:
        assert self._session is not None, "Gateway.start() was not called"
        # ``path``: the backend's path and query, as the client encoded them (no re-quoting).
        url = URL(route.base_url.rstrip("/") + path, encoded=True)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if self.strip_authorization:
            headers.pop("Authorization", None)
        try:
            upstream = await self._session.request(request.method, url, data=body, headers=headers, allow_redirects=False)
        except (aiohttp.ClientError, OSError) as exc:
            if (away := self.holder.taken_away(route.model)) is not None:
                return _taken_away(route, away), "503", None
            self.holder.backend_failed(route.model)  # refused or reset: observe now
            return _bad_gateway(route, f"{type(exc).__name__}: {exc}"), "502", f"backend unreachable: {exc}"
        async with upstream:
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_FROM_BACKEND}
            sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            if not sse and upstream.content_length is not None:
                try:
                    data = await upstream.read()
                except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
                    if (away := self.holder.taken_away(route.model)) is not None:
                        return _taken_away(route, away), "503", None
                    return _bad_gateway(route, f"the backend died mid-answer: {exc}"), "502", f"backend died: {exc}"
                return web.Response(status=upstream.status, body=data, headers=out_headers), str(upstream.status), None
            return await self._stream(request, route, upstream, out_headers, sse)

    async def _stream(
        self, request: web.BaseRequest, route: Route, upstream: aiohttp.ClientResponse, headers: dict[str, str], sse: bool
    ) -> tuple[web.StreamResponse, str, str | None]:
        response = web.StreamResponse(status=upstream.status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunks = upstream.content.iter_any().__aiter__()
        try:
            async for chunk in _until_gone(request, chunks, self.poll_seconds):
                await response.write(chunk)
        except (_ClientGone, ConnectionResetError, aiohttp.ClientConnectionResetError):
            return response, CLIENT_GONE, None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            away = self.holder.taken_away(route.model)
            if away is not None:  # vramctl stopped it: say so, and it is no backend fault
                reason, kind, status, error = (
                    f"vramctl stopped {route.model} during this answer: {away.message}",
                    "model_unavailable",
                    503,
                    None,
                )
            else:
                self.holder.backend_failed(route.model)
                reason = f"the backend of {route.model} died mid-stream: {type(exc).__name__}: {exc}"
                kind, status, error = "bad_gateway", 502, reason
            if sse:
                event = json.dumps(error_body(reason, kind, None, status))
                with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
                    await response.write(f"event: error\ndata: {event}\n\n".encode())
                    await response.write_eof()
            elif request.transport is not None:
                request.transport.close()  # a cut body, so the client cannot take it for whole
            return response, str(status), error
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            await response.write_eof()
        return response, str(upstream.status), None


async def _until_gone(request: web.BaseRequest, chunks: AsyncIterator[bytes], poll: float) -> AsyncIterator[bytes]:
    """The backend's chunks as they come, raising ``_ClientGone`` as soon as
    the client's connection closes, even while the backend is silent."""
    while True:
        nxt = asyncio.ensure_future(chunks.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=poll)
                if done:
                    break
                if _gone(request):
                    raise _ClientGone
        except BaseException:
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
            raise
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


def _gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _retry(refused: Refused) -> dict[str, str] | None:
    return {"Retry-After": str(refused.retry_after)} if refused.retry_after is not None else None


def _taken_away(route: Route, away: Refused) -> web.Response:
    headers = _retry(away)
    message = f"vramctl stopped {route.model} before it could answer: {away.message}; send the request again"
    return _error(503, message, "model_unavailable", "model", "model_switched", headers)


def _bad_gateway(route: Route, detail: str) -> web.Response:
    return _error(502, f"the server of model {route.model} failed: {detail}", "bad_gateway", code="bad_gateway")
