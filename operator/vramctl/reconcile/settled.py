"""What "settled" means for one GPU's loop.

A tick is settled when nothing more happens before its next look unless
something arrives (a command, a start event, an op's completion): the loop
may sleep until then. An empty plan settles the desired state: it is reached
(Ready, or Idle when no model is wanted), or what is missing is backing off
(Failed until the earliest back-off deadline, or until the spec changes),
and the loop looks again at the resync or at that deadline, whichever
comes first. ``settled_phase`` and ``next_look`` are pure; ``report`` tells
the worker (``ctx``).
"""

from __future__ import annotations

from vramctl.observed import Desired
from vramctl.planner import Plan
from vramctl.reconcile.context import LoopContext


def settled_phase(desired: Desired, p: Plan, now: float, phase: str) -> tuple[str, str, str] | None:
    """(phase, reason, message) once an empty plan ``p`` settled ``desired``;
    None to keep ``phase`` (already Failed while backing off)."""
    if p.deferred:
        failed = ", ".join(repr(m) for m in sorted(p.deferred))
        wait = min(p.deferred.values()) - now
        if phase == "Failed":
            return None
        when = "until the spec changes" if wait == float("inf") else f"retrying in {max(0.0, wait):.0f}s"
        return "Failed", "BackingOff", f"{failed} failed; {when}"
    if desired.active is None and not desired.companions:
        return "Idle", "NoModel", "no model is desired; the GPU is free"
    return "Ready", "ModelReady", f"{', '.join(desired.members)} ready"


def next_look(p: Plan, now: float, resync_s: float) -> float:
    """Seconds until a settled loop looks again: the resync, or sooner the
    first back-off deadline of a deferred model."""
    wait = resync_s
    if p.deferred:
        wait = min(wait, max(0.05, min(p.deferred.values()) - now))
    return wait


def report(ctx: LoopContext, desired: Desired, p: Plan, now: float) -> None:
    """The desired generation is observed, the switch in progress (if any)
    ends in success, the worker learns it settled, and the phase says how."""
    ctx.finish_switch("success", now)  # answers the desired generation
    ctx.settled(now, ok=not p.deferred)
    verdict = settled_phase(desired, p, now, ctx.current_phase)
    if verdict is not None:
        ctx.phase(*verdict)
