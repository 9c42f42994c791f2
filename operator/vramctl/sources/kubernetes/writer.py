"""The status writer: one thread that PATCHes ``.status`` and posts Events.

Why: the workers never wait for the API server (their sink only marks the
entry dirty), so something else must carry their progress out. ``Writer`` is
that one thread; each round it asks the controller to flush, backing off
after a failed round. ``StatusPublisher`` is what a flush does for one
entry: the worker's progress notes become Events (``EVENT_STEPS``), the GPU
figures are refreshed at least every ``GPU_REFRESH_S``, and ``.status`` is
rendered and PATCHed (merge patch) only when the document changed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from vramctl.runtimes.kubernetes import KubeApiError
from vramctl.sources.kubernetes.client import StatusApi
from vramctl.sources.kubernetes.entries import Entry
from vramctl.sources.kubernetes.outbox import Outbox
from vramctl.sources.kubernetes.status import StatusSnapshot, render_status
from vramctl.status.book import PHASE_BLOCKED
from vramctl.worker.actor import GpuWorker

log = logging.getLogger("vramctl.kubernetes")

GPU_REFRESH_S = 10.0  # usedMiB in .status is refreshed at least this often
_WRITER_PERIOD_S = 2.0  # the writer looks for new progress notes at least this often
# After a poke the writer waits this long, so that a burst (a request, then
# the switch's first notes) is one write, and so that it does not compete
# with the worker for the CPU while a switch begins.
_WRITER_DEBOUNCE_S = 0.1

# Worker progress steps that become Kubernetes Events: (type, reason).
EVENT_STEPS: dict[str, tuple[str, str]] = {
    "switch-started": ("Normal", "SwitchStarted"),
    "switch-success": ("Normal", "SwitchFinished"),
    "switch-failed": ("Warning", "SwitchFailed"),
    "switch-blocked": ("Warning", "SwitchBlocked"),
    "failed": ("Warning", "ModelFailed"),
    "gated": ("Warning", "StartGated"),
    "rejected": ("Warning", "StartRejected"),
    "violation": ("Warning", "ExclusivityViolation"),
}


def gpu_info(worker: GpuWorker) -> dict[str, Any] | None:
    """The ``.status.gpu`` figures of the worker's GPU; None when the probe fails."""
    try:
        info = worker.probe.info()
        used = worker.probe.snapshot().memory.used_mib
    except Exception as err:  # the GPU figures are optional; the status is not
        log.debug("gpu %d: no GPU figures for the status: %s", worker.gpu, err)
        return None
    return {"uuid": info.uuid or None, "name": info.name or None, "totalMiB": max(0, info.total_mib), "usedMiB": max(0, used)}


class StatusPublisher:
    """Writes one entry's news: progress Events, then ``.status`` if it changed.

    Runs on the writer's thread; takes the controller's ``lock`` only to
    render (the entry's fields are written under it by the other threads).
    """

    def __init__(
        self,
        api: StatusApi,
        outbox: Outbox,
        node_name: str,
        lock: threading.RLock,
        wall: Callable[[], float],
        clock: Callable[[], float],
    ) -> None:
        self.api, self.outbox, self.node_name, self.lock = api, outbox, node_name, lock
        self.wall, self.clock = wall, clock

    def flush_entry(self, entry: Entry) -> bool:
        """Write what changed for ``entry``; False when it must be retried."""
        worker = entry.worker
        if worker is not None:
            self._progress_events(entry, worker)
            if entry.dirty or self.clock() - entry.gpu_at >= GPU_REFRESH_S:
                gpu = gpu_info(worker)
                entry.dirty = entry.dirty or gpu != entry.gpu
                entry.gpu, entry.gpu_at = gpu, self.clock()
        if not entry.dirty or entry.gone:
            return True
        entry.dirty = False
        with self.lock:
            status = self.render(entry)
        if status == entry.last_written:
            return True
        try:
            self.api.patch_status(entry.namespace, entry.name, status)
        except KubeApiError as err:
            if err.status == 404:
                return True  # deleted meanwhile: the delete handler cleans up
            entry.dirty = True
            log.warning("%s/%s: status not written (%s); retrying", entry.namespace, entry.name, err)
            return False
        entry.last_written = status
        return True

    def _progress_events(self, entry: Entry, worker: GpuWorker) -> None:
        """The worker's progress notes since the last round, as Events (``EVENT_STEPS``)."""
        for p in worker.progress(entry.progress_seq):
            entry.progress_seq = max(entry.progress_seq, int(p["seq"]))
            kind = EVENT_STEPS.get(str(p["step"]))
            if kind is not None:
                message = str(p["message"])
                if p["step"] == "switch-blocked":
                    st = worker.published_status()
                    if st.get("phase") == PHASE_BLOCKED and st.get("message"):
                        message += f": {st['message']}"
                self.outbox.event(entry.ref(), kind[0], kind[1], message)

    def render(self, entry: Entry) -> dict[str, Any]:
        """The ``.status`` document of ``entry`` (lock held); remembers its conditions."""
        worker = entry.worker
        rendered = render_status(
            StatusSnapshot(
                node_name=self.node_name,
                now=self.wall(),
                worker=worker.published_status() if worker is not None else None,
                handed=entry.handed,
                problems=tuple(entry.problems),
                problem_generation=entry.problem_generation,
                conflict=entry.conflict,
                conflict_generation=entry.problem_generation,
                gpu=entry.gpu,
                last_switch=entry.last_switch,
                conditions=entry.conditions,
            )
        )
        entry.conditions = rendered.conditions
        return rendered.status


class Writer:
    """The one thread that talks to the API server on the workers' behalf:
    it calls ``flush`` after a poke (debounced) or every ``_WRITER_PERIOD_S``,
    and backs off (1, 2, 4 ... 30 s) while ``flush`` reports failures."""

    def __init__(self, flush: Callable[[], bool]) -> None:
        self.flush = flush
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vramctl-k8s-writer", daemon=True)
            self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.0  # after a failed round: 1, 2, 4 ... 30 s, pokes or not
        while not self._stop.is_set():
            if backoff:
                self._stop.wait(backoff)
            elif self._wake.wait(_WRITER_PERIOD_S):
                self._stop.wait(_WRITER_DEBOUNCE_S)
            self._wake.clear()
            try:
                ok = self.flush()
            except Exception:  # never die: the next round retries
                log.exception("status writer round failed")
                ok = False
            backoff = 0.0 if ok else min(30.0, max(1.0, backoff * 2))
        with contextlib.suppress(Exception):
            self.flush()
