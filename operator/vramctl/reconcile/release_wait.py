"""The loop's side of the memory gate: waiting until the GPU has released
what the plan stopped, before the next start or wake.

``memory_gate`` decides from one GPU snapshot; ``ReleaseWait`` is the wait
around it, owned by one worker's loop: it begins (and says so) once per
desired generation and need (the residues of sleeps that returned are
checked by the reconciler at every look), turns memory held by processes
that are not vramctl's into the Blocked
phase, and, when the memory is back, records how long the release took
after the stopped models exited (``last_release_seconds``, a metric).
"""

from __future__ import annotations

from dataclasses import replace

from vramctl.gpu.base import GpuProbe
from vramctl.observed import Desired
from vramctl.planner import WaitForMemory
from vramctl.reconcile import memory_gate
from vramctl.reconcile.context import LoopContext
from vramctl.reconcile.model_watch import Tracking
from vramctl.reconcile.warm import SleepBook


def memory_verdict(
    probe: GpuProbe, w: WaitForMemory, kept: frozenset[str], wait: memory_gate.MemoryWait, now: float, timeout_s: float, grace_s: float
) -> memory_gate.Verdict:
    """The memory gate's verdict on a fresh snapshot; a probe that cannot
    answer makes the memory unknown, never free."""
    try:
        snap = probe.snapshot()
    except Exception as err:  # ProbeError, ProbeTimeout: unknown, never free
        return memory_gate.check(None, str(err), w, kept, wait, now, timeout_s, grace_s)
    return memory_gate.check(snap, None, w, kept, wait, now, timeout_s, grace_s)


def waiting_message(w: WaitForMemory) -> str:
    return (
        f"waiting for GPU memory (need {w.need_free_mib} MiB free"
        + (f", at most {w.max_used_mib} MiB used" if w.max_used_mib is not None else "")
        + (f"; {', '.join(w.released)} gone from the GPU" if w.released else "")
        + ")"
    )


class ReleaseWait:
    """One GPU's memory wait (see the module's docstring)."""

    def __init__(self, ctx: LoopContext, probe: GpuProbe, track: Tracking, sleep: SleepBook) -> None:
        self.ctx, self.probe, self.track, self.sleep = ctx, probe, track, sleep
        self.mem_wait: tuple[tuple[int, int], memory_gate.MemoryWait] | None = None  # (generation, need) -> the wait
        self.blocked: str | None = None  # why the phase is Blocked
        self.last_release_seconds: float | None = None

    @property
    def waiting(self) -> bool:
        return self.mem_wait is not None

    def reset(self) -> None:
        """Nothing waits for memory any more."""
        self.mem_wait, self.blocked = None, None

    def wait(
        self, desired: Desired, w: WaitForMemory, kept: frozenset[str], baseline_mib: int | None, now: float
    ) -> tuple[float, bool] | None:
        """One look at the GPU for ``w``. None: the memory is free, go on with
        the plan; else the tick's (seconds until the next look, settled)."""
        s = self.ctx.settings
        key = (desired.generation, w.need_free_mib)
        if baseline_mib is None and w.max_used_mib is not None:
            # A bound computed from an unknown baseline would be a guess; the
            # stopped models' processes leaving and the free memory still tell.
            w = replace(w, max_used_mib=None)
        if self.mem_wait is None or self.mem_wait[0] != key:
            self.mem_wait = (key, memory_gate.MemoryWait(now))
            self.ctx.note("waiting-memory", None, waiting_message(w))
        v = memory_verdict(self.probe, w, kept, self.mem_wait[1], now, s.memory_timeout_s, s.foreign_grace_s)
        self.mem_wait = (key, v.wait)
        if v.free:
            self._free(desired, now, v.wait.since)
            return None
        if v.blocked is not None:
            if self.blocked is None:
                self.ctx.phase("Blocked", "MemoryNotReleased", v.blocked)
                self.ctx.finish_switch("blocked", now)  # answers the desired generation
            self.blocked = v.blocked
            return max(s.poll_interval_s, 0.25), True
        return s.poll_interval_s, False

    def _free(self, desired: Desired, now: float, since: float) -> None:
        """The memory is back: said, with the release's time since the exit; a Blocked switch resumes."""
        self.mem_wait = None
        after = ""
        if self.track.exited_at is not None:
            self.last_release_seconds = max(0.0, now - self.track.exited_at)
            after = f", {self.last_release_seconds:.3f}s after {_went(self.track.exited, self.sleep.asleep)}"
            self.track.exited_at, self.track.exited = None, ()
        if self.blocked is not None:
            self.blocked = None
            self.ctx.begin_switch(None, desired.active, now)
        self.ctx.note("memory-free", None, f"GPU memory confirmed free after {now - since:.2f}s{after}")


def _went(models: tuple[str, ...], asleep: set[str]) -> str:
    """``llm went to sleep, sdxl exited``: what each model that gave memory back did."""
    slept = [m for m in models if m in asleep]
    exited = [m for m in models if m not in asleep]
    parts = ([f"{', '.join(slept)} went to sleep"] if slept else []) + ([f"{', '.join(exited)} exited"] if exited else [])
    return "; ".join(parts)
