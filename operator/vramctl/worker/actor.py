"""The per-GPU worker: an actor.

Public methods (request, update_spec, gate_start, poke, stop) only put a
command in the worker's inbox and return; one loop thread owns every
mutable field (``Reconciler``) and publishes an immutable snapshot that the
API, the metrics collector and the status writers read without waiting
for a switch. Status sinks are written by the loop alone, in order.

``request`` validates, admits and records the desired state on the
caller's thread before it is queued, under one lock, so a caller learns at
once when the request is invalid or could not be recorded, and the order of
the recorded states is the order the loop applies them. The loop's own
wishes (the hold queue's switches, a start gated, a removal outside
vramctl) take the same checks through ``_want`` and are applied at once,
never through ``request`` and the inbox. An ``Admission`` (the Kubernetes
source: the spec decides) may put another desired state in place of the
one asked for, as a check when it is admitted, not by a request of its own.

What the reconciler may ask of its worker is ``reconcile.context.LoopContext``
(``_LoopPort`` here); status and progress are the ``WorkerReporter``'s.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from vramctl.costs import CostBook, switch_seconds, turn_seconds
from vramctl.demand import policy as dq
from vramctl.demand.desk import AddDemand, HoldDesk, QueueMetrics, Release, Renew, Withdraw
from vramctl.demand.lane import FastLane
from vramctl.gpu.base import GpuProbe
from vramctl.gpu.cgroups import with_container_processes
from vramctl.host.memory import MEMINFO, PROC_VERSION, HostMemoryReading, probe_pinned_ceiling, read_host_memory
from vramctl.host.pagecache import Prestager
from vramctl.observed import Desired
from vramctl.reconcile.actuator import Actuator
from vramctl.reconcile.context import LoopSettings
from vramctl.reconcile.gpu_claims import GpuClaims
from vramctl.reconcile.reconciler import Reconciler
from vramctl.reconcile.start_checks import squatted
from vramctl.reconcile.warm import Sleeper, SleepMetrics
from vramctl.runtimes.base import Runtime, StartEvent
from vramctl.runtimes.checkpoint import StrategySleeper
from vramctl.spec.models import Config, DeploymentSpec, DesiredStateError, GpuProbeConfig, check_desired
from vramctl.status.book import SWITCH_OUTCOMES, StatusBook
from vramctl.worker.reporting import WorkerReporter

log = logging.getLogger("vramctl.worker.supervisor")


class StatusSink(Protocol):
    def write_status(self, gpu: int, status: dict[str, Any]) -> None: ...


class DesiredSink(Protocol):
    def write_desired(self, gpu: int, desired: Desired, source: str, config_default: dict[str, Any] | None = None) -> None: ...


class Admission(Protocol):
    def admit(self, gpu: int, desired: Desired, source: str) -> Desired:
        """The desired state to record and apply for ``desired`` asked by
        ``source``: ``desired`` itself, or another in its place (its
        generation is replaced by ``desired``'s). Called with the worker's
        request lock held: never calls back into the worker."""


class Metrics:
    """The events the workers count: switches, their durations, violations, gated starts.

    What describes the present (phase, holder, model states, GPU memory) is
    not kept here: ``vramctl.telemetry`` reads it from the workers' published
    snapshots at scrape time.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.switches = Counter("vramctl_switches", "Model switches by outcome.", ["gpu", "outcome"], registry=self.registry)
        self.switch_duration = Histogram(
            "vramctl_switch_duration_seconds",
            "Time from a switch's first action to the new holder being healthy; strategy warm (woken) or cold (started).",
            ["gpu", "strategy"],
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
        self.queue = QueueMetrics(self.registry)
        self.sleep = SleepMetrics(self.registry)

    def init_gpu(self, gpu: int) -> None:
        """Create a GPU's label sets at zero: rates and dashboards then show 0, not "no data"."""
        g = str(gpu)
        for outcome in SWITCH_OUTCOMES:
            self.switches.labels(g, outcome)
        for strategy in ("warm", "cold"):
            self.switch_duration.labels(g, strategy)
        self.sleep.init_gpu(gpu)
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
    # A model that exits on its own sooner than this after it became healthy
    # is crash-looping: its failures keep counting (longer back-off).
    stable_s: float = 60.0
    # The host memory at start: the default budget of the level-1 sleepers
    # where the spec sets no hostMemoryBudgetMiB (None: unknown, unbounded).
    host_memory: HostMemoryReading | None = None
    # The pinned-memory ceiling probed at start (WSL2, Docker Desktop), where
    # the spec sets no pinnedMemoryCeilingMiB (None: no ceiling known).
    pinned_ceiling_mib: int | None = None
    pinned_ceiling_source: str = "not probed"

    @classmethod
    def from_config(cls, config: Config, meminfo: Path = MEMINFO, proc_version: Path = PROC_VERSION) -> WorkerSettings:
        p: GpuProbeConfig = config.gpu_probe
        pinned = probe_pinned_ceiling(proc_version)
        return cls(
            host_memory=read_host_memory(meminfo),
            pinned_ceiling_mib=pinned[0],
            pinned_ceiling_source=pinned[1],
            poll_interval_s=p.poll_interval_seconds,
            margin_mib=p.margin_mib,
            memory_timeout_s=p.memory_timeout_seconds,
            backoff_initial_s=config.backoff_initial_seconds,
            backoff_max_s=config.backoff_max_seconds,
            resync_s=config.resync_seconds,
        )


# Inbox commands.
@dataclass(frozen=True)
class _Request:
    desired: Desired
    source: str
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class _UpdateSpec:
    spec: DeploymentSpec


@dataclass(frozen=True)
class _Gate:
    event: StartEvent


_POKE = object()
_STOP = object()


def fitting(spec: DeploymentSpec, active: str, companions: tuple[str, ...], total: int | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The companions, in order, that fit the budget beside ``active``, and those dropped."""
    keep: list[str] = []
    dropped: list[str] = []
    for c in companions:
        if c == active:
            continue
        try:
            check_desired(spec, active, [*keep, c], total)
            keep.append(c)
        except DesiredStateError:
            dropped.append(c)
    return tuple(keep), tuple(dropped)


class GpuWorker:
    """Owns one GPU. Entry points for any thread: request, update_spec,
    gate_start, poke, stop, and the published reads (status, progress,
    model_states). ``sleep`` is how ``reconcile_once`` waits between ticks
    (a test's clock advances instead); ``sleeper`` is the model servers'
    sleep API; ``admission`` checks each desired state as it is admitted;
    ``costs``: the switch costs learned before a restart (``StateFile.costs``);
    ``prestager``: reads the next cold model's weights into the page cache."""

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
        sleep: Callable[[float], None] = time.sleep,
        admission: Admission | None = None,
        sleeper: Sleeper | None = None,
        costs: Any = None,
        prestager: Prestager | None = None,
    ) -> None:
        self.gpu = deployment.gpu
        self.prestager = prestager or Prestager()
        self.runtime, self.probe, self.settings = runtime, probe, settings
        self.status_sink, self.desired_sink = status_sink, desired_sink
        self.metrics = metrics or Metrics()
        self.clock, self.wall, self._sleep, self.admission = clock, wall, sleep, admission
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._request_lock = threading.Lock()  # callers and the loop's own wishes; never held across a tick
        self._thread: threading.Thread | None = None
        self._total: int | None = None
        # Published (replaced whole, read without a lock): the newest spec and
        # desired state handed in, and the loop's snapshot.
        self.spec = deployment
        self._desired = initial or Desired(deployment.active_model, tuple(deployment.companions), 0)
        self.book = StatusBook(self.gpu, wall())
        self.actuator = Actuator(runtime, self.poke, sleeper=sleeper)
        # switchStrategy checkpoint: the driver's checkpoint API, loaded now (not at the first switch).
        # A container's processes are named by their host pids (/proc), which the driver needs.
        warm = StrategySleeper(self.actuator.sleeper, probe.snapshot, lambda spec: with_container_processes(runtime.owners(spec)))
        warm.prepare(deployment)
        self.actuator.sleeper = warm
        cost_book = CostBook.from_dict(costs)
        self._rec = Reconciler(deployment, self._desired, runtime, probe, self.actuator, _LoopPort(self), self.metrics.sleep, cost_book)
        self.reporter = WorkerReporter(
            self.gpu,
            self._rec,
            self.book,
            self.metrics,
            runtime=runtime,
            probe=probe,
            settings=settings,
            write_status=status_sink.write_status if status_sink is not None else None,
            clock=clock,
            wall=wall,
            costs=cost_book,
        )
        self.lane = FastLane(self.poke, self.clock)
        self.queue = _Queue(self, deployment)
        # When each model is expected to serve (``publish`` replaces it whole): the Retry-After of the queue and the gateway.
        self.forecast = dq.Forecast()
        self.metrics.init_gpu(self.gpu)
        self.reporter.check_config(deployment, self.total_mib())
        self.reporter.check_initial(self.spec, self._desired, self.total_mib())
        self.publish()

    # --------------------------------------------------------- commands

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"vramctl-gpu{self.gpu}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop (within one tick, whatever it waits for) and wait for
        its thread. A stop of a model already under way finishes on its own."""
        self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        self.actuator.close()

    def share_gpus(self, claims: GpuClaims) -> None:
        """Take part in the host's cross-GPU claims (a model on several GPUs:
        ``reconcile.gpu_claims``). The supervisor's, before the loop starts."""
        claims.register(self.spec, lambda: self.probe.snapshot().memory.free_mib)
        self._rec.claims = claims

    def poke(self) -> None:
        self._inbox.put(_POKE)

    def post(self, cmd: AddDemand | Withdraw | Release | Renew) -> None:
        """A hold or demand command (``hold_desk.InboxHolder``): queued, answered by the loop."""
        self._inbox.put(cmd)

    @property
    def desired(self) -> Desired:
        """The newest desired state handed in (the loop applies it at its next look)."""
        return self._desired

    def request(
        self, active: str | None, companions: tuple[str, ...] | None = None, source: str = "api", keep_asleep: bool = False
    ) -> Desired:
        """Replace the desired state (latest wins). Raises DesiredStateError
        when invalid, and whatever the desired sink raises when it cannot
        record it: then nothing changes. ``keep_asleep`` (with no model):
        put to sleep what can sleep instead of freeing the GPU."""
        with self._request_lock:
            desired, dropped, said = self._admit(active, companions, source, keep_asleep)
            self._inbox.put(_Request(desired, said, dropped))
        return desired

    def _want(self, active: str | None, companions: tuple[str, ...] | None, source: str, keep_asleep: bool = False) -> Desired:
        """A desired state of the loop's own (loop thread only): the checks of
        ``request``, then applied at once instead of queued behind itself."""
        with self._request_lock:
            desired, dropped, said = self._admit(active, companions, source, keep_asleep)
        self._adopt(desired, said, dropped)
        self.poke()  # the loop looks again now, not at its resync (it may be settling when it wants)
        return desired

    def _admit(
        self, active: str | None, companions: tuple[str, ...] | None, source: str, keep_asleep: bool
    ) -> tuple[Desired, tuple[str, ...], str]:
        """Validate, preflight, admit and record a desired state (request lock
        held); it becomes the newest handed in. Returns it, the companions
        dropped for it, and how its source is said."""
        dropped: tuple[str, ...] = ()
        if companions is None:
            # Default: "no model" frees the whole GPU; otherwise keep the
            # current companions that still fit beside the new model.
            companions, dropped = ((), ()) if active is None else fitting(self.spec, active, self._desired.companions, self.total_mib())
        check_desired(self.spec, active, companions, self.total_mib())
        self._preflight(active, companions)
        desired = Desired(active or None, tuple(companions), self._desired.generation + 1, keep_asleep and not active and not companions)
        said = source
        if self.admission is not None:
            admitted = replace(self.admission.admit(self.gpu, desired, source), generation=desired.generation)
            if admitted != desired:
                try:
                    check_desired(self.spec, admitted.active, admitted.companions, self.total_mib())
                except DesiredStateError as err:
                    log.warning(
                        "gpu%d: the desired state admitted in place of %s's is invalid (%s); kept %s's", self.gpu, source, err, source
                    )
                else:
                    desired, dropped, said = admitted, (), f"{source}, overruled"
        if self.desired_sink is not None:
            self.desired_sink.write_desired(self.gpu, desired, source)
        if (desired.active, desired.companions) != (self._desired.active, self._desired.companions):
            self.lane.close()  # no new request slips in for a model on its way out; the queue reopens it
        self._desired = desired
        return desired, dropped, said

    def _preflight(self, active: str | None, companions: tuple[str, ...]) -> None:
        """Refuse a request whose new models cannot start here (image missing,
        executable not found, health port answered by a foreign server)
        before anything is stopped for it."""
        running = self._rec.model_states
        live = {m for m, s in running.items() if s not in ("absent", "stopped", "failed")}
        for path, m in [("activeModel", active), *((f"companions[{i}]", c) for i, c in enumerate(companions))]:
            if m is None or running.get(m) in ("running", "starting", "paused"):
                continue
            try:
                problem = self.runtime.preflight(self.spec, m)
            except Exception:
                continue  # the runtime cannot tell now (an outage): the start will say
            if problem is None and m not in live:
                problem = squatted(self.spec, m, live)
            if problem is not None:
                raise DesiredStateError(f"{m!r} cannot start: {problem}; nothing was stopped", path)

    def holds_against(self, active: str | None) -> int:
        """Live holds that a switch to ``active`` would end (on the models it stops)."""
        q = self.reporter.status.get("queue") or {}
        running = self._desired.active
        if active is None or active == running:
            return 0  # freeing the GPU (`switch ''`) is immediate: it is what `down` needs first
        return int((q.get("holds") or {}).get(running or "", 0)) + self.lane.in_flight(running or "")

    def demand_switch(self, active: str, companions: tuple[str, ...]) -> None:
        """A switch that waits its turn (POST /switch while holds are live):
        the queue grants it after the drain, then switches."""
        spec = self.spec.models.get(active)
        prio = int(spec.priority) if spec is not None else 0
        self.post(AddDemand(dq.Demand(uuid.uuid4().hex, active, self.clock(), companions, prio, kind="switch"), Future()))

    def update_spec(self, deployment: DeploymentSpec) -> None:
        with self._request_lock:
            self.spec = deployment
            self._inbox.put(_UpdateSpec(deployment))

    def gate_start(self, ev: StartEvent) -> None:
        """A managed workload of this GPU started (docker event thread)."""
        self._inbox.put(_Gate(ev))

    def reconcile_once(self, max_ticks: int = 10_000) -> None:
        """Apply what is queued and tick until settled, on the caller's thread,
        with stops and starts run inline (tests, ``--once``)."""
        inline, self.actuator.inline = self.actuator.inline, True
        try:
            for _ in range(max_ticks):
                self._drain(block=0.0)
                delay, settled = self._tick()
                if settled and self._inbox.empty():
                    return
                self._sleep(min(delay, self.settings.poll_interval_s))
        finally:
            self.actuator.inline = inline

    # ------------------------------------------------------------ reads

    def status(self) -> dict[str, Any]:
        return dict(self.reporter.status)

    def published_status(self) -> Mapping[str, Any]:
        return self.reporter.status

    def publish(self) -> None:
        """Render the snapshot readers see (loop thread): the status and the forecast."""
        self.forecast = self._forecast()
        self.queue.desk.state = replace(self.queue.desk.state, forecast=self.forecast)
        self.reporter.publish(self.queue.desk.snapshot(), self._total)

    def _forecast(self) -> dq.Forecast:
        """When each heavy model is expected to serve, by the cost book: the
        switch in flight (from its start, to its target), or a restart of the
        desired model (its back-off, then a cold start, timed from the start
        when one runs), then one switch from there to each other model."""
        rec, book, total, now = self._rec, self.reporter.costs, self._total, self.clock()
        spec, asleep, target = rec.spec, set(rec.asleep), rec.desired.active
        began: float | None = None
        seconds = 0.0
        sw = self.book.switch
        if sw is not None and sw.target == target:
            began, seconds = sw.started, switch_seconds(book, spec, sw.source, target, asleep, total) if target else 0.0
            if sw.source is not None and sw.source in spec.models and spec.models[sw.source].warm_switch:
                asleep.add(sw.source)
        elif target is not None and rec.model_states.get(target) != "running":
            starting = self.reporter.stopwatch.pending.get(target)
            if starting is not None and starting[0] == "start":
                began = starting[1]
            else:
                wait = rec.backoff.remaining(now).get(target, 0.0)
                began = now + (wait if wait != float("inf") else 0.0)
            seconds = switch_seconds(book, spec, None, target, asleep - {target}, total)
        heavy = [m for m, ms in spec.models.items() if ms.heavy and m != target]
        ways = tuple((m, switch_seconds(book, spec, target, m, asleep - {target}, total)) for m in heavy)
        return dq.Forecast(target, began, seconds, ways)

    def progress(self, since: int = 0) -> list[dict[str, Any]]:
        return [p for p in list(self.book.progress) if p["seq"] > since]

    def model_states(self) -> Mapping[str, str]:
        return self._rec.model_states

    @property
    def baseline_mib(self) -> int | None:
        return self._rec.baseline.mib

    @property
    def last_release_seconds(self) -> float | None:
        return self._rec.last_release_seconds

    def total_mib(self) -> int | None:
        """The GPU's total memory (it never changes): vLLM reserves a fraction of it."""
        if self._total is None:
            try:
                self._total = self.probe.info().total_mib
            except Exception:
                return None
        return self._total

    # ------------------------------------------------------------- loop

    def _run(self) -> None:
        delay = 0.0
        try:
            while self._drain(block=delay):
                delay, _ = self._tick()
        finally:  # nobody answers after this: the waiting clients learn it now, not at their timeout
            self.lane.close()
            self.queue.desk.refuse_all(503, f"gpu {self.gpu}: vramctl's worker stopped; retry")

    def _drain(self, block: float) -> bool:
        """Apply every queued command (waiting up to ``block`` for the first); False on stop."""
        try:
            cmd = self._inbox.get(timeout=block) if block > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                return False
            self._apply(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                self.queue.step()
                self.publish()
                self.queue.desk.deliver()
                return True

    def _tick(self) -> tuple[float, bool]:
        try:
            delay, settled = self._rec.tick()
        except Exception:  # never die: report and retry at the next resync
            log.exception("gpu%d: reconcile tick failed", self.gpu)
            self.reporter.phase("Failed", "ReconcileError", "internal error; see the log")
            delay, settled = self.settings.resync_s, True
        delay = self.queue.due(delay)
        self.publish()
        self.queue.desk.deliver()  # answers go out once /status shows what they answer
        return delay, settled

    def _apply(self, cmd: object) -> None:
        rec = self._rec
        match cmd:
            case _Request(desired=d, source=source, dropped=dropped):
                if d.generation > rec.desired.generation:  # else the loop's own wish came after it
                    self._adopt(d, source, dropped)
            case _UpdateSpec(spec=spec):
                rec.spec, rec.invalid = spec, None
                self.queue.update_spec(spec)
                rec.backoff.reset()  # a fixed spec deserves a try at once
                self.reporter.check_config(spec, self.total_mib())
            case _Gate(event=ev):
                rec.gate(ev)
            case AddDemand() | Withdraw() | Release() | Renew():
                self.queue.desk.handle(cmd, self.clock())

    def _adopt(self, d: Desired, source: str, dropped: tuple[str, ...]) -> None:
        """The loop takes ``d`` as its desired state (loop thread)."""
        for c in dropped:
            self.reporter.note("dropped", c, f"companion {c!r} does not fit beside {d.active!r}: not kept")
        self._rec.desired, self._rec.invalid = d, None
        members = (d.active or "(none)") + (f" + {', '.join(d.companions)}" if d.companions else "")
        self.reporter.note("requested", d.active, f"desired: {members} ({source})")


class _LoopPort:
    """What the reconciler may ask of its worker (``reconcile.context.LoopContext``),
    routed to the worker's reporter, its hold queue and its own wishes.
    Loop thread only."""

    def __init__(self, worker: GpuWorker) -> None:
        self.w = worker

    @property
    def settings(self) -> LoopSettings:
        return self.w.settings

    @property
    def clock(self) -> Callable[[], float]:
        return self.w.clock

    @property
    def switch_in_progress(self) -> bool:
        return self.w.book.switch is not None

    @property
    def current_phase(self) -> str:
        return self.w.book.phase

    def note(self, step: str, model: str | None, message: str) -> None:
        self.w.reporter.note(step, model, message)

    def phase(self, phase: str, reason: str, message: str) -> None:
        self.w.reporter.phase(phase, reason, message)

    def condition(self, ctype: str, value: bool, reason: str, message: str) -> None:
        self.w.reporter.condition(ctype, value, reason, message)

    def begin_switch(self, source: str | None, target: str | None, now: float) -> None:
        self.w.reporter.begin_switch(source, target, now)

    def finish_switch(self, outcome: str, now: float) -> None:
        if outcome != "success":
            self.w.queue.failed(now, self.w.book.message)
        self.w.reporter.finish_switch(outcome, now)

    def settled(self, now: float, ok: bool) -> None:
        self.w.queue.settled(now, ok)

    def violation(self, heavy_live: list[str]) -> None:
        self.w.reporter.violation(heavy_live)

    def gated(self, ev: StartEvent, not_adopted: str | None = None) -> None:
        """A start made behind vramctl's back was paused: it becomes the desired state, unless ``not_adopted`` says why not."""
        self.w.reporter.gated(ev, not_adopted)
        if not_adopted is not None:
            return
        rec = self.w._rec
        d = rec.desired
        try:
            if rec.spec.models[ev.model].heavy:
                self.w._want(ev.model, None if d.active != ev.model else d.companions, "docker-start")
            elif ev.model not in d.companions:
                self.w._want(d.active, (*d.companions, ev.model), "docker-start")
        except DesiredStateError as err:
            self.note("rejected", ev.model, f"{ev.model!r} cannot run here: {err}; it stays paused and will be stopped")
        except Exception as err:  # the desired state could not be recorded
            self.note("rejected", ev.model, f"{ev.model!r} could not be made the desired model: {err}; it stays paused and will be stopped")

    def want(self, active: str | None, companions: tuple[str, ...] | None, source: str) -> None:
        self.w._want(active, companions, source)

    def publish(self) -> None:
        self.w.publish()

    def logs(self, spec: DeploymentSpec, model: str) -> list[str]:
        try:
            return self.w.runtime.logs_tail(spec, model, 15)
        except Exception:
            return []

    def has_commands(self) -> bool:
        return not self.w._inbox.empty()

    def total_mib(self) -> int | None:
        return self.w.total_mib()

    def hold_off_demands(self) -> bool:
        return self.w.queue.hold_off()


class _Queue:
    """The worker's side of its hold queue (``hold_desk.HoldDesk``, loop thread
    only): demands and holds arrive in the inbox; each decision to switch
    becomes a request of its own, and the switch's outcome goes back to the
    desk, which answers the waiting clients."""

    def __init__(self, worker: GpuWorker, spec: DeploymentSpec) -> None:
        self.w = worker
        policy, idle = dq.policies_of(spec)
        d = worker.desired
        # Nothing is served before the first settled look: the desired model
        # may still be loading (or not run at all). Its start is the desk's
        # switch in progress, so a hold on it is granted once it is healthy.
        self.desk = HoldDesk(
            policy,
            idle,
            now=worker.clock(),
            gpu=str(worker.gpu),
            metrics=worker.metrics.queue,
            light=dq.light_models(spec),
            defer_answers=True,
        )
        for m in spec.models:  # every label set at zero: a rate over the first grant is not NaN
            worker.metrics.queue.wait.labels(str(worker.gpu), m)
        self.target: tuple[dq.Target, int] | None = None  # the queue's switch and the generation that carries it
        if d.active is not None:
            first = dq.Target(d.active, d.companions)
            self.desk.state = replace(self.desk.state, switching_to=first)
            self.target = (first, d.generation)
        self.companions: tuple[tuple[str, ...], int] | None = None
        self.wake_at: float | None = None

    def update_spec(self, spec: DeploymentSpec) -> None:
        policy, idle = dq.policies_of(spec)
        self.desk.state = replace(self.desk.state, policy=policy, idle=idle, light=dq.light_models(spec))

    def due(self, delay: float) -> float:
        """The loop's next look, no later than the queue's own next decision."""
        if self.wake_at is None:
            return delay
        now = self.w.clock()
        if now >= self.wake_at:
            self.step()
        return max(0.0, min(delay, (self.wake_at or now + delay) - now))

    def step(self) -> None:
        now = self.w.clock()
        lane = self.w.lane
        self.desk.state = dq.lane_activity(self.desk.state, lane.close(), lane.last_used, now)
        turns, longest = self._costs()
        self.desk.state = replace(self.desk.state, switch_costs=turns, switch_estimate_seconds=longest)
        decision = self.desk.tick(now)
        self.wake_at = decision.wake_at
        d = self.w.desired
        try:
            if decision.switch_to is not None:
                t = decision.switch_to
                self.target = (t, self.w._want(t.model, t.companions, "queue").generation)
            elif decision.companions is not None:
                self.companions = (decision.companions, self.w._want(d.active, decision.companions, "queue").generation)
            elif decision.idle in ("sleep", "free"):
                self.w._want(None, (), f"idle ({decision.idle})", keep_asleep=decision.idle == "sleep")
        except DesiredStateError as err:
            if decision.switch_to is not None:
                self.desk.switch_failed(str(err), now)
            elif decision.companions is not None:
                self.desk.companions_failed(str(err), now)
        if decision.switch_to is None and decision.idle is None and not self._moved(self.w.desired):
            lane.open(dq.lane_models(self.desk.state))
        self._prestage_next()

    def _prestage_next(self) -> None:
        """The heavy model the queue serves next, when its start will be cold
        and it declares its weights: read them into the page cache meanwhile."""
        st, rec, prestager = self.desk.state, self.w._rec, self.w.prestager
        if st.active is not None:
            prestager.forget(st.active)  # served: the next time it is cold again, it is read again
        spec = rec.spec
        nxt = next((d.model for d in st.demands if d.model != st.active and d.model in spec.models and spec.models[d.model].heavy), None)
        if nxt is None or nxt in rec.asleep or rec.model_states.get(nxt) in ("running", "starting"):
            return
        paths = spec.models[nxt].weight_paths
        if paths and prestager.request(nxt, paths):
            self.w.reporter.note(
                "prestage", nxt, f"reading {nxt!r}'s weights into the page cache ahead of its cold start: {', '.join(paths)}"
            )

    def _costs(self) -> tuple[tuple[tuple[str, float], ...], float]:
        """By the cost book: what serving each other heavy model would cost in
        switches, there and back (the queue's serving window), and the
        longest switch to one of them (its Retry-After)."""
        w, active, book = self.w, self.desk.state.active, self.w.reporter.costs
        spec, asleep = w._rec.spec, w._rec.asleep
        heavy = [m for m, ms in spec.models.items() if ms.heavy and m != active]
        turns = tuple((m, turn_seconds(book, spec, active, m, asleep, w._total)) for m in heavy)
        longest = max(
            (switch_seconds(book, spec, active, m, asleep, w._total) for m in heavy), default=dq.QueueState.switch_estimate_seconds
        )
        return turns, longest

    def hold_off(self) -> bool:
        """Nothing waits, is held or is in flight: new demands wait (the lane
        shut, the desk switching to what runs) until the loop settles, and
        True. Else the lane reopens as the queue decides, and False."""
        now, lane = self.w.clock(), self.w.lane
        self.desk.state = dq.lane_activity(self.desk.state, lane.close(), lane.last_used, now)
        st = self.desk.state
        if st.demands or st.holds or st.companions_pending is not None or st.drain_since is not None:
            self.step()
            return False
        d = self.w._rec.desired
        if self.target is None and st.switching_to is None and d.active is not None:
            t = dq.Target(d.active, d.companions)
            self.desk.state = replace(st, active=None, active_companions=(), switching_to=t)
            self.target = (t, d.generation)
        return True

    def settled(self, now: float, ok: bool) -> None:
        d = self.w._rec.desired
        if self.target is not None and d.generation >= self.target[1]:
            target, _ = self.target
            self.target = None
            if ok and d.active == target.model and set(target.companions) <= set(d.companions):
                self.desk.switch_done(dq.Target(target.model, d.companions), now)
            elif ok:
                # Superseded (a forced switch, the spec, the state file): not a
                # failure; the queue follows what runs and its demands for the
                # target keep their turn.
                self.desk.switch_superseded(dq.Target(d.active, d.companions) if d.active is not None else None, now)
            else:
                self.desk.switch_failed(f"{target.model!r} is not what runs now (it failed)", now)
        elif self.companions is not None and d.generation >= self.companions[1]:
            wanted, _ = self.companions
            self.companions = None
            if ok and set(wanted) <= set(d.companions):
                self.desk.companions_done(d.companions, now)
            else:
                self.desk.companions_failed(f"{', '.join(wanted)} not running beside {d.active!r}", now)
        elif ok and self.desk.state.switching_to is None and self._moved(d):
            # Another source (a forced POST /switch, a gated start, the spec) moved the GPU: the holds on
            # what ran end (their renew answers 409), and the queue follows what runs.
            if self.desk.state.active != d.active:
                self.desk.went_away(now)
            if d.active is not None:
                self.desk.switch_done(dq.Target(d.active, d.companions), now)
        self.step()

    def _moved(self, d: Desired) -> bool:
        st = self.desk.state
        return (st.active, st.active_companions) != (d.active, d.companions)

    def failed(self, now: float, reason: str) -> None:
        self.w.lane.close()  # until the queue knows what runs again
        if self.target is not None:
            self.target = None
            self.desk.switch_failed(reason, now)
        elif self.desk.state.active is not None and self.desk.state.holds:
            self.desk.went_away(now)  # the active model failed under its holds
