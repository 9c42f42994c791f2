"""Warm switching's bookkeeping for one GPU, owned by its worker's loop.

``SleepBook`` remembers what the loop did about sleeps between ticks: which
models it put to sleep and when (the residue still to be verified with the
GPU probe), each model's cycles and residues (maxCycles, a residue growing
across cycles), which models woke and must become healthy in time, when each
was last awake (eviction order), which must go the cold way this time
(a ``SleepFallback``), the way each ``switchStrategy: auto`` model went
(sleep or checkpoint: ``ways``, read by the sleeper that routes the call and
by the cost book's measurements) and which auto models are not offered the
driver's checkpoint again (``no_checkpoint``: refused or fell back once;
kept until the worker restarts, a stop does not clear it). ``Sleeper`` is the port to the model servers
(``HttpSleeper``: ``sleepctl`` at the model's health host and port).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from vramctl.gpu.base import GpuProbe
from vramctl.observed import GpuSnapshot, Observed
from vramctl.reconcile.context import LoopContext
from vramctl.runtimes import sleepctl
from vramctl.spec.models import DeploymentSpec

FALLBACK_REASONS = ("SleepFailed", "SleepTimeout", "ResidueOverLimit", "ResidueGrowing", "WakeFailed", "MaxCycles", "CheckpointRefused")
MIB = 1 << 20


class Sleeper(Protocol):
    def sleep(self, spec: DeploymentSpec, model: str) -> int | None:
        """Ask ``model`` to sleep; the residue its server reports (MiB), if any."""

    def wake(self, spec: DeploymentSpec, model: str) -> None: ...

    def is_sleeping(self, spec: DeploymentSpec, model: str) -> bool | None:
        """Whether it sleeps; None when it cannot tell (no state path)."""


class HttpSleeper:
    """The model servers' sleep API through ``sleepctl``. A sleep waits at
    most the model's own ``sleep.timeoutSeconds`` (``sleep_timeout_s``, when
    given, for every model): past it, the call fails (SleepTimeout) and the
    model goes the cold way at once."""

    def __init__(self, sleep_timeout_s: float | None = None, wake_timeout_s: float = 60.0, state_timeout_s: float = 1.0) -> None:
        self.sleep_timeout_s, self.wake_timeout_s, self.state_timeout_s = sleep_timeout_s, wake_timeout_s, state_timeout_s

    def sleep(self, spec: DeploymentSpec, model: str) -> int | None:
        t = _target(spec, model)
        timeout = self.sleep_timeout_s if self.sleep_timeout_s is not None else spec.models[model].sleep_timeout_seconds
        return sleepctl.sleep(t.base_url, t.api, t.level, timeout).residue_mib

    def wake(self, spec: DeploymentSpec, model: str) -> None:
        t = _target(spec, model)
        sleepctl.wake(t.base_url, t.api, self.wake_timeout_s)

    def is_sleeping(self, spec: DeploymentSpec, model: str) -> bool | None:
        if model not in spec.models:
            return None
        t = sleepctl.target_of(spec, model)
        if t is None:
            return None
        return sleepctl.is_sleeping(t.base_url, t.api, self.state_timeout_s)


def _target(spec: DeploymentSpec, model: str) -> sleepctl.SleepTarget:
    t = sleepctl.target_of(spec, model)
    if t is None:
        raise sleepctl.SleepCallError(f"{model!r} has no sleep API (switchStrategy stop)", "answer")
    return t


def sleepable(spec: DeploymentSpec, model: str) -> bool:
    m = spec.models.get(model)
    return m is not None and m.warm_switch  # sleep or checkpoint


class SleepMetrics:
    """vramctl_sleep_fallbacks_total{gpu,reason} and vramctl_model_sleep_residue_bytes{gpu,model}
    (the host memory of sleeping models is read at scrape time: ``telemetry``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.fallbacks = Counter(
            "vramctl_sleep_fallbacks", "Warm switches that went the cold way, by reason.", ["gpu", "reason"], registry=registry
        )
        self.residue = Gauge(
            "vramctl_model_sleep_residue_bytes", "GPU memory a sleeping model kept at its last sleep.", ["gpu", "model"], registry=registry
        )

    def init_gpu(self, gpu: int) -> None:
        for r in FALLBACK_REASONS:
            self.fallbacks.labels(str(gpu), r)


@dataclass
class SleepBook:
    """What the loop remembers about sleeps (see the module's docstring)."""

    slept_at: dict[str, float] = field(default_factory=dict)  # sleep returned, residue not yet verified
    asleep: set[str] = field(default_factory=set)  # put to sleep by vramctl (or found asleep)
    cycles: dict[str, int] = field(default_factory=dict)
    residues: dict[str, list[int]] = field(default_factory=dict)  # verified residue per cycle, MiB
    waking: set[str] = field(default_factory=set)  # woken, not yet healthy
    last_used: dict[str, float] = field(default_factory=dict)
    cold: set[str] = field(default_factory=set)
    ways: dict[str, str] = field(default_factory=dict)  # auto model -> "sleep" | "checkpoint", its latest way away
    no_checkpoint: set[str] = field(default_factory=set)  # auto models whose checkpoint was refused or fell back
    strategy: str = "cold"  # of the switch in progress (its duration's label)

    def slept(self, m: str, now: float) -> None:
        self.slept_at[m] = now
        self.asleep.add(m)
        self.last_used[m] = now
        self.cycles[m] = self.cycles.get(m, 0) + 1

    def woke(self, m: str, now: float) -> None:
        self.asleep.discard(m)
        self.slept_at.pop(m, None)
        self.waking.add(m)
        self.last_used[m] = now

    def gone(self, m: str) -> None:
        """Stopped: a fresh process next time (cycles, residues and the fall-back start over)."""
        for d in (self.slept_at, self.cycles, self.residues):
            d.pop(m, None)
        self.asleep.discard(m)
        self.waking.discard(m)
        self.cold.discard(m)
        self.ways.pop(m, None)

    def cycles_reached(self, spec: DeploymentSpec, m: str) -> bool:
        limit = spec.models[m].sleep_settings.max_cycles if m in spec.models else None
        return limit is not None and self.cycles.get(m, 0) >= limit

    def verify(
        self, spec: DeploymentSpec, snap: GpuSnapshot, baseline_mib: int, now: float, max_grace_s: float
    ) -> list[tuple[str, str, str]]:
        """Check the residues of the sleeps that returned. Returns (model, step,
        message) for each verdict: step ``asleep`` (verified), or a fall-back
        reason (``ResidueOverLimit`` after the model's ``sleep.residueSettleSeconds``,
        at most ``max_grace_s``; ``ResidueGrowing``)."""
        out: list[tuple[str, str, str]] = []
        for m, at in sorted(self.slept_at.items()):
            if m not in spec.models:
                self.slept_at.pop(m)
                continue
            settings = spec.models[m].sleep_settings
            limit, grace_s = settings.max_residue_mib, min(settings.residue_settle_seconds, max_grace_s)
            others = sum(spec.models[o].sleep_settings.max_residue_mib for o in self.asleep if o != m and o in spec.models)
            held = sleepctl.held_mib(snap, m, baseline_mib, others)
            if held > limit:
                if now - at >= grace_s:
                    self.slept_at.pop(m)
                    msg = f"{m!r} still holds {held} MiB {now - at:.1f}s after its sleep, over its maxResidueMiB {limit}"
                    out.append((m, "ResidueOverLimit", msg))
                continue
            self.slept_at.pop(m)
            history = self.residues.setdefault(m, [])
            if sleepctl.residue_growing(history, held):
                out.append((m, "ResidueGrowing", f"{m!r} keeps more after each sleep: {[*history, held]} MiB"))
                history.append(held)
                continue
            history.append(held)
            out.append((m, "asleep", f"{m!r} asleep after {now - at:.2f}s, holding {held} MiB (maxResidueMiB {limit})"))
        return out

    def host_mib(self, spec: DeploymentSpec) -> int:
        return sum(spec.models[m].host_memory_asleep_mib for m in self.asleep if m in spec.models)


class WarmSwitches:
    """The loop's side of warm switches that needs its worker (``ctx``: notes;
    ``metrics``: fall-backs and residues counted): fall-backs, the residue
    check after a sleep, a woken model becoming healthy. Only the worker's
    loop calls it."""

    def __init__(self, ctx: LoopContext, book: SleepBook, metrics: SleepMetrics | None = None) -> None:
        self.ctx, self.book, self.metrics = ctx, book, metrics

    def fallback(self, spec: DeploymentSpec, m: str, reason: str, why: str, now: float) -> None:
        """A warm switch goes the cold way: ``m`` is stopped (and started cold when wanted)."""
        self.book.cold.add(m)
        self.book.waking.discard(m)
        self.book.strategy = "cold"
        auto_checkpoint = m in spec.models and spec.models[m].auto_checkpoint
        checkpointed = self.book.ways.get(m) == "checkpoint" and reason != "MaxCycles"
        if auto_checkpoint and (checkpointed or reason == "CheckpointRefused"):
            self.book.no_checkpoint.add(m)
            why += "; checkpoint is not offered to it again until vramctl restarts"
        self.ctx.note("SleepFallback", m, f"{reason}: {why}; stopping {m!r} and going the cold way")
        if self.metrics is not None:
            self.metrics.fallbacks.labels(str(spec.gpu), reason).inc()

    def verify(self, spec: DeploymentSpec, probe: GpuProbe, baseline_mib: int, now: float, memory_timeout_s: float) -> bool:
        """The sleeps that returned, checked on the GPU. True when one fell back (re-plan)."""
        try:
            snap = probe.snapshot()
        except Exception:
            return False
        fell = False
        for m, step, msg in self.book.verify(spec, snap, baseline_mib, now, memory_timeout_s):
            if step == "asleep":
                self.ctx.note("asleep", m, msg)
                if self.metrics is not None:
                    self.metrics.residue.labels(str(spec.gpu), m).set(self.book.residues[m][-1] * MIB)
            else:
                self.fallback(spec, m, step, msg, now)
                fell = True
        return fell

    def awake(self, observed: Observed, started_at: Mapping[str, float], now: float) -> None:
        """Woken models seen healthy: the ``awake`` step."""
        for m in sorted(self.book.waking):
            w = observed.workloads.get(m)
            if w is None or not w.state.live:
                self.book.waking.discard(m)
            elif w.ready:
                self.book.waking.discard(m)
                self.book.last_used[m] = now
                self.ctx.note("awake", m, f"{m!r} awake and healthy after {now - started_at.get(m, now):.2f}s")
