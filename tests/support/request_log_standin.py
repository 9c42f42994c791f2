"""The stand-in model server (``vramctl.demo.standin``) that also writes down
every model request it receives, and in which state it was then.

Run as a script (``python tests/support/request_log_standin.py``; the
process runtime starts it like any model command) with the stand-in's
``STANDIN_*`` settings plus ``STANDIN_REQUEST_LOG``: a file that gets one
JSON line per request to an OpenAI path::

    {"t": wall time, "pid": N, "model": VRAMCTL_MODEL, "path": "/v1/...", "state": "ready", "tag": "..."}

``state`` is the server's own view when the request arrived: ``loading``
(before its load time was over), ``asleep``/``sleeping``/``waking`` (its
sleep state), ``stopping`` (it had received SIGTERM or SIGINT) or
``ready``; ``tag``: the content of the request's first message (a test
names each request there). Beside the requests it writes ``{"t", "pid", "model", "event":
"started" | "stop-signal"}`` lines. A gateway that only ever proxies to a
server that is ready leaves nothing but ``ready`` requests.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from typing import Any

from vramctl.demo import standin

_LOG = os.environ.get("STANDIN_REQUEST_LOG", "")
_STOPPING = threading.Event()
_LOCK = threading.Lock()


def _write(doc: dict[str, Any]) -> None:
    if not _LOG:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "model": os.environ.get("VRAMCTL_MODEL", "?"), **doc}) + "\n"
    with _LOCK:
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write per line, O_APPEND: lines of several servers never interleave
        finally:
            os.close(fd)


_original_wait = signal.sigtimedwait


def _sigtimedwait(sigset: Any, timeout: float) -> Any:
    info = _original_wait(sigset, timeout)
    if info is not None and not _STOPPING.is_set():
        _STOPPING.set()
        _write({"event": "stop-signal"})
    return info


_original_post = standin._Handler.do_POST


def _do_post(self: Any) -> None:
    path = self.path.split("?", 1)[0]
    if path in standin.OPENAI_PATHS:
        if _STOPPING.is_set():
            state = "stopping"
        elif time.monotonic() < self.server.ready_at:
            state = "loading"
        elif self.server.sleep.state != "awake":
            state = str(self.server.sleep.state)
        else:
            state = "ready"
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if 0 < length <= 1 << 20 else b""
        _write({"path": path, "state": state, "tag": _tag(body)})
        kept = self.rfile
        self.rfile = io.BytesIO(body)  # the stand-in reads the body again from here
        try:
            _original_post(self)
        finally:
            self.rfile = kept  # the connection's next request comes from the socket again
        return
    _original_post(self)


def _tag(body: bytes) -> str:
    try:
        return str(json.loads(body)["messages"][0]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def main() -> int:
    signal.sigtimedwait = _sigtimedwait  # the stand-in takes its stop signals here (its main loop)
    standin._Handler.do_POST = _do_post  # type: ignore[method-assign]
    _write({"event": "started"})
    return standin.main()


if __name__ == "__main__":
    raise SystemExit(main())
