"""The memory gate: is the GPU really free for the next start? Pure.

A start waits until (a) no process of ours that is not kept live by the plan
is still on the GPU (the stopped models, and any earlier one still tearing
down) and (b) used memory is at most baseline + kept + margin and free memory
covers what the next model needs. Memory held by processes that are not
vramctl's, long enough, makes the phase Blocked with them named.

``check`` is what the worker calls once per tick while it waits; the wait's
own memory (when it began, since when foreign processes were seen) lives in
``MemoryWait``, replaced whole each tick.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vramctl.observed import GpuProcess, GpuSnapshot
from vramctl.planner import WaitForMemory


def memory_problem(snap: GpuSnapshot, w: WaitForMemory, kept: frozenset[str] = frozenset()) -> str | None:
    """Why the GPU is not ready for the next start, or None when it is."""
    procs = snap.processes
    if procs is not None:
        lingering = [p for p in procs if _lingering(p, w, kept)]
        if lingering:
            return "still held by " + ", ".join(
                f"{p.model} (pid {p.pid}" + (f", {p.used_mib} MiB" if p.used_mib is not None else "") + ")" for p in lingering
            )
        over = residues_over(snap, w)
        if over:
            return "asleep but holding more than its residue: " + ", ".join(
                f"{m} ({held} MiB, maxResidueMiB {lim})" for m, held, lim in over
            )
    mem = snap.memory
    if _short(snap, w):
        foreign = [p for p in (procs or ()) if p.model is None]
        who = ""
        if foreign:
            who = "; held by processes that are not vramctl's: " + ", ".join(describe_process(p) for p in foreign)
        return (
            f"{mem.used_mib} MiB used, {mem.free_mib} MiB free, need {w.need_free_mib} MiB free"
            + (f" and at most {w.max_used_mib} MiB used" if w.max_used_mib is not None else "")
            + who
        )
    return None


def residues_over(snap: GpuSnapshot, w: WaitForMemory) -> list[tuple[str, int, int]]:
    """(model, MiB held, maxResidueMiB) for each sleeping model whose processes
    hold more than its residue (per-process figures only: the device-level
    bound ``max_used_mib`` covers probes without them)."""
    procs = snap.processes
    if procs is None:
        return []
    out = []
    for m, limit in w.residues:
        mine = [p.used_mib for p in procs if p.model == m]
        if any(u is None for u in mine):
            continue
        held = sum(u or 0 for u in mine)
        if held > limit:
            out.append((m, held, limit))
    return out


def foreign_holders(snap: GpuSnapshot, w: WaitForMemory, kept: frozenset[str] = frozenset()) -> list[GpuProcess]:
    """The processes that are not vramctl's and are why the memory is short:
    none of ours is lingering, and without their (known) memory the wait would
    be over. Empty when that cannot be shown (no per-process figures, WSL2),
    or when the memory is short anyway (a release still under way)."""
    procs = snap.processes
    if procs is None or any(_lingering(p, w, kept) for p in procs):
        return []
    foreign = [p for p in procs if p.model is None and p.used_mib]
    held = sum(p.used_mib or 0 for p in foreign)
    mem = snap.memory
    if not foreign or not _short(snap, w):
        return []
    fits_without = (w.max_used_mib is None or mem.used_mib - held <= w.max_used_mib) and mem.free_mib + held >= w.need_free_mib
    return foreign if fits_without else []


def describe_process(p: GpuProcess) -> str:
    where = f" (pod {p.pod})" if p.pod else (f" (container {p.container})" if p.container else "")
    return f"pid {p.pid}{where}" + (f" {p.used_mib} MiB" if p.used_mib is not None else "")


def _lingering(p: GpuProcess, w: WaitForMemory, kept: frozenset[str]) -> bool:
    return p.model is not None and (p.model in w.released or p.model not in kept)


def _short(snap: GpuSnapshot, w: WaitForMemory) -> bool:
    mem = snap.memory
    return (w.max_used_mib is not None and mem.used_mib > w.max_used_mib) or mem.free_mib < w.need_free_mib


@dataclass(frozen=True)
class MemoryWait:
    """One wait for memory, from its first tick: ``since`` when it began,
    ``foreign_since`` since when only foreign processes were in the way."""

    since: float
    foreign_since: float | None = None


@dataclass(frozen=True)
class Verdict:
    free: bool
    blocked: str | None  # a reason: stop waiting, the phase is Blocked
    problem: str | None  # what is still in the way (progress, messages)
    wait: MemoryWait


def check(
    snap: GpuSnapshot | None,
    probe_error: str | None,
    w: WaitForMemory,
    kept: frozenset[str],
    wait: MemoryWait,
    now: float,
    timeout_s: float,
    foreign_grace_s: float,
) -> Verdict:
    """One look at the GPU during a memory wait. A probe that cannot answer
    (``snap`` None) counts as "not back", never as free."""
    problem = f"the GPU probe did not answer ({probe_error})" if snap is None else memory_problem(snap, w, kept)
    if snap is not None and problem is None:
        return Verdict(True, None, None, wait)
    culprits = foreign_holders(snap, w, kept) if snap is not None else []
    if culprits:
        wait = wait if wait.foreign_since is not None else replace(wait, foreign_since=now)
        assert wait.foreign_since is not None
        if now - wait.foreign_since >= foreign_grace_s:
            blocked = f"GPU memory is held by processes that are not vramctl's: {problem}; the next model is not started"
            return Verdict(False, blocked, problem, wait)
    elif wait.foreign_since is not None:
        wait = replace(wait, foreign_since=None)
    if now - wait.since >= timeout_s:
        return Verdict(
            False, f"GPU memory did not come back within {timeout_s:.0f}s: {problem}; the next model is not started", problem, wait
        )
    return Verdict(False, None, problem, wait)


@dataclass(frozen=True)
class Baseline:
    """GPU memory in use with none of our models (what the memory bound
    starts from), unless configured.

    Learned: the lowest reading taken while none of ours is live and the
    probe shows no process of ours (a model that just exited may still be
    releasing). Until then, estimated from a probe that sizes every process
    of ours: used minus theirs (a supervisor restarted while a model runs).
    None while neither is possible (WSL2, right after a restart): the memory
    wait then goes by the processes and free memory.
    """

    mib: int | None = None
    learned: bool = False
    configured: bool = False

    def observe(self, snap: GpuSnapshot, any_live: bool) -> Baseline:
        if self.configured:
            return self
        used = snap.memory.used_mib
        ours = [p for p in snap.processes or () if p.model is not None]
        if not ours and not any_live:
            mib = used if not self.learned or self.mib is None else min(self.mib, used)
            return Baseline(mib, True)
        if not self.learned and ours and all(p.used_mib is not None for p in ours):
            estimate = max(0, used - sum(p.used_mib or 0 for p in ours))
            return Baseline(estimate if self.mib is None else min(self.mib, estimate), False)
        return self
