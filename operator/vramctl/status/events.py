"""The event journal: what the workers publish, as a bounded history of
events with increasing ids, for readers that follow it live (``GET /events``,
the status page, ``vramctl switch --wait``).

Why a journal and not a poll of ``/status``: the worker knows each step the
moment it happens (stopping, waiting for memory, starting, healthy, asleep,
woken, fall-backs), and a poll either misses steps between two looks or
costs a request per look. Each event has an id one above the previous one;
a reader that lost its connection asks for what followed its last id and
gets exactly that (no gap, no duplicate) while the id is still in the
history, or learns that it must start over from the current view.

Bounds, whatever the readers do: the history keeps ``capacity`` events;
each subscriber buffers at most ``limit`` events and is *dropped* (its
buffer emptied, ``dropped`` set) when it falls further behind: a slow
reader never makes the journal hold more. Writers are the workers' loop
threads (and a memory sampler); readers any thread. One lock guards the
whole, and subscribers are woken outside it.

Pure but for the wall clock, which is passed in: no I/O, no event loop.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CAPACITY = 2000
DEFAULT_SUBSCRIBER_LIMIT = 512
SWITCHES_KEPT = 20
RECENT_KEPT = 50
# The kinds a reader's log tells (the view's ``recent``): steps, model states, switch outcomes.
_STORY = frozenset({"progress", "model", "switch"})
# Status fields that change without anything happening (timers), left out of the comparison.
_VOLATILE = frozenset({"backoff", "progressSeq"})
# Progress steps that set the strategy of the switch in progress (as the reconciler labels its duration).
_WARM_STEPS = frozenset({"sleeping", "waking"})
_COLD_STEPS = frozenset({"starting", "SleepFallback"})
# Steps that say why a model is not what was asked: kept as its failure (the
# clean-up notes that follow must not hide it) until it is healthy again.
_FAILURE_STEPS = frozenset({"failed", "rejected", "SleepFallback", "removed-outside"})
_RECOVERED_STEPS = frozenset({"healthy", "awake"})


@dataclass(frozen=True)
class Event:
    """One thing that happened: ``kind`` progress (a switch step, a violation,
    a runtime outage: the worker's progress note), status (the GPU's
    published status changed), model (one model's state changed), queue
    (holds or waiting demands changed), switch (a switch ended), memory (the
    GPU's memory as sampled)."""

    id: int
    time: float  # wall clock, seconds
    kind: str
    gpu: int | None
    data: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "kind": self.kind, "gpu": self.gpu, "data": self.data}


class Subscription:
    """A reader's place in the journal: events appended after it subscribed,
    buffered up to ``limit``. Past that it is dropped: ``take`` returns
    nothing more and ``dropped`` is True; the reader resumes by subscribing
    again with its last id."""

    def __init__(self, journal: EventJournal, limit: int, wake: Callable[[], None] | None) -> None:
        self._journal = journal
        self.limit = limit
        self._wake = wake
        self._buf: deque[Event] = deque()
        self.dropped = False
        self.closed = False

    def take(self) -> list[Event]:
        """The buffered events, oldest first (and empties the buffer)."""
        with self._journal._lock:
            out = list(self._buf)
            self._buf.clear()
        return out

    def pending(self) -> int:
        return len(self._buf)

    def close(self) -> None:
        self._journal._unsubscribe(self)

    def _offer(self, ev: Event) -> bool:
        """Under the journal's lock. False when this subscriber is (now) dropped."""
        if self.dropped or self.closed:
            return False
        if len(self._buf) >= self.limit:
            self.dropped = True
            self._buf.clear()
            return False
        self._buf.append(ev)
        return True


@dataclass
class _GpuView:
    """What the journal remembers of one GPU beyond its history: the newest
    status, the last switches, when each model's holds and waits began, the
    last progress note per model (its reason) and the newest memory sample."""

    status: Mapping[str, Any] | None = None
    compared: dict[str, Any] | None = None
    switches: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=SWITCHES_KEPT))
    strategy: str = "cold"
    queue: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    failures: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    memory: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "switches": list(self.switches),
            "queue": self.queue,
            "notes": dict(self.notes),
            "failures": dict(self.failures),
            "memory": self.memory,
        }


@dataclass(frozen=True)
class Resume:
    """What ``subscribe`` hands a reader: its subscription; the events after
    its last id (``replay``; None when that id is no longer in the history,
    or was never given: start from ``view``); the current view and the id
    it is current at (``last_id``)."""

    subscription: Subscription
    replay: list[Event] | None
    view: dict[str, Any]
    last_id: int


class EventJournal:
    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        wall: Callable[[], float] = time.time,
        max_subscribers: int = 1024,
    ) -> None:
        self.capacity = capacity
        self.max_subscribers = max_subscribers
        self._wall = wall
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=capacity)
        self._last_id = 0
        self._subs: set[Subscription] = set()
        self._gpus: dict[int, _GpuView] = {}
        self.dropped_total = 0

    # ------------------------------------------------------------ reading

    @property
    def last_id(self) -> int:
        return self._last_id

    def replay(self, since: int) -> list[Event] | None:
        """The events with an id above ``since``, oldest first; None when some
        of them are no longer kept (or ``since`` is from another run: above
        the last id), so the reader must start over from ``view()``."""
        with self._lock:
            return self._replay(since)

    def view(self) -> dict[str, Any]:
        with self._lock:
            return self._view()

    def subscribe(self, since: int | None = None, limit: int = DEFAULT_SUBSCRIBER_LIMIT, wake: Callable[[], None] | None = None) -> Resume:
        """Follow the journal from now on, atomically with the replay after
        ``since`` and the view: nothing appended in between is missed or seen
        twice. ``wake`` is called (from the writer's thread, outside the lock)
        after each event offered to this subscriber. Raises OverflowError
        when ``max_subscribers`` already follow it."""
        sub = Subscription(self, limit, wake)
        with self._lock:
            if len(self._subs) >= self.max_subscribers:
                raise OverflowError(f"{len(self._subs)} readers already follow the events (at most {self.max_subscribers})")
            replay = self._replay(since) if since is not None else None
            self._subs.add(sub)
            return Resume(sub, replay, self._view(), self._last_id)

    def subscribers(self) -> int:
        return len(self._subs)

    def _replay(self, since: int) -> list[Event] | None:
        if since > self._last_id:
            return None
        if since == self._last_id:
            return []
        oldest = self._events[0].id if self._events else self._last_id + 1
        if since < oldest - 1:
            return None
        return [e for e in self._events if e.id > since]

    def _view(self) -> dict[str, Any]:
        recent = [e.as_dict() for e in self._events if e.kind in _STORY][-RECENT_KEPT:]
        return {"lastId": self._last_id, "gpus": {str(g): v.as_dict() for g, v in sorted(self._gpus.items())}, "recent": recent}

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            sub.closed = True
            sub._buf.clear()
            self._subs.discard(sub)

    # ------------------------------------------------------------ writing

    def append(self, kind: str, gpu: int | None, data: Mapping[str, Any]) -> Event:
        """Record one event and hand it to every subscriber."""
        return self._append_all([(kind, gpu, data)])[-1]

    def _append_all(self, items: Iterable[tuple[str, int | None, Mapping[str, Any]]]) -> list[Event]:
        wakes: list[Callable[[], None]] = []
        out: list[Event] = []
        with self._lock:
            now = self._wall()
            for kind, gpu, data in items:
                self._last_id += 1
                ev = Event(self._last_id, now, kind, gpu, data)
                self._events.append(ev)
                out.append(ev)
                for sub in list(self._subs):
                    if not sub._offer(ev) and sub.dropped and not sub.closed:
                        self._subs.discard(sub)  # it learns so at its next look (``dropped``)
                        self.dropped_total += 1
                        if sub._wake is not None:
                            wakes.append(sub._wake)
            if out:
                wakes += [s._wake for s in self._subs if s._wake is not None]
        for wake in dict.fromkeys(wakes):
            wake()
        return out

    def publish_note(self, gpu: int, entry: Mapping[str, Any]) -> None:
        """A progress note of ``gpu``'s worker (``StatusBook.note``'s entry)."""
        step, model = entry.get("step"), entry.get("model")
        with self._lock:
            v = self._gpus.setdefault(gpu, _GpuView())
            if step == "switch-started":
                v.strategy = "cold"
            elif step in _WARM_STEPS:
                v.strategy = "warm"
            elif step in _COLD_STEPS:
                v.strategy = "cold"
            if isinstance(model, str):
                v.notes[model] = entry
                if step in _FAILURE_STEPS:
                    v.failures[model] = entry
                elif step in _RECOVERED_STEPS:
                    v.failures.pop(model, None)
        self.append("progress", gpu, entry)

    def publish_status(self, gpu: int, status: Mapping[str, Any]) -> None:
        """``gpu``'s worker published ``status``. Appends a status event when
        anything but timers changed, and a model, queue or switch event for
        each such change."""
        compared = {k: v for k, v in status.items() if k not in _VOLATILE}
        items: list[tuple[str, int | None, Mapping[str, Any]]] = []
        with self._lock:
            v = self._gpus.setdefault(gpu, _GpuView())
            before = v.compared
            if compared == before:
                return
            v.status, v.compared = status, compared
            items.append(("status", gpu, status))
            old_states = (before or {}).get("modelStates") or {}
            new_states = compared.get("modelStates") or {}
            for m in sorted(set(old_states) | set(new_states)):
                if old_states.get(m) != new_states.get(m):
                    items.append(("model", gpu, {"model": m, "from": old_states.get(m), "to": new_states.get(m)}))
            queue = _queue_view(compared.get("queue") or {}, v.queue, self._wall())
            if queue != v.queue:
                v.queue = queue
                items.append(("queue", gpu, queue))
            last = compared.get("lastSwitch")
            if last and before is not None and last != before.get("lastSwitch"):
                record = {**last, "strategy": v.strategy}
                v.switches.append(record)
                items.append(("switch", gpu, record))
        self._append_all(items)

    def forget(self, gpu: int) -> None:
        """``gpu`` has no worker any more (its ModelDeployment went): it leaves the view (its events stay in the history)."""
        with self._lock:
            self._gpus.pop(gpu, None)

    def publish_memory(self, gpu: int, memory: Mapping[str, Any]) -> bool:
        """A memory sample of ``gpu``; an event only when it differs from the last. True when appended."""
        with self._lock:
            v = self._gpus.setdefault(gpu, _GpuView())
            if v.memory == memory:
                return False
            v.memory = memory
        self.append("memory", gpu, memory)
        return True


def _queue_view(snapshot: Mapping[str, Any], before: Mapping[str, Any], wall: float) -> dict[str, Any]:
    """The queue snapshot (``demand.desk.HoldDesk.snapshot``) per model, with
    the wall-clock time since when each model has had holds or waiting
    demands (kept from ``before`` while it still has some): what a page counts
    waiting times from."""

    def since(kind: str, model: str) -> float:
        old = (before.get(kind) or {}).get(model)
        return float(old["since"]) if old else round(wall, 3)

    holds = snapshot.get("holds") or {}
    waiting = snapshot.get("waiting") or {}
    ids = snapshot.get("holdIds") or {}
    return {
        "holds": {m: {"count": n, "since": since("holds", m), "ids": list(ids.get(m, []))} for m, n in sorted(holds.items()) if n},
        "waiting": {m: {"count": n, "since": since("waiting", m)} for m, n in sorted(waiting.items()) if n},
        "draining": bool(snapshot.get("draining")),
        "switchingTo": snapshot.get("switchingTo"),
    }
