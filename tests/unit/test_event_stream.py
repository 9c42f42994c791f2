"""``GET /events`` (``web.events``) on an aiohttp app of its own, read by a
plain socket client: the hello, live events in order, a resume with
Last-Event-ID, a gap, and slow readers that are dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from vramctl.status.events import EventJournal
from vramctl.web.events import EventStream, add_routes


class Served:
    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            app = web.Application()
            add_routes(app, self.stream)
            self._runner = web.AppRunner(app, shutdown_timeout=1.0)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None and server.sockets
            self.port = server.sockets[0].getsockname()[1]

        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def stop() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Reader:
    """A raw SSE reader: (id, event, data) per event, ignoring comments."""

    def __init__(self, port: int, last_id: int | None = None, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        extra = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        self.sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        self.buf = b""
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.headers = head.decode()
        self.chunked = b"chunked" in head.lower()

    def _until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        out, self.buf = self.buf.split(sep, 1)
        return out

    def _line(self) -> bytes:
        # The body is chunked: strip chunk framing lazily by reading whole chunks into a text buffer.
        return self._until(b"\n")

    def events(self) -> Iterator[tuple[int | None, str, Any]]:
        text = b""
        while True:
            if self.chunked:
                size = int(self._until(b"\r\n"), 16)
                while len(self.buf) < size + 2:
                    data = self.sock.recv(65536)
                    if not data:
                        raise EOFError
                    self.buf += data
                text += self.buf[:size]
                self.buf = self.buf[size + 2 :]
            while b"\n\n" in text:
                block, text = text.split(b"\n\n", 1)
                fields: dict[str, str] = {}
                for line in block.decode().split("\n"):
                    if line.startswith(":") or ":" not in line:
                        continue
                    k, v = line.split(":", 1)
                    fields[k] = v.removeprefix(" ")
                if "data" in fields:
                    yield (int(fields["id"]) if "id" in fields else None), fields.get("event", "message"), json.loads(fields["data"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def journal() -> EventJournal:
    return EventJournal(capacity=50)


@pytest.fixture
def served(journal: EventJournal) -> Iterator[Served]:
    s = Served(EventStream(journal, extra=lambda: {"runtime": "process"}, write_timeout=0.5, limit=20, keepalive=0.5))
    yield s
    s.stop()


def _wait(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("not within time")


def test_hello_then_every_event_in_order_with_its_id(journal: EventJournal, served: Served) -> None:
    journal.append("progress", 0, {"step": "before"})
    r = Reader(served.port)
    try:
        assert r.status == 200 and "text/event-stream" in r.headers
        it = r.events()
        eid, kind, hello = next(it)
        assert (eid, kind) == (1, "hello") and hello["lastId"] == 1 and hello["runtime"] == "process" and hello["gap"] is False
        for step in ("stopping", "waiting-memory", "memory-free", "starting", "healthy"):
            journal.append("progress", 0, {"step": step})
        got = [next(it) for _ in range(5)]
        assert [e[0] for e in got] == [2, 3, 4, 5, 6]
        assert [e[2]["data"]["step"] for e in got] == ["stopping", "waiting-memory", "memory-free", "starting", "healthy"]
    finally:
        r.close()


def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(journal: EventJournal, served: Served) -> None:
    r = Reader(served.port)
    it = r.events()
    next(it)  # hello
    for i in range(10):
        journal.append("progress", 0, {"n": i})
    first = [next(it) for _ in range(4)]
    r.close()  # disconnect mid-stream
    for i in range(10, 15):
        journal.append("progress", 0, {"n": i})
    r2 = Reader(served.port, last_id=first[-1][0])
    try:
        it2 = r2.events()
        rest = [next(it2) for _ in range(11)]
        ids = [e[0] for e in first + rest]
        assert ids == list(range(1, 16))
        assert all(kind == "progress" for _, kind, _ in rest)  # no hello: a true resume
    finally:
        r2.close()


def test_an_id_no_longer_kept_starts_over_from_a_fresh_hello(journal: EventJournal, served: Served) -> None:
    for i in range(80):  # capacity 50: ids 1..30 are gone
        journal.append("progress", 0, {"n": i})
    r = Reader(served.port, last_id=10)
    try:
        eid, kind, hello = next(r.events())
        assert (eid, kind) == (80, "hello") and hello["gap"] is True
    finally:
        r.close()


def test_slow_readers_are_dropped_and_the_journal_holds_nothing_for_them(journal: EventJournal, served: Served) -> None:
    readers = [Reader(served.port) for _ in range(5)]
    try:
        for r in readers:
            r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _wait(lambda: served.stream.streams == 5)
        big = "x" * 20_000
        for i in range(200):  # far more than a reader's socket buffers and its 20-event limit
            journal.append("progress", 0, {"n": i, "pad": big})
        _wait(lambda: served.stream.streams == 0 and journal.subscribers() == 0, timeout=10)
        assert served.stream.dropped >= 5
    finally:
        for r in readers:
            r.close()


def test_streams_are_bounded(journal: EventJournal) -> None:
    s = Served(EventStream(journal, max_streams=2, keepalive=0.5))
    readers = []
    try:
        readers = [Reader(s.port), Reader(s.port)]
        _wait(lambda: s.stream.streams == 2)
        third = Reader(s.port)
        readers.append(third)
        assert third.status == 503 and "Retry-After" in third.headers
    finally:
        for r in readers:
            r.close()
        s.stop()
