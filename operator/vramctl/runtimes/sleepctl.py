"""Asking a model server to sleep, to wake, and whether it sleeps.

The HTTP side of warm switching, nothing more: one request per call, bounded
by a timeout, with every failure raised as ``SleepCallError`` whose ``reason``
says which kind (the worker maps reasons to its fall-back to a stop). It does
not decide whether a sleep *worked*: a server can answer 200 and keep its
memory (vLLM with expandable segments; a ``/sleep`` during decoding that
crashed the engine), so the caller confirms every sleep with the GPU probe.

Standard library only (``http.client``), loopback or any host the spec
names; no retries (the caller's loop owns time). Beside the calls, three pure
helpers for the worker's checks: ``held_mib`` (what a model holds in a GPU
snapshot, per process or device level), ``residue_growing`` (a leak across
cycles) and ``fallback_reason`` (a failed call as a SleepFallback reason).
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args
from urllib.parse import urlsplit

from vramctl.observed import GpuSnapshot
from vramctl.spec.engines import SleepApi
from vramctl.spec.models import DeploymentSpec

Reason = Literal["unreachable", "timeout", "status", "answer"]
# Why a warm switch went the cold way (the SleepFallback Event's reason, the metric's label).
FallbackReason = Literal[
    "SleepFailed",  # /sleep answered an error or nothing
    "SleepTimeout",  # /sleep or the memory drop took too long
    "ResidueOverLimit",  # asleep, but holding more than maxResidueMiB
    "ResidueGrowing",  # each cycle leaves more behind
    "WakeFailed",  # /wake_up failed, or the model was not healthy in time after it
    "MaxCycles",  # sleep.maxCycles reached
    "CheckpointRefused",  # the driver cannot checkpoint it (no API, WSL2, managed or shared memory), or host memory would not hold it
]
# Bodies longer than this are cut in messages and never parsed.
MAX_BODY = 1 << 16


class SleepCallError(Exception):
    """A sleep, wake or state request that did not succeed.

    ``reason``: ``unreachable`` (no connection, reset), ``timeout`` (no
    answer within the timeout), ``status`` (a non-2xx answer: ``status`` and
    ``retry_after`` are set) or ``answer`` (a 2xx answer that is not what the
    API promises).
    """

    def __init__(self, message: str, reason: Reason, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Reply:
    """A successful answer: its status, the JSON body (None when not JSON) and how long it took."""

    status: int
    body: Any = None
    seconds: float = 0.0

    @property
    def residue_mib(self) -> int | None:
        """``residue_mib`` where the server reports it (vramctl's stand-ins; not vLLM)."""
        value = self.body.get("residue_mib") if isinstance(self.body, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class SleepTarget:
    """Where and how one model sleeps: its server's base URL, API and level."""

    model: str
    base_url: str
    api: SleepApi
    level: int
    max_residue_mib: int
    max_cycles: int | None = None


def target_of(spec: DeploymentSpec, model: str) -> SleepTarget | None:
    """The sleep target of ``model``; None when its switchStrategy is stop.

    The base URL is ``http://<health host>:<port>``: the model's health check
    (its own or its engine's), which is how vramctl already reaches the
    server from where it runs (loopback with host networking or the process
    runtime; a published port otherwise).
    """
    m = spec.models[model]
    api = m.sleep_api
    if api is None:
        return None
    health = spec.health_of(model)
    rendering = m.rendering()
    host = health.host if health is not None else rendering.health_host
    port = health.port if health is not None and health.port is not None else rendering.port
    if port is None:
        return None  # validation makes this unreachable: a sleeping container needs health.port
    s = m.sleep_settings
    return SleepTarget(model, f"http://{_host(host)}:{port}", api, s.level, s.max_residue_mib, s.max_cycles)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def sleep(base_url: str, api: SleepApi, level: int, timeout: float) -> Reply:
    """POST the sleep request at ``level``; returns once the server answered 2xx.

    vLLM and the SDXL server answer after the weights moved, so ``timeout``
    must cover the copy (pinned: well under a second per 10 GiB; pageable
    host memory: 10 s and more).
    """
    return _call("POST", base_url, api.sleep_target(level), timeout)


def wake(base_url: str, api: SleepApi, timeout: float) -> Reply:
    """POST the wake request; returns once the server answered 2xx (it may
    still need its health check to pass before it serves)."""
    return _call("POST", base_url, api.wake_path, timeout)


def is_sleeping(base_url: str, api: SleepApi, timeout: float) -> bool | None:
    """Whether the server says it sleeps; None when the API has no state path.

    Raises SleepCallError when it cannot be asked or answers something else
    than ``{"is_sleeping": true|false}``.
    """
    if api.state_path is None:
        return None
    reply = _call("GET", base_url, api.state_path, timeout)
    value = reply.body.get("is_sleeping") if isinstance(reply.body, dict) else None
    if not isinstance(value, bool):
        raise SleepCallError(f'GET {base_url}{api.state_path} answered {reply.body!r}, not {{"is_sleeping": true|false}}', "answer")
    return value


def state(base_url: str, api: SleepApi, timeout: float) -> Reply | None:
    """The raw answer of the state path (for the residue a stand-in reports); None without a state path."""
    if api.state_path is None:
        return None
    return _call("GET", base_url, api.state_path, timeout)


def asleep_residue(deployment: Callable[[], DeploymentSpec], timeout: float = 0.5) -> Callable[[str], int | None]:
    """For the simulated GPU: ``residue(model)`` asks the model's server
    whether it sleeps and returns what it keeps on the GPU while it does
    (the ``residue_mib`` the stand-ins report, else its ``maxResidueMiB``);
    None while awake, going to sleep, waking, unreachable, or not sleepable:
    the simulated GPU then counts the model's whole reservation."""

    def residue(model: str) -> int | None:
        spec = deployment()
        if model not in spec.models:
            return None
        target = target_of(spec, model)
        if target is None:
            return None
        try:
            reply = state(target.base_url, target.api, timeout)
        except SleepCallError:
            return None
        if reply is None or not isinstance(reply.body, dict) or reply.body.get("is_sleeping") is not True:
            return None
        reported = reply.residue_mib
        return reported if reported is not None else target.max_residue_mib

    return residue


def _call(method: str, base_url: str, target: str, timeout: float) -> Reply:
    url = urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"base_url must be http://host:port, got {base_url!r}")
    what = f"{method} {base_url.rstrip('/')}{target}"
    start = time.monotonic()
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    try:
        conn.request(method, target, body=b"" if method == "POST" else None, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        raw = resp.read(MAX_BODY + 1)
    except TimeoutError:
        raise SleepCallError(f"{what}: no answer within {timeout:g} s", "timeout") from None
    except (OSError, http.client.HTTPException) as err:
        raise SleepCallError(f"{what}: {err or type(err).__name__}", "unreachable") from None
    finally:
        conn.close()
    seconds = time.monotonic() - start
    text = raw[:MAX_BODY].decode("utf-8", "replace")
    if not 200 <= resp.status < 300:
        retry = _retry_after(resp.getheader("Retry-After"))
        raise SleepCallError(f"{what}: HTTP {resp.status} {text[:200].strip()}", "status", status=resp.status, retry_after=retry)
    body: Any = None
    if raw and len(raw) <= MAX_BODY:
        try:
            body = json.loads(text)
        except ValueError:
            body = None
    return Reply(resp.status, body, seconds)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def held_mib(snap: GpuSnapshot, model: str, baseline_mib: int, others_mib: int = 0) -> int:
    """MiB ``model`` holds in ``snap``: the sum of its processes where the probe
    reports per-process memory; else (WSL2, a process without a figure) the
    device's used memory over ``baseline_mib`` less ``others_mib`` (what the
    other models on the GPU are known to hold), never below 0.

    A model with no process in a per-process snapshot holds 0.
    """
    procs = snap.processes
    if procs is not None:
        mine = [p for p in procs if p.model == model]
        if all(p.used_mib is not None for p in mine):
            return sum(p.used_mib or 0 for p in mine)
    return max(0, snap.memory.used_mib - baseline_mib - others_mib)


def residue_growing(previous: list[int], now: int, tolerance_mib: int = 128) -> bool:
    """True when ``now`` (this sleep's residue) exceeds the first residue seen
    by more than ``tolerance_mib`` and is the highest yet: memory left behind
    by every cycle (the Blackwell leak), not the noise of one measurement."""
    if not previous:
        return False
    return now > previous[0] + tolerance_mib and now >= max(previous)


def fallback_reason(err: SleepCallError, waking: bool) -> FallbackReason:
    """The SleepFallback reason of a failed sleep (``waking`` False) or wake
    call; a checkpoint's error carries its own (``checkpoint.CheckpointError``)."""
    own = getattr(err, "fallback", None)
    if own in get_args(FallbackReason):
        return cast(FallbackReason, own)
    if waking:
        return "WakeFailed"
    return "SleepTimeout" if err.reason == "timeout" else "SleepFailed"
