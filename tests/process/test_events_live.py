"""``GET /events`` against a real ``vramctl up`` (stand-in models, process
runtime, simulated GPU), and the CLI that follows it:

- a reader sees every step of a switch, in the worker's order;
- a reader that disconnects mid-switch resumes with ``Last-Event-ID``
  without a gap or a duplicate;
- 200 readers that never read do not grow the supervisor's memory beyond a
  bound, and a reader that does read still gets every event;
- ``vramctl switch --wait`` prints what it printed when it polled, with two
  requests (the stream and the switch) instead of a poll every 100 ms, and
  still polls where no event stream is served;
- ``vramctl status --watch`` shows a switch as it happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_up import LiveUp

LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}  gpu0  (\S+)\s+\S.*$")


class SseReader:
    """A raw reader of ``GET /events``: (id, event, data) per event."""

    def __init__(self, port: int, last_id: int | None = None, rcvbuf: int | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        extra = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        self.sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode())
        self.buf = b""
        self.text = b""
        self.head: bytes | None = None

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the stream ended")
        self.buf += data

    def _until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        out, self.buf = self.buf.split(sep, 1)
        return out

    def events(self) -> Iterator[tuple[int | None, str, dict[str, Any]]]:
        if self.head is None:
            self.head = self._until(b"\r\n\r\n")
            assert b" 200 " in self.head.split(b"\r\n")[0], self.head
        while True:
            size = int(self._until(b"\r\n"), 16)
            while len(self.buf) < size + 2:
                self._fill()
            self.text += self.buf[:size]
            self.buf = self.buf[size + 2 :]
            while b"\n\n" in self.text:
                block, self.text = self.text.split(b"\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.decode().split("\n") if ": " in line and not line.startswith(":"))
                if "data" in fields:
                    yield (int(fields["id"]) if "id" in fields else None), fields.get("event", "message"), json.loads(fields["data"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class CountingProxy:
    """A TCP proxy on loopback that records the request line of each
    connection (the CLI makes one request per connection); with
    ``no_events`` it answers ``GET /events`` 404 itself, as a vramctl
    without an event stream would."""

    def __init__(self, upstream: int, no_events: bool = False) -> None:
        self.upstream, self.no_events = upstream, no_events
        self.requests: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            line = head.split(b"\r\n", 1)[0].decode()
            self.requests.append(line)
            if self.no_events and line.startswith("GET /events"):
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                conn.close()
                return
            up = socket.create_connection(("127.0.0.1", self.upstream), timeout=30)
            self._conns.append(up)
            up.sendall(head)
            threading.Thread(target=self._pipe, args=(up, conn), daemon=True).start()
            self._pipe(conn, up)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(5)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[LiveUp]:
    u = LiveUp(tmp_path)
    u.start()
    try:
        yield u
    finally:
        u.stop()
        u.kill_models()


def progress(up: LiveUp, since: int = 0) -> list[dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(f"{up.url}/status?since={since}", timeout=10) as r:
        return json.loads(r.read())["progress"]  # type: ignore[no-any-return]


def read_until_step(it: Iterator[tuple[int | None, str, dict[str, Any]]], step: str, out: list[tuple[int | None, str, dict[str, Any]]]) -> None:
    deadline = time.monotonic() + 30
    for ev in it:
        out.append(ev)
        if ev[1] == "progress" and ev[2]["data"]["step"] == step:
            return
        assert time.monotonic() < deadline, "no such step within 30 s"


def test_a_reader_sees_every_step_of_a_switch_in_order(up: LiveUp) -> None:
    r = SseReader(up.port)
    try:
        it = r.events()
        _, kind, hello = next(it)
        assert kind == "hello" and hello["gpus"]["0"]["status"]["activeModel"] == "llm"
        before = hello["gpus"]["0"]["status"]["progressSeq"]
        assert up.post({"model": "sdxl"})[0] == 202
        got: list[tuple[int | None, str, dict[str, Any]]] = []
        read_until_step(it, "switch-success", got)
        for ev in it:  # the status published with the outcome follows the step
            got.append(ev)
            if (ev[1] == "model" and ev[2]["data"]["model"] == "sdxl" and ev[2]["data"]["to"] == "running") or len(got) > 200:
                break
    finally:
        r.close()
    ids = [e[0] for e in got]
    assert ids == list(range(hello["lastId"] + 1, hello["lastId"] + 1 + len(ids)))  # every event, none twice
    seen = [e[2]["data"] for e in got if e[1] == "progress"]
    worker = [p for p in progress(up, before) if p["seq"] <= seen[-1]["seq"]]
    assert [p["seq"] for p in seen] == [p["seq"] for p in worker]  # every step, in the worker's order
    steps = [p["step"] for p in seen]
    for a, b in [("requested", "switch-started"), ("stopping", "stopped"), ("stopped", "starting"), ("starting", "healthy"), ("healthy", "switch-success")]:
        assert steps.index(a) < steps.index(b), steps
    models = [(e[2]["data"]["model"], e[2]["data"]["to"]) for e in got if e[1] == "model"]
    assert ("llm", "stopping") in models and ("sdxl", "running") in models


def test_a_reader_resumes_after_a_disconnect_without_gap_or_duplicate(up: LiveUp) -> None:
    r = SseReader(up.port)
    it = r.events()
    _, _, hello = next(it)
    assert up.post({"model": "sdxl"})[0] == 202
    first: list[tuple[int | None, str, dict[str, Any]]] = []
    read_until_step(it, "stopped", first)  # mid-switch
    r.close()
    time.sleep(0.3)  # the switch goes on while nobody reads
    r2 = SseReader(up.port, last_id=first[-1][0])
    try:
        rest: list[tuple[int | None, str, dict[str, Any]]] = []
        read_until_step(r2.events(), "switch-success", rest)
    finally:
        r2.close()
    assert rest[0][1] != "hello"  # resumed, not started over
    ids = [e[0] for e in first + rest]
    assert ids == list(range(hello["lastId"] + 1, hello["lastId"] + 1 + len(ids)))
    seqs = [e[2]["data"]["seq"] for e in first + rest if e[1] == "progress"]
    assert seqs == [p["seq"] for p in progress(up, hello["gpus"]["0"]["status"]["progressSeq"]) if p["seq"] <= seqs[-1]]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _closed_by_server(sock: socket.socket) -> bool:
    """The server ended the connection (reset or closed), read without reading a byte (TCP_INFO's state)."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state != 1  # TCP_ESTABLISHED


def test_200_slow_readers_are_dropped_and_do_not_grow_the_supervisors_memory(up: LiveUp) -> None:
    assert up.proc is not None
    pid = up.proc.pid
    warm = SseReader(up.port)  # what a first stream costs once (imports, buffers) is not counted
    next(warm.events())
    warm.close()
    rss_before = _rss_kib(pid)
    slow = [SseReader(up.port, rcvbuf=4096) for _ in range(200)]  # they never read a byte
    reader = SseReader(up.port)  # one that reads
    ids: list[int | None] = []
    try:
        it = reader.events()
        _, _, hello = next(it)
        for i in range(8):  # each switch publishes ~20 events of 1-3 KB, to every reader
            assert up.post({"model": "sdxl" if i % 2 == 0 else "llm"})[0] == 202
            got: list[tuple[int | None, str, dict[str, Any]]] = []
            read_until_step(it, "switch-success", got)
            ids += [e[0] for e in got]
        rss_after = _rss_kib(pid)
        # Each slow stream blocks once its buffers are full; it is dropped write_timeout (10 s) later.
        deadline = time.monotonic() + 25
        dropped = 0
        pending = list(slow)
        while pending and time.monotonic() < deadline:
            pending = [s for s in pending if not _closed_by_server(s.sock)]
            time.sleep(0.2)
        dropped = len(slow) - len(pending)
        rss_dropped = _rss_kib(pid)
    finally:
        for s in slow:
            s.close()
        reader.close()
    assert ids == list(range(hello["lastId"] + 1, hello["lastId"] + 1 + len(ids)))  # the reader that reads missed nothing
    grown_mib = (rss_after - rss_before) / 1024
    # Unbounded, each slow reader would hold every event: 200 x ~170 events x ~2 KB = ~65 MiB.
    assert len(ids) > 120
    assert grown_mib < 32, f"the supervisor grew {grown_mib:.1f} MiB with 200 slow readers ({len(ids)} events each)"
    assert dropped == 200, f"{200 - dropped} slow readers were still served 25 s later"
    assert (rss_dropped - rss_before) / 1024 < 32
    assert up.gpu()["activeModel"] == "llm"  # it kept switching all along


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramctl", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def test_switch_wait_follows_the_events_with_two_requests_and_prints_what_polling_printed(up: LiveUp) -> None:
    streamed = CountingProxy(up.port)
    polled = CountingProxy(up.port, no_events=True)
    try:
        a = cli("switch", "sdxl", "--wait", "--url", f"http://127.0.0.1:{streamed.port}")
        assert a.returncode == 0, a.stderr
        back = cli("switch", "llm", "--wait", "--url", f"http://127.0.0.1:{streamed.port}")
        assert back.returncode == 0, back.stderr
        b = cli("switch", "sdxl", "--wait", "--url", f"http://127.0.0.1:{polled.port}")
        assert b.returncode == 0, b.stderr
    finally:
        streamed.close()
        polled.close()
    assert [line.split(" ", 1)[0] + " " + line.split(" ", 2)[1] for line in streamed.requests] == [
        "GET /events",
        "POST /switch",
        "GET /events",
        "POST /switch",
    ]
    assert polled.requests[:2] == ["GET /events HTTP/1.1", "POST /switch HTTP/1.1"]
    assert len(polled.requests) > 4 and all(r.startswith("GET /status?since=") for r in polled.requests[2:])  # the fall-back polls
    for out in (a.stdout, b.stdout):
        lines = out.strip().splitlines()
        assert re.fullmatch(r"sdxl holds gpu 0 in \d+\.\d\ds: Ready", lines[-1]), out
        assert all(LINE.match(line) for line in lines[:-1]), out
    steps_a = [LINE.match(line).group(1) for line in a.stdout.strip().splitlines()[:-1]]  # type: ignore[union-attr]
    steps_b = [LINE.match(line).group(1) for line in b.stdout.strip().splitlines()[:-1]]  # type: ignore[union-attr]
    # The same switch (llm -> sdxl) says the same steps, streamed or polled.
    for key in ("requested", "switch-started", "stopping", "stopped", "starting", "healthy", "switch-success"):
        assert key in steps_a and key in steps_b, (steps_a, steps_b)
    assert [s for s in steps_a if s != "waiting-memory"] == [s for s in steps_b if s != "waiting-memory"]


def test_status_watch_shows_a_switch_as_it_happens(up: LiveUp) -> None:
    proxy = CountingProxy(up.port)
    watch = subprocess.Popen(
        [sys.executable, "-m", "vramctl", "status", "--watch", "--url", f"http://127.0.0.1:{proxy.port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    assert watch.stdout is not None
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in watch.stdout or ()], daemon=True).start()
    seen: list[str] = []

    def until_line(prefix: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.append(line)
            if line.startswith(prefix):
                return
        raise AssertionError(f"no line {prefix!r} within {timeout}s: {seen}")

    try:
        until_line("gpu 0: Ready  active=llm", timeout=15)
        deadline = time.monotonic() + 5
        while len(proxy.requests) < 2 and time.monotonic() < deadline:  # following the stream
            time.sleep(0.05)
        assert up.post({"model": "sdxl"})[0] == 202
        until_line("gpu 0: Ready  active=sdxl  running=sdxl")
    finally:
        watch.send_signal(signal.SIGINT)
        try:
            watch.wait(10)
        except subprocess.TimeoutExpired:
            watch.kill()
            watch.wait(5)
        proxy.close()
    assert watch.returncode == 0
    steps = [m.group(1) for m in (LINE.match(line) for line in seen) if m]
    assert "switch-started" in steps and "healthy" in steps and "switch-success" in steps
    assert [r.split(" ")[1] for r in proxy.requests] == ["/status", "/events"]  # one look, then the stream: no polling
