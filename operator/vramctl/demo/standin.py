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

Any other path answers 404. Bad settings exit 2; a port that cannot be bound
exits 70, both with a ``standin:`` line saying why.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # health polls every 100 ms would drown the lines that matter


def run(settings: Settings) -> int:
    """Serve until stopped or crashed; return the exit status (a crash exits
    the process directly, like a real crash would)."""
    t0 = time.monotonic()
    try:
        server = _Server((settings.host, settings.port), _Handler)
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
