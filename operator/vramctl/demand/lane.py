"""The fast lane: a request for a model that is already served, with nothing
queued, is admitted on the gateway's own thread, without a round trip
through the worker's inbox.

Through the inbox every request costs two commands, two ticks and two
publishes on the worker's thread, and the event loop waits for the GIL
meanwhile: milliseconds per request. The lane is a counter under a lock.

Who decides stays the same. The worker opens the lane for the models that
``demand_queue.lane_models`` names (where the queue would grant at once
anyway) and closes it before every decision (``close`` returns what is in
flight, which the desk folds in as holds: ``demand_queue.lane_activity``),
so a switch, a drain or an idle action never starts while a request it did
not count could still get in. A request that finds the lane closed takes the
queue as before. When the last request of a model that the desk counted
ends, ``notify`` wakes the worker (a drain may be waiting for it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable


class FastLane:
    """Thread-safe; ``enter``/``leave`` on any thread, the rest on the worker's."""

    def __init__(self, notify: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._notify = notify
        self._clock = clock
        self._open: frozenset[str] = frozenset()
        self._in_flight: dict[str, int] = {}
        self._counted: set[str] = set()  # models whose requests the desk holds for: wake it when they end
        self.last_used: float | None = None

    def admit(self, model: str) -> LaneLease | None:
        """``enter`` as a lease for the gateway (``release`` once, when the request ends)."""
        return LaneLease(self, model) if self.enter(model) else None

    def enter(self, model: str) -> bool:
        """Admit a request for ``model`` if the lane is open for it; call ``leave`` once when it ends."""
        with self._lock:
            if model not in self._open:
                return False
            self._in_flight[model] = self._in_flight.get(model, 0) + 1
            return True

    def leave(self, model: str) -> None:
        with self._lock:
            left = self._in_flight.get(model, 0) - 1
            if left > 0:
                self._in_flight[model] = left
            else:
                self._in_flight.pop(model, None)
            self.last_used = self._clock()
            wake = left <= 0 and model in self._counted
            if wake:
                self._counted.discard(model)
        if wake:
            self._notify()

    def close(self) -> dict[str, int]:
        """Admit nothing more; what is in flight, per model (the desk now holds for those)."""
        with self._lock:
            self._open = frozenset()
            self._counted = set(self._in_flight)
            return dict(self._in_flight)

    def open(self, models: Iterable[str]) -> None:
        with self._lock:
            self._open = frozenset(models)

    def in_flight(self, model: str) -> int:
        with self._lock:
            return self._in_flight.get(model, 0)

    @property
    def admits(self) -> frozenset[str]:
        return self._open


class LaneLease:
    """A request admitted by the fast lane; ``release`` leaves the lane once."""

    def __init__(self, lane: FastLane, model: str) -> None:
        self.lane, self.model = lane, model
        self.released = False

    def release(self, error: str | None = None) -> None:
        if not self.released:
            self.released = True
            self.lane.leave(self.model)
