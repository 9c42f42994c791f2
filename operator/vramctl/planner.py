"""The pure decision: from desired and observed state to an ordered plan.

``plan`` performs no I/O, reads no clock (``now`` is passed in) and does not
log. Its promise, checked by a property test: within one GPU, no plan starts a
heavy workload while another heavy workload is live (running, paused,
restarting, or being stopped earlier in the same plan and not yet confirmed
gone), and every Start is preceded by a WaitForMemory. All stops come before
all starts ("delete before create").

Warm switching: a heavy model with ``switchStrategy: sleep`` that is not
wanted is put to sleep (``Sleep``) instead of stopped, and a wanted model that
sleeps is woken (``Wake``, behind a WaitForMemory like a Start). At most one
heavy model is awake or waking per GPU; asleep models count against the
budget by their residue (maxResidueMiB) and against host memory by
hostMemoryMiB. When the next model's reservation plus the residues would not
fit, sleeping models are stopped in the caller's eviction order
(``costs.eviction_order``: the one cheapest to bring back cold first), else
least recently used first. ``cold`` names
models that must go the cold way this time (a sleep fall-back, maxCycles).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

from vramctl.observed import Desired, Observed, Workload, WorkloadState
from vramctl.spec.models import DeploymentSpec


@dataclass(frozen=True)
class Stop:
    model: str
    reason: str


@dataclass(frozen=True)
class Cleanup:
    """Remove what an exited workload left behind (processes of its group, its record)."""

    model: str


@dataclass(frozen=True)
class Sleep:
    """Ask a sleepable model to sleep (it gives the GPU away but its residue)."""

    model: str
    reason: str


@dataclass(frozen=True)
class Wake:
    """Wake a model that sleeps (instead of a cold start)."""

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
    # Models asleep (or put to sleep earlier in the plan) that stay on the GPU
    # with at most this many MiB each: their processes must be at or under it.
    residues: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Start:
    model: str
    reason: str


@dataclass(frozen=True)
class WaitHealthy:
    model: str
    timeout_seconds: float


Action = Cleanup | Stop | Sleep | WaitForMemory | Start | Wake | WaitHealthy


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    deferred: dict[str, float] = field(default_factory=dict)  # model -> back-off deadline

    @property
    def empty(self) -> bool:
        return not self.actions

    @property
    def switching(self) -> bool:
        return any(isinstance(a, (Stop, Start, Sleep, Wake)) for a in self.actions)

    @property
    def waiting(self) -> bool:
        """Nothing to do but wait (for memory or health): no stop or start left."""
        return bool(self.actions) and not any(isinstance(a, (Cleanup, Stop, Start, Sleep, Wake)) for a in self.actions)

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
                case Sleep(model=m, reason=r):
                    out.append(f"put {m} to sleep ({r})")
                case Wake(model=m):
                    out.append(f"wake {m}")
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
    cold: Set[str] = frozenset(),
    last_used: Mapping[str, float] | None = None,
    host_budget_mib: int | None = None,
    eviction_order: Sequence[str] | None = None,
) -> Plan:
    """``total_mib``: the GPU's total memory when known; a vLLM model's
    reservation is gpuMemoryUtilization x total (``DeploymentSpec.reservation``).
    ``cold``: models that are stopped rather than put to sleep (and stopped if
    they sleep); ``last_used``: when each model was last awake (eviction order);
    ``host_budget_mib``: the default host-memory budget of the level-1 sleepers
    (read from MemAvailable at start), used where the spec sets no
    ``hostMemoryBudgetMiB``; None: unbounded. ``eviction_order``: the sleepers
    in the order they are stopped when room is needed (a model it does not
    name goes after those it does, least recently used first); None: least
    recently used first.

    The steps, each a function of its own: leftovers are cleaned up
    (``_cleanups``); what is live and not wanted is stopped or put to sleep
    (``_release``); sleepers that no longer fit are evicted (``_evict``); the
    sleeps and stops are ordered (``_sleeps_and_stops``); the memory that stays
    in use bounds the first memory wait (``_first_wait``); the wanted models
    are started or woken behind it (``_starts``)."""
    wanted = set(desired.members)
    live = _live(spec, observed)
    if not wanted and not desired.keep_asleep:
        cold = {w.model for w in live}  # free the GPU: nothing sleeps on it, sleepers are stopped too
    release = _release(spec, live, wanted, cold)
    waking = [m for m in release.sleepers if m in wanted]
    _evict(spec, desired, observed, live, release, waking, margin_mib, total_mib, last_used or {}, host_budget_mib, eviction_order)
    actions: list[Action] = [*_cleanups(observed), *_sleeps_and_stops(spec, observed, live, release)]
    stopped = [a.model for a in actions if isinstance(a, (Cleanup, Stop))]
    first = _first_wait(spec, live, release.sleepers, stopped, baseline_mib, margin_mib, total_mib)
    starts, deferred = _starts(spec, desired, observed, now, backoff_until or {}, waking, stopped, first, total_mib)
    return Plan((*actions, *starts), deferred)


@dataclass
class _Release:
    """What leaves the GPU awake: stopped (with why), or kept on it asleep."""

    to_stop: list[tuple[str, str]] = field(default_factory=list)  # (model, reason)
    sleepers: list[str] = field(default_factory=list)  # stay on the GPU asleep (already, or put to sleep now)
    to_sleep: set[str] = field(default_factory=set)  # put to sleep by this plan


@dataclass(frozen=True)
class _FirstWait:
    """What only the plan's first memory wait waits for: the stopped models
    gone, the kept ones within their sizes, the sleepers within their residues."""

    released: tuple[str, ...]
    max_used_mib: int | None
    residues: tuple[tuple[str, int], ...]


def _cleanups(observed: Observed) -> list[Cleanup]:
    """0. Leftovers of exited workloads go first: they may hold GPU memory."""
    return [Cleanup(w.model) for w in sorted(observed.workloads.values(), key=lambda w: w.model) if w.leftover and not w.state.live]


def _live(spec: DeploymentSpec, observed: Observed) -> list[Workload]:
    """The live workloads, heavy ones first so the GPU starts emptying as early as possible."""
    live = [w for w in observed.workloads.values() if w.state.live]
    live.sort(key=lambda w: (not _heavy(spec, w.model, w.heavy), w.model))
    return live


def _release(spec: DeploymentSpec, live: list[Workload], wanted: Set[str], cold: Set[str]) -> _Release:
    """1. Stops (or sleeps): everything live that is not wanted, or wanted but
    drifted. A sleepable model that is ready (or asleep already) sleeps instead."""
    out = _Release()
    for w in live:
        sleepable = _sleepable(spec, w.model, cold) and w.state is WorkloadState.RUNNING and not w.drifted
        if w.model not in wanted:
            reason = "not in the spec" if w.model not in spec.models else "not desired"
        elif w.drifted:
            reason = "spec changed"
        elif w.asleep and not sleepable:
            reason = "cold: not kept asleep"
        else:
            if w.asleep:
                out.sleepers.append(w.model)  # woken by _starts
            continue
        if sleepable and (w.asleep or w.ready):
            out.sleepers.append(w.model)
            if not w.asleep:
                out.to_sleep.add(w.model)
            continue
        out.to_stop.append((w.model, reason))
    return out


def _evict(
    spec: DeploymentSpec,
    desired: Desired,
    observed: Observed,
    live: list[Workload],
    release: _Release,
    waking: list[str],
    margin_mib: int,
    total_mib: int | None,
    last_used: Mapping[str, float],
    default_host_budget_mib: int | None,
    order: Sequence[str] | None = None,
) -> None:
    """Eviction: the awake models, the next ones and the residues must fit the
    budget (and the sleepers' host memory the host budget); the sleepers that
    stay asleep are stopped in ``order`` (else least recently used first)."""
    staying = [m for m in release.sleepers if m not in waking]
    budget = spec.vram_budget_mib if spec.vram_budget_mib is not None else (total_mib - margin_mib if total_mib is not None else None)
    base = _awake_reservations(spec, desired, observed, live, release, waking, total_mib)
    # The model put to sleep now was awake until now: the most recently used, the last to go.
    rank = {m: i for i, m in enumerate(order or ())}
    staying.sort(
        key=lambda m: (m in release.to_sleep, rank.get(m, len(rank)), last_used.get(m, float("-inf")), m),
    )
    host_budget = spec.host_memory_budget_mib if spec.host_memory_budget_mib is not None else default_host_budget_mib
    while staying:
        residues = sum(_residue(spec, m) for m in staying)
        host = sum(spec.models[m].host_memory_asleep_mib for m in staying + waking)
        vram_fits = budget is None or base + residues <= budget
        if vram_fits and (host_budget is None or host <= host_budget):
            break
        evicted = staying.pop(0)
        release.sleepers.remove(evicted)
        release.to_sleep.discard(evicted)
        why = (
            "evicted: its residue does not fit beside the next model"
            if not vram_fits
            else f"evicted: the sleepers' host memory {host} MiB is over the host memory budget {host_budget} MiB"
        )
        release.to_stop.append((evicted, why))


def _awake_reservations(
    spec: DeploymentSpec,
    desired: Desired,
    observed: Observed,
    live: list[Workload],
    release: _Release,
    waking: list[str],
    total_mib: int | None,
) -> int:
    """The reservations of the models awake after the plan: those kept awake
    and those started (or restarted, or woken) by it."""
    restarting = {m for m, _ in release.to_stop}  # wanted but drifted: stopped, then started again
    awake_kept = [
        w.model for w in live if w.model not in release.sleepers and w.model not in restarting and w.state is not WorkloadState.PAUSED
    ]
    starting = [m for m in desired.members if (m in spec.models and (not observed.state(m).live or m in restarting)) or m in waking]
    base = sum(spec.reservation_mib(m, total_mib) or 0 for m in awake_kept if m in spec.models)
    base += sum(spec.reservation_mib(m, total_mib) or 0 for m in starting if m in spec.models)
    return base


def _sleeps_and_stops(spec: DeploymentSpec, observed: Observed, live: list[Workload], release: _Release) -> list[Action]:
    """The sleeps (in the order of ``live``), then the stops, heavy ones first."""
    actions: list[Action] = []
    for w in live:
        if w.model in release.to_sleep:
            actions.append(Sleep(w.model, "not desired" if w.model in spec.models else "not in the spec"))
    for m, reason in sorted(release.to_stop, key=lambda t: (not _heavy(spec, t[0], observed.workloads[t[0]].heavy), t[0])):
        actions.append(Stop(m, reason))
    return actions


def _first_wait(
    spec: DeploymentSpec,
    live: list[Workload],
    sleepers: list[str],
    stopped: list[str],
    baseline_mib: int,
    margin_mib: int,
    total_mib: int | None,
) -> _FirstWait:
    """Memory expected to remain in use by what keeps running. A paused (gated)
    workload is frozen before it could allocate: it is about to be started,
    so it counts in need_free_mib, not here. A sleeper counts by its residue."""
    kept = [w.model for w in live if w.model not in stopped and w.state is not WorkloadState.PAUSED]
    kept_sizes = [(_residue(spec, m) if m in sleepers else spec.reservation_mib(m, total_mib)) if m in spec.models else None for m in kept]
    max_used: int | None = None
    if all(s is not None for s in kept_sizes):
        max_used = baseline_mib + margin_mib + sum(s or 0 for s in kept_sizes)
    return _FirstWait(tuple(stopped), max_used, tuple((m, _residue(spec, m)) for m in sorted(sleepers)))


def _starts(
    spec: DeploymentSpec,
    desired: Desired,
    observed: Observed,
    now: float,
    backoff_until: Mapping[str, float],
    waking: list[str],
    stopped: list[str],
    first: _FirstWait,
    total_mib: int | None,
) -> tuple[list[Action], dict[str, float]]:
    """2. Starts (or wakes), heavy first, each behind a memory wait and followed
    by a health wait, so a companion never races the heavy model's allocation.
    A model still backing off is deferred (model -> its deadline)."""
    actions: list[Action] = []
    deferred: dict[str, float] = {}
    wait: _FirstWait | None = first  # None once the first memory wait is planned
    for m in desired.members:
        if m not in spec.models:
            continue
        current = observed.workloads.get(m)
        state = current.state if current else WorkloadState.ABSENT
        timeout = spec.models[m].start_timeout_seconds
        if m in waking:
            need = max(0, (spec.reservation_mib(m, total_mib) or 0) - _residue(spec, m))
            actions += [_wait_for_memory(need, wait), Wake(m), WaitHealthy(m, timeout)]
            wait = None
            continue
        if current is not None and m not in stopped and state in (WorkloadState.RUNNING, WorkloadState.RESTARTING):
            if not current.ready:
                actions.append(WaitHealthy(m, timeout))
            continue
        until = backoff_until.get(m)
        if until is not None and until > now:
            deferred[m] = until
            continue
        reason = "unpause (gated)" if state is WorkloadState.PAUSED and m not in stopped else "desired"
        actions += [_wait_for_memory(spec.reservation_mib(m, total_mib) or 0, wait), Start(m, reason), WaitHealthy(m, timeout)]
        wait = None
    return actions, deferred


def _wait_for_memory(need_free_mib: int, first: _FirstWait | None) -> WaitForMemory:
    """The memory wait before a start or wake: the first one of the plan also
    waits for what was released (``first``); the later ones for free memory only."""
    if first is None:
        return WaitForMemory(released=(), need_free_mib=need_free_mib, max_used_mib=None, residues=())
    return WaitForMemory(released=first.released, need_free_mib=need_free_mib, max_used_mib=first.max_used_mib, residues=first.residues)


def _heavy(spec: DeploymentSpec, model: str, fallback: bool) -> bool:
    m = spec.models.get(model)
    return m.heavy if m is not None else fallback


def _sleepable(spec: DeploymentSpec, model: str, cold: Set[str]) -> bool:
    m = spec.models.get(model)
    return m is not None and m.heavy and m.warm_switch and model not in cold


def _residue(spec: DeploymentSpec, model: str) -> int:
    return spec.models[model].sleep_settings.max_residue_mib
