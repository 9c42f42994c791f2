"""The scrape-time collector: fresh values, one-hot states, attribution,
failing probes, the DCGM-compatible set, and scrapes that never wait for a
worker. Workers run on the recording fakes (and once on the simulated GPU);
every test reads a fresh CollectorRegistry with get_sample_value."""

from __future__ import annotations

import logging
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.support.fakes import FakeClock, FakeGpu, FakeRuntime
from tests.support.workers import spec
from vramctl.app import build
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.observed import GpuMemory, GpuProcess, GpuSnapshot, WorkloadState
from vramctl.reconcile.model_view import MODEL_STATES
from vramctl.runtimes.base import StartEvent
from vramctl.spec.models import DeploymentSpec, parse_config
from vramctl.telemetry import MIB, VramctlCollector, model_memory_mib
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings
from vramctl.worker.supervisor import holders_from

RUN = WorkloadState.RUNNING


def settings() -> WorkerSettings:
    return WorkerSettings(poll_interval_s=0.001, memory_timeout_s=0.05, backoff_initial_s=2, backoff_max_s=16, baseline_mib=0)


class Rig:
    """Workers on a fresh registry with the collector registered."""

    def __init__(self, dcgm_compat: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.workers: list[GpuWorker] = []
        self.collector = VramctlCollector(lambda: self.workers, dcgm_compat=dcgm_compat, hostname="testhost")
        self.registry.register(self.collector)

    def add(self, rt: FakeRuntime, d: DeploymentSpec | None = None, **gpu_fields: object) -> tuple[GpuWorker, FakeGpu]:
        d = d or spec()
        gpu = FakeGpu(rt, d)
        for k, v in gpu_fields.items():
            setattr(gpu, k, v)
        w = GpuWorker(d, rt, gpu, settings(), metrics=self.metrics)
        self.workers.append(w)
        return w, gpu

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def state(self, model: str, gpu: str = "0") -> str:
        """The one state whose series is 1; fails unless exactly one is."""
        hot = [s for s in MODEL_STATES if self.value("vramctl_model_state", gpu=gpu, model=model, state=s) == 1.0]
        cold = [s for s in MODEL_STATES if self.value("vramctl_model_state", gpu=gpu, model=model, state=s) == 0.0]
        assert len(hot) == 1 and len(cold) == len(MODEL_STATES) - 1, (model, hot, cold)
        return hot[0]


def test_gpu_memory_is_read_from_the_probe_at_scrape_time() -> None:
    rig = Rig()
    rt = FakeRuntime(states={"llm": RUN})
    w, _ = rig.add(rt)
    w.reconcile_once()
    ids = {"gpu": "0", "UUID": "GPU-fake-0"}
    assert rig.value("vramctl_gpu_memory_total_bytes", **ids) == 16000 * MIB
    assert rig.value("vramctl_gpu_memory_used_bytes", **ids) == 12000 * MIB
    assert rig.value("vramctl_gpu_memory_free_bytes", **ids) == 4000 * MIB
    assert rig.value("vramctl_gpu_memory_reserved_bytes", **ids) == 0
    assert rig.value("vramctl_gpu_info", gpu="0", UUID="GPU-fake-0", modelName="Fake", driver_version="0") == 1
    # No worker pass in between: the next scrape still sees the change.
    rt.states["llm"] = WorkloadState.EXITED
    assert rig.value("vramctl_gpu_memory_used_bytes", **ids) == 0
    assert rig.value("vramctl_nvml_up", gpu="0") == 0  # a fake probe is not NVML
    assert rig.value("vramctl_gpu_utilization_ratio", **ids) is None  # not reported: no series, never a made-up 0
    assert rig.value("vramctl_scrape_duration_seconds") is not None


def test_holder_phase_and_one_hot_model_states() -> None:
    rig = Rig()
    rt = FakeRuntime(states={"llm": RUN, "tts": RUN})
    w, _ = rig.add(rt, spec(companions=["tts"]))
    w.reconcile_once()
    assert rig.value("vramctl_active_model", gpu="0", model="llm") == 1
    assert rig.value("vramctl_active_model", gpu="0", model="tts") is None  # light: beside the holder, not it
    assert rig.value("vramctl_active_model", gpu="0", model="sdxl") is None
    assert (rig.state("llm"), rig.state("tts"), rig.state("sdxl"), rig.state("big")) == ("running", "running", "absent", "absent")
    assert rig.value("vramctl_phase", gpu="0", phase="Ready") == 1
    assert rig.value("vramctl_phase", gpu="0", phase="Switching") == 0
    w.request("sdxl")
    w.reconcile_once()
    assert rig.value("vramctl_active_model", gpu="0", model="sdxl") == 1
    assert rig.value("vramctl_active_model", gpu="0", model="llm") is None
    assert (rig.state("llm"), rig.state("sdxl"), rig.state("tts")) == ("stopped", "running", "running")


def test_failed_and_paused_states() -> None:
    rig = Rig()
    rt = FakeRuntime(states={"llm": RUN}, crash_on_start={"sdxl"})
    w, _ = rig.add(rt)
    w.reconcile_once()
    w.request("sdxl", ())
    w.reconcile_once()
    assert rig.state("sdxl") == "failed"
    assert rig.value("vramctl_phase", gpu="0", phase="Failed") == 1
    assert rig.value("vramctl_switches_total", gpu="0", outcome="failed") == 1
    w.reconcile_once()  # observed again, still in back-off: still failed
    assert rig.state("sdxl") == "failed"

    rig2 = Rig()
    rt2 = FakeRuntime(states={"llm": RUN})
    w2, _ = rig2.add(rt2)
    w2.reconcile_once()
    rt2.states["sdxl"] = RUN  # docker compose --profile sdxl up -d; the watcher gates it
    w2.gate_start(StartEvent("sdxl", 0, "abc", True))
    w2._drain(0.0)  # what the worker's loop does first: apply its inbox
    assert rig2.state("sdxl") == "paused"
    assert rig2.value("vramctl_gated_starts_total", gpu="0") == 1
    assert rig2.value("vramctl_active_model", gpu="0", model="llm") == 1  # llm still holds the GPU


def test_switch_events_are_counters_with_every_label_set_created_at_zero() -> None:
    rig = Rig()
    rt = FakeRuntime(states={"llm": RUN})
    w, _ = rig.add(rt)
    for outcome in ("success", "failed", "blocked"):
        assert rig.value("vramctl_switches_total", gpu="0", outcome=outcome) == 0
    assert rig.value("vramctl_exclusivity_violations_total", gpu="0") == 0
    assert rig.value("vramctl_gated_starts_total", gpu="0") == 0
    assert rig.value("vramctl_switch_duration_seconds_count", gpu="0", strategy="cold") == 0
    assert rig.value("vramctl_switch_duration_seconds_count", gpu="0", strategy="warm") == 0
    w.request("sdxl", ())
    w.reconcile_once()
    assert rig.value("vramctl_switches_total", gpu="0", outcome="success") == 1
    assert rig.value("vramctl_switch_duration_seconds_count", gpu="0", strategy="cold") == 1
    rt.states["llm"] = RUN  # someone started llm beside sdxl behind everyone's back
    w.reconcile_once()
    assert rig.value("vramctl_exclusivity_violations_total", gpu="0") == 1


def test_a_switch_in_progress_is_visible_and_never_delays_a_scrape() -> None:
    rig = Rig()
    rt = FakeRuntime(states={"llm": RUN})
    w, _ = rig.add(rt)
    w.reconcile_once()
    in_stop, release = threading.Event(), threading.Event()

    def slow_stop(verb: str, model: str) -> None:
        if (verb, model) == ("stop", "llm"):
            in_stop.set()
            release.wait(10)  # llm takes its grace period

    rt.on_call = slow_stop
    w.request("sdxl", ())
    t = threading.Thread(target=w.reconcile_once, daemon=True)
    t.start()
    try:
        assert in_stop.wait(5)
        assert rig.value("vramctl_phase", gpu="0", phase="Switching") == 1
        assert rig.state("llm") == "stopping"
        assert rig.value("vramctl_active_model", gpu="0", model="llm") == 1  # still holds it until it exits
    finally:
        release.set()
        t.join(10)
    assert not t.is_alive()
    assert rig.state("sdxl") == "running" and rig.state("llm") == "stopped"
    assert rig.value("vramctl_phase", gpu="0", phase="Ready") == 1


def test_a_scrape_does_not_wait_for_a_worker_holding_its_lock() -> None:
    rig = Rig()
    rt = FakeRuntime(states={"llm": RUN})
    w, _ = rig.add(rt)
    w.reconcile_once()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with w._request_lock:  # e.g. a request() writing the state file
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    out: list[bytes] = []
    scraper = threading.Thread(target=lambda: out.append(generate_latest(rig.registry)), daemon=True)
    try:
        assert held.wait(5)
        scraper.start()
        scraper.join(5)  # bounded: a scrape that waited for the lock would still be blocked here
        assert not scraper.is_alive(), "the scrape waited for the worker's lock"
    finally:
        release.set()
        holder.join(5)
        scraper.join(5)
    assert b'vramctl_active_model{gpu="0",model="llm"} 1.0' in out[0]


def test_a_failing_probe_costs_only_its_gpus_series(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    rt0, rt1 = FakeRuntime(states={"llm": RUN}), FakeRuntime(states={"sdxl": RUN})
    rig.add(rt0, spec(gpu=0))
    w1, gpu1 = rig.add(rt1, spec(gpu=1, activeModel="sdxl"), kind="nvml", error=RuntimeError("NVML_ERROR_GPU_IS_LOST"))
    for w in rig.workers:
        w.reconcile_once()
    with caplog.at_level(logging.WARNING, logger="vramctl.telemetry"):
        text = generate_latest(rig.registry).decode()
        generate_latest(rig.registry)
    assert rig.value("vramctl_gpu_memory_used_bytes", gpu="0", UUID="GPU-fake-0") == 12000 * MIB
    gpu1_lines = [ln for ln in text.splitlines() if 'gpu="1"' in ln]
    assert gpu1_lines and not [ln for ln in gpu1_lines if ln.startswith(("vramctl_gpu_", "vramctl_model_gpu_memory"))]
    assert rig.value("vramctl_model_gpu_memory_bytes", gpu="1", model="sdxl") is None
    assert rig.value("vramctl_nvml_up", gpu="1") == 0
    assert rig.state("sdxl", gpu="1") == "running"  # the worker's own knowledge is still reported
    assert rig.value("vramctl_active_model", gpu="1", model="sdxl") == 1
    assert sum("NVML_ERROR_GPU_IS_LOST" in r.getMessage() for r in caplog.records) == 1  # said once, not every scrape
    gpu1.error = None
    assert rig.value("vramctl_nvml_up", gpu="1") == 1
    assert rig.value("vramctl_gpu_memory_used_bytes", gpu="1", UUID="GPU-fake-1") == 11000 * MIB
    assert w1.status()["phase"] == "Ready"


def test_a_worker_that_cannot_be_read_never_aborts_the_scrape() -> None:
    rig = Rig()
    rig.add(FakeRuntime(states={"llm": RUN}), spec(gpu=0))
    w1, _ = rig.add(FakeRuntime(), spec(gpu=1))
    w1.published_status = None  # type: ignore[method-assign,assignment]  # calling it raises TypeError
    generate_latest(rig.registry)
    assert rig.value("vramctl_gpu_memory_used_bytes", gpu="0", UUID="GPU-fake-0") == 12000 * MIB


def test_nvml_probe_fields_and_the_dcgm_compatible_set() -> None:
    optional: dict[str, Any] = {"kind": "nvml", "utilization": 0.42, "temperature_celsius": 61.0, "power_watts": 212.5}
    plain = Rig()
    plain.add(FakeRuntime(states={"llm": RUN}), **optional)
    assert plain.value("vramctl_nvml_up", gpu="0") == 1
    assert plain.value("vramctl_gpu_utilization_ratio", gpu="0", UUID="GPU-fake-0") == 0.42
    assert b"DCGM_FI_DEV" not in generate_latest(plain.registry)  # off by default

    rig = Rig(dcgm_compat=True)
    rig.add(FakeRuntime(states={"llm": RUN}), **optional)
    dcgm = {"gpu": "0", "UUID": "GPU-fake-0", "device": "nvidia0", "modelName": "Fake", "Hostname": "testhost"}
    assert rig.value("DCGM_FI_DEV_FB_USED", **dcgm) == 12000  # MiB, as dcgm-exporter
    assert rig.value("DCGM_FI_DEV_FB_FREE", **dcgm) == 4000
    assert rig.value("DCGM_FI_DEV_GPU_UTIL", **dcgm) == 42  # percent
    assert rig.value("DCGM_FI_DEV_GPU_TEMP", **dcgm) == 61
    assert rig.value("DCGM_FI_DEV_POWER_USAGE", **dcgm) == 212.5

    bare = Rig(dcgm_compat=True)
    bare.add(FakeRuntime(states={"llm": RUN}))  # a probe that reports no utilization, temperature or power
    assert bare.value("DCGM_FI_DEV_FB_USED", **dcgm) == 12000
    for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE"):
        assert bare.value(name, **dcgm) is None, name


def test_model_memory_per_process_or_attributed() -> None:
    rig = Rig()
    rt = FakeRuntime(states={"llm": RUN, "tts": RUN})
    w, gpu = rig.add(rt, spec(companions=["tts"]))
    w.reconcile_once()
    assert rig.value("vramctl_model_gpu_memory_bytes", gpu="0", model="llm") == 12000 * MIB  # per process
    assert rig.value("vramctl_model_gpu_memory_bytes", gpu="0", model="sdxl") == 0
    gpu.per_process = False  # WSL2: no per-process memory, attributed from the declared vramMiB
    gpu.baseline_mib = 700
    assert rig.value("vramctl_model_gpu_memory_bytes", gpu="0", model="llm") == 12000 * MIB
    assert rig.value("vramctl_model_gpu_memory_bytes", gpu="0", model="tts") == 3000 * MIB


D = spec(models={"llm": {"image": "i"}, "sdxl": {"image": "i", "vramMiB": 11000}, "tts": {"class": "light", "image": "i", "vramMiB": 3000}})


def snap(used: int, procs: tuple[GpuProcess, ...] | None = None) -> GpuSnapshot:
    return GpuSnapshot(GpuMemory(16000, used), procs)


@pytest.mark.parametrize(
    ("states", "snapshot", "baseline", "expected"),
    [
        # per process: the probe's figures, summed per model; foreign processes are nobody's
        (
            {"llm": "running", "tts": "running"},
            snap(13000, (GpuProcess(1, 9000, "llm"), GpuProcess(2, 500, "llm"), GpuProcess(3, 2500, "tts"), GpuProcess(4, 1000))),
            0,
            {"llm": 9500, "tts": 2500},
        ),
        # a model still releasing after it stopped keeps its memory until the probe says otherwise
        ({"sdxl": "stopped"}, snap(11000, (GpuProcess(1, 11000, "sdxl"),)), 0, {"sdxl": 11000}),
        # no per-process data: declared vramMiB; the one undeclared holder gets used - baseline - the rest
        ({"llm": "running", "tts": "running", "sdxl": "stopped"}, snap(14000), 500, {"llm": 10500, "tts": 3000, "sdxl": 0}),
        ({"sdxl": "starting", "llm": "paused"}, snap(9000), 0, {"sdxl": 11000, "llm": 0}),  # paused = gated: holds nothing
        ({"llm": "stopping"}, snap(200), 500, {"llm": 0}),  # floored at 0, never negative
        # a holding model none of whose processes is listed (pids not mapped): attributed, never 0
        ({"sdxl": "running", "llm": "stopped"}, snap(11000, (GpuProcess(7, 11000),)), 0, {"sdxl": 11000, "llm": 0}),
        # processes listed without a figure (some NVML versions): attributed like no per-process data
        (
            {"llm": "running", "tts": "running"},
            snap(12500, (GpuProcess(1, None, "llm"), GpuProcess(2, 3000, "tts"))),
            0,
            {"llm": 9500, "tts": 3000},
        ),
    ],
)
def test_model_memory_attribution(states: dict[str, str], snapshot: GpuSnapshot, baseline: int, expected: dict[str, int]) -> None:
    assert model_memory_mib(D, states, snapshot, baseline) == expected


def test_several_undeclared_holders_are_not_guessed() -> None:
    d = spec(activeModel="a", models={"a": {"image": "i"}, "b": {"class": "light", "image": "i"}})
    assert model_memory_mib(d, {"a": "running", "b": "running"}, snap(9000), 0) == {}


def test_simulated_gpu_release_delay_shows_in_the_series() -> None:
    clock = FakeClock()
    rig = Rig()
    rt = FakeRuntime(states={"llm": RUN})
    d = spec()
    sim = SimulatedGpu(0, 16000, 400, 0.5, holders_from(rt, lambda: d), clock=clock)
    w = GpuWorker(d, rt, sim, settings(), metrics=rig.metrics, clock=clock)
    rig.workers.append(w)
    w.reconcile_once()
    ids = {"gpu": "0", "UUID": "SIM-GPU-0"}
    assert rig.value("vramctl_gpu_memory_used_bytes", **ids) == (400 + 12000) * MIB
    rt.states["llm"] = WorkloadState.EXITED  # exited; the driver has not given the memory back yet
    w._tick()  # the worker's next look sees it gone: it exited on its own, so it failed
    assert rig.state("llm") == "failed"
    assert rig.value("vramctl_gpu_memory_used_bytes", **ids) == (400 + 12000) * MIB
    assert rig.value("vramctl_model_gpu_memory_bytes", gpu="0", model="llm") == 12000 * MIB
    clock.t += 0.5
    assert rig.value("vramctl_gpu_memory_used_bytes", **ids) == 400 * MIB
    assert rig.value("vramctl_model_gpu_memory_bytes", gpu="0", model="llm") == 0
    assert rig.value("vramctl_nvml_up", gpu="0") == 0  # simulated is not NVML


def test_app_build_registers_the_collector_with_the_dcgm_flag(tmp_path: Path) -> None:
    standin = [sys.executable, "-m", "vramctl.demo.standin"]
    config = parse_config(
        {
            "runtime": "process",
            "gpuProbe": {"kind": "simulated", "totalMiB": 16303},
            "metrics": {"dcgmCompat": True},
            "gpus": [{"gpu": 0, "models": {"llm": {"command": standin, "vramMiB": 12000}, "sdxl": {"command": standin}}}],
        }
    )
    built = build(config, tmp_path / "state.json", instance="telemetry-test")
    try:
        reg = built.supervisor.metrics.registry
        assert reg.get_sample_value("vramctl_model_state", {"gpu": "0", "model": "llm", "state": "absent"}) == 1
        assert reg.get_sample_value("DCGM_FI_DEV_FB_USED", {"gpu": "0", "UUID": "SIM-GPU-0"} | _dcgm_rest(reg)) is not None
    finally:
        built.supervisor.runtime.close()


def _dcgm_rest(reg: CollectorRegistry) -> dict[str, str]:
    for family in reg.collect():
        if family.name == "DCGM_FI_DEV_FB_USED":
            s = family.samples[0]
            return {k: v for k, v in s.labels.items() if k in ("device", "modelName", "Hostname")}
    raise AssertionError("no DCGM_FI_DEV_FB_USED family")


def test_scrape_latency_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    """Printed, not asserted: 1 GPU, 3 models (llm + tts running), simulated probe."""
    rig = Rig()
    rt = FakeRuntime(states={"llm": RUN, "tts": RUN})
    d = spec(companions=["tts"], models={k: v for k, v in spec().model_dump(by_alias=True)["models"].items() if k != "big"})
    sim = SimulatedGpu(0, 16303, 400, 0.3, holders_from(rt, lambda: d))
    w = GpuWorker(d, rt, sim, settings(), metrics=rig.metrics)
    rig.workers.append(w)
    w.reconcile_once()
    w.request("sdxl")
    w.reconcile_once()  # one switch in the histogram
    for _ in range(50):  # warm up
        generate_latest(rig.registry)
    samples = []
    for _ in range(1000):
        t0 = time.perf_counter()
        body = generate_latest(rig.registry)
        samples.append(time.perf_counter() - t0)
    q = statistics.quantiles(samples, n=100)
    with capsys.disabled():
        print(
            f"\n[bench] generate_latest, 1 GPU / 3 models / simulated probe: "
            f"p50 {q[49] * 1e3:.3f} ms, p95 {q[94] * 1e3:.3f} ms, max {max(samples) * 1e3:.3f} ms, {len(body)} bytes"
        )


def test_release_detection_latency_is_exported_once_measured() -> None:
    rig = Rig()
    w, _ = rig.add(FakeRuntime(states={"llm": RUN}))
    assert rig.value("vramctl_release_detection_seconds", gpu="0") is None  # no switch has released memory yet
    w._rec.last_release_seconds = 0.42  # what the worker records when a stopped model's memory is confirmed free
    assert rig.value("vramctl_release_detection_seconds", gpu="0") == 0.42
