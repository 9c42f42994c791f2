"""Prometheus series read at scrape time from the workers and their GPU probes.

Why a custom collector and not Gauges set by the worker: a Gauge shows what
the worker last wrote, which for GPU memory is whatever it was at the last
pass (up to ``resyncSeconds`` old) and for a model's state is wrong for the
whole length of a switch. Like client_python's ``ProcessCollector``, this
reads its sources when Prometheus asks. Events (switches, their durations,
violations, gated starts) stay real counters owned by the worker
(``supervisor.Metrics``): an event cannot be re-read later.

What a scrape promises:

- It never takes a worker's lock: it reads ``published_status()``,
  ``model_states()`` and ``baseline_mib``, which the worker replaces whole and
  never mutates. A switch in progress (a stop waiting out its grace period, a
  wait for memory) never delays a scrape.
- It asks each GPU probe once (``info()``, ``snapshot()``). A probe that
  raises costs that GPU its GPU series (memory, info, utilization, per-model
  memory, DCGM) and sets its ``vramctl_nvml_up`` to 0; its worker's series
  (phase, holder, model states) are still reported, and other GPUs are not
  affected. A worker that cannot be read at all is skipped, never the scrape.
- Optional probe fields (utilization, temperature, power) are exported only
  when the probe reports them: no series is better than a made-up zero.

Per-model GPU memory comes from the probe's per-process figures where it has
them (NVML on Linux, the simulated GPU). Where it has none (WSL2) it is
attributed from what the supervisor knows: a holding model's reservation
(its ``vramMiB``, or vLLM's gpuMemoryUtilization x total), or, for the single
holding model without one, used memory minus the baseline minus everything
else attributed.

Many scrapes at once (``SharedRendering``): one rendering of the registry is
shared by the scrapes that arrive together. A scrape that arrives while one
renders waits for it; one that arrives within ``SHARED_WINDOW_S`` after a
rendering began gets its bytes; a later one renders anew. Rendering (reading
the probes, then formatting some 15 KB of text) costs 1-2 ms; 500
concurrent scrapes used to render back to back, one per round of answers,
which is what made their p99 grow. The window is said in the help of
``vramctl_scrape_duration_seconds``: every series may be that much older than
the scrape.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from vramctl.gpu.base import GpuInfo
from vramctl.observed import GpuSnapshot
from vramctl.reconcile.model_view import MODEL_STATES
from vramctl.spec.models import DeploymentSpec
from vramctl.status.book import PHASES
from vramctl.worker.actor import GpuWorker
from vramctl.worker.supervisor import Supervisor

log = logging.getLogger("vramctl.telemetry")

MIB = 1024 * 1024

# States in which a model holds the GPU: the holder (vramctl_active_model)
# and, when the probe cannot say per process, whose memory is attributed. A
# paused (gated) model was frozen before it could allocate.
HOLDING_STATES = frozenset({"running", "starting", "stopping", "sleeping", "waking"})

# Scrapes within this long after a rendering began share it (SharedRendering).
SHARED_WINDOW_S = 0.1

_GPU = ["gpu", "UUID"]
_DCGM = ["gpu", "UUID", "device", "modelName", "Hostname"]


def model_memory_mib(spec: DeploymentSpec, states: Mapping[str, str], snap: GpuSnapshot, baseline_mib: int) -> dict[str, int]:
    """MiB each model holds on the GPU; every known model appears (0 when it holds nothing).

    Per-process figures win. A holding model the probe cannot size (no
    per-process data at all, none of its processes listed, or listed without
    a figure) is
    attributed its reservation (``vramMiB``; for vLLM gpuMemoryUtilization x
    total, see ``DeploymentSpec.reservation``); a single such model without one gets
    ``used - baseline - (everything else attributed)``, floored at 0. Several
    undeclared models cannot be told apart: they are left out rather than guessed.
    """
    out = dict.fromkeys(states, 0)
    unsized: list[str] = []
    if snap.processes is None:
        unsized = [m for m, st in states.items() if st in HOLDING_STATES]
    else:
        no_figure: set[str] = set()
        for p in snap.processes:
            if p.model is None:
                continue
            if p.used_mib is None:
                no_figure.add(p.model)
            else:
                out[p.model] = out.get(p.model, 0) + p.used_mib
        unsized = [m for m in sorted(no_figure) if out.get(m, 0) == 0]
        # Holding, yet none of its processes listed: its pids could not be
        # mapped to it (another pid namespace); 0 would be the one wrong answer.
        listed = {p.model for p in snap.processes if p.model is not None}
        unsized += [m for m, st in sorted(states.items()) if st in HOLDING_STATES and m not in listed]
    undeclared = []
    for m in unsized:
        declared = spec.reservation_mib(m, snap.memory.total_mib) if m in spec.models else None
        if declared is None:
            undeclared.append(m)
        else:
            out[m] = declared
    for m in undeclared:
        del out[m]
    if len(undeclared) == 1:
        others = sum(out.values())
        foreign = sum(p.used_mib or 0 for p in snap.processes or () if p.model is None)
        out[undeclared[0]] = max(0, snap.memory.used_mib - baseline_mib - others - foreign)
    return out


class _Families:
    """The families of one scrape, so each GPU adds its samples to the same family."""

    def __init__(self, dcgm_compat: bool) -> None:
        g = GaugeMetricFamily
        self.total = g("vramctl_gpu_memory_total_bytes", "GPU memory in total.", labels=_GPU)
        self.used = g(
            "vramctl_gpu_memory_used_bytes", "GPU memory in use (NVML memory info v2: driver-reserved memory not counted).", labels=_GPU
        )
        self.free = g(
            "vramctl_gpu_memory_free_bytes", "GPU memory free: total - used - reserved; negative when over-committed.", labels=_GPU
        )
        self.reserved = g("vramctl_gpu_memory_reserved_bytes", "GPU memory reserved by the driver.", labels=_GPU)
        self.util = g(
            "vramctl_gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran (only when the probe reports it).",
            labels=_GPU,
        )
        self.info = g("vramctl_gpu_info", "The GPU's identity; always 1.", labels=["gpu", "UUID", "modelName", "driver_version"])
        self.nvml_up = g(
            "vramctl_nvml_up", "1 when the real NVML probe answered this scrape; 0 for a simulated or failing probe.", labels=["gpu"]
        )
        self.phase = g("vramctl_phase", "1 for the worker's current phase.", labels=["gpu", "phase"])
        self.active = g(
            "vramctl_active_model",
            "1 for the heavy model that holds the GPU: starting, running, or stopping until it exits.",
            labels=["gpu", "model"],
        )
        self.state = g("vramctl_model_state", "1 for each model's current state, 0 for the others.", labels=["gpu", "model", "state"])
        self.model_mem = g(
            "vramctl_model_gpu_memory_bytes",
            "GPU memory a model holds: per process where the probe tells, else attributed from its declared vramMiB.",
            labels=["gpu", "model"],
        )
        self.release = g(
            "vramctl_release_detection_seconds",
            "Time from a stopped model's exit to its memory being confirmed free, at the last switch.",
            labels=["gpu"],
        )
        self.sleep_host = g(
            "vramctl_sleep_host_memory_bytes",
            "Host memory held by the GPU's sleeping models (their sleep.hostMemoryMiB at level 1).",
            labels=["gpu"],
        )
        self.switch_cost = g(
            "vramctl_switch_cost_seconds",
            "What a model's way of going or coming back is expected to take (path: start, stop, sleep-l1, wake-l1, ...): "
            "the median of its recent switches, else a prior from its declared size (status costs).",
            labels=["gpu", "model", "path"],
        )
        self.dcgm: list[GaugeMetricFamily] = []
        if dcgm_compat:
            self.fb_used = g("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=_DCGM)
            self.fb_free = g("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels=_DCGM)
            self.gpu_util = g("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=_DCGM)
            self.gpu_temp = g("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", labels=_DCGM)
            self.power = g("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", labels=_DCGM)
            self.dcgm = [self.fb_used, self.fb_free, self.gpu_util, self.gpu_temp, self.power]

    def all(self) -> list[GaugeMetricFamily]:
        return [
            self.total,
            self.used,
            self.free,
            self.reserved,
            self.util,
            self.info,
            self.nvml_up,
            self.phase,
            self.active,
            self.state,
            self.model_mem,
            self.release,
            self.sleep_host,
            self.switch_cost,
            *self.dcgm,
        ]


class VramctlCollector(Collector):
    """Collects the GPU, holder and model series of ``workers()`` at scrape time.

    Safe to call from several scraping threads at once.
    """

    def __init__(
        self,
        workers: Callable[[], Iterable[GpuWorker]],
        *,
        dcgm_compat: bool = False,
        hostname: str | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._workers = workers
        self.dcgm_compat = dcgm_compat
        self.hostname = hostname or socket.gethostname()
        self._timer = timer
        self._errors_lock = threading.Lock()
        self._last_error: dict[int, str] = {}  # per GPU: log a failing probe once, not every scrape

    def describe(self) -> Iterable[Metric]:
        # Nothing to check at registration; collect() must not run then (it asks the probes).
        return []

    def collect(self) -> Iterator[Metric]:
        t0 = self._timer()
        f = _Families(self.dcgm_compat)
        for w in sorted(self._workers(), key=lambda w: w.gpu):
            try:
                self._collect_worker(w, f)
            except Exception:
                log.exception("gpu%d: metrics could not be collected; skipped in this scrape", w.gpu)
        families: list[Metric] = list(f.all())
        took = GaugeMetricFamily(
            "vramctl_scrape_duration_seconds",
            "Time the rendering spent reading the workers and GPU probes. Scrapes that arrive while one renders, or within "
            f"{SHARED_WINDOW_S:g} s after it began, share its result: every series may be that much older than the scrape.",
        )
        took.add_metric([], self._timer() - t0)
        families.append(took)
        yield from families

    def _collect_worker(self, w: GpuWorker, f: _Families) -> None:
        gpu = str(w.gpu)
        spec = w.spec
        status = w.published_status()
        states = dict(w.model_states())
        for m in spec.models:
            states.setdefault(m, "absent")

        current = status.get("phase")
        for ph in PHASES:
            f.phase.add_metric([gpu, ph], 1.0 if ph == current else 0.0)
        for m in sorted(states):
            for st in MODEL_STATES:
                f.state.add_metric([gpu, m, st], 1.0 if st == states[m] else 0.0)
            if states[m] in HOLDING_STATES and m in spec.models and spec.models[m].heavy:
                f.active.add_metric([gpu, m], 1.0)
        asleep = [m for m, st in states.items() if st == "asleep" and m in spec.models]
        f.sleep_host.add_metric([gpu], float(sum(spec.models[m].host_memory_asleep_mib for m in asleep) * MIB))
        for m, paths in sorted((status.get("costs") or {}).items()):
            for path, cost in sorted(paths.items()):
                f.switch_cost.add_metric([gpu, m, path], float(cost["seconds"]))
        release = w.last_release_seconds  # a float, replaced whole: no lock needed
        if release is not None:
            f.release.add_metric([gpu], release)

        try:
            info = w.probe.info()
            snap = w.probe.snapshot()
        except Exception as err:
            self._probe_failed(w.gpu, err)
            f.nvml_up.add_metric([gpu], 0.0)
            return
        self._probe_answered(w.gpu)
        f.nvml_up.add_metric([gpu], 1.0 if w.probe.kind == "nvml" else 0.0)
        self._gpu_series(f, gpu, info, snap)
        for m, mib in sorted(model_memory_mib(spec, states, snap, w.baseline_mib or 0).items()):
            f.model_mem.add_metric([gpu, m], float(mib * MIB))

    def _gpu_series(self, f: _Families, gpu: str, info: GpuInfo, snap: GpuSnapshot) -> None:
        mem = snap.memory
        ids = [gpu, info.uuid]
        f.total.add_metric(ids, float(mem.total_mib * MIB))
        f.used.add_metric(ids, float(mem.used_mib * MIB))
        f.free.add_metric(ids, float(mem.free_mib * MIB))
        f.reserved.add_metric(ids, float(mem.reserved_mib * MIB))
        if snap.utilization is not None:
            f.util.add_metric(ids, float(snap.utilization))
        f.info.add_metric([gpu, info.uuid, info.name, info.driver], 1.0)
        if not self.dcgm_compat:
            return
        dcgm = [gpu, info.uuid, f"nvidia{info.index}", info.name, self.hostname]
        f.fb_used.add_metric(dcgm, float(mem.used_mib))
        f.fb_free.add_metric(dcgm, float(mem.free_mib))
        if snap.utilization is not None:
            f.gpu_util.add_metric(dcgm, round(snap.utilization * 100.0, 1))
        if snap.temperature_celsius is not None:
            f.gpu_temp.add_metric(dcgm, float(snap.temperature_celsius))
        if snap.power_watts is not None:
            f.power.add_metric(dcgm, float(snap.power_watts))

    def _probe_failed(self, gpu: int, err: Exception) -> None:
        text = f"{type(err).__name__}: {err}"
        with self._errors_lock:
            if self._last_error.get(gpu) == text:
                return
            self._last_error[gpu] = text
        log.warning("gpu%d: the GPU probe failed during a scrape (%s); its GPU series are left out until it answers", gpu, text)

    def _probe_answered(self, gpu: int) -> None:
        with self._errors_lock:
            if self._last_error.pop(gpu, None) is not None:
                log.info("gpu%d: the GPU probe answers again", gpu)


def register(supervisor: Supervisor, *, dcgm_compat: bool = False, hostname: str | None = None) -> VramctlCollector:
    """Add the scrape-time collector over ``supervisor``'s workers to its metrics registry."""
    # A copy: workers come and go at run time (ModelDeployments) while scrapes run.
    collector = VramctlCollector(lambda: list(supervisor.workers.values()), dcgm_compat=dcgm_compat, hostname=hostname)
    supervisor.metrics.registry.register(collector)
    return collector


class SharedRendering:
    """One rendering of ``registry`` (the exposition text) shared by the
    scrapes that arrive together: single flight, plus a freshness window of
    ``max_age_s`` from the moment a rendering began (see the module
    docstring). Thread-safe; ``body`` blocks a scrape only while another
    renders. A rendering that raises is raised to the scrapes that waited
    for it and is not kept: the next scrape renders again."""

    def __init__(
        self,
        registry: CollectorRegistry,
        max_age_s: float = SHARED_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        render: Callable[[CollectorRegistry], bytes] = generate_latest,
    ) -> None:
        self.registry, self.max_age_s = registry, max_age_s
        self._clock, self._render = clock, render
        self._cond = threading.Condition()
        self._kept: tuple[bytes, float] | None = None  # (body, when its rendering began), replaced whole: read without the lock
        self._rendering = False
        self._failed: BaseException | None = None  # what the rendering being waited for raised
        self._generation = 0  # renderings finished: a waiter knows its rendering ended

    def __call__(self) -> bytes:
        return self.body()

    def fresh(self) -> bytes | None:
        """The kept body while it is within the window, else None; never
        waits (an event loop asks this first, and hands ``body`` to a thread
        only when it is None)."""
        kept = self._kept
        if kept is not None and self._clock() - kept[1] <= self.max_age_s:
            return kept[0]
        return None

    def body(self) -> bytes:
        with self._cond:
            kept = self.fresh()
            if kept is not None:
                return kept
            if self._rendering:  # the one under way is fresh enough for this scrape, whatever it takes
                waited_for = self._generation
                while self._generation == waited_for:
                    self._cond.wait()
                if self._failed is not None:
                    raise self._failed
                assert self._kept is not None
                return self._kept[0]
            self._rendering, self._failed = True, None
            began = self._clock()
        try:
            body = self._render(self.registry)
        except BaseException as err:
            with self._cond:
                self._rendering, self._failed = False, err
                self._generation += 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._kept = (body, began)
            self._rendering = False
            self._generation += 1
            self._cond.notify_all()
        return body
