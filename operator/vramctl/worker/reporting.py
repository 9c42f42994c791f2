"""The worker's reporting side: what its reconciler tells it (progress,
phase, conditions, switch outcomes, gated starts) and the immutable status
snapshot it publishes. Runs on the worker's loop thread only; a base of
``worker.GpuWorker``, which provides the attributes declared here.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Mapping
from typing import Any

from vramctl.gpu.base import GpuProbe
from vramctl.host.memory import budget_in_use
from vramctl.observed import Desired
from vramctl.reconcile.reconciler import Reconciler
from vramctl.runtimes.base import Runtime, StartEvent
from vramctl.spec.models import DeploymentSpec, DesiredStateError, check_desired
from vramctl.spec.pitfalls import Finding, env_pitfalls
from vramctl.status.book import WARNING_STEPS, StatusBook, SwitchRecord
from vramctl.status.redact import redact

log = logging.getLogger("vramctl.worker.supervisor")


class WorkerReporting:
    """Status, progress and metrics of one GPU's worker."""

    gpu: int
    spec: DeploymentSpec
    runtime: Runtime
    probe: GpuProbe
    settings: Any  # WorkerSettings (defined beside the worker)
    book: StatusBook
    metrics: Any
    queue: Any
    status_sink: Any
    wall: Callable[[], float]
    clock: Callable[[], float]
    _rec: Reconciler
    _desired: Desired
    _inbox: queue.SimpleQueue[object]
    _findings: list[Finding]
    _last_written: dict[str, Any] | None
    _status: Mapping[str, Any]
    _secrets: tuple[DeploymentSpec, frozenset[str]] | None = None

    def request(self, active: str | None, companions: tuple[str, ...] | None = None, source: str = "api") -> Desired:
        raise NotImplementedError

    def total_mib(self) -> int | None:
        raise NotImplementedError

    # ----------------------------------- what the reconciler asks of its worker

    def _redacted(self, text: str) -> str:
        """``text`` with the spec's secrets (and token-shaped strings) masked: log
        lines of a failed start may echo an ``--api-key``."""
        spec = self._rec.spec
        cached = getattr(self, "_secrets", None)
        if cached is None or cached[0] is not spec:
            cached = (spec, spec.secrets())
            self._secrets = cached
        return redact(text, cached[1])

    def note(self, step: str, model: str | None, message: str) -> None:
        message = self._redacted(message)
        self.book.note(step, model, message, self.wall())
        log.log(logging.WARNING if step in WARNING_STEPS else logging.INFO, "gpu%d: %s", self.gpu, message)

    def phase(self, phase: str, reason: str, message: str) -> None:
        message = self._redacted(message)
        self.book.set_phase(phase, reason, message, self._rec.desired.generation, self.wall())

    def condition(self, ctype: str, value: bool, reason: str, message: str) -> None:
        self.book.set_condition(ctype, value, reason, message, self._rec.desired.generation, self.wall())

    def begin_switch(self, source: str | None, target: str | None, now: float) -> None:
        self.book.switch = SwitchRecord(source, target, now)
        self.note("switch-started", target, f"switch {source or '(none)'} -> {target or '(none)'} started")
        self.phase("Switching", "Switching", f"{source or '(none)'} -> {target or '(none)'}")

    def finish_switch(self, outcome: str, now: float) -> None:
        """Record the outcome (the desired generation it answers, and the switch in progress, if any)."""
        self.book.observed_generation = self._rec.desired.generation
        if outcome != "success":
            self.queue.failed(now, self.book.message)
        sw = self.book.switch
        if sw is None:
            return
        duration = now - sw.started
        self.book.finish_switch(outcome, duration, self._rec.desired.generation, self.wall())
        self.metrics.switches.labels(str(self.gpu), outcome).inc()
        if outcome == "success":
            self.metrics.switch_duration.labels(str(self.gpu), self._rec.sleep.strategy).observe(duration)
        self.note(
            "switch-" + outcome, sw.target, f"switch {sw.source or '(none)'} -> {sw.target or '(none)'}: {outcome} in {duration:.2f}s"
        )

    def settled(self, now: float, ok: bool) -> None:
        """The desired state is reached (``ok``) or its models are backing off."""
        self.queue.settled(now, ok)

    def violation(self, heavy_live: list[str]) -> None:
        self.metrics.violations.labels(str(self.gpu)).inc()
        self.note("violation", None, f"two heavy workloads running on gpu {self.gpu}: {', '.join(heavy_live)}")

    def gated(self, ev: StartEvent, not_adopted: str | None = None) -> None:
        """A start made behind vramctl's back was paused: it becomes the desired state, unless ``not_adopted`` says why not."""
        self.metrics.gated.labels(str(self.gpu)).inc()
        if not_adopted is not None:
            self.note("gated", ev.model, f"{ev.model!r} was started outside vramctl: paused and not kept, since {not_adopted}")
            return
        self.note("gated", ev.model, f"{ev.model!r} was started outside vramctl: paused until the GPU is free")
        d = self._rec.desired
        try:
            if self._rec.spec.models[ev.model].heavy:
                self.request(ev.model, None if d.active != ev.model else d.companions, source="docker-start")
            elif ev.model not in d.companions:
                self.request(d.active, (*d.companions, ev.model), source="docker-start")
        except DesiredStateError as err:
            self.note("rejected", ev.model, f"{ev.model!r} cannot run here: {err}; it stays paused and will be stopped")
        except Exception as err:  # the desired state could not be recorded
            self.note("rejected", ev.model, f"{ev.model!r} could not be made the desired model: {err}; it stays paused and will be stopped")

    def has_commands(self) -> bool:
        return not self._inbox.empty()

    def logs(self, spec: DeploymentSpec, model: str) -> list[str]:
        try:
            return self.runtime.logs_tail(spec, model, 15)
        except Exception:
            return []

    # ----------------------------------------------------------- status

    def _check_config(self, spec: DeploymentSpec) -> None:
        """Pitfalls of the spec (pitfalls.env_pitfalls) as the ConfigWarnings condition:
        reported while the config is in use, not discovered when a model fails."""
        self._findings = env_pitfalls(spec, self.total_mib())
        if self._findings:
            message = "; ".join(f"{f.path}: {f.message}" for f in self._findings)
            self.condition("ConfigWarnings", True, "PitfallsFound", message)
            for f in self._findings:
                log.warning("gpu%d: config: %s", self.gpu, f.render())
        else:
            self.condition("ConfigWarnings", False, "NoPitfalls", "no known pitfalls in the spec")

    def _check_initial(self) -> None:
        """The desired state handed in at start (state file, config) gets the
        same validation as a request: invalid, nothing is done for it and the
        status says why in the same words (a request or a spec change lifts it)."""
        d = self._desired
        try:
            check_desired(self.spec, d.active, d.companions, self.total_mib())
        except DesiredStateError as err:
            self._rec.invalid = (
                f"the desired state {d.active or '(none)'}"
                + (f" + {', '.join(d.companions)}" if d.companions else "")
                + f" is refused: {err}"
            )
            self.note("rejected", d.active, self._rec.invalid)
            self.phase("Failed", "InvalidDesiredState", self._rec.invalid)

    def _host_budget(self) -> dict[str, Any]:
        """``hostMemoryBudget``: what the level-1 sleepers are held to, and
        where it comes from; only where a model sleeps at level 1 or a reading exists."""
        spec, reading = self._rec.spec, self.settings.host_memory
        pinned = spec.host_memory_budget_mib is not None
        if not pinned and reading is None and not any(m.host_memory_asleep_mib for m in spec.models.values()):
            return {}
        mib, source = budget_in_use(spec.host_memory_budget_mib, reading)
        return {"hostMemoryBudget": {"mib": mib, "source": source}}

    def publish(self) -> None:
        """Render the snapshot readers see; write the status sink when it changed."""
        rec, d = self._rec, self._rec.desired
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
            queue=self.queue.desk.snapshot(),
            backoff={m: round(t, 1) for m, t in rec.backoff.remaining(now).items() if not m.startswith("stop:") and t != float("inf")},
            configWarnings=[f.as_dict() for f in self._findings],
            # Running but asleep: only their residue on the GPU (not in runningModels).
            **({"asleepModels": list(rec.asleep)} if rec.asleep else {}),
            modelStates={m: s for m, s in rec.model_states.items() if s != "absent"},
            **self._host_budget(),
        )
        self._status = status
        comparable = {k: v for k, v in status.items() if k not in ("backoff", "progressSeq")}
        if self.status_sink is not None and comparable != self._last_written:
            self._last_written = comparable
            try:
                self.status_sink.write_status(self.gpu, dict(status))
            except Exception:
                log.exception("gpu%d: could not write status", self.gpu)
