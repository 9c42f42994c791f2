"""The exclusivity recorder itself (tests/conftest.py), fed a scripted event
stream: it must see real overlaps and must not invent one where a daemon
restart made it resync (the chaos run's case: the daemon's restart-policy
start of a container arrives after the resync already listed it running)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tests.support.exclusivity import ExclusivityRecorder

LABELS = {"app.kubernetes.io/managed-by": "vramctl", "vramctl.io/instance": "chaos", "vramctl.io/gpu": "0"}


@dataclass
class FakeContainer:
    id: str
    name: str
    labels: dict[str, str] = field(default_factory=lambda: dict(LABELS))


class FakeContainers:
    def __init__(self) -> None:
        self.running: list[FakeContainer] = []

    def list(self, **_: Any) -> list[FakeContainer]:
        return list(self.running)


class FakeClient:
    """Records nothing it is not asked; ``events`` waits out its window (no stream here)."""

    def __init__(self) -> None:
        self.containers = FakeContainers()

    def events(self, since: str, until: str, **_: Any) -> list[dict[str, Any]]:
        time.sleep(max(0.0, min(0.05, float(until) - time.time())))
        return []


def event(action: str, name: str, at: float) -> dict[str, Any]:
    return {"Action": action, "timeNano": int(at * 1e9), "Actor": {"ID": f"id-{name}", "Attributes": {**LABELS, "name": name}}}


def recorder() -> tuple[ExclusivityRecorder, FakeClient]:
    client = FakeClient()
    rec = ExclusivityRecorder(client)  # type: ignore[arg-type]
    rec.close()  # drive it by hand
    return rec, client


def test_a_resync_span_ends_with_the_containers_death_even_when_its_start_event_comes_late() -> None:
    rec, client = recorder()
    t = time.time()
    client.containers.running = [FakeContainer("id-sdxl", "sdxl")]
    rec._resync()  # the daemon is back: sdxl (restarted by its policy) runs
    with rec._lock:
        rec._handle(event("start", "sdxl", t - 0.08))  # the gap's start event, delivered after the resync
        rec._handle(event("die", "sdxl", t + 0.5))  # vramctl stops it
        rec._handle(event("start", "llm", t + 0.7))
        rec._promote(t + 3.0)
    assert rec.violations == [] and rec.holders("chaos") == ["llm"]


def test_a_resync_span_ends_with_a_pause_too() -> None:
    rec, client = recorder()
    t = time.time()
    client.containers.running = [FakeContainer("id-img", "img")]
    rec._resync()
    with rec._lock:
        rec._handle(event("start", "img", t - 0.05))
        rec._handle(event("pause", "img", t + 0.02))  # gated
        rec._handle(event("start", "llm", t + 0.3))
        rec._promote(t + 3.0)
    assert rec.violations == [] and rec.holders("chaos") == ["llm"]


def test_a_real_overlap_is_still_seen() -> None:
    rec, _ = recorder()
    t = time.time()
    with rec._lock:
        rec._handle(event("start", "llm", t))
        rec._promote(t + 1.5)
        rec._handle(event("start", "sdxl", t + 2.0))  # not paused, llm still runs
        rec._handle(event("die", "sdxl", t + 2.5))
        rec._promote(t + 5.0)
    (v,) = rec.violations
    assert (v.first, v.second) == ("llm", "sdxl")


class LateDaemon(FakeClient):
    """A daemon that stamps one event just before a stream's ``until`` and
    publishes it after that stream closed: that stream never delivers it,
    and only a window reaching back before ``until`` can."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[dict[str, Any]] = []
        self.late: tuple[str, str, float] | None = None  # (action, name, not before)

    def events(self, since: str, until: str, **_: Any) -> list[dict[str, Any]]:
        s, u = float(since), float(until)
        time.sleep(max(0.0, min(0.25, u - time.time())))
        out = [e for e in self.log if s <= e["timeNano"] / 1e9 <= u]
        if self.late is not None and time.time() >= self.late[2]:
            action, name, _ = self.late
            self.late = None
            self.log.append(event(action, name, u - 0.01))  # stamped inside this window, published after it
        return out


def test_an_event_published_after_its_window_closed_is_still_read() -> None:
    client = LateDaemon()
    rec = ExclusivityRecorder(client)  # type: ignore[arg-type]
    try:
        t = time.time()
        client.log += [event("start", "holder", t), event("start", "newcomer", t + 0.01)]
        client.late = ("pause", "newcomer", t + 0.05)  # the gate's pause, published late
        time.sleep(0.2)
        rec.settle()
        assert rec.violations == [], rec.violations
        assert [name for name, _ in rec.gate_latencies] == ["newcomer"]
        assert rec.holders("chaos") == ["holder"]
    finally:
        rec.close()
