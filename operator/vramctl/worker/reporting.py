"""The worker's reporting side: what its reconciler tells it (progress,
phase, conditions, switch outcomes, violations, gated starts) and the
immutable status snapshot it publishes.

Why a part of its own: the worker holds one ``WorkerReporter`` (composed,
not inherited), so what the status says is decided here alone and can be
read without the worker's commands around it. Runs on the worker's loop
thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from prometheus_client import Counter, Histogram

from vramctl.costs import CostBook, Stopwatch, path_of
from vramctl.gpu.base import GpuProbe
from vramctl.host.memory import budget_in_use
from vramctl.observed import Desired
from vramctl.reconcile.context import LoopSettings
from vramctl.reconcile.reconciler import Reconciler
from vramctl.runtimes.base import Runtime, StartEvent
from vramctl.spec.models import DeploymentSpec, DesiredStateError, check_desired
from vramctl.spec.pitfalls import Finding, env_pitfalls
from vramctl.status.book import WARNING_STEPS, StatusBook, SwitchRecord
from vramctl.status.redact import redact

log = logging.getLogger("vramctl.worker.supervisor")


class ReportMetrics(Protocol):
    """The counters the reporter moves (``worker.actor.Metrics``)."""

    @property
    def switches(self) -> Counter: ...
    @property
    def switch_duration(self) -> Histogram: ...
    @property
    def violations(self) -> Counter: ...
    @property
    def gated(self) -> Counter: ...


class WorkerReporter:
    """Status, progress and metrics of one GPU's worker. ``rec``: the loop's
    state it reports on; ``write_status``: the status sink, if any;
    ``costs``: the switch cost book, fed by the steps the progress records
    (``costs.Stopwatch``) and published as the status's ``costs``."""

    def __init__(
        self,
        gpu: int,
        rec: Reconciler,
        book: StatusBook,
        metrics: ReportMetrics,
        *,
        runtime: Runtime,
        probe: GpuProbe,
        settings: LoopSettings,
        write_status: Callable[[int, dict[str, Any]], None] | None,
        clock: Callable[[], float],
        wall: Callable[[], float],
        costs: CostBook | None = None,
    ) -> None:
        self.gpu, self.rec, self.book, self.metrics = gpu, rec, book, metrics
        self.costs = costs or CostBook()
        self.stopwatch = Stopwatch()
        self._costs_view: tuple[int, DeploymentSpec, int | None, dict[str, Any]] | None = None
        self.runtime, self.probe, self.write_status = runtime, probe, write_status
        self.settings, self.clock, self.wall = settings, clock, wall
        self.findings: list[Finding] = []
        self.status: Mapping[str, Any] = {}
        self._last_written: dict[str, Any] | None = None
        self._secrets: tuple[DeploymentSpec, frozenset[str]] | None = None

    # ----------------------------------- what the reconciler tells its worker

    def redacted(self, text: str) -> str:
        """``text`` with the spec's secrets (and token-shaped strings) masked: log
        lines of a failed start may echo an ``--api-key``."""
        spec = self.rec.spec
        if self._secrets is None or self._secrets[0] is not spec:
            self._secrets = (spec, spec.secrets())
        return redact(text, self._secrets[1])

    def note(self, step: str, model: str | None, message: str) -> None:
        message = self.redacted(message)
        self.book.note(step, model, message, self.wall())
        log.log(logging.WARNING if step in WARNING_STEPS else logging.INFO, "gpu%d: %s", self.gpu, message)
        self._measure(step, model)

    def _measure(self, step: str, model: str | None) -> None:
        """A step that ends a start, stop, sleep or wake is a measurement for the cost book."""
        done = self.stopwatch.step(step, model, self.clock())
        spec = self.rec.spec
        if done is None or model is None or model not in spec.models:
            return
        kind, seconds = done
        residue = host = None
        if kind == "sleep":
            history = self.rec.sleep.residues.get(model)
            residue = history[-1] if history else None
            host = spec.models[model].host_memory_asleep_mib or None
        way = self.rec.sleep.ways.get(model)
        self.costs.record(model, path_of(spec, model, kind, way), seconds, residue_mib=residue, host_mib=host)

    def phase(self, phase: str, reason: str, message: str) -> None:
        message = self.redacted(message)
        self.book.set_phase(phase, reason, message, self.rec.desired.generation, self.wall())

    def condition(self, ctype: str, value: bool, reason: str, message: str) -> None:
        self.book.set_condition(ctype, value, reason, message, self.rec.desired.generation, self.wall())

    def begin_switch(self, source: str | None, target: str | None, now: float) -> None:
        self.book.switch = SwitchRecord(source, target, now)
        self.note("switch-started", target, f"switch {source or '(none)'} -> {target or '(none)'} started")
        self.phase("Switching", "Switching", f"{source or '(none)'} -> {target or '(none)'}")

    def finish_switch(self, outcome: str, now: float) -> None:
        """Record the outcome (the desired generation it answers, and the switch in progress, if any)."""
        self.book.observed_generation = self.rec.desired.generation
        sw = self.book.switch
        if sw is None:
            return
        duration = now - sw.started
        self.book.finish_switch(outcome, duration, self.rec.desired.generation, self.wall())
        self.metrics.switches.labels(str(self.gpu), outcome).inc()
        if outcome == "success":
            self.metrics.switch_duration.labels(str(self.gpu), self.rec.sleep.strategy).observe(duration)
            if sw.target is not None:
                self.costs.record_switch(duration)
        self.note(
            "switch-" + outcome, sw.target, f"switch {sw.source or '(none)'} -> {sw.target or '(none)'}: {outcome} in {duration:.2f}s"
        )

    def violation(self, heavy_live: list[str]) -> None:
        self.metrics.violations.labels(str(self.gpu)).inc()
        self.note("violation", None, f"two heavy workloads running on gpu {self.gpu}: {', '.join(heavy_live)}")

    def gated(self, ev: StartEvent, not_adopted: str | None) -> None:
        """A start made behind vramctl's back was paused (counted and said)."""
        self.metrics.gated.labels(str(self.gpu)).inc()
        if not_adopted is not None:
            self.note("gated", ev.model, f"{ev.model!r} was started outside vramctl: paused and not kept, since {not_adopted}")
        else:
            self.note("gated", ev.model, f"{ev.model!r} was started outside vramctl: paused until the GPU is free")

    # ----------------------------------------------------------- status

    def check_config(self, spec: DeploymentSpec, total_mib: int | None) -> None:
        """Pitfalls of the spec (pitfalls.env_pitfalls) as the ConfigWarnings condition:
        reported while the config is in use, not discovered when a model fails."""
        self.findings = env_pitfalls(spec, total_mib)
        if self.findings:
            message = "; ".join(f"{f.path}: {f.message}" for f in self.findings)
            self.condition("ConfigWarnings", True, "PitfallsFound", message)
            for f in self.findings:
                log.warning("gpu%d: config: %s", self.gpu, f.render())
        else:
            self.condition("ConfigWarnings", False, "NoPitfalls", "no known pitfalls in the spec")

    def check_initial(self, spec: DeploymentSpec, d: Desired, total_mib: int | None) -> None:
        """The desired state handed in at start (state file, config) gets the
        same validation as a request: invalid, nothing is done for it and the
        status says why in the same words (a request or a spec change lifts it)."""
        try:
            check_desired(spec, d.active, d.companions, total_mib)
        except DesiredStateError as err:
            self.rec.invalid = (
                f"the desired state {d.active or '(none)'}"
                + (f" + {', '.join(d.companions)}" if d.companions else "")
                + f" is refused: {err}"
            )
            self.note("rejected", d.active, self.rec.invalid)
            self.phase("Failed", "InvalidDesiredState", self.rec.invalid)

    def _host_budget(self) -> dict[str, Any]:
        """``hostMemoryBudget``: what the level-1 sleepers are held to, and
        where it comes from; only where a model sleeps at level 1 or a reading exists."""
        spec, reading = self.rec.spec, self.settings.host_memory
        pinned = spec.host_memory_budget_mib is not None
        if not pinned and reading is None and not any(m.host_memory_asleep_mib for m in spec.models.values()):
            return {}
        mib, source = budget_in_use(spec.host_memory_budget_mib, reading)
        return {"hostMemoryBudget": {"mib": mib, "source": source}}

    def _pinned_ceiling(self) -> dict[str, Any]:
        """``pinnedMemoryCeiling``: what switchStrategy auto holds a level-1
        sleep's pinned copy to, and where it comes from; only where a model is auto."""
        spec = self.rec.spec
        if not any(m.switch_strategy == "auto" for m in spec.models.values()):
            return {}
        if spec.pinned_memory_ceiling_mib is not None:
            return {"pinnedMemoryCeiling": {"mib": spec.pinned_memory_ceiling_mib, "source": "pinnedMemoryCeilingMiB"}}
        source = f"probed at start: {self.settings.pinned_ceiling_source}"
        return {"pinnedMemoryCeiling": {"mib": self.settings.pinned_ceiling_mib, "source": source}}

    def _costs(self, total_mib: int | None) -> dict[str, Any]:
        """The cost book's view (rendered again only when it or the spec changed)."""
        v, spec = self._costs_view, self.rec.spec
        if v is None or v[0] != self.costs.version or v[1] is not spec or v[2] != total_mib:
            v = self._costs_view = (self.costs.version, spec, total_mib, self.costs.view(spec, total_mib))
        return v[3]

    def publish(self, queue: Mapping[str, Any], total_mib: int | None = None) -> None:
        """Render the snapshot readers see (``queue``: the hold queue's
        snapshot); write the status sink when it changed."""
        rec, d = self.rec, self.rec.desired
        now = self.clock()
        status = self.book.render(
            deployment=rec.spec.display_name,
            activeModel=d.active,
            companions=list(d.companions),
            desiredGeneration=d.generation,
            observedGeneration=self.book.observed_generation,
            runningModels=list(rec.running),
            runtime=self.runtime.kind,
            gpuProbe=self.probe.kind,
            queue=queue,
            backoff={m: round(t, 1) for m, t in rec.backoff.remaining(now).items() if not m.startswith("stop:") and t != float("inf")},
            configWarnings=[f.as_dict() for f in self.findings],
            # Running but asleep: only their residue on the GPU (not in runningModels).
            **({"asleepModels": list(rec.asleep)} if rec.asleep else {}),
            # How each sleeps: its server's sleep API, or suspended by the driver's checkpoint API.
            **({"asleepModes": {m: _sleep_mode(rec.spec, m, rec.sleep.ways.get(m)) for m in rec.asleep}} if rec.asleep else {}),
            modelStates={m: s for m, s in rec.model_states.items() if s != "absent"},
            **self._host_budget(),
            **self._pinned_ceiling(),
            costs=self._costs(total_mib),
        )
        self.status = status
        comparable = {k: v for k, v in status.items() if k not in ("backoff", "progressSeq")}
        if self.write_status is not None and comparable != self._last_written:
            self._last_written = comparable
            try:
                self.write_status(self.gpu, dict(status))
            except Exception:
                log.exception("gpu%d: could not write status", self.gpu)


def _sleep_mode(spec: DeploymentSpec, model: str, way: str | None = None) -> str:
    """``checkpoint`` or ``sleep``: the model's switchStrategy, or the way an auto model went."""
    m = spec.models.get(model)
    return "checkpoint" if m is not None and (m.switch_strategy == "checkpoint" or (m.auto_checkpoint and way == "checkpoint")) else "sleep"
