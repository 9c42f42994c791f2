"""The per-GPU worker: observe, plan, act, report.

One ``GpuWorker`` thread owns every mutation of its GPU (llama-swap's lesson:
a read that gates a mutation must not race another writer). Each pass
observes from scratch and asks the pure planner what to do, so a supervisor
killed at any point and restarted simply converges.

Requests are coalesced: ``request()`` only replaces the desired state and
pokes the worker. The worker re-reads desired state between actions; a new
request aborts waits (memory, health) but never a stop in flight.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from vramctl.gpu.base import GpuProbe
from vramctl.observed import Desired, GpuProcess, GpuSnapshot, Observed, Workload, WorkloadState
from vramctl.pitfalls import Finding, env_pitfalls
from vramctl.planner import Plan, Start, Stop, WaitForMemory, WaitHealthy, plan
from vramctl.runtimes.base import Runtime, StartError, StartEvent
from vramctl.spec import Config, DeploymentSpec, DesiredStateError, GpuProbeConfig, check_desired

log = logging.getLogger("vramctl.supervisor")

PHASE_IDLE = "Idle"
PHASE_SWITCHING = "Switching"
PHASE_READY = "Ready"
PHASE_BLOCKED = "Blocked"
PHASE_FAILED = "Failed"
PHASES = (PHASE_IDLE, PHASE_SWITCHING, PHASE_READY, PHASE_BLOCKED, PHASE_FAILED)

# A model's state as its worker knows it (GpuWorker.model_states, vramctl_model_state).
MODEL_STATES = ("running", "starting", "paused", "stopping", "stopped", "failed", "absent")
SWITCH_OUTCOMES = ("success", "failed", "blocked")

# How long a start we issued is expected to show up as a docker 'start' event.
_OWN_START_WINDOW_S = 10.0


class StatusSink(Protocol):
    def write_status(self, gpu: int, status: dict[str, Any]) -> None: ...


class DesiredSink(Protocol):
    def write_desired(self, gpu: int, desired: Desired, source: str, config_default: dict[str, Any] | None = None) -> None: ...


@dataclass
class Condition:
    """Shaped like metav1.Condition; lastTransitionTime moves only on flips."""

    type: str
    status: str = "Unknown"
    reason: str = "Initializing"
    message: str = ""
    last_transition_time: float = 0.0
    observed_generation: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": rfc3339(self.last_transition_time),
            "observedGeneration": self.observed_generation,
        }


def rfc3339(ts: float) -> str:
    """A unix time as Kubernetes writes times (RFC 3339, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Metrics:
    """The events the workers count: switches, their durations, violations, gated starts.

    What describes the present (phase, holder, model states, GPU memory) is
    not kept here: ``vramctl.telemetry`` reads it from the workers and their
    probes at scrape time.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.switches = Counter("vramctl_switches", "Model switches by outcome.", ["gpu", "outcome"], registry=self.registry)
        self.switch_duration = Histogram(
            "vramctl_switch_duration_seconds",
            "Time from a switch's first action to the new holder being healthy.",
            ["gpu"],
            buckets=(0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300),
            registry=self.registry,
        )
        self.violations = Counter(
            "vramctl_exclusivity_violations",
            "Times two heavy workloads of one GPU were seen live at once.",
            ["gpu"],
            registry=self.registry,
        )
        self.gated = Counter("vramctl_gated_starts", "Heavy starts made behind vramctl's back and paused.", ["gpu"], registry=self.registry)

    def init_gpu(self, gpu: int) -> None:
        """Create a GPU's label sets at zero: rates and dashboards then show 0, not "no data"."""
        g = str(gpu)
        for outcome in SWITCH_OUTCOMES:
            self.switches.labels(g, outcome)
        self.switch_duration.labels(g)
        self.violations.labels(g)
        self.gated.labels(g)


@dataclass
class WorkerSettings:
    poll_interval_s: float = 0.05
    margin_mib: int = 256
    memory_timeout_s: float = 60.0
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0
    resync_s: float = 5.0
    baseline_mib: int | None = None  # None: learn it from the probe when nothing of ours runs
    # Memory that is short only because of processes that are not ours, for this
    # long: Blocked at once instead of at memory_timeout_s.
    foreign_grace_s: float = 2.0

    @classmethod
    def from_config(cls, config: Config) -> WorkerSettings:
        p: GpuProbeConfig = config.gpu_probe
        return cls(
            poll_interval_s=p.poll_interval_seconds,
            margin_mib=p.margin_mib,
            memory_timeout_s=p.memory_timeout_seconds,
            backoff_initial_s=config.backoff_initial_seconds,
            backoff_max_s=config.backoff_max_seconds,
            resync_s=config.resync_seconds,
        )


class _Interrupted(Exception):
    """Desired state changed while waiting: abandon the plan and re-plan."""


class _Blocked(Exception):
    pass


class _Failed(Exception):
    def __init__(self, model: str, reason: str, message: str, logs: list[str]) -> None:
        super().__init__(message)
        self.model, self.reason, self.logs = model, reason, logs


@dataclass
class _Switch:
    source: str | None
    target: str | None
    started: float
    steps: list[dict[str, Any]] = field(default_factory=list)


class GpuWorker:
    """Owns one GPU. Thread-safe entry points: request, gate_start, status, poke, stop."""

    def __init__(
        self,
        deployment: DeploymentSpec,
        runtime: Runtime,
        probe: GpuProbe,
        settings: WorkerSettings,
        *,
        initial: Desired | None = None,
        status_sink: StatusSink | None = None,
        desired_sink: DesiredSink | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.spec = deployment
        self.gpu = deployment.gpu
        self.runtime = runtime
        self.probe = probe
        self.settings = settings
        self.status_sink = status_sink
        self.desired_sink = desired_sink
        self.metrics = metrics or Metrics()
        self.clock, self.wall = clock, wall

        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._desired = initial or Desired(deployment.active_model, tuple(deployment.companions), 0)
        self._own_starts: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._backoff_until: dict[str, float] = {}
        self._baseline = settings.baseline_mib
        self._baseline_learned = settings.baseline_mib is not None  # False: an estimate, or None
        # Release detection: the last Stop's return (the runtime saw the exit)
        # and the models that stay live through the current plan.
        self._exited_at: float | None = None
        self._kept: frozenset[str] = frozenset()
        # Seconds from the old holder's exit to its memory confirmed free, at
        # the last switch that stopped something (read by the metrics collector).
        self.last_release_seconds: float | None = None
        self._progress: deque[dict[str, Any]] = deque(maxlen=300)
        self._seq = 0
        self._passes = 0
        self._status: dict[str, Any] = {}
        # Unknown since the worker started: lastTransitionTime must be a real time (RFC 3339), never "".
        self._conditions = {t: Condition(t, last_transition_time=wall()) for t in ("Ready", "Progressing", "Degraded", "ConfigWarnings")}
        self._total: int | None = None  # the GPU's total MiB, once the probe said
        self._findings: list[Finding] = []
        self._phase = PHASE_IDLE
        self._message = ""
        self._running: list[str] = []
        self._last_switch: dict[str, Any] | None = None
        self._observed_generation = -1
        self._last_written: dict[str, Any] | None = None
        # Replaced whole, never mutated, so scrapes read it without self._lock.
        self._model_states: dict[str, str] = {}
        self._states_lock = threading.Lock()  # writers only, never held across I/O
        self.metrics.init_gpu(self.gpu)
        self._check_config(deployment)
        self._publish()

    # ------------------------------------------------------------------ API

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"vramctl-gpu{self.gpu}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poke(self) -> None:
        self._wake.set()

    @property
    def desired(self) -> Desired:
        with self._lock:
            return self._desired

    def request(self, active: str | None, companions: tuple[str, ...] | None = None, source: str = "api") -> Desired:
        """Replace the desired state (latest wins). Raises DesiredStateError when invalid."""
        with self._lock:
            if companions is None:
                # Default: "no model" frees the whole GPU; otherwise keep the
                # current companions that still fit beside the new model.
                companions = () if active is None else self._fitting(active, self._desired.companions)
            check_desired(self.spec, active, companions, self._total_mib())
            desired = Desired(active or None, tuple(companions), self._desired.generation + 1)
            self._desired = desired
            self._note(
                "requested",
                active,
                f"desired: {active or '(none)'}" + (f" + {', '.join(companions)}" if companions else "") + f" ({source})",
            )
            if self.desired_sink is not None:
                self.desired_sink.write_desired(self.gpu, desired, source)
        self._publish()
        self._wake.set()
        return desired

    def _fitting(self, active: str, companions: tuple[str, ...]) -> tuple[str, ...]:
        """The companions, in order, that fit the budget beside ``active``."""
        total = self._total_mib()
        keep: list[str] = []
        for c in companions:
            if c == active:
                continue
            try:
                check_desired(self.spec, active, [*keep, c], total)
                keep.append(c)
            except DesiredStateError:
                self._note("dropped", c, f"companion {c} does not fit beside {active}: not kept")
        return tuple(keep)

    def update_spec(self, deployment: DeploymentSpec) -> None:
        with self._lock:
            self.spec = deployment
        self._check_config(deployment)
        self._publish()
        self._wake.set()

    def _total_mib(self) -> int | None:
        """The GPU's total memory (it never changes): vLLM reserves a fraction of it."""
        if self._total is None:
            with contextlib.suppress(Exception):
                self._total = self.probe.info().total_mib
        return self._total

    def _check_config(self, spec: DeploymentSpec) -> None:
        """Pitfalls of the spec (pitfalls.env_pitfalls) as the ConfigWarnings condition:
        reported while the config is in use, not discovered when a model fails."""
        findings = env_pitfalls(spec, self._total_mib())
        with self._lock:
            self._findings = findings
            gen = self._desired.generation
        if findings:
            message = "; ".join(f"{f.path}: {f.message}" for f in findings)
            self._condition("ConfigWarnings", True, "PitfallsFound", message, gen)
            for f in findings:
                log.warning("gpu%d: config: %s", self.gpu, f.render())
        else:
            self._condition("ConfigWarnings", False, "NoPitfalls", "no known pitfalls in the spec", gen)

    def gate_start(self, ev: StartEvent) -> None:
        """A managed workload of this GPU started. Ours: ignore. Someone else's
        (``docker compose --profile sdxl up -d``): pause it at once, before it
        can allocate, make it the desired model, and let the plan hand over."""
        with self._lock:
            deadline = self._own_starts.get(ev.model)
            if deadline is not None and deadline >= self.clock():
                return
            if ev.model not in self.spec.models:
                return
        try:
            self.runtime.pause(self.spec, ev.model)
        except Exception as err:  # it may have exited already: the next pass sees it
            log.warning("gpu%d: could not pause %s: %s", self.gpu, ev.model, err)
        self.metrics.gated.labels(str(self.gpu)).inc()
        self._note("gated", ev.model, f"{ev.model} was started outside vramctl: paused until the GPU is free")
        with self._lock:
            heavy = self.spec.models[ev.model].heavy
            d = self._desired
            try:
                if heavy:
                    self.request(ev.model, self._fitting(ev.model, d.companions), source="docker-start")
                elif ev.model not in d.companions:
                    self.request(d.active, (*d.companions, ev.model), source="docker-start")
            except DesiredStateError as err:
                self._note("rejected", ev.model, f"{ev.model} cannot run here: {err}; it stays paused and will be stopped")
        self._wake.set()

    def progress(self, since: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self._progress if p["seq"] > since]

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    # Lock-free reads for scrapes: a scrape must never wait for a switch in
    # progress. Each returns a reference the worker replaces whole and never
    # mutates; the values may be a moment apart from one another.

    def published_status(self) -> Mapping[str, Any]:
        """The last published status (``status()`` without the lock and the copy)."""
        return self._status

    def model_states(self) -> Mapping[str, str]:
        """Each model's state (one of MODEL_STATES) as the worker last knew it:
        from each observation, and from its own stops, starts and health checks
        in between."""
        return self._model_states

    @property
    def baseline_mib(self) -> int | None:
        """GPU memory in use with none of our models live (configured or learned); None until known."""
        return self._baseline

    def reconcile_once(self) -> Plan:
        """One pass, on the caller's thread (tests, ``--once``)."""
        return self._pass()

    # ------------------------------------------------------------- the loop

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                p = self._pass()
            except Exception:  # never die: report and retry at the next resync
                log.exception("gpu%d: reconcile pass failed", self.gpu)
                self._set_phase(PHASE_FAILED, "ReconcileError", "internal error; see logs")
                p = Plan(())
            timeout = self.settings.resync_s
            if p.deferred:
                timeout = min(timeout, max(0.05, min(p.deferred.values()) - self.clock()))
            self._wake.wait(timeout)

    def _observe(self) -> Observed:
        with self._lock:
            spec = self.spec
        raw = self.runtime.observe(spec)
        out: dict[str, Workload] = {}
        for name, w in raw.items():
            if w.state in (WorkloadState.RUNNING, WorkloadState.RESTARTING) and name in spec.models:
                try:
                    ready = self.runtime.check_health(spec, name)
                except Exception:
                    ready = False
                w = replace(w, ready=ready)
            out[name] = w
        heavy_live = [w.model for w in out.values() if w.state is WorkloadState.RUNNING and w.heavy]
        if len(heavy_live) > 1:
            self.metrics.violations.labels(str(self.gpu)).inc()
            self._note("violation", None, f"two heavy workloads running on gpu {self.gpu}: {', '.join(sorted(heavy_live))}")
        self._track_states(spec, out)
        return Observed(out)

    def _track_states(self, spec: DeploymentSpec, observed: Mapping[str, Workload]) -> None:
        with self._lock:
            failed = set(self._failures)
        states = {m: _model_state(observed.get(m), m in failed, m in spec.models) for m in spec.models}
        states.update({m: _model_state(w, False, False) for m, w in observed.items() if m not in spec.models})
        with self._states_lock:
            self._model_states = states

    def _set_model_state(self, model: str, state: str) -> None:
        with self._states_lock:
            self._model_states = {**self._model_states, model: state}

    def _pass(self) -> Plan:
        self._passes += 1
        with self._lock:
            desired, spec = self._desired, self.spec
        observed = self._observe()
        self._learn_baseline(observed)
        now = self.clock()
        p = plan(spec, desired, observed, now, self._backoff_until, self._baseline or 0, self.settings.margin_mib, self._total_mib())
        stopped = {a.model for a in p.actions if isinstance(a, Stop)}
        self._kept = frozenset(m for m, w in observed.workloads.items() if w.state.live and m not in stopped)
        self._exited_at = None
        self._running = sorted(m for m, w in observed.workloads.items() if w.state is WorkloadState.RUNNING)
        if p.empty:
            self._settle(desired, observed, p)
            return p
        switch = _Switch(self._holder(observed), desired.active, now) if p.switching else None
        if switch:
            self._note("switch-started", switch.target, f"switch {switch.source or '(none)'} -> {switch.target or '(none)'} started")
            self._set_phase(PHASE_SWITCHING, "Switching", f"{switch.source or '(none)'} -> {switch.target or '(none)'}")
        try:
            for action in p.actions:
                self._execute(spec, desired, action)
        except _Interrupted:
            self._note("superseded", None, "a newer request arrived; re-planning")
            self._wake.set()
            return p
        except _Blocked as err:
            self._set_phase(PHASE_BLOCKED, "MemoryNotReleased", str(err))
            self._finish_switch(switch, "blocked", desired)
            self._observed_generation = desired.generation
            self._publish()
            return p
        except _Failed as err:
            self._record_failure(err)
            self._finish_switch(switch, "failed", desired)
            self._observed_generation = desired.generation
            self._publish()
            return p
        observed = self._observe()
        self._running = sorted(m for m, w in observed.workloads.items() if w.state is WorkloadState.RUNNING)
        self._finish_switch(switch, "success", desired)
        self._settle(desired, observed, p)
        return p

    # ------------------------------------------------------------ actions

    def _execute(self, spec: DeploymentSpec, desired: Desired, action: object) -> None:
        match action:
            case Stop(model=m, reason=reason):
                # Never interrupted: a half-stopped model is the worst of both worlds.
                self._note("stopping", m, f"stopping {m} ({reason})")
                self._set_model_state(m, "stopping")
                out = self.runtime.stop(spec, m)
                self._exited_at = self.clock()
                self._set_model_state(m, "stopped")
                how = "killed after its grace period" if out.killed else "stopped"
                self._note("stopped", m, f"{m} {how} in {out.seconds:.2f}s")
                self._check_interrupt(desired)
            case WaitForMemory():
                self._wait_memory(spec, desired, action)
            case Start(model=m, reason=reason):
                self._check_interrupt(desired)
                self._note("starting", m, f"starting {m} ({reason})")
                with self._lock:
                    self._own_starts[m] = self.clock() + _OWN_START_WINDOW_S
                try:
                    ref = self.runtime.start(spec, m)
                except StartError as err:
                    raise _Failed(m, "StartFailed", f"{m} could not be started: {err}", self._logs(spec, m)) from err
                # Started by this plan, it stays live through it: a companion's
                # memory wait must not take its processes for a leftover.
                self._kept = self._kept | {m}
                self._set_model_state(m, "starting")
                self._note("started", m, f"{m} started ({ref[:12]})")
            case WaitHealthy(model=m, timeout_seconds=timeout):
                self._wait_healthy(spec, desired, m, timeout)

    def _check_interrupt(self, desired: Desired) -> None:
        with self._lock:
            if self._desired != desired or self._stopping.is_set():
                raise _Interrupted()

    def _wait_memory(self, spec: DeploymentSpec, desired: Desired, w: WaitForMemory) -> None:
        """Poll the probe (every poll_interval_s) until the stopped models'
        processes are gone and the memory is back (memory_problem). Blocked
        when processes that are not ours hold it for foreign_grace_s, or when it
        is not back within memory_timeout_s; a probe that cannot answer counts
        as "not back", never as free."""
        if self._baseline is None and w.max_used_mib is not None:
            # A bound computed from an unknown baseline would be a guess; the
            # stopped models' processes leaving and the free memory still tell.
            w = replace(w, max_used_mib=None)
        self._note(
            "waiting-memory",
            None,
            f"waiting for GPU memory (need {w.need_free_mib} MiB free"
            + (f", at most {w.max_used_mib} MiB used" if w.max_used_mib is not None else "")
            + (f"; {', '.join(w.released)} gone from the GPU" if w.released else "")
            + ")",
        )
        t0 = self.clock()
        deadline = t0 + self.settings.memory_timeout_s
        foreign_since: float | None = None
        while True:
            snap: GpuSnapshot | None = None
            try:
                snap = self.probe.snapshot()
            except Exception as err:  # ProbeError, ProbeTimeout: unknown, never free
                problem: str | None = f"the GPU probe did not answer ({err})"
            else:
                problem = memory_problem(snap, w, self._kept)
            now = self.clock()
            if snap is not None and problem is None:
                m = snap.memory
                since = ""
                if w.released and self._exited_at is not None:
                    self.last_release_seconds = max(0.0, now - self._exited_at)
                    since = f", {self.last_release_seconds:.3f}s after {', '.join(w.released)} exited"
                self._note(
                    "memory-free",
                    None,
                    f"GPU memory confirmed free after {now - t0:.2f}s{since} ({m.used_mib} MiB used, {m.free_mib} MiB free)",
                )
                return
            culprits = foreign_holders(snap, w, self._kept) if snap is not None else []
            if culprits:
                foreign_since = now if foreign_since is None else foreign_since
                if now - foreign_since >= self.settings.foreign_grace_s:
                    raise _Blocked(f"GPU memory is held by processes that are not vramctl's: {problem}; the next model is not started")
            else:
                foreign_since = None
            if now >= deadline:
                raise _Blocked(
                    f"GPU memory did not come back within {self.settings.memory_timeout_s:.0f}s: {problem}; the next model is not started"
                )
            self._check_interrupt(desired)
            self._stopping.wait(self.settings.poll_interval_s)

    def _memory_problem(self, snap: GpuSnapshot, w: WaitForMemory) -> str | None:
        return memory_problem(snap, w, self._kept)

    def _wait_healthy(self, spec: DeploymentSpec, desired: Desired, model: str, timeout: float) -> None:
        t0 = self.clock()
        health = spec.health_of(model)
        interval = health.interval_seconds if health else 0.1
        next_observe = t0
        while True:
            if self.runtime.check_health(spec, model):
                with self._lock:
                    self._failures.pop(model, None)
                    self._backoff_until.pop(model, None)
                self._set_model_state(model, "running")
                self._note("healthy", model, f"{model} is healthy after {self.clock() - t0:.2f}s")
                return
            now = self.clock()
            if now >= next_observe:
                w = self.runtime.observe(spec).get(model)
                if w is None or not w.state.live:
                    code = w.exit_code if w else None
                    raise _Failed(model, "Crashed", f"{model} exited while starting (exit code {code})", self._logs(spec, model))
                next_observe = now + 0.5
            if now - t0 >= timeout:
                logs = self._logs(spec, model)
                self._note("stopping", model, f"{model} not healthy after {timeout:.0f}s: stopping it")
                self.runtime.stop(spec, model)
                raise _Failed(model, "StartTimeout", f"{model} did not become healthy within {timeout:.0f}s", logs)
            try:
                self._check_interrupt(desired)
            except _Interrupted:
                with self._lock:
                    still_wanted = model in self._desired.members
                if not still_wanted:
                    raise
            self._stopping.wait(interval)

    def _logs(self, spec: DeploymentSpec, model: str) -> list[str]:
        try:
            return self.runtime.logs_tail(spec, model, 15)
        except Exception:
            return []

    # ------------------------------------------------------------- status

    def _holder(self, observed: Observed) -> str | None:
        for w in observed.workloads.values():
            if w.state.live and w.heavy:
                return w.model
        return None

    def _learn_baseline(self, observed: Observed) -> None:
        """The GPU's memory in use without any of our models (what the memory
        wait's bound starts from), unless configured.

        Learned: the lowest reading taken while none of ours is live and the
        probe shows no process of ours (a model that just exited may still be
        releasing). Until then, estimated from a probe that sizes every
        process of ours: used minus theirs (a supervisor restarted while a
        model runs). None while neither is possible (WSL2, right after a
        restart): the memory wait then goes by the processes and free memory.
        """
        if self.settings.baseline_mib is not None:
            return
        try:
            snap = self.probe.snapshot()
        except Exception:
            return
        used = snap.memory.used_mib
        ours = [p for p in snap.processes or () if p.model is not None]
        if not ours and not any(w.state.live for w in observed.workloads.values()):
            self._baseline = used if not self._baseline_learned or self._baseline is None else min(self._baseline, used)
            self._baseline_learned = True
        elif not self._baseline_learned and ours and all(p.used_mib is not None for p in ours):
            estimate = max(0, used - sum(p.used_mib or 0 for p in ours))
            self._baseline = estimate if self._baseline is None else min(self._baseline, estimate)

    def _record_failure(self, err: _Failed) -> None:
        with self._lock:
            n = self._failures.get(err.model, 0) + 1
            self._failures[err.model] = n
            delay = min(self.settings.backoff_initial_s * 2 ** (n - 1), self.settings.backoff_max_s)
            self._backoff_until[err.model] = self.clock() + delay
        self._set_model_state(err.model, "failed")
        tail = "\n".join(err.logs[-10:])
        msg = f"{err} (attempt {n}; retrying in {delay:.0f}s)" + (f"\nlast log lines:\n{tail}" if tail else "")
        self._note("failed", err.model, msg)
        self._set_phase(PHASE_FAILED, err.reason, msg)

    def _finish_switch(self, switch: _Switch | None, outcome: str, desired: Desired) -> None:
        if switch is None:
            return
        duration = self.clock() - switch.started
        self._last_switch = {
            "from": switch.source,
            "to": switch.target,
            "durationSeconds": round(duration, 3),
            "outcome": outcome,
            "finishedAt": rfc3339(self.wall()),
            "generation": desired.generation,
        }
        self.metrics.switches.labels(str(self.gpu), outcome).inc()
        if outcome == "success":
            self.metrics.switch_duration.labels(str(self.gpu)).observe(duration)
        self._note(
            "switch-" + outcome,
            switch.target,
            f"switch {switch.source or '(none)'} -> {switch.target or '(none)'}: {outcome} in {duration:.2f}s",
        )

    def _settle(self, desired: Desired, observed: Observed, p: Plan) -> None:
        self._observed_generation = desired.generation
        if p.deferred:
            failed = ", ".join(sorted(p.deferred))
            wait = max(0.0, min(p.deferred.values()) - self.clock())
            if self._phase != PHASE_FAILED:
                self._set_phase(PHASE_FAILED, "BackingOff", f"{failed} failed; retrying in {wait:.0f}s")
        elif desired.active is None and not desired.companions:
            self._set_phase(PHASE_IDLE, "NoModel", "no model is desired; the GPU is free")
        else:
            held = ", ".join(desired.members)
            self._set_phase(PHASE_READY, "ModelReady", f"{held} ready")
        self._publish()

    def _set_phase(self, phase: str, reason: str, message: str) -> None:
        with self._lock:
            self._phase, self._message = phase, message
            gen = self._desired.generation
        self._condition("Ready", phase in (PHASE_READY, PHASE_IDLE), reason, message, gen)
        self._condition("Progressing", phase == PHASE_SWITCHING, reason, message, gen)
        self._condition("Degraded", phase in (PHASE_FAILED, PHASE_BLOCKED), reason, message, gen)
        # The spec in use is checked for pitfalls as a whole: that verdict is as current as the phase.
        self._conditions["ConfigWarnings"].observed_generation = gen
        self._publish()

    def _condition(self, ctype: str, value: bool, reason: str, message: str, generation: int) -> None:
        c = self._conditions[ctype]
        status = "True" if value else "False"
        if c.status != status:
            c.last_transition_time = self.wall()
        c.status, c.reason, c.message, c.observed_generation = status, reason, message, generation

    def _note(self, step: str, model: str | None, message: str) -> None:
        with self._lock:
            self._seq += 1
            entry = {"seq": self._seq, "time": self.wall(), "gpu": self.gpu, "step": step, "model": model, "message": message}
            self._progress.append(entry)
        level = logging.WARNING if step in ("failed", "violation", "gated", "rejected") else logging.INFO
        log.log(level, "gpu%d: %s", self.gpu, message)

    def _publish(self) -> None:
        with self._lock:
            d = self._desired
            status = {
                "gpu": self.gpu,
                "deployment": self.spec.display_name,
                "phase": self._phase,
                "message": self._message,
                "activeModel": d.active,
                "companions": list(d.companions),
                "desiredGeneration": d.generation,
                "observedGeneration": self._observed_generation,
                "runningModels": list(self._running),
                "conditions": [c.as_dict() for c in self._conditions.values()],
                "lastSwitch": self._last_switch,
                "runtime": self.runtime.kind,
                "gpuProbe": self.probe.kind,
                "backoff": {m: round(max(0.0, t - self.clock()), 1) for m, t in self._backoff_until.items()},
                "progressSeq": self._seq,
                "configWarnings": [f.as_dict() for f in self._findings],
            }
            self._status = status
        comparable = {k: v for k, v in status.items() if k not in ("backoff", "progressSeq")}
        if self.status_sink is not None and comparable != self._last_written:
            self._last_written = comparable
            try:
                self.status_sink.write_status(self.gpu, status)
            except Exception:
                log.exception("gpu%d: could not write status", self.gpu)


def _model_state(w: Workload | None, failed: bool, in_spec: bool) -> str:
    """MODEL_STATES from an observation; ``failed``: its last start failed."""
    st = w.state if w is not None else WorkloadState.ABSENT
    if st is WorkloadState.RUNNING:
        # Not in the spec: no health check was run, so ready says nothing.
        return "running" if (w is not None and w.ready) or not in_spec else "starting"
    if st is WorkloadState.RESTARTING:
        return "starting"
    if st is WorkloadState.PAUSED:
        return "paused"
    if failed:
        return "failed"
    return "absent" if st is WorkloadState.ABSENT else "stopped"


def memory_problem(snap: GpuSnapshot, w: WaitForMemory, kept: frozenset[str] = frozenset()) -> str | None:
    """Why the GPU is not ready for the next start, or None when it is.

    Not ready while a process of ours that is not ``kept`` (a model that stays
    live through the plan) is still on the GPU: the stopped models, and any
    earlier one still tearing down. Then while used memory is above
    ``w.max_used_mib`` or free memory below ``w.need_free_mib``; the message
    names the processes that are not vramctl's, with their container.
    """
    procs = snap.processes
    if procs is not None:
        lingering = [p for p in procs if p.model is not None and (p.model in w.released or p.model not in kept)]
        if lingering:
            return "still held by " + ", ".join(
                f"{p.model} (pid {p.pid}" + (f", {p.used_mib} MiB" if p.used_mib is not None else "") + ")" for p in lingering
            )
    mem = snap.memory
    if (w.max_used_mib is not None and mem.used_mib > w.max_used_mib) or mem.free_mib < w.need_free_mib:
        foreign = [p for p in (procs or ()) if p.model is None]
        who = ""
        if foreign:
            who = "; held by processes that are not vramctl's: " + ", ".join(_describe_process(p) for p in foreign)
        return (
            f"{mem.used_mib} MiB used, {mem.free_mib} MiB free, need {w.need_free_mib} MiB free"
            + (f" and at most {w.max_used_mib} MiB used" if w.max_used_mib is not None else "")
            + who
        )
    return None


def foreign_holders(snap: GpuSnapshot, w: WaitForMemory, kept: frozenset[str] = frozenset()) -> list[GpuProcess]:
    """The processes that are not vramctl's and are why the memory is short:
    none of ours is lingering, and without their (known) memory the wait would
    be over. Empty when that cannot be shown (no per-process figures, WSL2),
    or when the memory is short anyway (a release still under way)."""
    procs = snap.processes
    if procs is None or any(p.model is not None and (p.model in w.released or p.model not in kept) for p in procs):
        return []
    foreign = [p for p in procs if p.model is None and p.used_mib]
    held = sum(p.used_mib or 0 for p in foreign)
    mem = snap.memory
    short = (w.max_used_mib is not None and mem.used_mib > w.max_used_mib) or mem.free_mib < w.need_free_mib
    if not foreign or not short:
        return []
    fits_without = (w.max_used_mib is None or mem.used_mib - held <= w.max_used_mib) and mem.free_mib + held >= w.need_free_mib
    return foreign if fits_without else []


def _describe_process(p: GpuProcess) -> str:
    return (
        f"pid {p.pid}" + (f" (container {p.container})" if p.container else "") + (f" {p.used_mib} MiB" if p.used_mib is not None else "")
    )


def holders_from(
    runtime: Runtime, deployment: Callable[[], DeploymentSpec], total_mib: int | None = None
) -> Callable[[], Mapping[str, int]]:
    """For the simulated GPU: the models running right now and what they hold
    (their reservation: vramMiB, or gpuMemoryUtilization x ``total_mib`` for vLLM)."""

    def holders() -> Mapping[str, int]:
        spec = deployment()
        out = {}
        for name, w in runtime.observe(spec).items():
            if w.state is WorkloadState.RUNNING:
                out[name] = (spec.reservation_mib(name, total_mib) or 0) if name in spec.models else 0
        return out

    return holders


class Supervisor:
    """All workers of this host plus the watcher that gates starts made behind our back."""

    def __init__(self, workers: list[GpuWorker], runtime: Runtime, metrics: Metrics, notes: list[str] | None = None) -> None:
        self.workers = {w.gpu: w for w in workers}
        self.runtime = runtime
        self.metrics = metrics
        self.notes = notes or []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="vramctl-events", daemon=True)
        self._watcher.start()
        for w in self.workers.values():
            w.start()

    def add_worker(self, worker: GpuWorker) -> None:
        """Adopt a worker for a GPU that appeared at run time (a ModelDeployment
        was created); started at once when the supervisor already runs."""
        if worker.gpu in self.workers:
            raise ValueError(f"gpu {worker.gpu} already has a worker")
        self.workers[worker.gpu] = worker
        if self._watcher is not None:
            worker.start()

    def remove_worker(self, gpu: int) -> GpuWorker | None:
        """Stop and forget the worker of ``gpu``; its models keep running."""
        w = self.workers.pop(gpu, None)
        if w is not None:
            w.stop()
        return w

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.runtime.watch_starts(self._on_start, self._stop.is_set)
            except Exception as err:
                log.warning("event watcher failed (%s); restarting it", err)
            if self.runtime.kind != "docker":
                return
            self._stop.wait(1.0)

    def _on_start(self, ev: StartEvent) -> None:
        w = self.workers.get(ev.gpu)
        if w is not None:
            w.gate_start(ev)

    def stop(self) -> None:
        self._stop.set()
        for w in self.workers.values():
            w.stop()
        if self._watcher is not None:
            self._watcher.join(5)
        self.runtime.close()

    def status(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime.kind,
            "notes": list(self.notes),
            "gpus": {str(g): w.status() for g, w in sorted(self.workers.items())},
        }
