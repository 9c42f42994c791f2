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

Log lines go to stdout, flushed one by one, so a log file shows them at once::

    standin: loading (N s)
    standin: ready on :PORT
    standin: got SIGTERM, stopping in N s
    standin: stopped
    standin: crashing with exit code N

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


class _Server(ThreadingHTTPServer):
    # Handler threads must never keep the process alive past its exit.
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections at 10 concurrent clients.
    request_queue_size = 128
    ready_at: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/health":
            self._answer(404, b"not found\n")
        # Compared here, not via a flag the main loop sets, so /health turns
        # 200 exactly when the load time is over, not one loop turn later.
        elif time.monotonic() >= self.server.ready_at:
            self._answer(200, b"ok\n")
        else:
            self._answer(503, b"loading\n")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if 0 < length <= 1 << 20 else b""
        if path not in OPENAI_PATHS:
            self._answer(404, b"not found\n")
        elif time.monotonic() < self.server.ready_at:
            self._json(503, {"error": {"message": "loading", "type": "unavailable"}})
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

    def _json(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
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
    handler = _Handler
    if os.environ.get("STANDIN_KEEPALIVE", "").strip() == "1":
        # TCP_NODELAY: headers and body go out in two writes; with Nagle the
        # second waits for the client's delayed ACK (40 ms) on a kept connection.
        handler = type("_KeepAliveHandler", (_Handler,), {"protocol_version": "HTTP/1.1", "disable_nagle_algorithm": True})
    try:
        server = _Server((settings.host, settings.port), handler)
    except OSError as err:
        log(f"cannot listen on {settings.host}:{settings.port}: {err.strerror or err}")
        return EXIT_CANNOT_LISTEN
    server.ready_at = t0 + settings.load_seconds
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
        if not ready_logged and stop_at is None and now >= server.ready_at:
            ready_logged = True
            log(f"ready on :{port}")
        deadlines = [d for d in (crash_at, stop_at, None if ready_logged else server.ready_at) if d is not None and d > now]
        timeout = min(deadlines) - now if deadlines else 3600.0
        if settings.ignore_sigterm:
            time.sleep(timeout)
        else:
            info = signal.sigtimedwait(stop_signals, timeout)
            if info is not None and stopped_by is None:
                stopped_by = signal.Signals(info.si_signo).name


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
