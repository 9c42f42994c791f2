#!/usr/bin/env python3
"""GPU proof: vramctl's switching protocol and NVML probe against real CUDA processes.

Run on a machine with an NVIDIA GPU, torch and nvidia-ml-py (no docker
needed). In one process it runs vramctl's own GpuWorker with the NvmlProbe
and the process runtime, which starts ``benchmarks/cuda_workload.py``
servers that each hold a different amount of VRAM, and switches between
them ``--switches`` times (default 12). It reports:

1. memory truth: for each holder, NVML's per-process and device-level used
   memory against the workload's own ``torch.cuda.memory_reserved()`` (the
   difference is the CUDA context);
2. release detection: from the old holder's exit (its ``EXIT_AT`` line) to
   vramctl confirming the memory free, median and p95, next to the worker's
   own figure (from the runtime seeing the exit) and to what a 5 ms NVML
   sampler saw;
3. scrape cost: p50/p95 of ``NvmlProbe.snapshot()`` and of
   ``generate_latest`` over vramctl's collector, against spawning
   ``nvidia-smi --query-gpu=memory.used --format=csv`` (what
   nvidia_gpu_exporter does per scrape), interleaved in the same run;
4. exclusivity: a background thread samples NVML's process list every ~5 ms
   for the whole run; no sample may show two workload processes at once.

Targets (printed PASS/FAIL): scrape p95 < 5 ms and >= 5x faster than the
nvidia-smi spawn; release detection median < 200 ms after the exit; zero
moments with two holders; every switch a success.

``--dry-run`` runs the same path on a machine without a GPU: the simulated
GPU instead of NVML, cuda_workload.py without torch. Only the CUDA parts are
then untested; the targets are printed but mean nothing.

Writes the results to ``$OUT/gpu_proof.json`` when OUT is set (or --out).
Needs vramctl importable: run from the repository root (operator/ is put on
sys.path), with pydantic, pyyaml and prometheus-client installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from vramctl.gpu.base import GpuProbe  # noqa: E402
from vramctl.gpu.simulated import SimulatedGpu  # noqa: E402
from vramctl.observed import Desired  # noqa: E402
from vramctl.runtimes.process import ProcessRuntime  # noqa: E402
from vramctl.spec.models import DeploymentSpec  # noqa: E402
from vramctl.worker.actor import GpuWorker, WorkerSettings  # noqa: E402
from vramctl.worker.supervisor import holders_from  # noqa: E402

WORKLOAD = ROOT / "benchmarks" / "cuda_workload.py"
TARGET_SCRAPE_P95_MS = 5.0
TARGET_SPEEDUP = 5.0
TARGET_RELEASE_MEDIAN_S = 0.2
FRACTIONS = (0.25, 0.15, 0.35)  # of the GPU's memory, for workloads a, b, c
CONTEXT_ALLOWANCE_MIB = 1024  # declared vramMiB = allocation + this (CUDA context, torch's libraries)
EXIT_RE = re.compile(r"EXIT_AT (\d+\.\d+)")
SMI = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv"]


def pctl(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def stats_ms(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"n": len(xs), "p50_ms": pctl(xs, 0.5) * 1e3, "p95_ms": pctl(xs, 0.95) * 1e3, "max_ms": max(xs) * 1e3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------ the sampler


@dataclass
class Sample:
    t: float  # time.time()
    used_mib: int
    holders: tuple[str, ...]  # "pid:<n>" (NVML) or model names (simulated GPU)


@dataclass
class Sampler:
    """Reads ``read()`` every ``period`` seconds on its own thread for the whole run."""

    read: Callable[[], tuple[int, tuple[str, ...]]]
    period: float = 0.005
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proof-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                used, holders = self.read()
                self.samples.append(Sample(time.time(), used, holders))
            except Exception:
                self.errors += 1
            nxt += self.period
            self._stop.wait(max(0.0, nxt - time.monotonic()))


def nvml_reader(gpu: int) -> tuple[Callable[[], tuple[int, tuple[str, ...]]], Callable[[], float]]:
    """A raw pynvml reader for the sampler (independent of the probe under
    test) and a raw memory query to time against the probe."""
    import pynvml

    pynvml.nvmlInit()  # NVML counts inits; the probe's session holds its own
    h = pynvml.nvmlDeviceGetHandleByIndex(gpu)

    def read() -> tuple[int, tuple[str, ...]]:
        m = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        return int(m.used) >> 20, tuple(f"pid:{p.pid}" for p in procs)

    def memory_query() -> float:
        t0 = time.perf_counter()
        pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        return time.perf_counter() - t0

    return read, memory_query


def exclusivity(samples: list[Sample], initial: set[str]) -> dict[str, Any]:
    """Moments with two or more workload processes holding GPU memory.
    Holders present before the run (``initial``) are not workloads."""
    worst, violations = 0, []
    intervals = [b.t - a.t for a, b in itertools.pairwise(samples)]
    for s in samples:
        mine = [h for h in s.holders if h not in initial]
        worst = max(worst, len(mine))
        if len(mine) > 1:
            violations.append({"t": s.t, "holders": mine, "used_mib": s.used_mib})
    return {
        "samples": len(samples),
        "period_ms_median": statistics.median(intervals) * 1e3 if intervals else None,
        "period_ms_p95": pctl(intervals, 0.95) * 1e3 if intervals else None,
        "max_simultaneous_workloads": worst,
        "moments_with_two_holders": len(violations),
        "first_violations": violations[:5],
    }


def sampler_release(samples: list[Sample], holder: str, after: float, baseline: int, margin: int) -> dict[str, float | None]:
    """When the sampler first saw ``holder`` gone, and the memory back, after ``after``."""
    gone = back = None
    for s in samples:
        if s.t < after:
            continue
        if gone is None and holder not in s.holders:
            gone = s.t
        if back is None and holder not in s.holders and s.used_mib <= baseline + margin:
            back = s.t
        if gone is not None and back is not None:
            break
    return {"gone": gone, "back": back}


# ------------------------------------------------------------------ the run


def deployment(sizes: dict[str, int], ports: dict[str, int], fake: bool) -> DeploymentSpec:
    models = {}
    for name, mib in sizes.items():
        env = {"VRAM_MIB": str(mib), "PORT": str(ports[name]), "PYTHONUNBUFFERED": "1"}
        if fake:
            env["CUDA_WORKLOAD_FAKE"] = "1"
        models[name] = {
            "class": "heavy",
            "command": [sys.executable, str(WORKLOAD)],
            "env": env,
            "health": {"path": "/health", "port": ports[name], "intervalSeconds": 0.05},
            "stop": {"signal": "SIGTERM", "gracePeriodSeconds": 20},
            "startTimeoutSeconds": 180,
            "vramMiB": mib + CONTEXT_ALLOWANCE_MIB,
        }
    return DeploymentSpec.model_validate({"name": "gpu-proof", "gpu": 0, "models": models})


def wait_settled(w: GpuWorker, generation: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = w.status()
        if st["observedGeneration"] >= generation and st["phase"] != "Switching":
            return st
        time.sleep(0.02)
    raise TimeoutError(f"generation {generation} not settled within {timeout:.0f}s: {w.status()['phase']} {w.status()['message']}")


def note_time(notes: list[dict[str, Any]], step: str) -> float | None:
    return next((float(n["time"]) for n in notes if n["step"] == step), None)


def last_exit_at(runtime: ProcessRuntime, d: DeploymentSpec, model: str) -> float | None:
    for line in reversed(runtime.logs_tail(d, model, 40)):
        m = EXIT_RE.search(line)
        if m:
            return float(m.group(1))
    return None


class ExitWatcher:
    """Times a process's real end (the OS's view, 0.5 ms polls of /proc): the
    main thread a zombie with no other thread left, or the pid gone. The
    workload's own ``EXIT_AT`` line comes before its CUDA context and Python
    interpreter are torn down (often 0.5-1 s for a 20 GB torch process), so
    release detection is timed from this instant instead."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exited_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _gone(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            return True
        return fields.get("State", "").strip().startswith("Z") and int(fields.get("Threads", "1").strip() or 1) <= 1

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._gone():
                self.exited_at = time.time()
                return
            time.sleep(0.0005)

    def close(self) -> float | None:
        self._stop.set()
        self._thread.join(2)
        return self.exited_at


def measure_scrapes(
    probe: GpuProbe, worker: GpuWorker, raw_query: Callable[[], float] | None, rounds: int, smi_cmd: list[str] | None
) -> dict[str, Any]:
    """Probe snapshots, collector scrapes and nvidia-smi spawns, interleaved."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from vramctl.telemetry import VramctlCollector

        registry: Any = CollectorRegistry()
        registry.register(VramctlCollector(lambda: [worker]))
    except Exception as err:  # no collector in this tree (yet), or another signature
        print(f"  (no vramctl collector to scrape: {err})", flush=True)
        registry = None
    smi = smi_cmd
    snaps: list[float] = []
    raws: list[float] = []
    scrapes: list[float] = []
    spawns: list[float] = []
    for _ in range(20):  # warm up
        probe.snapshot()
    for _ in range(rounds):
        if smi:
            t0 = time.perf_counter()
            subprocess.run(smi, capture_output=True, check=True)
            spawns.append(time.perf_counter() - t0)
        for _ in range(10):
            t0 = time.perf_counter()
            probe.snapshot()
            snaps.append(time.perf_counter() - t0)
            if raw_query is not None:
                raws.append(raw_query())
        if registry is not None:
            for _ in range(2):
                t0 = time.perf_counter()
                generate_latest(registry)
                scrapes.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "probe_snapshot": stats_ms(snaps),
        "raw_nvml_memory_query": stats_ms(raws),
        "collector_generate_latest": stats_ms(scrapes),
        "nvidia_smi_spawn": stats_ms(spawns) if smi else "nvidia-smi not found",
        "nvidia_smi_command": smi,
    }
    if spawns and snaps:
        out["speedup_p50_snapshot_vs_smi"] = pctl(spawns, 0.5) / pctl(snaps, 0.5)
        out["speedup_p95_snapshot_vs_smi"] = pctl(spawns, 0.95) / pctl(snaps, 0.95)
        if scrapes:
            out["speedup_p50_scrape_vs_smi"] = pctl(spawns, 0.5) / pctl(scrapes, 0.5)
            out["speedup_p95_scrape_vs_smi"] = pctl(spawns, 0.95) / pctl(scrapes, 0.95)
    if raws and snaps:
        out["probe_overhead_over_raw_memory_query_us_p50"] = (pctl(snaps, 0.5) - pctl(raws, 0.5)) * 1e6
    return out


def environment(dry: bool, probe: GpuProbe) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = probe.info()
    return {
        "dry_run": dry,
        "device": info.name,
        "uuid": info.uuid,
        "driver": info.driver,
        "total_mib": info.total_mib,
        "torch": version("torch"),
        "nvidia_ml_py": version("nvidia-ml-py"),
        "pydantic": version("pydantic"),
        "prometheus_client": version("prometheus-client") or version("prometheus_client"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "memory_info_version": getattr(probe, "memory_info_version", None),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    fake = args.dry_run
    state_dir = Path(tempfile.mkdtemp(prefix="vramctl-gpu-proof-"))
    runtime = ProcessRuntime(state_dir, instance="gpuproof")
    ref: dict[str, DeploymentSpec] = {}

    raw_query: Callable[[], float] | None = None
    probe: GpuProbe
    if fake:
        total = 81559
        sim = SimulatedGpu(args.gpu, total, 0, args.sim_release_s, holders_from(runtime, lambda: ref["d"]))
        probe = sim

        def read() -> tuple[int, tuple[str, ...]]:
            s = sim.snapshot()
            return s.memory.used_mib, tuple(p.model or f"pid:{p.pid}" for p in s.processes or ())

    else:
        from vramctl.gpu.nvml import NvmlProbe

        probe = NvmlProbe(args.gpu, lambda: runtime.owners(ref["d"]))
        total = probe.info().total_mib
        read, raw_query = nvml_reader(args.gpu)

    sizes = {name: max(1024, int(total * f)) for name, f in zip("abc", FRACTIONS, strict=True)}
    if args.sizes:
        sizes = {name: int(x) for name, x in zip("abc", args.sizes.split(","), strict=True)}
    ports = {name: free_port() for name in sizes}
    d = deployment(sizes, ports, fake)
    ref["d"] = d
    env = environment(fake, probe)
    print(
        f"device: {env['device']} ({env['uuid']}), driver {env['driver']}, {total} MiB; torch {env['torch']}; "
        f"nvidia-ml-py {env['nvidia_ml_py']}; python {env['python']}" + ("  [DRY RUN: simulated GPU, no CUDA]" if fake else ""),
        flush=True,
    )
    print(f"workloads: {', '.join(f'{n}={s} MiB' for n, s in sizes.items())}", flush=True)
    result: dict[str, Any] = {"environment": env, "workloads_mib": sizes, "doctor": run_doctor()}

    settings = WorkerSettings(poll_interval_s=0.05, memory_timeout_s=60, resync_s=5, backoff_initial_s=1, backoff_max_s=5)
    worker = GpuWorker(d, runtime, probe, settings, initial=Desired(None, (), 0))
    sampler = Sampler(read)
    initial_holders = set(read()[1])
    sampler.start()
    worker.start()
    switches: list[dict[str, Any]] = []
    holders: list[dict[str, Any]] = []
    try:
        wait_settled(worker, 0, 30)
        baseline = worker.baseline_mib
        result["baseline_mib"] = baseline
        order = [["a", "b", "c"][i % 3] for i in range(args.switches + 1)]
        current: str | None = None
        for target in order:
            seq0 = int(worker.status()["progressSeq"])
            before_release = worker.last_release_seconds
            watcher = None
            if current is not None:
                holder = runtime.observe(d).get(current)
                if holder is not None and holder.ref.isdigit():
                    watcher = ExitWatcher(int(holder.ref))
            t_req = time.time()
            desired = worker.request(target, ())
            st = wait_settled(worker, desired.generation, 240)
            notes = worker.progress(seq0)
            last = st.get("lastSwitch") or {}
            rec: dict[str, Any] = {
                "from": current,
                "to": target,
                "outcome": last.get("outcome") if last.get("generation") == desired.generation else st["phase"],
                "phase": st["phase"],
                "duration_s": last.get("durationSeconds"),
                "requested_at": t_req,
            }
            if st["phase"] != "Ready":
                rec["message"] = st["message"]
                switches.append(rec)
                print(f"  {current} -> {target}: {st['phase']}: {st['message']}", flush=True)
                break
            t_free = note_time(notes, "memory-free")
            if current is not None:
                exit_at = last_exit_at(runtime, d, current)
                rec["worker_release_s"] = worker.last_release_seconds if worker.last_release_seconds != before_release else None
                os_exit = watcher.close() if watcher is not None else None
                rec["exit_to_confirmed_free_s"] = (t_free - os_exit) if (t_free is not None and os_exit is not None) else None
                rec["exit_line_to_process_gone_s"] = (os_exit - exit_at) if (os_exit is not None and exit_at is not None) else None
            t_stop, t_wait = note_time(notes, "stopping"), note_time(notes, "waiting-memory")
            if current is not None and exit_at is not None and t_stop is not None:
                # The old holder as the sampler knew it just before the stop (its NVML
                # pid, which is a host pid: it need not match ours in a container).
                keys = holders_before(sampler.samples, t_stop, initial_holders)
                if len(keys) == 1:
                    seen = sampler_release(sampler.samples, keys[0], exit_at, baseline or 0, settings.margin_mib)
                    rec["sampler_gone_after_exit_s"] = None if seen["gone"] is None else seen["gone"] - exit_at
                    rec["sampler_memory_back_after_exit_s"] = None if seen["back"] is None else seen["back"] - exit_at
            t_started, t_healthy = note_time(notes, "starting"), note_time(notes, "healthy")
            if t_stop is not None and t_wait is not None:
                rec["stop_s"] = t_wait - t_stop
            if t_wait is not None and t_free is not None:
                rec["memory_wait_s"] = t_free - t_wait
            if t_started is not None and t_healthy is not None:
                rec["start_to_healthy_s"] = t_healthy - t_started
            switches.append(rec)
            holders.append(holder_truth(runtime, probe, d, target, ports[target], baseline, initial_holders))
            print(
                f"  {current or '(none)'} -> {target}: {rec['outcome']} in {rec['duration_s']}s"
                + (
                    f"; exit->free {rec['exit_to_confirmed_free_s'] * 1e3:.0f} ms (worker {rec['worker_release_s'] * 1e3:.0f} ms)"
                    if rec.get("exit_to_confirmed_free_s") is not None and rec.get("worker_release_s") is not None
                    else ""
                ),
                flush=True,
            )
            current = target
        smi: list[str] | None = SMI if shutil.which(SMI[0]) else None
        if smi is None and fake:  # exercise the path: a Python process spawned per "scrape"
            smi = [sys.executable, "-S", "-c", "print('memory.used [MiB]')"]
        result["scrape"] = measure_scrapes(probe, worker, raw_query, args.scrape_rounds, smi)
        seq0 = int(worker.status()["progressSeq"])
        wait_settled(worker, worker.request(None, ()).generation, 120)
    finally:
        worker.stop()
        for name in sizes:
            with contextlib.suppress(Exception):
                runtime.remove(d, name)
        runtime.close()
        time.sleep(0.2)
        sampler.stop()
    result["switches"] = switches
    result["holders"] = holders
    result["exclusivity"] = exclusivity(sampler.samples, initial_holders)
    result["exclusivity"]["sampler_errors"] = sampler.errors
    result["exclusivity"]["worker_violation_notes"] = sum(1 for p in worker.progress() if p["step"] == "violation")
    result["run_seconds"] = time.monotonic() - t_start
    result["verdicts"] = verdicts(result)
    return result


def run_doctor() -> list[str]:
    """``vramctl doctor`` on this machine with the demo config (its NVML lines are the point)."""
    try:
        from vramctl import doctor
        from vramctl.demo.config import demo_config

        lines = [c.render() for c in doctor.checks(doctor.gather(demo_config(), "embedded demo config"))]
    except Exception as err:
        lines = [f"FAIL doctor: {type(err).__name__}: {err}"]
    print("vramctl doctor:\n  " + "\n  ".join(lines), flush=True)
    return lines


def holders_before(samples: list[Sample], t: float, initial: set[str]) -> list[str]:
    """The workload holders of the last sample taken before ``t``."""
    for s in reversed(samples):
        if s.t < t:
            return [h for h in s.holders if h not in initial]
    return []


def holder_truth(
    runtime: ProcessRuntime, probe: GpuProbe, d: DeploymentSpec, model: str, port: int, baseline: int | None, initial: set[str]
) -> dict[str, Any]:
    """NVML's view of a holder against the workload's own torch figures."""
    w = runtime.observe(d).get(model)
    pid = int(w.ref) if w is not None else None
    vram = get_json(f"http://127.0.0.1:{port}/vram")
    snap = probe.snapshot()
    procs = snap.processes or ()
    by_pid = [p for p in procs if p.pid == pid or (p.pid == 0 and p.model == model)]  # pid 0: the simulated GPU
    # In a container NVML's pids are the host's: then the one process that is
    # not from before the run is the holder.
    others = [p for p in procs if f"pid:{p.pid}" not in initial and (p.model or f"pid:{p.pid}") not in initial]
    mine = by_pid or (others if len(others) == 1 else [])
    attributed = [p for p in procs if p.model == model]
    proc_mib = sum(p.used_mib or 0 for p in mine) if mine and all(p.used_mib is not None for p in mine) else None
    reserved_mib = vram["reserved_bytes"] / (1 << 20)
    return {
        "model": model,
        "pid": pid,
        "nvml_pid": mine[0].pid if mine else None,
        "nvml_pid_is_ours": bool(by_pid),  # False: NVML sees host pids (another pid namespace)
        "attributed_to_model_by_probe": bool(attributed),
        "attributed_container": attributed[0].container if attributed else None,
        "torch_reserved_mib": round(reserved_mib, 1),
        "nvml_process_used_mib": proc_mib,
        "cuda_context_mib": None if proc_mib is None else round(proc_mib - reserved_mib, 1),
        "nvml_device_used_mib": snap.memory.used_mib,
        "nvml_device_used_over_baseline_mib": None if baseline is None else snap.memory.used_mib - baseline,
        "nvml_reserved_mib": snap.memory.reserved_mib,
    }


def verdicts(r: dict[str, Any]) -> dict[str, Any]:
    sw = [s for s in r["switches"] if s["from"] is not None]
    exit_free = [s["exit_to_confirmed_free_s"] for s in sw if s.get("exit_to_confirmed_free_s") is not None]
    worker_rel = [s["worker_release_s"] for s in sw if s.get("worker_release_s") is not None]
    scrape = r.get("scrape", {})
    snap = scrape.get("probe_snapshot") or {}
    gen = scrape.get("collector_generate_latest") or {}
    out: dict[str, Any] = {
        "switches_ok": {
            "value": f"{sum(1 for s in sw if s['outcome'] == 'success')}/{len(sw)}",
            "pass": len(sw) >= 10 and all(s["outcome"] == "success" for s in sw),
        },
        "no_two_holders": {
            "value": r["exclusivity"]["moments_with_two_holders"],
            "pass": r["exclusivity"]["moments_with_two_holders"] == 0 and r["exclusivity"]["samples"] > 0,
        },
        "release_exit_to_free_median_ms": {
            "value": statistics.median(exit_free) * 1e3 if exit_free else None,
            "p95_ms": pctl(exit_free, 0.95) * 1e3 if exit_free else None,
            "worker_median_ms": statistics.median(worker_rel) * 1e3 if worker_rel else None,
            "worker_p95_ms": pctl(worker_rel, 0.95) * 1e3 if worker_rel else None,
            "target_ms": TARGET_RELEASE_MEDIAN_S * 1e3,
            "pass": bool(exit_free) and statistics.median(exit_free) < TARGET_RELEASE_MEDIAN_S,
        },
        "scrape_p95_ms": {
            "value": snap.get("p95_ms"),
            "collector_p95_ms": gen.get("p95_ms"),
            "target_ms": TARGET_SCRAPE_P95_MS,
            "pass": snap.get("p95_ms") is not None
            and snap["p95_ms"] < TARGET_SCRAPE_P95_MS
            and (gen.get("p95_ms") is None or gen["p95_ms"] < TARGET_SCRAPE_P95_MS),
        },
    }
    speed = scrape.get("speedup_p50_scrape_vs_smi", scrape.get("speedup_p50_snapshot_vs_smi"))
    out["faster_than_nvidia_smi"] = {
        "value": speed,
        "snapshot_speedup_p50": scrape.get("speedup_p50_snapshot_vs_smi"),
        "target": TARGET_SPEEDUP,
        "pass": speed is not None and speed >= TARGET_SPEEDUP,
    }
    return out


def report(r: dict[str, Any]) -> None:
    print("\nmemory truth (per holder):")
    for h in r["holders"]:
        print(
            f"  {h['model']} pid {h['pid']}: torch reserved {h['torch_reserved_mib']} MiB, NVML process {h['nvml_process_used_mib']} MiB "
            f"(CUDA context {h['cuda_context_mib']} MiB), device used {h['nvml_device_used_mib']} MiB "
            f"(+{h['nvml_device_used_over_baseline_mib']} over baseline), attributed={h['attributed_to_model_by_probe']}"
        )
    s = r.get("scrape", {})
    print("\nscrape cost:")
    for k in ("probe_snapshot", "raw_nvml_memory_query", "collector_generate_latest", "nvidia_smi_spawn"):
        v = s.get(k)
        if isinstance(v, dict):
            print(f"  {k:<26} p50 {v['p50_ms']:8.3f} ms  p95 {v['p95_ms']:8.3f} ms  (n={v['n']})")
        else:
            print(f"  {k:<26} {v}")
    ex = r["exclusivity"]
    print(
        f"\nexclusivity: {ex['samples']} samples (period median {ex['period_ms_median'] or 0:.1f} ms), "
        f"max simultaneous workloads {ex['max_simultaneous_workloads']}, moments with two holders {ex['moments_with_two_holders']}"
    )
    print("\nverdicts:")
    for name, v in r["verdicts"].items():
        extra = {k: (round(x, 3) if isinstance(x, float) else x) for k, x in v.items() if k not in ("pass", "value")}
        value = round(v["value"], 3) if isinstance(v["value"], float) else v["value"]
        print(f"  {'PASS' if v['pass'] else 'FAIL'}  {name}: {value}  {extra}")
    print(f"\nrun took {r['run_seconds']:.1f}s" + ("  [DRY RUN: the targets mean nothing here]" if r["environment"]["dry_run"] else ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dry-run", action="store_true", help="simulated GPU and no torch: test the proof itself without a GPU")
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--switches", type=int, default=12)
    p.add_argument("--sizes", help="MiB of workloads a,b,c (default: 25%%, 15%%, 35%% of the GPU)")
    p.add_argument("--scrape-rounds", type=int, default=30, help="rounds of 1 nvidia-smi spawn + 10 snapshots + 2 scrapes")
    p.add_argument("--sim-release-s", type=float, default=0.1, help="dry run: the simulated GPU's release delay")
    p.add_argument("--out", help="JSON results file (default: $OUT/gpu_proof.json when OUT is set)")
    args = p.parse_args()
    result = run(args)
    report(result)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_proof.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(result, indent=2, default=str))
        print(f"results: {out}")
    return 0 if all(v["pass"] for v in result["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
