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

``--gpus 0,1`` is the two-GPU proof, through one ``vramctl up`` (process
runtime, NVML probe): on each GPU two CUDA workloads (27% and 45% of its
memory: 21.5 and 35.8 GiB on an 80 GB H100), and one model on both GPUs
(``gpus: [0, 1]``, 36% of each: ``benchmarks/tp_launcher.py`` runs one
cuda_workload.py per GPU, each picking its device by rank, as
tensor-parallel vLLM does). Phase A: GPU 0's entry alone, ``--switches``
(default 10) switches between its two workloads, the one-GPU baseline.
Phase B: both entries; each round asks both GPUs at once (10 switches per
GPU), and ``--tp-rounds`` (2) rounds ask GPU 0 for the two-GPU model while
GPU 1 is freed, the next round both back to their own models. A 5 ms
sampler reads each GPU's NVML process list (each process's model from its
VRAMCTL_MODEL) and used memory for the whole run, a 10 ms one every model
process and the GPUs it sees (CUDA_VISIBLE_DEVICES). Verdicts: every switch a
success; never two heavy models (above a 1 GiB residue; the two-GPU model on
both) on one GPU at one sample; the two-GPU model seen on both GPUs; each
GPU's per-GPU switch median in phase B at most 1.5x phase A's. The JSON is
written after each phase; ``--budget-s`` (330) stops issuing switches so the
run ends within about 6 minutes. With ``--dry-run``: two simulated GPUs, the
workloads and the launcher without torch, and the first sampler reads the
holders of ``/status`` instead of NVML.

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
import signal
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from free_ports import free_port  # noqa: E402
from vramctl.gpu.base import GpuProbe  # noqa: E402
from vramctl.gpu.simulated import SimulatedGpu  # noqa: E402
from vramctl.observed import Desired  # noqa: E402
from vramctl.runtimes.process import ProcessRuntime  # noqa: E402
from vramctl.spec.models import DeploymentSpec  # noqa: E402
from vramctl.worker.actor import GpuWorker, WorkerSettings  # noqa: E402
from vramctl.worker.supervisor import holders_from  # noqa: E402
from warm_proof import stop_group  # noqa: E402

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


# ------------------------------------------------------------------ two GPUs (--gpus 0,1)
#
# One `vramctl up` (process runtime, NVML probe) with an entry per GPU: two
# per-GPU CUDA workloads on each, and one model on both GPUs (declared in the
# first GPU's entry, ``gpus: [g0, g1]``) whose launcher runs one process per
# GPU, the way tensor-parallel vLLM runs its workers. Phase A: the first
# GPU's entry alone, the same per-GPU switches, for the baseline. Phase B:
# both GPUs, switches issued on both at once, the two-GPU model in between.

LAUNCHER = ROOT / "benchmarks" / "tp_launcher.py"
TWO_GPU_FRACTIONS = {"a": 0.27, "b": 0.45}  # of each GPU's memory: 21.5 and 35.8 GiB on an 80 GB H100
TP_FRACTION = 0.36  # the two-GPU model, on each of its GPUs: 28.7 GiB on an 80 GB H100
DRY_TOTAL_MIB = 16384  # the dry run's simulated GPUs (the fake workloads hold nothing)
RESIDUE_MIB = 1024  # a process holding this or less on a GPU is a residue (a stray CUDA context), not a heavy model
TARGET_SLOWDOWN = 1.5  # phase B's per-GPU switch median at most this times phase A's
TP = "tp"
HOLDING = frozenset({"running", "starting", "stopping", "sleeping", "waking"})


def http_json(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            code, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        code, raw = err.code, err.read()
    try:
        return code, json.loads(raw)
    except ValueError:
        return code, raw.decode(errors="replace")


@dataclass(frozen=True)
class TwoGpuPlan:
    gpus: tuple[int, int]
    sizes: dict[str, int]  # model -> MiB it allocates (on each of its GPUs)
    ports: dict[str, int]
    fake: bool
    sim_release_s: float

    def gpus_of(self, model: str) -> tuple[int, ...]:
        return self.gpus if model == TP else (int(model[1:]),)

    def per_gpu(self, g: int) -> tuple[str, str]:
        return (f"a{g}", f"b{g}")


def two_gpu_model(plan: TwoGpuPlan, model: str) -> dict[str, Any]:
    mib, port = plan.sizes[model], plan.ports[model]
    env = {"VRAM_MIB": str(mib), "PORT": str(port), "PYTHONUNBUFFERED": "1"} | ({"CUDA_WORKLOAD_FAKE": "1"} if plan.fake else {})
    spec: dict[str, Any] = {
        "class": "heavy",
        "command": [sys.executable, str(LAUNCHER if model == TP else WORKLOAD)],
        "env": env,
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
        "stop": {"signal": "SIGTERM", "gracePeriodSeconds": 20},
        "startTimeoutSeconds": 180,
        "vramMiB": mib + CONTEXT_ALLOWANCE_MIB,  # on each of its GPUs
    }
    if model == TP:
        spec["gpus"] = list(plan.gpus)
    return spec


def two_gpu_config(plan: TwoGpuPlan, both: bool) -> dict[str, Any]:
    """The ``vramctl up`` config: phase A the first GPU's entry alone (no
    two-GPU model), phase B both entries and the model on both GPUs."""
    g0, g1 = plan.gpus
    first = {m: two_gpu_model(plan, m) for m in plan.per_gpu(g0)}
    entries = [{"name": f"proof-gpu{g0}", "gpu": g0, "models": first}]
    if both:
        first[TP] = two_gpu_model(plan, TP)
        entries.append({"name": f"proof-gpu{g1}", "gpu": g1, "models": {m: two_gpu_model(plan, m) for m in plan.per_gpu(g1)}})
    probe: dict[str, Any] = (
        {"kind": "simulated", "totalMiB": DRY_TOTAL_MIB, "releaseDelaySeconds": plan.sim_release_s} if plan.fake else {"kind": "nvml"}
    )
    probe |= {"pollIntervalSeconds": 0.01, "memoryTimeoutSeconds": 60}
    return {"runtime": "process", "gpuProbe": probe, "backoffInitialSeconds": 1, "gpus": entries}


class Up:
    """``vramctl up`` in a subprocess (its own session), driven over its HTTP API."""

    def __init__(self, cfg: dict[str, Any], workdir: Path, instance: str) -> None:
        self.instance = instance
        self.dir = workdir / instance
        self.dir.mkdir(parents=True)
        (self.dir / "vramctl.yaml").write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        self.log_path = self.dir / "vramctl.log"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "operator") + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "vramctl", "up", "--config", str(self.dir / "vramctl.yaml"), "--state", str(self.dir / "state.json")]
        cmd += ["--listen", f"127.0.0.1:{self.port}", "--instance", instance]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy(60)
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vramctl up exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if http_json("GET", self.base + "/healthz", timeout=1)[0] == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"vramctl up did not answer /healthz within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def gpus(self) -> dict[str, Any]:
        return http_json("GET", self.base + "/status", timeout=5)[1]["gpus"]  # type: ignore[no-any-return]

    def round(self, targets: dict[int, str | None], timeout: float, flip: bool) -> dict[int, dict[str, Any]]:
        """Ask every GPU of ``targets`` for its model at once; return, per GPU,
        when it settled (the client's seconds from its request) and how."""
        out: dict[int, dict[str, Any]] = {}
        pending: dict[int, tuple[int, float]] = {}
        for g in sorted(targets, reverse=flip):
            t0 = time.perf_counter()
            code, reply = http_json("POST", self.base + "/switch", {"gpu": g, "model": targets[g]})
            if code != 202:
                out[g] = {"ok": False, "error": f"HTTP {code}: {reply!r}"}
            else:
                pending[g] = (int(reply["generation"]), t0)
        waits: dict[int, list[str]] = {g: [] for g in pending}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            try:
                gpus = self.gpus()
            except (OSError, ValueError, KeyError):
                time.sleep(0.01)
                continue
            now = time.perf_counter()
            for g, (gen, t0) in list(pending.items()):
                st = gpus[str(g)]
                if st["observedGeneration"] >= gen and st["phase"] != "Switching":
                    last = st.get("lastSwitch") or {}
                    want = targets[g]
                    ok = st["phase"] in ("Ready", "Idle") and (want is None or want in (st.get("runningModels") or []))
                    out[g] = {
                        "ok": ok,
                        "seconds": now - t0,
                        "vramctl_seconds": last.get("durationSeconds") if last.get("generation") == gen else None,
                        "phase": st["phase"],
                        "running": st.get("runningModels"),
                        "waited_for": waits[g],
                    } | ({} if ok else {"message": st.get("message")})
                    del pending[g]
                elif st["phase"] == "Switching" and st.get("message") and st["message"] not in waits[g] and len(waits[g]) < 4:
                    waits[g].append(st["message"])
            time.sleep(0.01)
        for g in pending:
            out[g] = {"ok": False, "error": f"not settled within {timeout:.0f}s", "waited_for": waits[g]}
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.round(dict.fromkeys((int(g) for g in self.gpus()), None), 120, False)
        stop_group(self.proc, 30)
        self.kill_models()

    def kill_models(self) -> None:
        """SIGKILL the process group of every model record still alive (its pid with the recorded start)."""
        for path in (self.dir / "proc").glob(f"{self.instance}-*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                rec = json.loads(path.read_text())
                if rec["pid"] > 1 and rec["pgid"] > 1 and start_ticks(rec["pid"]) == rec["start_ticks"]:
                    os.killpg(rec["pgid"], signal.SIGKILL)


def start_ticks(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(raw[raw.rfind(b")") + 2 :].split()[19])


def proc_env(pid: int | str) -> dict[bytes, bytes]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(e.split(b"=", 1) for e in raw.split(b"\0") if b"=" in e)


GpuHolders = dict[int, dict[str, int | None]]  # GPU -> holder (model, or pid:N) -> MiB it holds (None: not known)


def nvml_holders(gpus: tuple[int, ...], instances: set[str]) -> Callable[[], tuple[GpuHolders, dict[int, int]]]:
    """A raw pynvml reader of every GPU's compute processes (by model, read
    from the process's VRAMCTL_MODEL when it is one of ours; else pid:N) and
    used memory."""
    import pynvml

    pynvml.nvmlInit()
    handles = {g: pynvml.nvmlDeviceGetHandleByIndex(g) for g in gpus}
    names: dict[int, str] = {}

    def label(pid: int) -> str:
        if pid not in names:
            try:
                env = proc_env(pid)
            except OSError:
                return f"pid:{pid}"  # another pid namespace (NVML's pids are the host's), or gone
            if env.get(b"VRAMCTL_INSTANCE", b"").decode() not in instances:
                return f"pid:{pid}"
            names[pid] = env.get(b"VRAMCTL_MODEL", b"?").decode()
        return names[pid]

    def read() -> tuple[GpuHolders, dict[int, int]]:
        holders: GpuHolders = {}
        used: dict[int, int] = {}
        for g, h in handles.items():
            used[g] = int(pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2).used) >> 20
            per: dict[str, int | None] = {}
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                name, mib = label(int(p.pid)), (None if p.usedGpuMemory is None else int(p.usedGpuMemory) >> 20)
                per[name] = None if mib is None or (name in per and per[name] is None) else (per.get(name) or 0) + mib
            holders[g] = per
        return holders, used

    return read


def status_holders(up: Callable[[], Up | None], plan: TwoGpuPlan) -> Callable[[], tuple[GpuHolders, dict[int, int]]]:
    """The dry run: on each GPU, the heavy models its simulated GPU counts as
    holders (a model holding, starting, stopping, asleep or waking by its
    worker's last look; the two-GPU model on each of its GPUs), from /status."""

    def read() -> tuple[GpuHolders, dict[int, int]]:
        holders: GpuHolders = {g: {} for g in plan.gpus}
        u = up()
        if u is not None:
            for st in u.gpus().values():
                for m, state in (st.get("modelStates") or {}).items():
                    if state in HOLDING and m in plan.sizes:
                        for g in plan.gpus_of(m):
                            holders[g][m] = None
        return holders, {}

    return read


def proc_holders(gpus: tuple[int, ...], instances: set[str]) -> Callable[[], tuple[GpuHolders, dict[int, int]]]:
    """Every live process of our vramctl instances, on each GPU its CUDA_VISIBLE_DEVICES names."""

    def read() -> tuple[GpuHolders, dict[int, int]]:
        holders: GpuHolders = {g: {} for g in gpus}
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                env = proc_env(p.name)
                state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if env.get(b"VRAMCTL_INSTANCE", b"").decode() in instances and state not in ("Z", "X"):
                for d in env.get(b"CUDA_VISIBLE_DEVICES", b"").decode().split(","):
                    if d.strip().isdigit():
                        holders.setdefault(int(d), {})[env.get(b"VRAMCTL_MODEL", b"?").decode()] = None
        return holders, {}

    return read


@dataclass
class GpuSampler:
    """Reads every GPU's holders every ``period`` seconds on its own thread;
    counts, per phase and GPU, the moments with two heavy models (a holder
    above ``RESIDUE_MIB``, or of unknown size, not there before the run)."""

    name: str
    read: Callable[[], tuple[GpuHolders, dict[int, int]]]
    gpus: tuple[int, ...]
    period: float
    initial: set[str] = field(default_factory=set)
    phase: str = "setup"
    errors: int = 0
    last_error: str | None = None

    def __post_init__(self) -> None:
        self.stats: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"proof-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _phase(self) -> dict[str, Any]:
        if self.phase not in self.stats:
            self.stats[self.phase] = {
                "samples": 0,
                "times": [],
                "gpus": {
                    g: {"max_heavy": 0, "overlaps": 0, "two_gpu_model_seen": 0, "unidentified_holders_seen": 0, "max_used_mib": None}
                    for g in self.gpus
                },
                "first_overlaps": [],
            }
        return self.stats[self.phase]

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                holders, used = self.read()
            except Exception as err:
                self.errors += 1
                self.last_error = f"{type(err).__name__}: {err}"
            else:
                t, ph = time.time(), self._phase()
                ph["samples"] += 1
                ph["times"].append(t)
                for g in self.gpus:
                    per = holders.get(g, {})
                    heavy = sorted(m for m, mib in per.items() if m not in self.initial and (mib is None or mib > RESIDUE_MIB))
                    s = ph["gpus"][g]
                    s["max_heavy"] = max(s["max_heavy"], len(heavy))
                    s["two_gpu_model_seen"] += TP in heavy
                    if g in used:
                        s["max_used_mib"] = max(s["max_used_mib"] or 0, used[g])
                    if len(heavy) > 1:
                        s["overlaps"] += 1
                        if len(ph["first_overlaps"]) < 10:
                            ph["first_overlaps"].append({"t": t, "gpu": g, "holders": per})
                    s["unidentified_holders_seen"] += sum(1 for m in heavy if m.startswith("pid:"))
            now = time.monotonic()
            nxt += self.period
            if nxt < now:  # a slow read: no burst of catch-up reads, the next one a period from now
                nxt = now + self.period
            self._stop.wait(max(0.0, nxt - now))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"period_target_ms": self.period * 1e3, "errors": self.errors, "last_error": self.last_error, "phases": {}}
        for phase, ph in self.stats.items():
            gaps = [b - a for a, b in itertools.pairwise(ph["times"])]
            out["phases"][phase] = {
                "samples": ph["samples"],
                "period_ms_median": statistics.median(gaps) * 1e3 if gaps else None,
                "period_ms_p95": pctl(gaps, 0.95) * 1e3 if gaps else None,
                "gpus": {str(g): s for g, s in ph["gpus"].items()},
                "first_overlaps": ph["first_overlaps"],
            }
        out["moments_with_two_heavy_on_one_gpu"] = sum(s["overlaps"] for ph in self.stats.values() for s in ph["gpus"].values())
        return out


def plan_rounds(plan: TwoGpuPlan, switches: int, tp_rounds: int) -> list[dict[int, str | None]]:
    """Phase B's rounds: each asks both GPUs at once. Round 0 starts a model on
    each GPU; then ``switches`` rounds alternate each GPU's two models, with
    ``tp_rounds`` rounds spread among them in which the first GPU asks for the
    two-GPU model while the second GPU is freed for it (the next round
    switches both GPUs back to their own models)."""
    g0, g1 = plan.gpus
    after = {round(switches * (j + 1) / (tp_rounds + 1)) for j in range(tp_rounds)} - {0, switches}
    rounds: list[dict[int, str | None]] = []
    for i in range(switches + 1):
        rounds.append({g: plan.per_gpu(g)[i % 2] for g in (g0, g1)})
        if i in after:
            rounds.append({g0: TP, g1: None})
    return rounds


def kind_of(gpu: int, plan: TwoGpuPlan, frm: str | None, to: str | None, first: bool) -> str:
    if first:
        return "start"
    if to == TP:
        return "to-two-gpu-model"
    if frm == TP:
        return "from-two-gpu-model"
    if to is None:
        return "free-for-two-gpu-model"
    if frm is None:
        return "after-two-gpu-model"  # the second GPU: its model waits for the two-GPU model to leave
    return "per-gpu"


def switch_stats(recs: list[dict[str, Any]], key: str = "seconds") -> dict[str, Any] | None:
    xs = [r[key] for r in recs if r.get("ok") and r.get(key) is not None]
    if not xs:
        return None
    return {"n": len(xs), "median_s": statistics.median(xs), "p95_s": pctl(xs, 0.95), "max_s": max(xs)}


def gpu_environment(plan: TwoGpuPlan) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    devices: dict[str, Any] = {}
    for g in plan.gpus:
        if plan.fake:
            devices[str(g)] = {"device": "simulated", "uuid": None, "driver": None, "total_mib": DRY_TOTAL_MIB}
        else:
            from vramctl.gpu.nvml import NvmlProbe

            info = NvmlProbe(g).info()
            devices[str(g)] = {"device": info.name, "uuid": info.uuid, "driver": info.driver, "total_mib": info.total_mib}
    return {
        "dry_run": plan.fake,
        "gpus": devices,
        "torch": version("torch"),
        "nvidia_ml_py": version("nvidia-ml-py"),
        "pydantic": version("pydantic"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def run_two_gpus(args: argparse.Namespace, write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    t_start = time.monotonic()
    gpus = tuple(int(g) for g in args.gpus.split(","))
    if len(gpus) != 2 or gpus[0] == gpus[1]:
        raise SystemExit(f"--gpus takes two different GPU indices, e.g. 0,1 (got {args.gpus!r})")
    g0, g1 = gpus
    switches = args.switches if args.switches is not None else 10
    fake = args.dry_run
    models = [f"a{g0}", f"b{g0}", f"a{g1}", f"b{g1}", TP]
    stub = TwoGpuPlan((g0, g1), {}, {}, fake, args.sim_release_s)
    env = gpu_environment(stub)
    totals = {g: int(env["gpus"][str(g)]["total_mib"]) for g in gpus}
    sizes = {m: max(1024, int(totals[int(m[1:])] * TWO_GPU_FRACTIONS[m[0]])) for m in models if m != TP}
    sizes[TP] = max(1024, int(min(totals.values()) * TP_FRACTION))
    if args.sizes:
        a, b, tp = (int(x) for x in args.sizes.split(","))
        sizes = {f"a{g0}": a, f"b{g0}": b, f"a{g1}": a, f"b{g1}": b, TP: tp}
    plan = TwoGpuPlan((g0, g1), sizes, {m: free_port() for m in models}, fake, args.sim_release_s)
    rounds = plan_rounds(plan, switches, args.tp_rounds)
    print(
        "gpus: "
        + "; ".join(f"{g}: {d['device']} ({d['uuid']}), {d['total_mib']} MiB" for g, d in env["gpus"].items())
        + f"; torch {env['torch']}; python {env['python']}"
        + ("  [DRY RUN: simulated GPUs, no CUDA]" if fake else ""),
        flush=True,
    )
    print(f"workloads (MiB on each of its GPUs): {', '.join(f'{m}={s}' for m, s in sizes.items())}", flush=True)
    result: dict[str, Any] = {
        "mode": "two-gpus",
        "environment": env,
        "gpus": list(gpus),
        "workloads_mib": sizes,
        "plan": {"switches_per_gpu": switches, "two_gpu_rounds": sum(1 for r in rounds if r[g0] == TP), "budget_s": args.budget_s},
        "doctor": run_doctor(),
    }

    workdir = Path(tempfile.mkdtemp(prefix="vramctl-gpu-proof-2-"))
    tag = f"gp{os.getpid()}"
    instances = {f"{tag}a", f"{tag}b"}
    current: list[Up | None] = [None]
    primary = GpuSampler(
        "nvml" if not fake else "status",
        status_holders(lambda: current[0], plan) if fake else nvml_holders(gpus, instances),
        gpus,
        0.005,
    )
    procs = GpuSampler("proc", proc_holders(gpus, instances), gpus, 0.01)
    if not fake:
        primary.initial = {m for per in primary.read()[0].values() for m in per}
    primary.start()
    procs.start()
    budget_a = t_start + args.budget_s * 0.4
    budget_b = t_start + args.budget_s - 20

    def finish() -> None:
        result["exclusivity"] = {"nvml" if not fake else "status_holders": primary.summary(), "processes": procs.summary()}
        result["run_seconds"] = time.monotonic() - t_start
        result["verdicts"] = two_gpu_verdicts(result, plan)
        write(result)

    try:
        # Phase A: the first GPU alone.
        primary.phase = procs.phase = "A"
        print(f"\nphase A: GPU {g0} alone, {switches} switches", flush=True)
        up = current[0] = Up(two_gpu_config(plan, both=False), workdir, f"{tag}a")
        recs_a: list[dict[str, Any]] = []
        prev: str | None = None
        try:
            for i in range(switches + 1):
                if time.monotonic() > budget_a:
                    result["phase_a_budget_exhausted"] = True
                    break
                to = plan.per_gpu(g0)[i % 2]
                r = up.round({g0: to}, 240, False)[g0] | {"gpu": g0, "round": i, "from": prev, "to": to}
                r["kind"] = kind_of(g0, plan, prev, to, i == 0)
                recs_a.append(r)
                print(f"  gpu{g0} {prev or '(none)'} -> {to}: {'ok' if r['ok'] else 'FAILED'} {r.get('seconds', 0):.2f}s", flush=True)
                if not r["ok"]:
                    print(f"    {r.get('message') or r.get('error')}", flush=True)
                    break
                prev = to
        finally:
            current[0] = None
            up.close()
            result.setdefault("vramctl_log_tails", {})["A"] = up.log_tail(4000)
        result["phase_a"] = {"switches": recs_a, "per_gpu": {str(g0): switch_stats([r for r in recs_a if r["kind"] == "per-gpu"])}}
        primary.phase = procs.phase = "between"
        finish()  # partial results after phase A

        # Phase B: both GPUs at once, the two-GPU model in between.
        primary.phase = procs.phase = "B"
        print(
            f"\nphase B: GPUs {g0} and {g1} at once, {switches} switches each, {result['plan']['two_gpu_rounds']} rounds of {TP} on both",
            flush=True,
        )
        up = current[0] = Up(two_gpu_config(plan, both=True), workdir, f"{tag}b")
        recs_b: list[dict[str, Any]] = []
        prevs: dict[int, str | None] = {g0: None, g1: None}
        try:
            for i, targets in enumerate(rounds):
                if time.monotonic() > budget_b:
                    result["phase_b_budget_exhausted"] = True
                    break
                got = up.round(targets, 240, flip=bool(i % 2))
                line = []
                for g in gpus:
                    r = got[g] | {"gpu": g, "round": i, "from": prevs[g], "to": targets[g]}
                    r["kind"] = kind_of(g, plan, prevs[g], targets[g], i == 0)
                    recs_b.append(r)
                    line.append(
                        f"gpu{g} {prevs[g] or '(none)'} -> {targets[g] or '(free)'}: {'ok' if r['ok'] else 'FAILED'} {r.get('seconds', 0):.2f}s"
                    )
                    prevs[g] = targets[g]
                print("  " + "   ".join(line), flush=True)
                bad = [got[g] for g in gpus if not got[g]["ok"]]
                if bad:
                    print(f"    {bad[0].get('message') or bad[0].get('error')}", flush=True)
                    break
        finally:
            current[0] = None
            up.close()
            result.setdefault("vramctl_log_tails", {})["B"] = up.log_tail(4000)
        result["phase_b"] = {
            "switches": recs_b,
            "per_gpu": {str(g): switch_stats([r for r in recs_b if r["gpu"] == g and r["kind"] == "per-gpu"]) for g in gpus},
            "by_kind": {
                f"gpu{g}:{k}": switch_stats([r for r in recs_b if r["gpu"] == g and r["kind"] == k])
                for g in gpus
                for k in sorted({r["kind"] for r in recs_b if r["gpu"] == g})
            },
        }
        primary.phase = procs.phase = "teardown"
        time.sleep(0.2)
    except Exception as err:  # a vramctl up that did not start, a lost API: the JSON still tells what ran
        result["error"] = f"{type(err).__name__}: {err}"
        print(f"\nERROR: {result['error']}", flush=True)
    finally:
        primary.stop()
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    finish()
    return result


def two_gpu_verdicts(r: dict[str, Any], plan: TwoGpuPlan) -> dict[str, Any]:
    g0 = plan.gpus[0]
    planned = r["plan"]["switches_per_gpu"]
    out: dict[str, Any] = {}
    if "error" in r:
        out["ran_to_the_end"] = {"value": r["error"], "pass": False}
    a = (r.get("phase_a") or {}).get("switches", [])
    a_sw = [s for s in a if s["kind"] != "start"]
    out["switches_ok_one_gpu"] = {
        "value": f"{sum(1 for s in a_sw if s['ok'])}/{planned}",
        "pass": len(a_sw) == planned and all(s["ok"] for s in a),
    }
    ex = r.get("exclusivity") or {}
    prim = ex.get("nvml") or ex.get("status_holders") or {}
    prim_b = (prim.get("phases") or {}).get("B") or {}
    if "phase_b" in r:
        b = r["phase_b"]["switches"]
        per_gpu_done = {
            g: sum(1 for s in b if s["gpu"] == g and s["ok"] and s["to"] is not None and s["to"] != TP and s["kind"] != "start")
            for g in plan.gpus
        }
        tp_ok = sum(1 for s in b if s["to"] == TP and s["ok"])
        out["switches_ok_two_gpus"] = {
            "value": {f"gpu{g}": f"{n}/{planned}" for g, n in per_gpu_done.items()}
            | {"two_gpu_model": f"{tp_ok}/{r['plan']['two_gpu_rounds']}"},
            "pass": all(s["ok"] for s in b) and all(n == planned for n in per_gpu_done.values()) and tp_ok == r["plan"]["two_gpu_rounds"],
        }
        seen = {g: ((prim_b.get("gpus") or {}).get(str(g)) or {}).get("two_gpu_model_seen", 0) for g in plan.gpus}
        out["two_gpu_model_held_both_gpus"] = {
            "value": {f"gpu{g}": n for g, n in seen.items()},
            "pass": tp_ok > 0 and all(n > 0 for n in seen.values()),
        }
        base = ((r.get("phase_a") or {}).get("per_gpu") or {}).get(str(g0))
        ratios = {}
        for g in plan.gpus:
            st = r["phase_b"]["per_gpu"].get(str(g))
            ratios[f"gpu{g}"] = None if not (st and base) else st["median_s"] / base["median_s"]
        out["per_gpu_switch_median_vs_one_gpu"] = {
            "value": ratios,
            "one_gpu_median_s": base and base["median_s"],
            "target_ratio": TARGET_SLOWDOWN,
            "pass": all(x is not None and x <= TARGET_SLOWDOWN for x in ratios.values()),
        }
    samples_ok = all(((prim_b.get("gpus") or {}).get(str(g)) is not None) for g in plan.gpus) and prim_b.get("samples", 0) > 0
    overlaps = prim.get("moments_with_two_heavy_on_one_gpu")
    out["never_two_heavy_on_one_gpu"] = {
        "value": overlaps,
        "by_processes": (ex.get("processes") or {}).get("moments_with_two_heavy_on_one_gpu"),
        "pass": overlaps == 0
        and (ex.get("processes") or {}).get("moments_with_two_heavy_on_one_gpu") == 0
        and ("phase_b" not in r or samples_ok),
    }
    return out


def report_two_gpus(r: dict[str, Any]) -> None:
    def fmt(st: dict[str, Any] | None) -> str:
        return "-" if not st else f"median {st['median_s']:.2f}s p95 {st['p95_s']:.2f}s (n={st['n']})"

    g0 = r["gpus"][0]
    print("\nper-GPU switch times (client: request -> settled):")
    print(f"  phase A, GPU {g0} alone:      {fmt(((r.get('phase_a') or {}).get('per_gpu') or {}).get(str(g0)))}")
    for g, st in ((r.get("phase_b") or {}).get("per_gpu") or {}).items():
        print(f"  phase B, GPU {g} (both busy): {fmt(st)}")
    for k, st in ((r.get("phase_b") or {}).get("by_kind") or {}).items():
        if not k.endswith(":per-gpu"):
            print(f"    {k:<36} {fmt(st)}")
    for name, ex in (r.get("exclusivity") or {}).items():
        for phase, ph in ex["phases"].items():
            if phase not in ("A", "B"):
                continue
            gpus = ", ".join(
                f"GPU {g}: max heavy {s['max_heavy']}, overlaps {s['overlaps']}, {TP} seen {s['two_gpu_model_seen']}"
                + (f", max used {s['max_used_mib']} MiB" if s["max_used_mib"] is not None else "")
                for g, s in ph["gpus"].items()
            )
            print(f"{name} sampler, phase {phase}: {ph['samples']} samples (period median {ph['period_ms_median'] or 0:.1f} ms); {gpus}")
    print("\nverdicts:")
    for name, v in r["verdicts"].items():
        extra = {k: (round(x, 3) if isinstance(x, float) else x) for k, x in v.items() if k not in ("pass", "value")}
        value = (
            {k: (round(x, 3) if isinstance(x, float) else x) for k, x in v["value"].items()} if isinstance(v["value"], dict) else v["value"]
        )
        print(f"  {'PASS' if v['pass'] else 'FAIL'}  {name}: {value}  {extra}")
    print(
        f"\nrun took {r['run_seconds']:.1f}s"
        + ("  [DRY RUN: simulated GPUs; the timings mean nothing here]" if r["environment"]["dry_run"] else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dry-run", action="store_true", help="simulated GPU and no torch: test the proof itself without a GPU")
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument(
        "--gpus",
        help="two GPUs, e.g. 0,1: the two-GPU proof (per-GPU workloads on each, a model on both, one vramctl up; "
        "phase A the first GPU alone, phase B both at once)",
    )
    p.add_argument("--switches", type=int, help="switches (default 12; with --gpus: per GPU, default 10)")
    p.add_argument(
        "--sizes",
        help="MiB of workloads a,b,c (default: 25%%, 15%%, 35%% of the GPU); with --gpus: a,b,tp "
        "(default 27%%, 45%%, 36%% of each GPU; tp on each of its GPUs)",
    )
    p.add_argument("--scrape-rounds", type=int, default=30, help="rounds of 1 nvidia-smi spawn + 10 snapshots + 2 scrapes")
    p.add_argument("--sim-release-s", type=float, default=0.1, help="dry run: the simulated GPU's release delay")
    p.add_argument("--tp-rounds", type=int, default=2, help="with --gpus: rounds of the two-GPU model, spread among the switches")
    p.add_argument("--budget-s", type=float, default=330, help="with --gpus: no new switch after this many seconds (phase A: 40%% of it)")
    p.add_argument("--out", help="JSON results file (default: $OUT/gpu_proof.json when OUT is set)")
    args = p.parse_args(argv)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_proof.json") if os.environ.get("OUT") else None)

    def write(result: dict[str, Any]) -> None:
        if out:
            Path(out).write_text(json.dumps(result, indent=2, default=str))

    if args.gpus:
        result = run_two_gpus(args, write)
        report_two_gpus(result)
        if out:
            print(f"results: {out}")
        return 0 if all(v["pass"] for v in result["verdicts"].values()) else 1
    if args.switches is None:
        args.switches = 12
    result = run(args)
    report(result)
    if out:
        write(result)
        print(f"results: {out}")
    return 0 if all(v["pass"] for v in result["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
