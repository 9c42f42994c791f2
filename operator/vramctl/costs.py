"""The switch cost book of one GPU: what each way of giving the GPU away
and taking it back has cost, per model.

Every switch the worker makes is a measurement. Per model and per *path*
(``start``: a cold start to healthy; ``stop``; ``sleep-l1`` / ``sleep-l2``
and ``wake-l1`` / ``wake-l2``; ``checkpoint`` and ``restore``, the driver's
suspend and resume) the book keeps the last ``RECENT`` durations and gives
their median: robust to the one-off outlier (the first level-1 sleep of a
vLLM server pins host memory for 8-9 s; later ones take 0.5 s). Until a
path has been measured its estimate is a *prior* from the model's declared
size (``PRIORS``). Beside the durations it keeps what a sleep left behind:
the residue on the GPU and the host memory the weights took.

``Stopwatch`` turns the worker's progress steps (``starting`` ...
``healthy``, ``stopping`` ... ``stopped``, ``sleeping`` ... ``asleep``,
``waking`` ... ``awake``) into measured durations; ``switch_seconds``
composes the estimate of a whole switch (the active model away, the target
back: Retry-After), ``turn_seconds`` that of a switch there and back (what
the demand queue's serving window avoids). ``choose_way`` picks the
cheapest way a switch can take within the host memory, residue and
pinned-memory budgets and the sleep cycles left; ``eviction_order`` stops
the sleeper cheapest to bring back cold first.

Pure: no I/O, no clock (``now`` is passed in), no logging. The book is a
plain dict on the way out and in (``to_dict`` / ``from_dict``), so the state
file keeps it across restarts; ``from_dict`` takes what it can from damaged
input and drops the rest.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vramctl.spec.models import DeploymentSpec

Path = Literal["start", "stop", "sleep-l1", "sleep-l2", "wake-l1", "wake-l2", "checkpoint", "restore"]
PATHS: tuple[Path, ...] = ("start", "stop", "sleep-l1", "sleep-l2", "wake-l1", "wake-l2", "checkpoint", "restore")
Source = Literal["measured", "prior"]
StepKind = Literal["start", "stop", "sleep", "wake"]

# The estimate is the median of the last RECENT measurements.
RECENT = 7
GIB_MIB = 1024
# The driver's host copy of a checkpointed process: 1.03-1.17x its GPU bytes
# measured (results/warm_proof-checkpoint-h100.json), taken as 1.1x.
CHECKPOINT_HOST_FACTOR = 1.1
# The size assumed for a model that declares none (vramMiB, vLLM's share,
# sleep.hostMemoryMiB): an 8B model's weights in fp8, SDXL's in fp16.
DEFAULT_GIB = 8.0


@dataclass(frozen=True)
class Prior:
    """``floor + per_gib x size``: a path's expected seconds before it is measured."""

    per_gib: float
    floor: float

    def seconds(self, gib: float) -> float:
        return self.floor + self.per_gib * max(0.0, gib)


# From the figures measured on H100 and H200 (benchmarks/results:
# sdxl_gpu-h100.json, warm_proof-h200.json; benchmarks/checkpoint_probe.py):
# - start: our SDXL server (16.5 GiB) took 30.7 s from a cold start to its
#   first image: 1.9 s/GiB; a vLLM cold start is 15-100 s.
# - stop: a SIGTERM'd server exits in about a second; freeing grows a little with size.
# - sleep-l1 / wake-l1: the weights copied to and from pinned host memory;
#   a warm switch of a 14 GiB LLM and SDXL took 0.5 s on an H200 (both ways):
#   0.02 s/GiB, taken here at 0.05 (PCIe Gen4, under 30 GB/s).
# - sleep-l2: the weights dropped (no copy); wake-l2: reloaded from disk,
#   a cold start without the process's own start-up: 1 s/GiB.
# - checkpoint / restore: through vramctl on an H100, driver 580.159.04
#   (results/warm_proof-checkpoint-h100.json): 0.41-0.49 s/GiB away and
#   0.13-0.20 s/GiB back, e.g. a 19 GiB LLM stand-in 9.1 s and 3.7 s, the
#   10.3 GiB SDXL server 4.9 s and 1.8 s: 0.47 and 0.19 s/GiB, with a 0.1 s floor.
PRIORS: Mapping[Path, Prior] = {
    "start": Prior(1.9, 5.0),
    "stop": Prior(0.05, 1.0),
    "sleep-l1": Prior(0.05, 0.2),
    "sleep-l2": Prior(0.01, 0.2),
    "wake-l1": Prior(0.05, 0.2),
    "wake-l2": Prior(1.0, 1.0),
    "checkpoint": Prior(0.47, 0.1),
    "restore": Prior(0.19, 0.1),
}


@dataclass(frozen=True)
class Estimate:
    """What a path is expected to take; ``samples`` 0 means the prior."""

    seconds: float
    source: Source
    samples: int = 0


@dataclass
class PathCosts:
    """One model's record of one path: recent durations (oldest first) and,
    for sleeps and checkpoints, what they left behind."""

    recent: list[float] = field(default_factory=list)
    residue_mib: int | None = None
    host_mib: int | None = None


class CostBook:
    """One GPU's switch costs (owned by its worker's loop; see the module docstring)."""

    def __init__(self, recent: int = RECENT) -> None:
        self.keep = recent
        self.paths: dict[str, dict[Path, PathCosts]] = {}
        # The last whole switches to a model on this GPU, as the worker timed
        # them (in memory only): what a switch takes where a part of it has
        # not been measured for its model yet.
        self.switches: list[float] = []
        self.version = 0  # grows with every change (readers re-render their view)

    def record(self, model: str, path: Path, seconds: float, *, residue_mib: int | None = None, host_mib: int | None = None) -> None:
        """One measurement; a negative or non-finite duration is ignored."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        pc = self.paths.setdefault(model, {}).setdefault(path, PathCosts())
        self.version += 1
        pc.recent = [*pc.recent, seconds][-self.keep :]
        if residue_mib is not None:
            pc.residue_mib = residue_mib
        if host_mib is not None:
            pc.host_mib = host_mib

    def record_switch(self, seconds: float) -> None:
        """One whole switch to a model; a negative or non-finite duration is ignored."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        self.switches = [*self.switches, seconds][-self.keep :]
        self.version += 1

    def switch_median(self) -> float | None:
        """The median of the recent whole switches; None before the first."""
        return statistics.median(self.switches) if self.switches else None

    def costs(self, model: str, path: Path) -> PathCosts | None:
        return self.paths.get(model, {}).get(path)

    def estimate(self, model: str, path: Path, gib: float | None = None) -> Estimate:
        """The median of the recent measurements, else the prior for ``gib``
        (the model's declared size; None: ``DEFAULT_GIB``)."""
        pc = self.costs(model, path)
        if pc is not None and pc.recent:
            return Estimate(statistics.median(pc.recent), "measured", len(pc.recent))
        return Estimate(PRIORS[path].seconds(DEFAULT_GIB if gib is None else gib), "prior")

    def forget(self, keep_models: Iterable[str]) -> None:
        """Drop the models no longer in the spec."""
        keep = set(keep_models)
        self.paths = {m: p for m, p in self.paths.items() if m in keep}
        self.version += 1

    # -- a plain dict, for the state file --------------------------------------------

    def to_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{model: {path: {"recent": [s, ...], "residueMiB": n, "hostMemoryMiB": n}}}``."""
        return {m: {p: _path_dict(pc) for p, pc in sorted(paths.items())} for m, paths in sorted(self.paths.items())}

    @classmethod
    def from_dict(cls, data: Any, recent: int = RECENT) -> CostBook:
        """The book ``to_dict`` (or ``view``) wrote; entries of the wrong shape are dropped."""
        book = cls(recent)
        if not isinstance(data, Mapping):
            return book
        for model, paths in data.items():
            if not isinstance(model, str) or not isinstance(paths, Mapping):
                continue
            for path, entry in paths.items():
                if path not in PATHS or not isinstance(entry, Mapping):
                    continue
                seconds = entry.get("recent")
                if not isinstance(seconds, list):
                    continue
                good = [float(s) for s in seconds if _number(s) and math.isfinite(s) and s >= 0]
                if not good:
                    continue
                pc = PathCosts(good[-recent:], _mib(entry.get("residueMiB")), _mib(entry.get("hostMemoryMiB")))
                book.paths.setdefault(model, {})[path] = pc
        return book

    def view(self, spec: DeploymentSpec, total_mib: int | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Per model of ``spec``, the paths it may take (and any measured):
        the estimate in use, its source, and the record behind it (``/status``'s
        ``costs``; ``from_dict`` reads it back)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for m in sorted(spec.models):
            paths = [p for p in PATHS if p in paths_of(spec, m) or self.costs(m, p) is not None]
            entry: dict[str, dict[str, Any]] = {}
            for p in paths:
                est = self.estimate(m, p, declared_gib(spec, m, p, total_mib))
                pc = self.costs(m, p)
                entry[p] = {"seconds": round(est.seconds, 3), "source": est.source, **(_path_dict(pc) if pc is not None else {})}
            out[m] = entry
        return out


def _path_dict(pc: PathCosts) -> dict[str, Any]:
    d: dict[str, Any] = {"recent": [round(s, 3) for s in pc.recent]}
    if pc.residue_mib is not None:
        d["residueMiB"] = pc.residue_mib
    if pc.host_mib is not None:
        d["hostMemoryMiB"] = pc.host_mib
    return d


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _mib(x: Any) -> int | None:
    return int(x) if _number(x) and math.isfinite(x) and x >= 0 else None


# -- what a model's paths are, and how big it says it is --------------------------------


def paths_of(spec: DeploymentSpec, model: str) -> tuple[Path, ...]:
    """The ways ``model`` can go and come back under its spec (its
    switchStrategy; auto: stop or sleep, and checkpoint with ``sleep.checkpoint``)."""
    m = spec.models[model]
    if m.switch_strategy == "checkpoint":
        return ("start", "stop", "checkpoint", "restore")
    if m.sleeps_by_api:
        level = m.sleep_settings.level
        sleep: tuple[Path, ...] = ("sleep-l1", "wake-l1") if level == 1 else ("sleep-l2", "wake-l2")
        return ("start", "stop", *sleep, *(("checkpoint", "restore") if m.auto_checkpoint else ()))
    return ("start", "stop")


def declared_gib(spec: DeploymentSpec, model: str, path: Path, total_mib: int | None = None) -> float | None:
    """The size a path's prior scales with: the weights in host memory for
    the copies (``sleep.hostMemoryMiB``, when declared), else the model's
    VRAM reservation; None when the spec says neither. An auto model's
    checkpoint copies all its GPU memory, not only the weights its
    hostMemoryMiB declares: its reservation first."""
    m = spec.models.get(model)
    if m is None:
        return None
    host = m.sleep_settings.host_memory_mib if m.sleep is not None else None
    if path in ("checkpoint", "restore") and m.switch_strategy == "auto":
        mib = spec.reservation_mib(model, total_mib)
        return mib / GIB_MIB if mib else host / GIB_MIB if host else None
    if path in ("sleep-l1", "wake-l1", "wake-l2", "checkpoint", "restore") and host:
        return host / GIB_MIB
    mib = spec.reservation_mib(model, total_mib)
    return mib / GIB_MIB if mib else None


def path_of(spec: DeploymentSpec, model: str, kind: StepKind, way: str | None = None) -> Path:
    """The path a measured step took: sleeps and wakes by the model's level;
    a checkpointed model's "sleep" is its checkpoint, its "wake" the restore
    (``way``: the way an auto model went, ``SleepBook.ways``)."""
    if kind in ("start", "stop"):
        return kind
    m = spec.models.get(model)
    if m is not None and (m.switch_strategy == "checkpoint" or (way == "checkpoint" and m.auto_checkpoint)):
        return "checkpoint" if kind == "sleep" else "restore"
    level = m.sleep_settings.level if m is not None else 1
    return "sleep-l1" if kind == "sleep" and level == 1 else "sleep-l2" if kind == "sleep" else "wake-l1" if level == 1 else "wake-l2"


def switch_seconds(
    book: CostBook,
    spec: DeploymentSpec,
    active: str | None,
    target: str,
    asleep: Iterable[str] = (),
    total_mib: int | None = None,
) -> float:
    """The estimated seconds of a switch from ``active`` to ``target``: the
    active model away (a sleep when it sleeps, else a stop) plus the target
    back (a wake when it is asleep, else a cold start). Nothing to do: 0.

    Where a part of it has not been measured for its model, what this GPU's
    recent switches took (their median) stands for the whole switch: a prior
    from the declared size may be off by tens of seconds where the GPU's own
    switches say otherwise. Before the first switch: the priors."""
    if active == target:
        return 0.0
    parts: list[Estimate] = []
    if active is not None and active in spec.models:
        away = path_of(spec, active, "sleep") if spec.models[active].warm_switch else "stop"
        parts.append(book.estimate(active, away, declared_gib(spec, active, away, total_mib)))
    if target in spec.models:
        back = path_of(spec, target, "wake") if target in set(asleep) else "start"
        parts.append(book.estimate(target, back, declared_gib(spec, target, back, total_mib)))
    whole = book.switch_median()
    if whole is not None and any(e.source == "prior" for e in parts):
        return whole
    return sum(e.seconds for e in parts)


def turn_seconds(
    book: CostBook,
    spec: DeploymentSpec,
    active: str | None,
    target: str,
    asleep: Iterable[str] = (),
    total_mib: int | None = None,
) -> float:
    """What giving the GPU to ``target`` costs in switches: there, and back
    to ``active`` (asleep by then when it sleeps): the switches a serving
    window avoids (``demand.policy``'s ``switch_costs``)."""
    if active is None or active == target:
        return switch_seconds(book, spec, active, target, asleep, total_mib)
    after = set(asleep) - {target}
    if active in spec.models and spec.models[active].warm_switch:
        after.add(active)
    there = switch_seconds(book, spec, active, target, asleep, total_mib)
    return there + switch_seconds(book, spec, target, active, after, total_mib)


# -- measuring: progress steps in, durations out -----------------------------------------

# The progress step that begins each kind of step, and the one that ends it.
BEGINS: Mapping[str, StepKind] = {"starting": "start", "stopping": "stop", "sleeping": "sleep", "waking": "wake"}
ENDS: Mapping[str, StepKind] = {"healthy": "start", "stopped": "stop", "asleep": "sleep", "awake": "wake"}
# Steps after which the step in progress measures nothing (it failed or went the cold way).
ABORTS = frozenset({"failed", "SleepFallback", "removed-outside"})


class Stopwatch:
    """Times each model's step from the progress step that begins it to the
    one that ends it (a wake's ``healthy`` is not its end: ``awake`` is).
    A step that fails, or is begun again, measures nothing (begun again:
    timed from the new beginning)."""

    def __init__(self) -> None:
        self._began: dict[str, tuple[StepKind, float]] = {}

    def step(self, step: str, model: str | None, now: float) -> tuple[StepKind, float] | None:
        """Fold one progress step in; the kind and seconds of the step it ends, if any."""
        if model is None:
            return None
        if step in BEGINS:
            self._began[model] = (BEGINS[step], now)
            return None
        if step in ABORTS:
            self._began.pop(model, None)
            return None
        kind = ENDS.get(step)
        began = self._began.get(model)
        if kind is None or began is None or began[0] != kind:
            return None
        del self._began[model]
        return kind, max(0.0, now - began[1])

    @property
    def pending(self) -> Mapping[str, tuple[StepKind, float]]:
        return dict(self._began)


# -- the way a switch takes, and who is evicted ------------------------------------------

Way = Literal["stop", "sleep", "checkpoint"]


@dataclass(frozen=True)
class WayNeeds:
    """One way for a model to give the GPU away and take it back, and what
    it holds meanwhile: host memory (of it ``pinned_mib`` page-locked), GPU
    residue, and whether it counts against ``sleep.maxCycles``."""

    way: Way
    away: Path
    back: Path
    host_mib: int = 0
    residue_mib: int = 0
    pinned_mib: int = 0
    cycles: bool = False


@dataclass(frozen=True)
class Budgets:
    """What a model going away may still take (None: no limit): host memory
    left beside the other sleepers and checkpoints, GPU memory left for
    residues beside the next model, the pinned-memory ceiling (probed at
    start; under 1 GiB on WSL2 and Docker Desktop), and whether its sleep
    cycles are not used up."""

    host_mib: int | None = None
    residue_mib: int | None = None
    pinned_mib: int | None = None
    cycles_left: bool = True


@dataclass(frozen=True)
class Choice:
    needs: WayNeeds
    seconds: float  # away and back
    why: str

    @property
    def way(self) -> Way:
        return self.needs.way


def checkpoint_host_mib(spec: DeploymentSpec, model: str, total_mib: int | None = None) -> int:
    """The host memory ``model`` holds while checkpointed, MiB: its declared
    ``sleep.hostMemoryMiB`` under switchStrategy checkpoint (declared as
    about 1.1x its VRAM); under auto (whose hostMemoryMiB is the sleep's
    weights) ``CHECKPOINT_HOST_FACTOR`` x its VRAM reservation, at least the
    hostMemoryMiB."""
    m = spec.models[model]
    host = m.sleep_settings.host_memory_mib or 0
    if m.switch_strategy != "auto":
        return host
    vram = spec.reservation_mib(model, total_mib) or host
    return max(host, math.ceil(CHECKPOINT_HOST_FACTOR * vram))


def ways_of(
    book: CostBook, spec: DeploymentSpec, model: str, checkpoint: bool = False, total_mib: int | None = None
) -> tuple[WayNeeds, ...]:
    """The ways ``model`` may take under its spec: a stop always; its sleep
    (level 1 pins its weights' copy in host memory) or its checkpoint (the
    driver keeps the memory in host RAM and nothing on the GPU). The residue
    is the last measured one, else ``sleep.maxResidueMiB``. An auto model
    with ``sleep.checkpoint`` has its checkpoint too where ``checkpoint``
    says the driver offers it (available at start, never refused for it)."""
    m = spec.models[model]
    stop = WayNeeds("stop", "stop", "start")
    if not m.warm_switch:
        return (stop,)
    s = m.sleep_settings
    host = s.host_memory_mib or 0
    if m.switch_strategy == "checkpoint":
        return (stop, WayNeeds("checkpoint", "checkpoint", "restore", host_mib=host, cycles=True))
    away = path_of(spec, model, "sleep")
    known = book.costs(model, away)
    residue = known.residue_mib if known is not None and known.residue_mib is not None else s.max_residue_mib
    level1 = s.level == 1
    sleep = WayNeeds(
        "sleep",
        away,
        path_of(spec, model, "wake"),
        host_mib=host if level1 else 0,
        residue_mib=residue,
        pinned_mib=host if level1 else 0,
        cycles=True,
    )
    if not (checkpoint and m.auto_checkpoint):
        return (stop, sleep)
    return (stop, sleep, WayNeeds("checkpoint", "checkpoint", "restore", host_mib=checkpoint_host_mib(spec, model, total_mib), cycles=True))


def over_budget(w: WayNeeds, b: Budgets) -> str | None:
    """Why ``w`` does not fit ``b``, or None."""
    if b.host_mib is not None and w.host_mib > b.host_mib:
        return f"{w.host_mib} MiB of host memory, {b.host_mib} MiB left"
    if b.residue_mib is not None and w.residue_mib > b.residue_mib:
        return f"a residue of {w.residue_mib} MiB on the GPU, {b.residue_mib} MiB left"
    if b.pinned_mib is not None and w.pinned_mib > b.pinned_mib:
        return f"{w.pinned_mib} MiB of pinned memory, over the ceiling of {b.pinned_mib} MiB"
    if w.cycles and not b.cycles_left:
        return "its sleep.maxCycles are used up"
    return None


def choose_way(
    book: CostBook, spec: DeploymentSpec, model: str, ways: Iterable[WayNeeds], budgets: Budgets, total_mib: int | None = None
) -> Choice:
    """The cheapest way (away and back, by the book's estimates) that fits
    every budget; a stop needs none, so there is always one. ``why`` says
    what it costs, what the others would, and why any does not fit, then
    the estimates behind the choice (each path's seconds and source)."""
    fitting: list[tuple[float, WayNeeds]] = []
    refused: list[str] = []

    def estimates(w: WayNeeds) -> tuple[Estimate, Estimate]:
        return (
            book.estimate(model, w.away, declared_gib(spec, model, w.away, total_mib)),
            book.estimate(model, w.back, declared_gib(spec, model, w.back, total_mib)),
        )

    for w in ways:
        problem = over_budget(w, budgets)
        seconds = sum(e.seconds for e in estimates(w))
        if problem is None:
            fitting.append((seconds, w))
        else:
            refused.append(f"{w.way} does not fit ({problem})")
    if not any(w.way == "stop" for _, w in fitting):
        stop = WayNeeds("stop", "stop", "start")
        fitting.append((sum(book.estimate(model, p, declared_gib(spec, model, p, total_mib)).seconds for p in ("stop", "start")), stop))
    fitting.sort(key=lambda sw: sw[0])
    seconds, best = fitting[0]
    others = [f"{w.way} {s:.1f} s" for s, w in fitting[1:]]
    why = f"{best.way}: {seconds:.1f} s away and back" + (f" (against {', '.join(others)})" if others else "")
    away, back = estimates(best)
    basis = f"; {best.away} {away.seconds:.1f} s ({_source(away)}) + {best.back} {back.seconds:.1f} s ({_source(back)})"
    return Choice(best, seconds, why + "".join(f"; {r}" for r in refused) + basis)


def _source(e: Estimate) -> str:
    return f"median of {e.samples}" if e.source == "measured" else "prior from its size"


# Cold starts this close count as equally costly (eviction_order).
EQUAL_SECONDS = 1.0
EQUAL_FRACTION = 0.25


def eviction_order(
    book: CostBook, spec: DeploymentSpec, sleepers: Iterable[str], last_used: Mapping[str, float], total_mib: int | None = None
) -> list[str]:
    """The sleepers in the order they are stopped when room is needed: the
    one cheapest to bring back cold first (by the book's ``start``
    estimate), the least recently used among equals. Costs within
    ``EQUAL_SECONDS`` or ``EQUAL_FRACTION`` of the cheapest of a group count
    as equal: two cold starts of 0.52 and 0.55 s differ by noise, not by
    what bringing them back costs."""
    cold = {m: book.estimate(m, "start", declared_gib(spec, m, "start", total_mib)).seconds for m in sleepers if m in spec.models}

    def recency(m: str) -> tuple[float, str]:
        return (last_used.get(m, 0.0), m)

    out: list[str] = []
    group: list[str] = []
    for m in sorted(cold, key=lambda m: (cold[m], m)):
        if group and cold[m] > cold[group[0]] + max(EQUAL_SECONDS, EQUAL_FRACTION * cold[group[0]]):
            out += sorted(group, key=recency)
            group = []
        group.append(m)
    return out + sorted(group, key=recency)


def budgets_for(
    spec: DeploymentSpec,
    model: str,
    *,
    sleepers: Iterable[str],
    awake_next: Iterable[str],
    cycles_left: bool = True,
    total_mib: int | None = None,
    margin_mib: int = 256,
    host_budget_mib: int | None = None,
    pinned_ceiling_mib: int | None = None,
    host_held: Mapping[str, int] | None = None,
) -> Budgets:
    """What is left for ``model`` going away beside the other ``sleepers``
    (asleep and staying so) while ``awake_next`` run: the host memory budget
    (``hostMemoryBudgetMiB``, else ``host_budget_mib``) less the sleepers'
    host memory; the GPU's budget (``vramBudgetMiB``, else total less the
    margin) less the next models' reservations and the sleepers' residues;
    the pinned-memory ceiling (``pinnedMemoryCeilingMiB``, else
    ``pinned_ceiling_mib``, the probe's) less what the level-1 sleepers pin.
    None where the budget is unknown (no limit). ``host_held``: what a
    sleeper holds in host memory when not its ``host_memory_asleep_mib``
    (an auto model checkpointed: ``checkpoint_host_mib``; it pins nothing
    and leaves no residue)."""
    others = [m for m in dict.fromkeys(sleepers) if m != model and m in spec.models]
    held = host_held or {}
    host_budget = spec.host_memory_budget_mib if spec.host_memory_budget_mib is not None else host_budget_mib
    host_left = None if host_budget is None else host_budget - sum(held.get(m, spec.models[m].host_memory_asleep_mib) for m in others)
    vram = spec.vram_budget_mib if spec.vram_budget_mib is not None else (total_mib - margin_mib if total_mib is not None else None)
    residue_left = None
    if vram is not None:
        awake = sum(spec.reservation_mib(m, total_mib) or 0 for m in dict.fromkeys(awake_next) if m in spec.models and m != model)
        residue_left = vram - awake - sum(spec.models[m].sleep_settings.max_residue_mib for m in others if m not in held)
    ceiling = spec.pinned_memory_ceiling_mib if spec.pinned_memory_ceiling_mib is not None else pinned_ceiling_mib
    pinned = [m for m in others if spec.models[m].sleeps_by_api and spec.models[m].sleep_settings.level == 1]
    pinned_left = None if ceiling is None else ceiling - sum(spec.models[m].host_memory_asleep_mib for m in pinned)
    return Budgets(host_left, residue_left, pinned_left, cycles_left)
