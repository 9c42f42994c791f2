"""Where a model allowed on several GPUs (``placement: any``) is served: a pure rule.

The gateway asks it for every request of such a model; it reads no clock and
does no I/O. The rule, in order:

1. where the model is awake, or being switched to (it is in that GPU's
   desired state): a request never starts a second copy beside one that
   serves or is on its way;
2. else where the switch to it is cheapest by that GPU's cost book (the
   predicted seconds of stopping or putting to sleep what holds the GPU and
   starting or waking the model there); costs within ``SAME_COST_SECONDS``
   of the cheapest count as a tie;
3. among ties (and where no cost is known), the GPU least recently used (one
   never used first), then the lowest index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Two predicted switches this close count as the same cost. Small on purpose:
# a GPU that must first stop its model (a second or more) loses to a free one.
SAME_COST_SECONDS = 0.25


@dataclass(frozen=True)
class Site:
    """One GPU the model may run on, as its worker last saw it."""

    gpu: int
    awake: bool = False  # awake there, or in that GPU's desired state
    switch_seconds: float | None = None  # predicted seconds of the switch to the model there; None: unknown
    last_used: float | None = None  # when the GPU last served a request (any clock, the same for all); None: never


def place(sites: Sequence[Site]) -> int:
    """The GPU to serve the model on. Raises ValueError when ``sites`` is empty."""
    if not sites:
        raise ValueError("no GPU to place the model on")
    awake = sorted(s.gpu for s in sites if s.awake)
    if awake:
        return awake[0]
    known = [s.switch_seconds for s in sites if s.switch_seconds is not None]
    tied = list(sites)
    if known:
        cheapest = min(known)
        tied = [s for s in sites if s.switch_seconds is not None and s.switch_seconds <= cheapest + SAME_COST_SECONDS]
    return min(tied, key=lambda s: (s.last_used is not None, s.last_used or 0.0, s.gpu)).gpu
