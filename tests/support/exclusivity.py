"""The heavy-exclusivity invariant, recorded from the Docker engine's events.

``ExclusivityRecorder`` follows docker events for every vramctl-labelled
container and records each time two heavy containers hold one GPU of one
instance (or compose project) at once. The ``exclusivity`` fixture of
tests/conftest.py runs one per session; every test under tests/docker and
tests/e2e is checked by its autouse guard.

Holding = running, not paused and not asleep. A heavy container whose server
says it sleeps (the stand-in's ``GET /is_sleeping`` on its STANDIN_PORT, asked
when another heavy container begins holding) keeps only a residue: it is
not counted (a wake is not a docker event: the worker's own exclusivity
metric covers a wake beside an awake model). A heavy container that is started and
paused within ``GATE_WINDOW`` seconds was *gated* (vramctl froze a start made
behind its back before it could allocate): it holds nothing during that
window, and the start->pause delay is recorded as a gate latency.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# `import docker.errors` also binds `docker`; ruff would sort a bare `import docker`
# as first-party because of the tests/docker package.
import docker.errors

from tests.support.docker_engine import MANAGED


@dataclass(frozen=True)
class Violation:
    seq: int
    key: str  # vramctl instance, or compose project when there is no instance label
    gpu: str
    first: str  # container names
    second: str
    at: float  # unix time the overlap began
    detail: str

    def __str__(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.at)) + f".{int(self.at * 1000) % 1000:03d}"
        return f"[{self.key} gpu{self.gpu}] {self.first} and {self.second} both held the GPU at {when}: {self.detail}"


@dataclass
class _Span:
    cid: str
    name: str
    since: float
    until: float | None = None  # None: still holding


class ExclusivityRecorder:
    """Follows docker events; records overlapping heavy holders per (key, gpu).

    ``owns(key)``: whether this recorder answers for ``key`` (an xdist
    worker's recorder sees every worker's containers but answers only for the
    instances its own tests made); None: every key."""

    GATE_WINDOW = 1.0
    EVENT_WINDOW = 0.2
    # The daemon stamps an event before it publishes it, and a stream whose
    # ``until`` passes in between never delivers it (nor does the next
    # window, which starts after the stamp). Each window therefore reaches
    # back OVERLAP seconds (``_seen`` drops what came twice), and what has
    # been read counts as complete only up to OVERLAP before its end.
    OVERLAP = 0.3

    def __init__(self, client: docker.DockerClient, owns: Callable[[str], bool] | None = None) -> None:
        self._client = client
        self._owns = owns
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[tuple[str, str], str, float]] = {}  # cid -> (domain, name, start time)
        self._spans: dict[tuple[str, str], list[_Span]] = {}  # holding and recently released
        self._violations: list[Violation] = []
        self._seen: dict[tuple[str, str, float], float] = {}
        self._seq = 0
        self._ignored: set[str] = set()
        self.gate_latencies: list[tuple[str, float]] = []
        self.errors: list[str] = []
        self._through = 0.0
        self._stop = threading.Event()
        self._since = time.time()
        self._seed()
        self._thread = threading.Thread(target=self._run, name="exclusivity-recorder", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------

    @property
    def violations(self) -> list[Violation]:
        with self._lock:
            return list(self._violations)

    @property
    def max_gate_latency(self) -> float | None:
        with self._lock:
            return max((s for _, s in self.gate_latencies), default=None)

    @property
    def seq(self) -> int:
        with self._lock:
            return self._seq

    def violations_for(self, key: str) -> list[Violation]:
        return [v for v in self.violations if v.key == key]

    def holders(self, key: str, gpu: int | str = 0) -> list[str]:
        with self._lock:
            return [s.name for s in self._spans.get((key, str(gpu)), []) if s.until is None]

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every event up to now is processed and no start that
        happened before now is still inside its gate window."""
        asked = time.time()
        deadline = asked + timeout
        target = asked
        while time.time() < deadline:
            with self._lock:
                target = max([asked] + [t + self.GATE_WINDOW for _, _, t in self._pending.values() if t <= asked])
                if self._through >= target:
                    return
            time.sleep(0.02)
        raise AssertionError(f"exclusivity recorder lags: events processed until {self._through:.3f}, wanted {target:.3f}; {self.errors}")

    def assert_no_violations(self, key: str | None = None, since_seq: int = 0) -> None:
        self.settle()
        found = [v for v in self.violations if (key is None or v.key == key) and v.seq >= since_seq]
        if found:
            raise AssertionError("heavy exclusivity violated:\n  " + "\n  ".join(map(str, found)))

    def clear(self, key: str) -> None:
        """Forget the violations and state of ``key`` (a test that made them on
        purpose) and ignore that key from now on: late events of its removed
        containers must not resurrect the violation in another test's check."""
        with self._lock:
            self._ignored.add(key)
            self._violations = [v for v in self._violations if v.key != key]
            for dom in [d for d in self._spans if d[0] == key]:
                del self._spans[dom]
            for cid in [c for c, (dom, _, _) in self._pending.items() if dom[0] == key]:
                del self._pending[cid]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)

    # -- event handling -----------------------------------------------

    @staticmethod
    def _domain(labels: dict[str, str]) -> tuple[str, str] | None:
        if labels.get("app.kubernetes.io/managed-by") != "vramctl" or labels.get("vramctl.io/class", "heavy") == "light":
            return None
        key = labels.get("vramctl.io/instance") or labels.get("com.docker.compose.project")
        gpu = labels.get("vramctl.io/gpu")
        return (key, gpu) if key and gpu is not None else None

    def _seed(self) -> None:
        now = time.time()
        for c in self._client.containers.list(filters={"label": MANAGED, "status": "running"}, ignore_removed=True):
            dom = self._domain(c.labels)
            if dom is not None:
                self._spans.setdefault(dom, []).append(_Span(c.id, c.name, now))

    def _violate(self, dom: tuple[str, str], a: str, b: str, at: float, detail: str) -> None:
        if dom[0] in self._ignored or (self._owns is not None and not self._owns(dom[0])):
            return
        self._violations.append(Violation(self._seq, dom[0], dom[1], a, b, at, detail))
        self._seq += 1

    def _asleep(self, cid: str) -> bool:
        """Whether the container's stand-in says it sleeps (False when it cannot tell)."""
        try:
            env = self._client.containers.get(cid).attrs["Config"]["Env"] or []
            port = next(int(e.split("=", 1)[1]) for e in env if e.startswith("STANDIN_PORT="))
            if not any(e == "STANDIN_SLEEP=1" for e in env):
                return False
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/is_sleeping", timeout=0.5) as r:
                return json.loads(r.read()).get("is_sleeping") is True
        except Exception:
            return False

    def _check(self, dom: tuple[str, str], cid: str, name: str, since: float, until: float | None) -> None:
        """Record a violation for each other span of ``dom`` overlapping [since, until)."""
        for s in self._spans.get(dom, []):
            if s.cid == cid:
                continue
            if (
                (s.until is None or s.until > since)
                and (until is None or s.since < until)
                and not (s.until is None and self._asleep(s.cid))
            ):
                self._violate(dom, s.name, name, max(s.since, since), f"{name} began holding while {s.name} held since {s.since:.3f}")

    def _hold(self, dom: tuple[str, str], cid: str, name: str, since: float) -> None:
        self._check(dom, cid, name, since, None)
        self._spans.setdefault(dom, []).append(_Span(cid, name, since))

    def _release(self, cid: str, at: float) -> None:
        for spans in self._spans.values():
            for s in spans:
                if s.cid == cid and s.until is None:
                    s.until = at

    def _promote(self, now: float) -> None:
        for cid, (dom, name, t) in list(self._pending.items()):
            if t + self.GATE_WINDOW <= now:
                del self._pending[cid]
                self._hold(dom, cid, name, t)
        horizon = now - 10 * self.GATE_WINDOW
        for k in [k for k, t in self._seen.items() if t < horizon]:
            del self._seen[k]
        for dom, spans in self._spans.items():
            self._spans[dom] = [s for s in spans if s.until is None or s.until > horizon]

    def _handle(self, ev: dict[str, Any]) -> None:
        actor = ev.get("Actor") or {}
        attrs = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
        dom = self._domain(attrs)
        if dom is None:
            return
        cid = str(actor.get("ID") or ev.get("id"))
        name = attrs.get("name", cid[:12])
        action = str(ev.get("Action") or ev.get("status") or "")
        at = int(ev.get("timeNano") or 0) / 1e9 or time.time()
        if (cid, action, at) in self._seen:
            return  # delivered by two adjacent windows
        self._seen[(cid, action, at)] = at
        self._promote(at)
        if action == "start":
            self._pending[cid] = (dom, name, at)
        elif action == "pause":
            pending = self._pending.pop(cid, None)
            if pending is not None:
                self.gate_latencies.append((name, at - pending[2]))
            # Also a span opened by a resync for this container (its start
            # event, from the gap, came after the resync's listing).
            self._release(cid, at)
        elif action == "unpause":
            self._hold(dom, cid, name, at)
        elif action in ("die", "destroy"):
            pending = self._pending.pop(cid, None)
            if pending is not None:  # ran (ungated) from start to death
                self._check(dom, cid, name, pending[2], at)
                self._spans.setdefault(dom, []).append(_Span(cid, name, pending[2], at))
            self._release(cid, at)  # and any span a resync opened for it

    def _resync(self, broke: float | None = None) -> bool:
        """The event stream broke (a daemon restart): the events of the gap
        are lost, so start again from what holds a GPU now. With live-restore
        off, every container stopped with the daemon: spans end at the break.
        False: the daemon does not answer yet."""
        try:
            running = self._client.containers.list(filters={"label": MANAGED, "status": "running"}, ignore_removed=True)
        except Exception as err:
            self.errors.append(repr(err))
            return False
        now = time.time()
        with self._lock:
            for spans in self._spans.values():
                for sp in spans:
                    if sp.until is None:
                        sp.until = max(sp.since, broke if broke is not None else now)
            self._pending.clear()
            for c in running:
                dom = self._domain(c.labels)
                if dom is not None:
                    self._hold(dom, c.id, c.name, now)
        return True

    def _run(self) -> None:
        filters = {"type": "container", "label": MANAGED, "event": ["start", "pause", "unpause", "die", "kill", "stop", "destroy"]}
        since = self._since
        while not self._stop.is_set():
            until = time.time() + self.EVENT_WINDOW
            try:
                for ev in self._client.events(since=f"{since:.9f}", until=f"{until:.9f}", filters=filters, decode=True):
                    with self._lock:
                        self._handle(ev)
            except Exception as err:  # keep recording; report at the check
                self.errors.append(repr(err))
                # Resynced only once the daemon answers: a stream that works
                # again before a listing does would leave the spans of the
                # containers that died with the daemon open.
                broke = time.time()
                while not self._stop.wait(self.EVENT_WINDOW) and not self._resync(broke):
                    pass
            with self._lock:
                self._promote(until - self.OVERLAP)
                self._through = until - self.OVERLAP
            since = until - self.OVERLAP
