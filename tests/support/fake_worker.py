"""A fake worker thread that owns one ``HoldDesk``: commands in through
``post``, ticks, switches that take ``switch_seconds``; it records the
switches, the companion starts and any switch made while a hold was live."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from vramctl.demand import policy as dq
from vramctl.demand.desk import HoldDesk


@dataclass
class FakeWorker:
    """Owns one desk on its thread: commands in, tick, switches take ``switch_seconds``."""

    desk: HoldDesk
    switch_seconds: float = 0.05
    inbox: queue.Queue[object] = field(default_factory=queue.Queue)
    switches: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    companions: list[tuple[str, ...]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def post(self, gpu: str, cmd: object) -> None:
        assert gpu == "0"
        self.inbox.put(cmd)

    def run(self, stop: threading.Event) -> None:
        switching: tuple[float, dq.Target] | None = None
        wake: float | None = None
        while not stop.is_set():
            deadlines = [t for t in (wake, switching[0] if switching else None) if t is not None]
            timeout = max(0.0, min(deadlines) - self.now()) if deadlines else 0.05
            try:
                cmd = self.inbox.get(timeout=min(timeout, 0.05))
            except queue.Empty:
                cmd = None
            now = self.now()
            if cmd is not None:
                self.desk.handle(cmd, now)  # type: ignore[arg-type]
            if switching is not None and switching[0] <= now:
                self.desk.switch_done(switching[1], now)
                switching = None
            live = {h.id for h in self.desk.state.holds if h.live(now)}
            d = self.desk.tick(now)
            if d.companions is not None:
                self.companions.append(d.companions)
                self.desk.companions_done(d.companions, now)  # a light start is quick here
                d = self.desk.tick(now)
            if d.switch_to is not None:
                if live - set(d.revoke) - set(d.expire):
                    self.violations.append(f"{now:.3f}: switch to {d.switch_to.model} while {live} held")
                self.switches.append(d.switch_to.model)
                switching = (now + self.switch_seconds, d.switch_to)
            wake = d.wake_at
