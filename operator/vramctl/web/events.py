"""``GET /events``: the event journal as Server-Sent Events.

What a reader gets, in order: a ``retry`` hint; then either the events
after its ``Last-Event-ID`` (a reconnecting ``EventSource`` sends it), when
the journal still has them all, or a ``hello`` event carrying the current
view (each GPU's status, its last switches, holds and waits, the models of
its spec, the newest memory sample) whose id is the journal's last id;
then every new event as it is published, each with its journal id. A reader
that resumes therefore sees no gap and no duplicate, and one whose id is
too old (or from an earlier run) starts over from a fresh ``hello``.

Bounds, whatever the readers do:

- at most ``max_streams`` streams (503 with Retry-After beyond);
- each stream buffers at most ``limit`` events in the journal, and
  ``SEND_BUFFER`` bytes in its transport and in the kernel; a write that the reader does not take within
  ``write_timeout`` seconds, or a buffer that overflows, ends the stream
  (the connection is aborted, its buffers freed): a slow reader is dropped,
  never buffered without bound; it reconnects with its last id;
- a comment every ``keepalive`` seconds tells a proxy (and a reader's
  timeout) that the stream lives.

Each event is encoded (and its secrets redacted) once, whatever the number
of readers. Memory is not a worker event: while anyone reads, one sampler
reads every GPU's memory each ``memory_interval`` seconds and publishes a
``memory`` event when it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from vramctl.status.events import DEFAULT_SUBSCRIBER_LIMIT, Event, EventJournal
from vramctl.status.redact import redact_status
from vramctl.web.guards import public

log = logging.getLogger("vramctl.web.events")

WRITE_TIMEOUT = 10.0
KEEPALIVE = 15.0
MAX_STREAMS = 256
MEMORY_INTERVAL = 0.5
# What one stream may hold unsent, in the kernel (autotuned, its send buffer
# could reach megabytes per reader) and in its transport (aiohttp's default
# high-water mark is 64 KiB): a reader that takes nothing blocks the writes
# after this much, and is dropped ``write_timeout`` later. Events are small
# (a status is 1-3 KB); a reader that keeps up never comes near it.
SEND_BUFFER = 16 * 1024
_ENCODED_KEPT = 4096

# What the hello adds to the journal's view (runtime, notes, models, read-only mode).
Extra = Callable[[], Mapping[str, Any]]
# Every GPU's memory now (blocking: run in an executor).
MemorySample = Callable[[], Mapping[int, Mapping[str, Any]]]


class EventStream:
    """The ``GET /events`` handler over ``journal``; ``secrets()``: values
    to mask in everything sent."""

    def __init__(
        self,
        journal: EventJournal,
        *,
        secrets: Callable[[], frozenset[str]] = frozenset,
        extra: Extra = dict,
        memory: MemorySample | None = None,
        limit: int = DEFAULT_SUBSCRIBER_LIMIT,
        write_timeout: float = WRITE_TIMEOUT,
        keepalive: float = KEEPALIVE,
        max_streams: int = MAX_STREAMS,
        memory_interval: float = MEMORY_INTERVAL,
    ) -> None:
        self.journal = journal
        self.secrets, self.extra, self.memory = secrets, extra, memory
        self.limit, self.write_timeout, self.keepalive = limit, write_timeout, keepalive
        self.max_streams, self.memory_interval = max_streams, memory_interval
        self.streams = 0
        self.dropped = 0
        self.closing = False
        self._wakers: set[Callable[[], None]] = set()
        self._encoded: OrderedDict[int, bytes] = OrderedDict()
        self._sampler: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ encoding

    def _data(self, doc: Any) -> str:
        return json.dumps(redact_status(doc, self.secrets()), separators=(",", ":"), default=str)

    def encode(self, ev: Event) -> bytes:
        """``id``/``event``/``data`` lines of one event (cached by id: encoded once for every reader)."""
        cached = self._encoded.get(ev.id)
        if cached is None:
            cached = f"id: {ev.id}\nevent: {ev.kind}\ndata: {self._data(ev.as_dict())}\n\n".encode()
            self._encoded[ev.id] = cached
            while len(self._encoded) > _ENCODED_KEPT:
                self._encoded.popitem(last=False)
        return cached

    def hello(self, view: Mapping[str, Any], last_id: int, resumed_from: int | None) -> bytes:
        doc = {**view, **self.extra(), "gap": resumed_from is not None}
        return f"id: {last_id}\nevent: hello\ndata: {self._data(doc)}\n\n".encode()

    # ------------------------------------------------------------ the stream

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.json_response({"error": "/events answers GET only"}, status=405, headers={"Allow": "GET, HEAD"})
        if self.streams >= self.max_streams:
            return web.json_response(
                {"error": f"{self.streams} event streams are open (at most {self.max_streams}): retry later"},
                status=503,
                headers={"Retry-After": "5"},
            )
        since = _last_event_id(request.headers.get("Last-Event-ID"))
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        pending = False

        def _set() -> None:
            nonlocal pending
            pending = False
            woken.set()

        def wake() -> None:  # a writer's thread: at most one call queued at a time
            nonlocal pending
            if not pending:
                pending = True
                with contextlib.suppress(RuntimeError):  # the loop has ended
                    loop.call_soon_threadsafe(_set)

        try:
            resume = self.journal.subscribe(since, self.limit, wake)
        except OverflowError as err:
            return web.json_response({"error": str(err)}, status=503, headers={"Retry-After": "5"})
        sub = resume.subscription
        self.streams += 1
        self._wakers.add(_set)
        self._ensure_sampler()
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",
                "X-Content-Type-Options": "nosniff",
            }
        )
        try:
            _small_send_buffer(request)
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            first = b"retry: 1000\n\n"
            if resume.replay is None:
                first += self.hello(resume.view, resume.last_id, since)
            else:
                first += b"".join(self.encode(e) for e in resume.replay)
            if not await self._write(request, resp, first):
                return resp
            while not self.closing:
                events = sub.take()
                if sub.dropped:
                    self.dropped += 1
                    log.debug("an event reader fell %d events behind: dropped", self.limit)
                    _abort(request)
                    return resp
                if events:
                    if not await self._write(request, resp, b"".join(self.encode(e) for e in events)):
                        return resp
                    continue
                woken.clear()
                if sub.pending() or sub.dropped:
                    continue
                try:
                    await asyncio.wait_for(woken.wait(), self.keepalive)
                except TimeoutError:
                    if not await self._write(request, resp, b": keepalive\n\n"):
                        return resp
            return resp
        except (ConnectionError, asyncio.CancelledError):
            log.debug("an event reader went away")
            raise
        finally:
            sub.close()
            self._wakers.discard(_set)
            self.streams -= 1

    async def _write(self, request: web.BaseRequest, resp: web.StreamResponse, chunk: bytes) -> bool:
        """False (and the connection aborted) when the reader did not take ``chunk`` in time."""
        try:
            await asyncio.wait_for(resp.write(chunk), self.write_timeout)
        except TimeoutError:
            self.dropped += 1
            log.debug("an event reader took nothing for %.0f s: dropped", self.write_timeout)
            _abort(request)
            return False
        return True

    # ------------------------------------------------------------ memory

    def _ensure_sampler(self) -> None:
        if self.memory is not None and (self._sampler is None or self._sampler.done()):
            self._sampler = asyncio.get_running_loop().create_task(self._sample(self.memory))

    async def _sample(self, memory: MemorySample) -> None:
        """Publish each GPU's memory when it changed, while anyone reads."""
        loop = asyncio.get_running_loop()
        while self.streams > 0:
            try:
                for gpu, view in (await loop.run_in_executor(None, memory)).items():
                    self.journal.publish_memory(gpu, view)
            except Exception:
                log.debug("memory sample failed", exc_info=True)
            await asyncio.sleep(self.memory_interval)

    async def close(self) -> None:
        """End every stream (at their next look, within one loop turn) and the sampler."""
        self.closing = True
        for wake in list(self._wakers):
            wake()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sampler


def _last_event_id(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n >= 0 else None


def _small_send_buffer(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    if isinstance(transport, asyncio.WriteTransport):
        transport.set_write_buffer_limits(high=SEND_BUFFER)


def _abort(request: web.BaseRequest) -> None:
    """End the connection at once, with what it holds unsent: a reset (linger
    0), so that the kernel does not keep the unsent events for a reader that
    takes nothing either."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def add_routes(app: web.Application, stream: EventStream) -> None:
    """``GET /events`` on ``app``, a public read like ``/status`` (an
    ``EventSource`` cannot send a token; the guards still bound the
    connections); the streams and the sampler end when the app shuts down."""
    app.router.add_get("/events", public(stream.handle))

    async def closing(_app: web.Application) -> None:
        await stream.close()

    app.on_shutdown.append(closing)  # before the server waits for its handlers: the streams end first
