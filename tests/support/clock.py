"""Time that moves only when a test moves it: a worker's ``clock`` (and
``sleep``, for ``reconcile_once``), so that back-offs, drains, idle timers
and outage retries are waited out in no real time.

A worker on its loop thread waits on its inbox for at most the next look's
delay; ``until`` advances the clock a step at a time and pokes the worker,
so each step is one look at the new time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Protocol


class Pokeable(Protocol):
    def poke(self) -> None: ...


class ManualClock:
    """Monotonic seconds that advance only by ``advance`` (or ``sleep``)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)


def until(cond: Callable[[], bool], clock: ManualClock, worker: Pokeable, step: float = 0.1, timeout: float = 5.0) -> bool:
    """Advance ``clock`` by ``step`` and poke ``worker`` until ``cond()`` holds
    (at most ``timeout`` real seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        clock.advance(step)
        worker.poke()
        time.sleep(0.002)
    return cond()


async def until_async(cond: Callable[[], bool], clock: ManualClock, worker: Pokeable, step: float = 0.1, timeout: float = 5.0) -> bool:
    """``until`` inside an event loop (the clients' futures keep running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        clock.advance(step)
        worker.poke()
        await asyncio.sleep(0.002)
    return cond()
