"""What the controller has to tell the API server, queued without blocking.

Why: the workers and kopf's threads must never wait for the API server. They
only mark an entry dirty or queue an Event here, and poke the writer thread;
that thread drains the Event queue (``flush_events``), giving each Event a
few attempts before it is dropped (a lost Event is a nuisance, a stuck
writer is not an option).
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from vramctl.runtimes.kubernetes import KubeApiError
from vramctl.sources.kubernetes.client import StatusApi
from vramctl.sources.kubernetes.entries import Entry
from vramctl.status.conditions import rfc3339

log = logging.getLogger("vramctl.kubernetes")

_EVENT_ATTEMPTS = 3
_EVENT_MESSAGE_MAX = 1024  # Kubernetes truncates longer Event messages


class Outbox:
    """Dirty marks and queued Events; ``poke`` wakes the writer. Takes no lock:
    safe on the workers' threads, with their request lock held."""

    def __init__(self, api: StatusApi, node_name: str, wall: Callable[[], float], poke: Callable[[], None]) -> None:
        self.api, self.node_name, self.wall, self.poke = api, node_name, wall, poke
        self._events: deque[tuple[dict[str, Any], str, str, str, int]] = deque(maxlen=1000)

    def mark(self, entry: Entry) -> None:
        """The status of ``entry`` may have changed (never blocks, takes no lock)."""
        entry.dirty = True
        self.poke()

    def event(self, ref: dict[str, Any], etype: str, reason: str, message: str) -> None:
        self._events.append((ref, etype, reason, message, 0))
        self.poke()

    def flush_events(self) -> bool:
        """Post the queued Events (the writer's thread); False when one must be retried."""
        ok = True
        for _ in range(len(self._events)):
            try:
                ref, etype, reason, message, attempts = self._events.popleft()
            except IndexError:
                break
            try:
                self.api.create_event(ref["namespace"], self._event_body(ref, etype, reason, message))
            except KubeApiError as err:
                if attempts + 1 < _EVENT_ATTEMPTS and err.status != 404:
                    self._events.append((ref, etype, reason, message, attempts + 1))
                    ok = False
                else:
                    log.warning("event %s on %s/%s dropped: %s", reason, ref["namespace"], ref["name"], err)
        return ok

    def _event_body(self, ref: dict[str, Any], etype: str, reason: str, message: str) -> dict[str, Any]:
        now = rfc3339(self.wall())
        if len(message) > _EVENT_MESSAGE_MAX:
            message = message[: _EVENT_MESSAGE_MAX - 3] + "..."
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{ref['name']}.{uuid.uuid4().hex[:16]}", "namespace": ref["namespace"]},
            "involvedObject": ref,
            "type": etype,
            "reason": reason,
            "message": message,
            "source": {"component": "vramctl", "host": self.node_name},
            "reportingComponent": "vramctl.io/operator",
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
