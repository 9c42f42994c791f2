"""A stand-in model server: slow to load, slow to stop, driven by env vars.

``python -m vramctl.demo.standin`` behaves like the docker stand-in image
(images/standin/standin.sh), so the process runtime can run the demo and the
tests without docker or a GPU. Standard library only.

Environment (same contract as the image):

``STANDIN_PORT``
    HTTP port (default 8000; 0 picks a free one, logged in the ready line).
``STANDIN_HOST``
    Address to bind (default 127.0.0.1).
``STANDIN_LOAD_SECONDS``
    ``GET /health`` answers 503 for this long after start, then 200 (default 2).
``STANDIN_STOP_SECONDS``
    After SIGTERM or SIGINT the health port closes at once and the process
    exits 0 this long after the signal (default 1).
``STANDIN_KEEPALIVE=1``
    Speak HTTP/1.1 and keep connections open between requests, as real model
    servers do (default: HTTP/1.0, a connection per request).
``STANDIN_IGNORE_SIGTERM=1``
    SIGTERM and SIGINT are ignored (as in the image): only SIGKILL ends it.
``STANDIN_CRASH_AFTER_SECONDS``
    Exit abruptly with ``STANDIN_EXIT_CODE`` (default 1) this long after start.

Sleep, like vLLM's sleep mode (``POST /sleep?level=N``, ``POST /wake_up``,
``GET /is_sleeping`` answering ``{"is_sleeping": bool, "residue_mib": N,
"cycles": N, "level": N}``); while not awake ``/health`` still answers 200 and
model requests get 503 with ``Retry-After``:

``STANDIN_SLEEP_SECONDS`` / ``STANDIN_WAKE_SECONDS``
    How long a sleep and a wake take before they answer (default 0.2 each).
``STANDIN_RESIDUE_MIB``
    The GPU memory it reports keeping while asleep (default 512); the
    simulated GPU counts it (``sleepctl.asleep_residue``).
``STANDIN_RESIDUE_GROWTH_MIB``
    Added to the residue at each further sleep: a leak across cycles (default 0).
``STANDIN_SLEEP_STATUS``
    HTTP status ``/sleep`` answers (default 200; e.g. 500 for a failed sleep,
    which leaves it awake).
``STANDIN_WAKE_BROKEN=1``
    ``/wake_up`` answers 200 but ``/health`` answers 503 from then on (an
    engine that did not survive the cycle).

Log lines go to stdout, flushed one by one, so a log file shows them at once::

    standin: loading (N s)
    standin: ready on :PORT
    standin: got SIGTERM, stopping in N s
    standin: stopped
    standin: crashing with exit code N
    standin: sleeping (level N, N s)
    standin: asleep (residue N MiB)
    standin: waking (N s)
    standin: awake

Minimal OpenAI-shaped answers once ready (503 before), for the gateway's
tests and benchmark: ``POST /v1/chat/completions`` (``"stream": true``: one
Server-Sent Event per token, chunked, ending ``data: [DONE]``),
``/v1/completions``, ``/v1/embeddings`` (8 numbers per input) and
``/v1/images/generations`` (a 1x1 PNG as ``b64_json``). ``max_tokens``
tokens (default 8) are made, each taking ``STANDIN_TOKEN_SECONDS`` (default
0), streamed or not.

Any other path answers 404. Bad settings exit 2; a port that cannot be bound
exits 70, both with a ``standin:`` line saying why.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

EXIT_BAD_SETTING = 2
EXIT_CANNOT_LISTEN = 70


def log(message: str) -> None:
    # One write per line: print() writes the text and the newline separately,
    # which under PYTHONUNBUFFERED lets a log reader see half a line.
    sys.stdout.write(f"standin: {message}\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    load_seconds: float
    stop_seconds: float
    ignore_sigterm: bool
    crash_after_seconds: float | None
    exit_code: int
    # The values as written, for the log lines: the image prints them verbatim.
    load_text: str
    stop_text: str
    sleep_seconds: float = 0.2
    wake_seconds: float = 0.2
    residue_mib: int = 512
    residue_growth_mib: int = 0
    sleep_status: int = 200
    wake_broken: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read the STANDIN_* variables; raise ValueError naming a bad one."""

        def number(name: str, default: str) -> tuple[float, str]:
            text = env.get(name, "").strip() or default
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {text!r}")
            return value, text

        def integer(name: str, default: str, lo: int, hi: int) -> int:
            text = env.get(name, "").strip() or default
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"{name} must be a whole number, got {text!r}") from None
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}, got {text!r}")
            return value

        load, load_text = number("STANDIN_LOAD_SECONDS", "2")
        stop, stop_text = number("STANDIN_STOP_SECONDS", "1")
        crash: float | None = None
        if env.get("STANDIN_CRASH_AFTER_SECONDS", "").strip():
            crash, _ = number("STANDIN_CRASH_AFTER_SECONDS", "0")
        return cls(
            sleep_seconds=number("STANDIN_SLEEP_SECONDS", "0.2")[0],
            wake_seconds=number("STANDIN_WAKE_SECONDS", "0.2")[0],
            residue_mib=integer("STANDIN_RESIDUE_MIB", "512", 0, 1 << 24),
            residue_growth_mib=integer("STANDIN_RESIDUE_GROWTH_MIB", "0", 0, 1 << 24),
            sleep_status=integer("STANDIN_SLEEP_STATUS", "200", 100, 599),
            wake_broken=env.get("STANDIN_WAKE_BROKEN", "").strip() == "1",
            host=env.get("STANDIN_HOST", "").strip() or "127.0.0.1",
            port=integer("STANDIN_PORT", "8000", 0, 65535),
            load_seconds=load,
            stop_seconds=stop,
            ignore_sigterm=env.get("STANDIN_IGNORE_SIGTERM", "").strip() == "1",
            crash_after_seconds=crash,
            exit_code=integer("STANDIN_EXIT_CODE", "1", 0, 255),
            load_text=load_text,
            stop_text=stop_text,
        )


class SleepState:
    """awake -> sleeping -> asleep -> waking -> awake, one transition at a time.

    A second /sleep (or /wake_up) while one runs waits for it and answers the
    same; a /sleep while asleep (a /wake_up while awake) answers at once.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = "awake"
        self.level = 0
        self.cycles = 0
        self.broken = False
        self._cond = threading.Condition()

    def residue_mib(self) -> int:
        return self.settings.residue_mib + self.settings.residue_growth_mib * max(0, self.cycles - 1)

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return self.snapshot_locked()

    def go(self, sleep: bool, level: int) -> dict[str, Any]:
        """Sleep (``sleep``) or wake; returns the state afterwards."""
        s = self.settings
        busy, done = ("sleeping", "asleep") if sleep else ("waking", "awake")
        with self._cond:
            # Bounded: each transition takes its delay, and this one waits for at most one.
            self._cond.wait_for(lambda: self.state not in ("sleeping", "waking"), timeout=s.sleep_seconds + s.wake_seconds + 5)
            if self.state == done:
                return self.snapshot_locked()
            self.state = busy
            if sleep:
                self.level = level
        delay = s.sleep_seconds if sleep else s.wake_seconds
        log(f"sleeping (level {level}, {delay:g} s)" if sleep else f"waking ({delay:g} s)")
        time.sleep(delay)
        with self._cond:
            self.state = done
            if sleep:
                self.cycles += 1
            elif s.wake_broken:
                self.broken = True
            self._cond.notify_all()
            out = self.snapshot_locked()
        log(f"asleep (residue {out['residue_mib']} MiB)" if sleep else "awake")
        return out

    def snapshot_locked(self) -> dict[str, Any]:
        return {
            "is_sleeping": self.state == "asleep",
            "state": self.state,
            "level": self.level,
            "cycles": self.cycles,
            "residue_mib": self.residue_mib(),
        }


class _Server(ThreadingHTTPServer):
    # Handler threads must never keep the process alive past its exit.
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections at 10 concurrent clients.
    request_queue_size = 128
    ready_at: float = 0.0
    sleep: SleepState


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/is_sleeping":
            self._json(200, self.server.sleep.snapshot())
        elif path != "/health":
            self._answer(404, b"not found\n")
        elif self.server.sleep.broken:
            self._answer(503, b"broken after wake\n")
        # Compared here, not via a flag the main loop sets, so /health turns
        # 200 exactly when the load time is over, not one loop turn later.
        elif time.monotonic() >= self.server.ready_at:
            self._answer(200, b"ok\n")
        else:
            self._answer(503, b"loading\n")

    def do_POST(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if 0 < length <= 1 << 20 else b""
        if path in ("/sleep", "/wake_up"):
            self._sleep_or_wake(path == "/sleep", query)
        elif path not in OPENAI_PATHS:
            self._answer(404, b"not found\n")
        elif time.monotonic() < self.server.ready_at:
            self._json(503, {"error": {"message": "loading", "type": "unavailable"}})
        elif self.server.sleep.state != "awake":
            self._json(503, {"error": {"message": f"model is {self.server.sleep.state}", "type": "unavailable"}}, retry_after=1)
        else:
            try:
                doc = json.loads(body or b"null")
                if not isinstance(doc, dict):
                    raise ValueError("the body must be a JSON object")
                answer = openai_answer(path, doc)
            except ValueError as err:
                self._json(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
                return
            delay = _token_seconds()
            if doc.get("stream") is True and path == "/v1/chat/completions":
                self._stream(doc, delay)
            else:
                time.sleep(delay * _max_tokens(doc))
                self._json(200, answer)

    def _sleep_or_wake(self, sleep: bool, query: str) -> None:
        if time.monotonic() < self.server.ready_at:
            self._json(503, {"error": {"message": "loading", "type": "unavailable"}}, retry_after=1)
            return
        level_text = parse_qs(query).get("level", ["1"])[0]
        if sleep and level_text not in ("1", "2"):
            self._json(400, {"error": {"message": f"level must be 1 or 2, got {level_text!r}", "type": "invalid_request_error"}})
            return
        status = self.server.sleep.settings.sleep_status
        if sleep and status != 200:
            self._json(status, {"error": {"message": "sleep failed (STANDIN_SLEEP_STATUS)", "type": "server_error"}})
            return
        self._json(200, self.server.sleep.go(sleep, int(level_text) if sleep else 0))

    def _json(self, status: int, doc: Any, retry_after: int | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, doc: dict[str, Any], delay: float) -> None:
        # Chunked (HTTP/1.1), so a reader can tell a killed server from the end.
        self.protocol_version = "HTTP/1.1"
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        model = str(doc.get("model"))
        events = [chat_chunk(model, {"role": "assistant", "content": ""}, None)]
        events += [chat_chunk(model, {"content": f"tok{i} "}, None) for i in range(_max_tokens(doc))]
        events.append(chat_chunk(model, {}, "stop"))
        for i, event in enumerate(events):
            if 0 < i < len(events) - 1:
                time.sleep(delay)
            self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # health polls every 100 ms would drown the lines that matter


OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/images/generations"})


def _token_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("STANDIN_TOKEN_SECONDS", "0") or 0))
    except ValueError:
        return 0.0


def _max_tokens(doc: dict[str, Any]) -> int:
    n = doc.get("max_tokens", 8)
    return max(0, min(int(n), 100_000)) if isinstance(n, int) and not isinstance(n, bool) else 8


def chat_chunk(model: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": [choice]}


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG, written by hand (no PIL here)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")


def openai_answer(path: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The non-streamed answer to an OpenAI-shaped request; ValueError names a bad field."""
    model = doc.get("model")
    if not isinstance(model, str) and path != "/v1/images/generations":
        raise ValueError("model is required and must be a string")
    n = _max_tokens(doc)
    text = "".join(f"tok{i} " for i in range(n))
    usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
    created = int(time.time())
    if path == "/v1/chat/completions":
        if not isinstance(doc.get("messages"), list):
            raise ValueError("messages is required and must be a list")
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
    if path == "/v1/completions":
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        return {"id": "cmpl-standin", "object": "text_completion", "created": created, "model": model, "choices": [choice], "usage": usage}
    if path == "/v1/embeddings":
        inputs = doc.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise ValueError("input is required: a string or a list of strings")
        data = []
        for i, item in enumerate(inputs):
            digest = hashlib.sha256(str(item).encode()).digest()
            data.append({"object": "embedding", "index": i, "embedding": [b / 255.0 for b in digest[:8]]})
        return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}
    prompt = doc.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt is required and must be a non-empty string")
    count = doc.get("n", 1)
    if not isinstance(count, int) or not 1 <= count <= 10:
        raise ValueError("n must be an integer 1-10")
    png = base64.b64encode(tiny_png()).decode()
    return {"created": created, "data": [{"b64_json": png, "revised_prompt": prompt} for _ in range(count)]}


def run(settings: Settings) -> int:
    """Serve until stopped or crashed; return the exit status (a crash exits
    the process directly, like a real crash would)."""
    t0 = time.monotonic()
    handler: type[_Handler] = _Handler
    if os.environ.get("STANDIN_KEEPALIVE", "").strip() == "1":
        handler = _KeepAliveHandler
    try:
        server = _Server((settings.host, settings.port), handler)
    except OSError as err:
        log(f"cannot listen on {settings.host}:{settings.port}: {err.strerror or err}")
        return EXIT_CANNOT_LISTEN
    server.ready_at = t0 + settings.load_seconds
    server.sleep = SleepState(settings)
    port = server.server_address[1]

    # No Python signal handlers: they run only in the main thread, and a
    # signal the kernel hands to another thread (the HTTP threads) would not
    # wake a main thread blocked on a lock -- the stop would wait forever.
    # Instead the stop signals are blocked before any thread exists (threads
    # inherit the mask) and the main loop takes them with sigtimedwait, which
    # dequeues a process-wide pending signal whichever thread it was aimed at.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    if settings.ignore_sigterm:
        for sig in stop_signals:
            signal.signal(sig, signal.SIG_IGN)
        log("ignoring SIGTERM and SIGINT")
    else:
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)

    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="standin-http", daemon=True)
    serving.start()
    log(f"loading ({settings.load_text} s)")

    ready_logged = False
    stop_at: float | None = None
    stopped_by: str | None = None
    closer: threading.Thread | None = None
    crash_at = t0 + settings.crash_after_seconds if settings.crash_after_seconds is not None else None
    while True:
        now = time.monotonic()
        # Said before a stop taken in the same turn: /health has answered 200
        # since ready_at, even when this thread wakes late (a loaded machine)
        # and finds the stop signal already waiting.
        if not ready_logged and stop_at is None and now >= server.ready_at:
            ready_logged = True
            log(f"ready on :{port}")
        if stopped_by is not None and stop_at is None:
            log(f"got {stopped_by}, stopping in {settings.stop_text} s")
            stop_at = now + settings.stop_seconds
            # Close the port right away (the image kills its httpd first), in
            # a thread so a zero stop time is not stretched by the shutdown.
            closer = threading.Thread(target=_close, args=(server,), name="standin-close", daemon=True)
            closer.start()
        if crash_at is not None and now >= crash_at:
            log(f"crashing with exit code {settings.exit_code}")
            sys.stdout.flush()
            os._exit(settings.exit_code)
        if stop_at is not None and now >= stop_at:
            if closer is not None:
                closer.join(timeout=1.0)
            log("stopped")
            return 0
        deadlines = [d for d in (crash_at, stop_at, None if ready_logged else server.ready_at) if d is not None and d > now]
        timeout = min(deadlines) - now if deadlines else 3600.0
        if settings.ignore_sigterm:
            time.sleep(timeout)
        else:
            info = signal.sigtimedwait(stop_signals, timeout)
            # A wait cut by SIGSTOP/SIGCONT (a paused start) can come back
            # with a record whose si_signo is not a signal at all: only a
            # stop signal stops, anything else is one more turn.
            signo = info.si_signo if info is not None else None
            if signo in stop_signals and stopped_by is None:
                stopped_by = signal.Signals(signo).name


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle the second waits for
    # the client's delayed ACK (40 ms) on a kept connection.
    disable_nagle_algorithm = True


def _close(server: _Server) -> None:
    server.shutdown()
    server.server_close()


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as err:
        log(str(err))
        return EXIT_BAD_SETTING
    return run(settings)


if __name__ == "__main__":
    raise SystemExit(main())
