"""The pure decision: from desired and observed state to an ordered plan.

``plan`` performs no I/O, reads no clock (``now`` is passed in) and does not
log. Its promise, checked by a property test: within one GPU, no plan starts a
heavy workload while another heavy workload is live (running, paused,
restarting, or being stopped earlier in the same plan and not yet confirmed
gone), and every Start is preceded by a WaitForMemory. All stops come before
all starts ("delete before create").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vramctl.observed import Desired, Observed, WorkloadState
from vramctl.spec import DeploymentSpec


@dataclass(frozen=True)
class Stop:
    model: str
    reason: str


@dataclass(frozen=True)
class Cleanup:
    """Remove what an exited workload left behind (processes of its group, its record)."""

    model: str


@dataclass(frozen=True)
class WaitForMemory:
    """Block until the GPU has really released what was stopped.

    ``released``: models whose processes must be gone from the GPU.
    ``max_used_mib``: used memory must be at most this (baseline + kept + margin);
    None when the kept workloads' sizes are unknown.
    ``need_free_mib``: free memory the next start needs.
    """

    released: tuple[str, ...]
    need_free_mib: int
    max_used_mib: int | None


@dataclass(frozen=True)
class Start:
    model: str
    reason: str


@dataclass(frozen=True)
class WaitHealthy:
    model: str
    timeout_seconds: float


Action = Cleanup | Stop | WaitForMemory | Start | WaitHealthy


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    deferred: dict[str, float] = field(default_factory=dict)  # model -> back-off deadline

    @property
    def empty(self) -> bool:
        return not self.actions

    @property
    def switching(self) -> bool:
        return any(isinstance(a, (Stop, Start)) for a in self.actions)

    @property
    def waiting(self) -> bool:
        """Nothing to do but wait (for memory or health): no stop or start left."""
        return bool(self.actions) and not any(isinstance(a, (Cleanup, Stop, Start)) for a in self.actions)

    def describe(self) -> list[str]:
        out = []
        for a in self.actions:
            match a:
                case Cleanup(model=m):
                    out.append(f"clean up after {m}")
                case Stop(model=m, reason=r):
                    out.append(f"stop {m} ({r})")
                case WaitForMemory(released=rel, need_free_mib=need):
                    out.append(f"wait for memory (released: {', '.join(rel) or '-'}; need {need} MiB free)")
                case Start(model=m, reason=r):
                    out.append(f"start {m} ({r})")
                case WaitHealthy(model=m):
                    out.append(f"wait until {m} is healthy")
        return out


def plan(
    spec: DeploymentSpec,
    desired: Desired,
    observed: Observed,
    now: float,
    backoff_until: Mapping[str, float] | None = None,
    baseline_mib: int = 0,
    margin_mib: int = 256,
    total_mib: int | None = None,
) -> Plan:
    """``total_mib``: the GPU's total memory when known; a vLLM model's
    reservation is gpuMemoryUtilization x total (``DeploymentSpec.reservation``)."""
    backoff_until = backoff_until or {}
    wanted = set(desired.members)
    actions: list[Action] = []
    stopped: list[str] = []

    # 0. Leftovers of exited workloads go first: they may hold GPU memory.
    for w in sorted(observed.workloads.values(), key=lambda w: w.model):
        if w.leftover and not w.state.live:
            actions.append(Cleanup(w.model))
            stopped.append(w.model)

    # 1. Stops: everything live that is not wanted, or wanted but drifted.
    #    Heavy ones first so the GPU starts emptying as early as possible.
    live = [w for w in observed.workloads.values() if w.state.live]
    live.sort(key=lambda w: (not _heavy(spec, w.model, w.heavy), w.model))
    for w in live:
        if w.model not in wanted:
            reason = "not in the spec" if w.model not in spec.models else "not desired"
        elif w.drifted:
            reason = "spec changed"
        else:
            continue
        actions.append(Stop(w.model, reason))
        stopped.append(w.model)

    # Memory expected to remain in use by what keeps running. A paused (gated)
    # workload is frozen before it could allocate: it is about to be started,
    # so it counts in need_free_mib, not here.
    kept = [w.model for w in live if w.model not in stopped and w.state is not WorkloadState.PAUSED]
    kept_sizes = [spec.reservation_mib(m, total_mib) if m in spec.models else None for m in kept]
    max_used: int | None = None
    if all(s is not None for s in kept_sizes):
        max_used = baseline_mib + margin_mib + sum(s or 0 for s in kept_sizes)

    # 2. Starts, heavy first, each behind a memory wait and followed by a
    #    health wait, so a companion never races the heavy model's allocation.
    deferred: dict[str, float] = {}
    first_wait = True
    for m in desired.members:
        if m not in spec.models:
            continue
        current = observed.workloads.get(m)
        state = current.state if current else WorkloadState.ABSENT
        timeout = spec.models[m].start_timeout_seconds
        if current is not None and m not in stopped and state in (WorkloadState.RUNNING, WorkloadState.RESTARTING):
            if not current.ready:
                actions.append(WaitHealthy(m, timeout))
            continue
        until = backoff_until.get(m)
        if until is not None and until > now:
            deferred[m] = until
            continue
        need = spec.reservation_mib(m, total_mib) or 0
        actions.append(
            WaitForMemory(
                released=tuple(stopped) if first_wait else (),
                need_free_mib=need,
                max_used_mib=max_used if first_wait else None,
            )
        )
        first_wait = False
        reason = "unpause (gated)" if state is WorkloadState.PAUSED and m not in stopped else "desired"
        actions.append(Start(m, reason))
        actions.append(WaitHealthy(m, timeout))
    return Plan(tuple(actions), deferred)


def _heavy(spec: DeploymentSpec, model: str, fallback: bool) -> bool:
    m = spec.models.get(model)
    return m.heavy if m is not None else fallback
