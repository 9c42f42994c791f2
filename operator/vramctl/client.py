"""Hold a model from an application: ``with vramctl.client.hold("sdxl"): ...``.

The users' ModelManager switched the GPU itself and nothing stopped a second
client from switching it away mid-image. A hold asks vramctl instead:
``POST /holds`` answers once the model is active and healthy, and until the
hold is released (or its ttl runs out un-renewed) vramctl does not switch
away, except after its drain timeout, which revokes the hold.

    with hold("sdxl", url="http://127.0.0.1:9400", ttl=120) as h:
        draw()          # h.lost tells whether vramctl took the GPU back

    async with ahold("llm") as h:
        await plan()

The protocol (vramctl's HTTP API):

- ``POST /holds {"model", "ttlSeconds", "companions"}`` -> 200 ``{"id"}``;
  503 with ``Retry-After`` (queue full, queue timeout) is retried until
  ``wait`` seconds have passed; any other status raises ``HoldRefused``.
- ``POST /holds/{id}/renew`` every ttl/3, in a thread (sync) or a task
  (async); 409 (revoked by a drain timeout) or 404 (expired) marks the hold
  lost and stops renewing.
- ``DELETE /holds/{id}`` on leaving the block; 404 counts as released.

Standard library only for ``hold``; ``ahold`` needs aiohttp. Imports nothing
else of vramctl: applications may vendor this one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_URL = "http://127.0.0.1:9400"
DEFAULT_TTL = 120.0
DEFAULT_WAIT = 600.0
MIN_RETRY = 0.05  # a floor against a busy loop; vramctl sends whole seconds


class HoldError(Exception):
    """Base of the client's errors."""


class HoldRefused(HoldError):
    """vramctl did not grant the hold: ``status`` (503 after the deadline,
    409 in declared mode, 404 unknown model, ...) and its message."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"hold refused ({status}): {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


class HoldLost(HoldError):
    """The hold ended before it was released (revoked or expired)."""


@dataclass
class Hold:
    """A granted hold. ``lost`` is set (with ``lost_reason``) when a renew
    answered 409 or 404: the GPU may already serve another model."""

    id: str
    model: str
    ttl: float
    lost: threading.Event = field(default_factory=threading.Event)
    lost_reason: str | None = None
    renewals: int = 0

    def check(self) -> None:
        """Raise ``HoldLost`` if the hold has ended."""
        if self.lost.is_set():
            raise HoldLost(f"hold {self.id} on {self.model} was lost: {self.lost_reason}")

    def _lose(self, status: int, message: str) -> None:
        self.lost_reason = f"{'revoked' if status == 409 else 'expired'} ({status}): {message}"
        self.lost.set()


def _body(model: str, ttl: float, companions: Sequence[str]) -> bytes:
    return json.dumps({"model": model, "ttlSeconds": ttl, "companions": list(companions)}).encode()


def _message(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace").strip()[:500]
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return str(doc)[:500]


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: not sent by vramctl


def _grant_id(status: int, raw: bytes) -> str:
    doc = json.loads(raw)
    hold_id = doc.get("id") if isinstance(doc, dict) else None
    if not isinstance(hold_id, str) or not hold_id:
        raise HoldRefused(status, f"the answer has no hold id: {raw[:200]!r}")
    return hold_id


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"ttl must be positive seconds, got {ttl}")


# -- sync ------------------------------------------------------------------------


class _Http:
    """One HTTP/1.1 request at a time, a fresh connection each (renewals are rare)."""

    def __init__(self, url: str, token: str | None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host:port, got {url!r}")
        self.parts = parts
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, dict[str, str], bytes]:
        cls = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.parts.hostname or "", self.parts.port, timeout=timeout)
        try:
            conn.request(method, self.parts.path.rstrip("/") + path, body=body if body is not None else b"", headers=self.headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


def acquire(
    model: str,
    *,
    url: str = DEFAULT_URL,
    ttl: float = DEFAULT_TTL,
    companions: Sequence[str] = (),
    token: str | None = None,
    wait: float = DEFAULT_WAIT,
) -> Hold:
    """``POST /holds`` until granted or ``wait`` seconds passed (503s retried
    after their Retry-After). Prefer ``hold``, which also renews and releases."""
    _check_ttl(ttl)
    http_ = _Http(url, token)
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        # The answer comes when the model is up: allow the whole wait for it.
        status, headers, raw = http_.request("POST", "/holds", _body(model, ttl, companions), timeout=max(left, 1.0) + 30)
        if status == 200:
            return Hold(_grant_id(status, raw), model, ttl)
        retry = _retry_after(headers.get("retry-after"))
        left = deadline - time.monotonic()
        if status != 503 or left <= 0:
            raise HoldRefused(status, _message(raw), retry)
        time.sleep(min(max(retry or 1.0, MIN_RETRY), left))


def _renew_loop(http_: _Http, h: Hold, stop: threading.Event) -> None:
    while not stop.wait(h.ttl / 3):
        try:
            status, _, raw = http_.request("POST", f"/holds/{h.id}/renew", b"", timeout=max(h.ttl / 3, 1.0))
        except OSError:
            continue  # vramctl unreachable for a moment: the next tick tries again, the ttl has room for two misses
        if status in (404, 409):
            h._lose(status, _message(raw))
            return
        if status == 200:
            h.renewals += 1


def release(h: Hold, *, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 10.0) -> None:
    """``DELETE /holds/{id}``; an already ended hold counts as released."""
    status, _, raw = _Http(url, token).request("DELETE", f"/holds/{h.id}", None, timeout)
    if status not in (200, 204, 404, 409):
        raise HoldError(f"releasing hold {h.id} failed ({status}): {_message(raw)}")


@contextlib.contextmanager
def hold(
    model: str,
    *,
    url: str = DEFAULT_URL,
    ttl: float = DEFAULT_TTL,
    companions: Sequence[str] = (),
    token: str | None = None,
    wait: float = DEFAULT_WAIT,
) -> Iterator[Hold]:
    """Hold ``model`` for the block: acquired on entry (raises ``HoldRefused``),
    renewed every ttl/3 by a daemon thread, released on exit (exceptions too)."""
    h = acquire(model, url=url, ttl=ttl, companions=companions, token=token, wait=wait)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_loop, args=(_Http(url, token), h, stop), name=f"vramctl-hold-{h.id}", daemon=True)
    renewer.start()
    try:
        yield h
    finally:
        stop.set()
        renewer.join(timeout=5)
        release(h, url=url, token=token)


# -- async -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ahold(
    model: str,
    *,
    url: str = DEFAULT_URL,
    ttl: float = DEFAULT_TTL,
    companions: Sequence[str] = (),
    token: str | None = None,
    wait: float = DEFAULT_WAIT,
    session: Any = None,
) -> AsyncIterator[Hold]:
    """``hold`` for asyncio applications (aiohttp; pass your own ``session``
    to share its connection pool). Cancelling the acquire (the caller went
    away) closes the request, which withdraws the demand."""
    import aiohttp

    _check_ttl(ttl)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base = url.rstrip("/")
    own = session is None
    s: aiohttp.ClientSession = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) if own else session
    try:
        deadline = time.monotonic() + wait
        while True:
            async with s.post(base + "/holds", data=_body(model, ttl, companions), headers=headers) as resp:
                raw = await resp.read()
                if resp.status == 200:
                    h = Hold(_grant_id(resp.status, raw), model, ttl)
                    break
                retry = _retry_after(resp.headers.get("Retry-After"))
                left = deadline - time.monotonic()
                if resp.status != 503 or left <= 0:
                    raise HoldRefused(resp.status, _message(raw), retry)
            await asyncio.sleep(min(max(retry or 1.0, MIN_RETRY), left))

        async def renew() -> None:
            while True:
                await asyncio.sleep(ttl / 3)
                try:
                    async with s.post(f"{base}/holds/{h.id}/renew", headers=headers) as r:
                        raw = await r.read()
                        if r.status in (404, 409):
                            h._lose(r.status, _message(raw))
                            return
                        if r.status == 200:
                            h.renewals += 1
                except (aiohttp.ClientError, OSError):
                    continue

        renewer = asyncio.create_task(renew(), name=f"vramctl-hold-{h.id}")
        try:
            yield h
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            async with s.delete(f"{base}/holds/{h.id}", headers=headers) as r:
                if r.status not in (200, 204, 404, 409):
                    raise HoldError(f"releasing hold {h.id} failed ({r.status}): {_message(await r.read())}")
    finally:
        if own:
            await s.close()


# -- the command line: hold a model for a command's life ------------------------------


def run_held(
    model: str,
    command: Sequence[str],
    *,
    url: str = DEFAULT_URL,
    ttl: float = DEFAULT_TTL,
    companions: Sequence[str] = (),
    token: str | None = None,
    wait: float = DEFAULT_WAIT,
) -> int:
    """Run ``command`` while holding ``model``; its exit status (128 + N when
    killed by signal N). SIGINT and SIGTERM are passed on to it; the hold is
    released when it ends. A hold lost meanwhile is reported on stderr."""
    import signal
    import subprocess
    import sys

    with hold(model, url=url, ttl=ttl, companions=companions, token=token, wait=wait) as h:
        proc = subprocess.Popen(list(command))
        forward = {sig: signal.signal(sig, lambda s, _f: proc.send_signal(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
        finally:
            for sig, previous in forward.items():
                signal.signal(sig, previous)
        if h.lost.is_set():
            sys.stderr.write(f"vramctl hold: the hold on {model} was lost while the command ran: {h.lost_reason}\n")
    return 128 - rc if rc < 0 else rc


def main(argv: Sequence[str] | None = None) -> int:
    """``vramctl hold MODEL [--ttl S] [--url URL] [--companions a,b] [--wait S] -- COMMAND...``
    (everything after ``--`` is the command)."""
    import argparse
    import os
    import sys

    ap = argparse.ArgumentParser(prog="vramctl hold", description="Hold MODEL on its GPU while COMMAND runs.")
    ap.add_argument("model")
    ap.add_argument(
        "--url", default=os.environ.get("VRAMCTL_URL", DEFAULT_URL), help=f"vramctl's API (default {DEFAULT_URL}, or VRAMCTL_URL)"
    )
    ap.add_argument("--ttl", type=float, default=DEFAULT_TTL, help="seconds a hold lives un-renewed (renewed every ttl/3)")
    ap.add_argument("--companions", default="", help="light models to run beside it, comma-separated")
    ap.add_argument("--wait", type=float, default=DEFAULT_WAIT, help="give up after this many seconds of 503s")
    ap.add_argument("--token", default=None, help="bearer token (or VRAMCTL_TOKEN)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        ap.error("give the command after --, e.g. vramctl hold sdxl -- python draw.py")
    cut = argv.index("--")
    args = ap.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    if not command:
        ap.error("give the command after --, e.g. vramctl hold sdxl -- python draw.py")
    try:
        return run_held(
            args.model,
            command,
            url=args.url,
            ttl=args.ttl,
            companions=[c for c in args.companions.split(",") if c],
            token=args.token or os.environ.get("VRAMCTL_TOKEN") or None,
            wait=args.wait,
        )
    except HoldRefused as exc:
        sys.stderr.write(f"vramctl hold: {exc}\n")
        return 75  # EX_TEMPFAIL: try again later
    except (HoldError, OSError, ValueError) as exc:
        sys.stderr.write(f"vramctl hold: {exc}\n")
        return 69  # EX_UNAVAILABLE


if __name__ == "__main__":
    raise SystemExit(main())
