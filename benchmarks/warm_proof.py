#!/usr/bin/env python3
"""Warm switching proof: LLM -> SDXL -> LLM round trips, cold (stop/start) and
warm (sleep/wake), through vramctl, measured with NVML every 5 ms.

Run on a machine with an NVIDIA GPU, torch, diffusers, transformers,
safetensors and nvidia-ml-py (no docker needed), from the repository root:

    python benchmarks/warm_proof.py                  # 10 round trips each way
    python benchmarks/warm_proof.py --dry-run --rounds 2   # no GPU: simulated

Two models, both heavy, run by ``vramctl up`` (the process runtime, the NVML
probe) from a config this script writes:

- ``llm``: ``benchmarks/cuda_workload.py`` in ``WORKLOAD_MODE=llm``, a torch
  process holding ``--llm-weights-mib`` of fp16 weights (default 14336, in 256
  tensors) plus ``--llm-kv-mib`` of KV cache, speaking vLLM's sleep API;
- ``sdxl``: vramctl's SDXL server (images/sdxl/server.py) with the full-size
  SDXL pipeline, random fp16 weights (``SDXL_RANDOM_INIT=full``, as
  benchmarks/sdxl_gpu.py).

The same round trips run twice in one run: first with ``switchStrategy: stop``
(cold: every switch stops one process and starts the other), then with
``switchStrategy: sleep`` level 1 (warm: host buffers pinned at load). Each
switch is timed from ``POST /switch`` to vramctl reporting the GPU Ready
with the target healthy. A sampler thread reads NVML's process list every
5 ms for the whole run. Reported:

- each direction's median and p95, cold and warm, and the warm/cold ratio;
- residues: what NVML shows the sleeping model's process holding after each
  warm switch (first and last: growth across cycles);
- host memory pinned by each server for sleeping (its own report);
- max awake heavies: the most processes above their ``maxResidueMiB`` at one
  NVML sample (must be 1);
- whether the warm run really slept (the model switched away answers
  ``/is_sleeping`` true) rather than stopped;
- SDXL image identity: the image of one seed made before the first sleep and
  after every wake (and, for reference, after every cold start).

Targets (PASS/FAIL): warm switch median < 1.0 s; warm at least 10x faster than
cold; at most one heavy awake at any sample; every warm switch slept; every
image identical.

Two more runs in the same process (``--runs``; both by default on a GPU):
``checkpoint``, the same round trips with ``switchStrategy: checkpoint`` (the
driver's checkpoint API; the SDXL server's own sleep API off, the LLM
stand-in's host buffers not pinned), and ``rotation``, LLM -> SDXL -> TTS ->
LLM with a third model that has no sleep API at all (a torch process holding
``--tts-mib``, standing in for GPT-SoVITS), every switch by checkpoint.
Reported beside the above: vramctl's own timed steps per model (away: the
sleep or checkpoint until verified asleep; back: the wake or restore until
healthy; start: start until healthy; stop), the driver's seconds (and per
GiB) each way from vramctl's log, the host RSS of each checkpointed model,
and whether each switch really checkpointed (the driver's state of the model
switched away). Targets: a checkpointed SDXL serves again at least 5x sooner
than a cold start (restore + health against start + health); a checkpoint
round trip (away + back) shorter than a stop and a cold start; the SDXL
image identical after every restore; every rotation switch warm (no
fall-back, no cold start after the warm-up).

``--driver direct`` does the switching in this process with vramctl's own
parts instead of ``vramctl up``: the process runtime, the GPU probe and
``vramctl.runtimes.sleepctl``, following the warm protocol (sleep the old model, wait
until the probe shows its processes at or under ``maxResidueMiB``, then wake
the new one if it sleeps, else start it; health-gate). It is the reference
the worker's own warm switch is measured against, and it works before the
worker knows how to sleep.

``--dry-run``: the simulated GPU (no NVML), the LLM stand-in without torch,
the tiny SDXL pipeline on the CPU; the sampler then asks the servers whether
they are awake instead of NVML. Only the plumbing is proven; the timing
targets are printed but mean nothing.

Results as JSON to ``$OUT/warm_proof.json`` when OUT is set (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from free_ports import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
WORKLOAD = ROOT / "benchmarks" / "cuda_workload.py"
SDXL_SERVER = ROOT / "images" / "sdxl" / "server.py"
TARGET_WARM_MEDIAN_S = 1.0
TARGET_SPEEDUP = 10.0
MAX_RESIDUE_MIB = 1536
IMAGE = {"prompt": "a lighthouse on a cliff at sunset", "seed": 1234, "steps": 4, "width": 512, "height": 512}


def pctl(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(xs: list[float]) -> dict[str, Any] | None:
    if not xs:
        return None
    return {"n": len(xs), "median_s": statistics.median(xs), "p95_s": pctl(xs, 0.95), "min_s": min(xs), "max_s": max(xs)}


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """(status, parsed JSON or raw bytes); connection errors raise OSError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        raw, status, ctype = err.read(), err.code, err.headers.get("Content-Type", "")
    if "json" in ctype:
        try:
            return status, json.loads(raw)
        except ValueError:
            pass
    return status, raw


# ------------------------------------------------------------------ the config


@dataclass(frozen=True)
class Plan:
    dry: bool
    gpu: int
    llm_weights_mib: int
    llm_kv_mib: int
    sdxl_size: str  # full | tiny
    ports: dict[str, int]
    tts_mib: int = 4096

    @classmethod
    def of(cls, args: argparse.Namespace, full_weights_mib: int, full_sdxl: str = "full", **more: Any) -> Plan:
        """The plan of a run from its command line: the dry run's LLM has 1 GiB
        of weights (it allocates nothing, but its declared host memory must
        still fit this machine) and a tiny SDXL; three fresh ports."""
        dry = args.dry_run
        return cls(
            dry=dry,
            gpu=args.gpu,
            llm_weights_mib=args.llm_weights_mib if args.llm_weights_mib is not None else (1024 if dry else full_weights_mib),
            llm_kv_mib=args.llm_kv_mib,
            sdxl_size="tiny" if dry else full_sdxl,
            ports={"llm": free_port(), "sdxl": free_port(), "tts": free_port()},
            **more,
        )


def host_mib(vram_mib: int) -> int:
    """A checkpointed model's host memory: the driver's copy was measured at about 1.1x its GPU bytes."""
    return int(vram_mib * 1.15) + 512


def config(plan: Plan, strategy: str, tts: bool = False) -> dict[str, Any]:
    """The vramctl config of one run (``strategy``: stop, sleep or checkpoint;
    ``tts``: the third model, with no sleep API, beside them)."""
    sleeping = strategy == "sleep"
    llm_env = {
        "WORKLOAD_MODE": "llm",
        "WEIGHTS_MIB": str(plan.llm_weights_mib),
        "VRAM_MIB": str(plan.llm_kv_mib),
        "TENSORS": "256",
        "PORT": str(plan.ports["llm"]),
        "SLEEP_PIN": "1" if sleeping else "0",
        "PYTHONUNBUFFERED": "1",
    }
    sdxl_env = {
        "SDXL_RANDOM_INIT": plan.sdxl_size,
        "SDXL_DEVICE": "cpu" if plan.dry else "cuda",
        "PYTHONUNBUFFERED": "1",
    }
    if plan.dry:
        llm_env["CUDA_WORKLOAD_FAKE"] = "1"
        sdxl_env["CUDA_VISIBLE_DEVICES"] = ""
    llm: dict[str, Any] = {
        "class": "heavy",
        "command": [sys.executable, str(WORKLOAD)],
        "env": llm_env,
        "health": {"path": "/health", "port": plan.ports["llm"], "intervalSeconds": 0.01},
        "stop": {"signal": "SIGTERM", "gracePeriodSeconds": 30},
        "startTimeoutSeconds": 600,
        "vramMiB": plan.llm_weights_mib + plan.llm_kv_mib + 1024,
    }
    sdxl: dict[str, Any] = {
        "class": "heavy",
        "engine": "sdxl",
        "sdxl": {"modelPath": f"random:{plan.sdxl_size}", "port": plan.ports["sdxl"]},
        "command": [sys.executable, str(SDXL_SERVER)],
        "env": sdxl_env,
        "health": {"path": "/health", "port": plan.ports["sdxl"], "intervalSeconds": 0.01},
        "stop": {"signal": "SIGTERM", "gracePeriodSeconds": 30},
        "startTimeoutSeconds": 600,
        "vramMiB": 16000 if plan.sdxl_size == "full" else 2000,
    }
    if sleeping:
        llm["switchStrategy"] = "sleep"
        llm["sleep"] = {
            "level": 1,
            "hostMemoryMiB": plan.llm_weights_mib,
            "maxResidueMiB": MAX_RESIDUE_MIB,
            "path": "/sleep",
            "wakePath": "/wake_up",
            "statePath": "/is_sleeping",
        }
        sdxl["switchStrategy"] = "sleep"
        sdxl["sleep"] = {"level": 1, "hostMemoryMiB": 7600 if plan.sdxl_size == "full" else 64, "maxResidueMiB": MAX_RESIDUE_MIB}
    models = {"llm": llm, "sdxl": sdxl}
    if tts:
        models["tts"] = {
            "class": "heavy",
            "command": [sys.executable, str(WORKLOAD), "tts"],
            "env": {"VRAM_MIB": str(plan.tts_mib), "PORT": str(plan.ports["tts"]), "PYTHONUNBUFFERED": "1"}
            | ({"CUDA_WORKLOAD_FAKE": "1"} if plan.dry else {}),
            "health": {"path": "/health", "port": plan.ports["tts"], "intervalSeconds": 0.01},
            "stop": {"signal": "SIGTERM", "gracePeriodSeconds": 30},
            "startTimeoutSeconds": 600,
            "vramMiB": plan.tts_mib + 1024,
        }
    if strategy == "checkpoint":
        for m in models.values():
            m["switchStrategy"] = "checkpoint"
            m["sleep"] = {"hostMemoryMiB": host_mib(m["vramMiB"]), "maxResidueMiB": MAX_RESIDUE_MIB}
    probe: dict[str, Any] = {"kind": "simulated", "totalMiB": 81559, "releaseDelaySeconds": 0.05} if plan.dry else {"kind": "nvml"}
    probe["pollIntervalSeconds"] = 0.01
    return {
        "runtime": "process",
        "gpuProbe": probe,
        "gpus": [
            {"name": "warm-proof", "gpu": plan.gpu, "models": models}
            # A fresh VM's MemAvailable may start small and grow: the checkpointed models' budget is set, not read.
            | ({"hostMemoryBudgetMiB": sum(m["sleep"]["hostMemoryMiB"] for m in models.values())} if strategy == "checkpoint" else {})
        ],
    }


# ------------------------------------------------------------------ the sampler


@dataclass
class Sample:
    t: float
    held: dict[str, int]  # model (or pid:N) -> MiB; dry run: 1 awake, 0 asleep


@dataclass
class Sampler:
    read: Callable[[], dict[str, int]]
    period: float
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="warm-proof-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append(Sample(time.time(), self.read()))
            except Exception:
                self.errors += 1
            nxt += self.period
            self._stop.wait(max(0.0, nxt - time.monotonic()))


def model_of_pid(pid: int, cache: dict[int, str]) -> str:
    if pid not in cache:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmdline = ""
        cache[pid] = (
            "tts"
            if "cuda_workload.py tts" in cmdline
            else "llm"
            if "cuda_workload.py" in cmdline
            else "sdxl"
            if "sdxl/server.py" in cmdline
            else f"pid:{pid}"
        )
    return cache[pid]


def nvml_read(gpu: int) -> Callable[[], dict[str, int]]:
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(gpu)
    cache: dict[int, str] = {}

    def read() -> dict[str, int]:
        out: dict[str, int] = {}
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            name = model_of_pid(p.pid, cache)
            out[name] = out.get(name, 0) + (int(p.usedGpuMemory or 0) >> 20)
        return out

    return read


def servers_read(ports: dict[str, int]) -> Callable[[], dict[str, int]]:
    """Dry run: 1 for a server that answers and is not asleep (loading, awake,
    going to sleep or waking all hold memory), 0 asleep; absent when down."""

    def read() -> dict[str, int]:
        out: dict[str, int] = {}
        for name, port in ports.items():
            try:
                status, doc = http("GET", f"http://127.0.0.1:{port}/is_sleeping", timeout=0.5)
            except OSError:
                continue
            out[name] = 0 if status == 200 and isinstance(doc, dict) and doc.get("is_sleeping") is True else 1
        return out

    return read


def awake_heavies(samples: list[Sample], dry: bool) -> dict[str, Any]:
    threshold = 0 if dry else MAX_RESIDUE_MIB
    worst, moments = 0, []
    for s in samples:
        awake = [m for m, mib in s.held.items() if mib > threshold]
        worst = max(worst, len(awake))
        if len(awake) > 1:
            moments.append({"t": s.t, "held": s.held})
    return {
        "samples": len(samples),
        "awake_threshold_mib": threshold,
        "max_awake_heavies": worst,
        "moments_with_two_awake": len(moments),
        "first": moments[:5],
    }


def stop_group(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM the process group of ``proc`` (started in its own session),
    SIGKILL it if ``proc`` is still there ``grace`` seconds later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# ------------------------------------------------------------------ one run


class Supervisor:
    """``vramctl up`` in a subprocess, driven over its HTTP API."""

    def __init__(self, cfg: dict[str, Any], workdir: Path, instance: str, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg_path = workdir / f"{instance}.yaml"
        cfg_path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        self.log_path = workdir / f"{instance}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "operator") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "vramctl", "up", "--config", str(cfg_path), "--state", str(workdir / f"{instance}.state.json")]
        cmd += ["--listen", f"127.0.0.1:{self.port}", "--instance", instance, *extra_args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.progress: list[dict[str, Any]] = []  # every progress entry, in order (timed steps)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"vramctl up exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if http("GET", self.base + "/healthz", timeout=1)[0] == 200:
                    return
            time.sleep(0.05)
        raise SystemExit(f"vramctl up did not answer /healthz within 60 s:\n{self.log_path.read_text()[-3000:]}")

    def switch(self, model: str | None, timeout: float) -> dict[str, Any]:
        """Ask for ``model``; return once the GPU settled: timing and outcome."""
        t0 = time.perf_counter()
        status, reply = http("POST", self.base + "/switch", {"model": model})
        if status != 202:
            return {"to": model, "ok": False, "error": f"HTTP {status}: {reply!r}"}
        gen = reply["generation"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, st = http("GET", self.base + "/status")
            g = st["gpus"][str(reply["gpu"])]
            if g["observedGeneration"] >= gen and g["phase"] != "Switching":
                seconds = time.perf_counter() - t0
                self.collect()
                last = g.get("lastSwitch") or {}
                ok = g["phase"] in ("Ready", "Idle")
                return {
                    "to": model,
                    "ok": ok,
                    "seconds": seconds,
                    "phase": g["phase"],
                    "message": g.get("message"),
                    "vramctl_seconds": last.get("durationSeconds") if last.get("generation") == gen else None,
                }
            time.sleep(0.005)
        return {"to": model, "ok": False, "error": f"not settled within {timeout:.0f}s"}

    def collect(self) -> None:
        """The progress entries since the last look (``/status?since=``)."""
        since = self.progress[-1]["seq"] if self.progress else 0
        with contextlib.suppress(Exception):
            _, st = http("GET", f"{self.base}/status?since={since}")
            self.progress += [p for p in st.get("progress", []) if p.get("seq", 0) > since]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.switch(None, 120)
        stop_group(self.proc, 30)


class Direct:
    """The warm protocol run here, with vramctl's process runtime, GPU probe and sleepctl."""

    def __init__(self, cfg: dict[str, Any], workdir: Path, instance: str) -> None:
        from vramctl.gpu.base import GpuProbe
        from vramctl.gpu.simulated import SimulatedGpu, with_residues
        from vramctl.observed import WorkloadState
        from vramctl.runtimes import sleepctl
        from vramctl.runtimes.process import ProcessRuntime
        from vramctl.spec.models import parse_config

        self.sleepctl = sleepctl
        conf = parse_config(cfg, "warm-proof")
        self.d = d = conf.gpus[0]
        self.runtime = runtime = ProcessRuntime(workdir / instance, instance=instance)
        self.poll = conf.gpu_probe.poll_interval_seconds
        self.margin = conf.gpu_probe.margin_mib
        self.probe: GpuProbe
        if conf.gpu_probe.kind == "simulated":

            def holders() -> dict[str, int]:
                return {n: d.reservation_mib(n) or 0 for n, w in runtime.observe(d).items() if w.state is WorkloadState.RUNNING}

            self.probe = SimulatedGpu(
                d.gpu,
                conf.gpu_probe.total_mib,
                0,
                conf.gpu_probe.release_delay_seconds,
                with_residues(holders, sleepctl.asleep_residue(lambda: d)),
            )
        else:
            from vramctl.gpu.nvml import NvmlProbe

            self.probe = NvmlProbe(d.gpu, lambda: runtime.owners(d))
        self.baseline = self.probe.snapshot().memory.used_mib
        self.current: str | None = None

    def held(self, model: str) -> int:
        """MiB the probe shows ``model`` holding (``sleepctl.held_mib``: per process, else device level)."""
        held: int = self.sleepctl.held_mib(self.probe.snapshot(), model, self.baseline)
        return held

    def wait(self, check: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(self.poll)
        return check()

    def switch(self, model: str | None, timeout: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        steps: dict[str, float] = {}
        old, sc = self.current, self.sleepctl
        try:
            if old is not None and old != model:
                target = sc.target_of(self.d, old)
                if target is not None and model is not None:
                    sc.sleep(target.base_url, target.api, target.level, timeout=120)
                    steps["sleep_s"] = time.perf_counter() - t0
                    if not self.wait(lambda: self.held(old) <= target.max_residue_mib, 30):
                        raise RuntimeError(f"{old} holds {self.held(old)} MiB after its sleep, over maxResidueMiB {target.max_residue_mib}")
                else:
                    self.runtime.stop(self.d, old)
                    steps["stop_s"] = time.perf_counter() - t0
                    if not self.wait(lambda: self.held(old) <= self.margin, 60):
                        raise RuntimeError(f"{old} still holds {self.held(old)} MiB after its stop")
                steps["memory_confirmed_s"] = time.perf_counter() - t0
            if model is not None and model != old:
                t = sc.target_of(self.d, model)
                running = model in self.runtime.observe(self.d)
                if t is not None and running and sc.is_sleeping(t.base_url, t.api, 5) is True:
                    sc.wake(t.base_url, t.api, timeout=300)
                    steps["wake_s"] = time.perf_counter() - t0
                else:
                    self.runtime.start(self.d, model)
                    steps["start_s"] = time.perf_counter() - t0
                if not self.wait(lambda: self.runtime.check_health(self.d, model), timeout):
                    raise RuntimeError(f"{model} not healthy within {timeout:.0f}s")
        except Exception as err:
            return {"to": model, "ok": False, "error": f"{type(err).__name__}: {err}", "steps": steps}
        self.current = model
        return {"to": model, "ok": True, "seconds": time.perf_counter() - t0, "phase": "Ready", "steps": steps, "vramctl_seconds": None}

    def close(self) -> None:
        for name in self.d.models:
            with contextlib.suppress(Exception):
                self.runtime.remove(self.d, name)
        self.runtime.close()
        self.log_path = Path(os.devnull)


def image_digest(port: int) -> str | None:
    status, body = http("POST", f"http://127.0.0.1:{port}/generate", IMAGE, timeout=600)
    return hashlib.sha256(body).hexdigest()[:16] if status == 200 and isinstance(body, bytes) else None


def asleep(port: int) -> bool | None:
    """Whether the server on ``port`` says it sleeps; None when nothing answers (stopped)."""
    try:
        status, doc = http("GET", f"http://127.0.0.1:{port}/is_sleeping", timeout=2)
    except OSError:
        return None
    return bool(status == 200 and isinstance(doc, dict) and doc.get("is_sleeping") is True)


class Checkpoints:
    """The driver's word on the models' processes (vramctl's own binding), from outside."""

    def __init__(self) -> None:
        from vramctl.runtimes.checkpoint import load_driver

        self.driver, self.availability = load_driver()

    @staticmethod
    def pids(model: str) -> list[int]:
        cache: dict[int, str] = {}
        return sorted(int(d) for d in os.listdir("/proc") if d.isdigit() and model_of_pid(int(d), cache) == model)

    def checkpointed(self, model: str) -> bool | None:
        """True when a process of ``model`` is checkpointed; None when none runs (or no driver)."""
        from vramctl.runtimes.checkpoint import DriverError, ProcessState

        pids = self.pids(model)
        if self.driver is None or not pids:
            return None
        states = []
        for pid in pids:
            with contextlib.suppress(DriverError):
                states.append(self.driver.state(pid))
        return ProcessState.CHECKPOINTED in states

    def rss_mib(self, model: str) -> int:
        from vramctl.runtimes.checkpoint import rss_mib

        return sum(rss_mib(pid) or 0 for pid in self.pids(model))


STEP_PAIRS = {
    "away": ("sleeping", "asleep"),
    "back": ("waking", "awake"),
    "start": ("starting", "healthy"),
    "stop": ("stopping", "stopped"),
}


def step_times(progress: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per model, the seconds of each timed step vramctl reported (a begin
    note to the next end note of the same model): away (sleep or checkpoint
    to verified asleep), back (wake or restore to healthy), start (start to
    healthy), stop."""
    out: dict[str, dict[str, list[float]]] = {}
    for kind, (begin, end) in STEP_PAIRS.items():
        open_at: dict[str, float] = {}
        for p in progress:
            m = p.get("model")
            if m is None:
                continue
            if p["step"] == begin:
                open_at[m] = p["time"]
            elif p["step"] == end and m in open_at:
                out.setdefault(m, {}).setdefault(kind, []).append(p["time"] - open_at.pop(m))
            elif p["step"] == "SleepFallback":
                open_at.pop(m, None)
    return out


CHECKPOINT_LINE = re.compile(r"'(\w+)' checkpointed \(pids [^)]*\): (\d+) MiB off the GPU in ([\d.]+)s, host RSS (\S+) MiB")
RESTORE_LINE = re.compile(r"'(\w+)' restored \(pids [^)]*\): (\S+) MiB back on the GPU in ([\d.]+)s")


def driver_times(log: str) -> dict[str, Any]:
    """Per model, the driver's own seconds from vramctl's log: checkpoint
    (lock + checkpoint + NVML confirmation) and restore (restore + unlock +
    confirmation), with seconds per GiB each way and the host RSS."""
    out: dict[str, Any] = {}
    for m, mib, sec, rss in CHECKPOINT_LINE.findall(log):
        d = out.setdefault(m, {"away_s": [], "back_s": [], "gpu_mib": int(mib), "host_rss_mib": []})
        d["away_s"].append(float(sec))
        d["gpu_mib"] = int(mib)
        if rss.isdigit():
            d["host_rss_mib"].append(int(rss))
    for m, _, sec in RESTORE_LINE.findall(log):
        out.setdefault(m, {"away_s": [], "back_s": [], "gpu_mib": None, "host_rss_mib": []})["back_s"].append(float(sec))
    for d in out.values():
        gib = (d["gpu_mib"] or 0) / 1024
        d["away_s_per_gib"] = statistics.median(d["away_s"]) / gib if d["away_s"] and gib else None
        d["back_s_per_gib"] = statistics.median(d["back_s"]) / gib if d["back_s"] and gib else None
    return out


ROUND_TRIP = (("llm", "sdxl"), ("sdxl", "llm"))
ROTATION = (("llm", "sdxl"), ("sdxl", "tts"), ("tts", "llm"))


def one_run(plan: Plan, strategy: str, rounds: int, workdir: Path, sampler: Sampler, driver: str, rotation: bool = False) -> dict[str, Any]:
    """``rounds`` of LLM -> SDXL -> LLM (``rotation``: LLM -> SDXL -> TTS -> LLM, every model checkpointed)."""
    legs = ROTATION if rotation else ROUND_TRIP
    name = f"{strategy}-rotation" if rotation else strategy
    print(f"\n[{name}] {'vramctl up' if driver == 'vramctl' else 'direct protocol'} with switchStrategy {strategy}", flush=True)
    cfg = config(plan, strategy, tts=rotation)
    sup: Supervisor | Direct
    sup = Supervisor(cfg, workdir, f"warmproof-{name}") if driver == "vramctl" else Direct(cfg, workdir, f"warmproof-{name}")
    cp = Checkpoints() if strategy == "checkpoint" else None
    models = sorted(cfg["gpus"][0]["models"])
    out: dict[str, Any] = {"strategy": strategy, "legs": [f"{a}->{b}" for a, b in legs], "switches": [], "images": [], "slept": []}
    out["residues"] = {m: [] for m in models}
    out["host_rss_mib"] = {m: [] for m in models}
    mark: int | None = None
    try:
        # Untimed warm-up: every model started once (a warm run cannot wake what never ran).
        out["warmup"] = [sup.switch(m, 900) for m in ([*(a for a, _ in legs), legs[0][0]])]
        for w in out["warmup"]:
            print(f"  warm-up -> {w['to']}: {'ok' if w['ok'] else 'FAILED'} in {w.get('seconds', float('nan')):.3f}s", flush=True)
        if not all(w["ok"] for w in out["warmup"]):
            out["error"] = next(w.get("error") or w.get("message") for w in out["warmup"] if not w["ok"])
            return out
        mark = len(sup.progress) if isinstance(sup, Supervisor) else 0  # what follows is timed
        for i in range(rounds):
            for frm, to in legs:
                rec = sup.switch(to, 900)
                rec["from"] = frm
                rec["round"] = i
                slept = cp.checkpointed(frm) if cp is not None else asleep(plan.ports[frm])
                rec["from_asleep"] = slept
                out["slept"].append(slept)
                if cp is not None and slept:
                    out["host_rss_mib"][frm].append(cp.rss_mib(frm))
                if isinstance(sup, Direct):
                    out["residues"][frm].append(sup.held(frm) if slept else None)
                else:
                    latest = sampler.latest()
                    if latest is not None and not plan.dry:
                        out["residues"][frm].append(latest.held.get(frm, 0) if slept else None)
                out["switches"].append(rec)
                print(
                    f"  {frm} -> {to}: {'ok' if rec['ok'] else 'FAILED'} in {rec.get('seconds', float('nan')):.3f}s"
                    f" (vramctl {rec.get('vramctl_seconds')}); {frm} {'asleep' if slept else 'stopped' if slept is None else 'awake'}",
                    flush=True,
                )
                if not rec["ok"]:
                    print(f"    {rec.get('error') or rec.get('message')}", flush=True)
                    return out
                if to == "sdxl":
                    out["images"].append(image_digest(plan.ports["sdxl"]))
        if strategy == "sleep":
            with contextlib.suppress(Exception):
                out["llm_vram"] = http("GET", f"http://127.0.0.1:{plan.ports['llm']}/vram")[1]
            # SDXL is asleep now (the LLM holds the GPU): its host buffer figures.
            with contextlib.suppress(Exception):
                out["sdxl_state"] = http("GET", f"http://127.0.0.1:{plan.ports['sdxl']}/is_sleeping")[1]
        if strategy == "checkpoint":
            with contextlib.suppress(Exception):
                out["llm_vram"] = http("GET", f"http://127.0.0.1:{plan.ports['llm']}/vram")[1]
    finally:
        if isinstance(sup, Supervisor):
            sup.collect()
            out["steps_s"] = step_times(sup.progress)
            out["fallbacks"] = [p for p in sup.progress if p["step"] == "SleepFallback"]
            after = sup.progress[mark:] if mark is not None else []
            out["starts_after_warmup"] = sum(1 for p in after if p["step"] == "starting")
        sup.close()
        if isinstance(sup, Supervisor):
            log = sup.log_path.read_text(errors="replace")
            out["driver_s"] = driver_times(log)
            out["vramctl_log_tail"] = log[-2000:]
    return out


# ------------------------------------------------------------------ report


def directions(run: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    legs = [tuple(leg.split("->")) for leg in run.get("legs", ["llm->sdxl", "sdxl->llm"])]
    for frm, to in legs:
        xs = [s["seconds"] for s in run["switches"] if s["ok"] and s["from"] == frm and s["to"] == to]
        out[f"{frm}->{to}"] = summary(xs)
    rt = []
    sw = [s for s in run["switches"] if s["ok"]]
    for i in range(0, len(sw) - len(legs) + 1, len(legs)):
        rt.append(sum(x["seconds"] for x in sw[i : i + len(legs)]))
    out["round_trip"] = summary(rt)
    out["all"] = summary([s["seconds"] for s in sw])
    return out


def _median(run: dict[str, Any] | None, model: str, kind: str) -> float | None:
    xs = ((run or {}).get("steps_s") or {}).get(model, {}).get(kind) or []
    return statistics.median(xs) if xs else None


def verdicts(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ex = r["exclusivity"]
    out["at_most_one_heavy_awake"] = {"value": ex["max_awake_heavies"], "pass": ex["samples"] > 0 and ex["max_awake_heavies"] <= 1}
    cold_run, warm_run = r.get("cold"), r.get("warm")
    if cold_run and warm_run:
        cold, warm = cold_run["timing"]["all"], warm_run["timing"]["all"]
        ratio = warm["median_s"] / cold["median_s"] if cold and warm else None
        slept = warm_run["slept"]
        images = list(warm_run["images"])
        n_switches = len(warm_run["switches"])
        out |= {
            "warm_median_under_1s": {
                "value": warm["median_s"] if warm else None,
                "target_s": TARGET_WARM_MEDIAN_S,
                "pass": bool(warm) and warm["median_s"] < TARGET_WARM_MEDIAN_S,
            },
            "warm_10x_faster_than_cold": {
                "value": (1 / ratio) if ratio else None,
                "warm_over_cold": ratio,
                "target": TARGET_SPEEDUP,
                "pass": ratio is not None and 1 / ratio >= TARGET_SPEEDUP,
            },
            "warm_switches_slept": {
                "value": f"{sum(1 for s in slept if s)}/{len(slept)}",
                "pass": bool(slept) and all(s is True for s in slept),
            },
            "sdxl_image_identical_after_wake": {
                "value": sorted({d for d in images if d is not None}),
                "pass": len(images) > 0 and None not in images and len(set(images)) == 1,
            },
            "residues_within_max": {
                "value": {m: v["last"] for m, v in r["residues_mib"].items()},
                "max_mib": MAX_RESIDUE_MIB,
                # No figures: only acceptable in a dry run through vramctl up (the simulated GPU is not readable from here).
                "pass": all(x <= MAX_RESIDUE_MIB for v in r["residues_mib"].values() for x in v["all"] if x is not None)
                and (r["environment"]["dry_run"] or any(x is not None for v in r["residues_mib"].values() for x in v["all"])),
            },
            "enough_round_trips": {"value": n_switches // 2, "pass": n_switches // 2 >= r["rounds"]},
        }
    cp = r.get("checkpoint")
    if cp:
        slept = cp["slept"]
        images = list(cp["images"])
        back, start = _median(cp, "sdxl", "back"), _median(cold_run, "sdxl", "start")
        away, stop = _median(cp, "sdxl", "away"), _median(cold_run, "sdxl", "stop")
        out |= {
            "checkpoint_switches_checkpointed": {
                "value": f"{sum(1 for s in slept if s)}/{len(slept)}",
                "fallbacks": len(cp.get("fallbacks") or []),
                "pass": bool(slept) and all(s is True for s in slept) and not cp.get("fallbacks"),
            },
            "checkpoint_sdxl_image_identical_after_restore": {
                "value": sorted({d for d in images if d is not None}),
                "same_as_cold": bool(images) and set(images) == set((cold_run or {}).get("images") or images),
                "pass": len(images) > 0 and None not in images and len(set(images)) == 1,
            },
            "checkpoint_sdxl_serves_5x_sooner_than_cold": {
                "value": start / back if back and start else None,
                "restore_to_healthy_s": back,
                "start_to_healthy_s": start,
                "target": 5.0,
                "pass": bool(back and start) and start / back >= 5.0,  # type: ignore[operator]
            },
            "checkpoint_round_trip_shorter_than_stop_and_cold_start": {
                "value": (away + back) if away and back else None,
                "stop_plus_start_s": (stop + start) if stop and start else None,
                "pass": bool(away and back and stop and start) and away + back < stop + start,  # type: ignore[operator]
            },
            "checkpoint_enough_round_trips": {"value": len(cp["switches"]) // 2, "pass": len(cp["switches"]) // 2 >= r["rounds"]},
        }
    rot = r.get("rotation")
    if rot:
        slept = rot["slept"]
        out["rotation_every_switch_warm"] = {
            "value": f"{sum(1 for s in slept if s)}/{len(slept)} checkpointed, {rot.get('starts_after_warmup')} cold starts after the warm-up",
            "pass": bool(slept) and all(s is True for s in slept) and rot.get("starts_after_warmup") == 0 and not rot.get("fallbacks"),
        }
    return out


def environment(dry: bool) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "dry_run": dry,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **{d: version(d) for d in ("torch", "diffusers", "transformers", "safetensors", "nvidia-ml-py", "pydantic")},
    }
    if not dry:
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(h)
            env["device"] = name.decode() if isinstance(name, bytes) else name
            drv = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = drv.decode() if isinstance(drv, bytes) else drv
            env["total_mib"] = int(pynvml.nvmlDeviceGetMemoryInfo(h).total) >> 20
        except Exception as err:
            env["nvml_error"] = str(err)
    return env


RUNS = {"cold": ("stop", False), "warm": ("sleep", False), "checkpoint": ("checkpoint", False), "rotation": ("checkpoint", True)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    dry = args.dry_run
    plan = Plan.of(args, 14336, args.sdxl_size, tts_mib=args.tts_mib)
    runs = [x for x in args.runs.split(",") if x]
    result: dict[str, Any] = {
        "environment": environment(dry),
        "rounds": args.rounds,
        "driver": args.driver,
        "runs": runs,
        "plan": plan.__dict__,
    }
    print(f"environment: {result['environment']}", flush=True)
    read = servers_read(plan.ports) if dry else nvml_read(args.gpu)
    sampler = Sampler(read, period=0.02 if dry else 0.005)
    sampler.start()
    workdir = Path(tempfile.mkdtemp(prefix="vramctl-warm-proof-"))
    try:
        for key in runs:
            strategy, rotation = RUNS[key]
            rounds = args.rotation_rounds if rotation and args.rotation_rounds is not None else args.rounds
            run_ = one_run(plan, strategy, rounds, workdir, sampler, args.driver, rotation)
            run_["timing"] = directions(run_)
            result[key] = run_
            if args.partial_out:  # what is done so far, in case the run is cut short
                Path(args.partial_out).write_text(json.dumps(result, indent=2, default=str))
    finally:
        sampler.stop()
    result["exclusivity"] = awake_heavies(sampler.samples, dry)
    result["exclusivity"]["sampler_errors"] = sampler.errors
    intervals = [b.t - a.t for a, b in zip(sampler.samples, sampler.samples[1:], strict=False)]
    result["exclusivity"]["period_ms_median"] = statistics.median(intervals) * 1e3 if intervals else None
    warm = result.get("warm") or {}
    result["residues_mib"] = {
        m: {"all": v, "first": v[0] if v else None, "last": v[-1] if v else None} for m, v in warm.get("residues", {}).items()
    }
    llm_vram = warm.get("llm_vram") or {}
    result["pinned_host_memory"] = {
        "llm": {"bytes": llm_vram.get("host_bytes"), "kind": llm_vram.get("host_memory")},
        "sdxl": {"bytes": (warm.get("sdxl_state") or {}).get("host_bytes"), "kind": (warm.get("sdxl_state") or {}).get("host_memory")},
        "llm_weights_checksum_same_after_wakes": llm_vram.get("weights_checksum") == llm_vram.get("checksum_at_load") if llm_vram else None,
    }
    for key in ("checkpoint", "rotation"):
        if key in result:
            c = result[key]
            v = c.get("llm_vram") or {}
            c["llm_weights_checksum_same_after_restores"] = v.get("weights_checksum") == v.get("checksum_at_load") if v else None
    result["run_seconds"] = time.monotonic() - t0
    result["verdicts"] = verdicts(result)
    return result


def report(r: dict[str, Any]) -> None:
    print("\nswitch times (request -> healthy):")
    for key in RUNS:
        if key not in r:
            continue
        for d, s in r[key]["timing"].items():
            if s:
                print(f"  {key:<10} {d:<11} median {s['median_s']:7.3f}s  p95 {s['p95_s']:7.3f}s  (n={s['n']})")
    for key in RUNS:
        if key in r and r[key].get("steps_s"):
            steps = {m: {k: round(statistics.median(v), 3) for k, v in d.items()} for m, d in r[key]["steps_s"].items()}
            print(f"  {key:<10} vramctl's steps, median s: {steps}")
        if key in r and r[key].get("driver_s"):
            for m, d in r[key]["driver_s"].items():
                print(
                    f"  {key:<10} {m}: checkpoint {d['away_s']} s, restore {d['back_s']} s, {d['gpu_mib']} MiB on the GPU, "
                    f"s/GiB away {d['away_s_per_gib']}, back {d['back_s_per_gib']}; host RSS while checkpointed {d['host_rss_mib']} MiB"
                )
    if r.get("residues_mib"):
        print(f"\nresidues (MiB the probe shows the sleeping process holding after each warm switch): {r['residues_mib']}")
        print(f"pinned host memory: {r['pinned_host_memory']}")
    ex = r["exclusivity"]
    print(
        f"sampler: {ex['samples']} samples (period median {ex['period_ms_median'] or 0:.1f} ms), "
        f"max awake heavies {ex['max_awake_heavies']}, moments with two awake {ex['moments_with_two_awake']}"
    )
    print("sdxl images: " + "  ".join(f"{k} {r[k]['images']}" for k in RUNS if k in r))
    print("\nverdicts:")
    for name, v in r["verdicts"].items():
        extra = {k: (round(x, 3) if isinstance(x, float) else x) for k, x in v.items() if k not in ("pass", "value")}
        value = round(v["value"], 3) if isinstance(v["value"], float) else v["value"]
        print(f"  {'PASS' if v['pass'] else 'FAIL'}  {name}: {value}  {extra}")
    print(
        f"\nrun took {r['run_seconds']:.1f}s" + ("  [DRY RUN: the timing targets mean nothing here]" if r["environment"]["dry_run"] else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dry-run", action="store_true", help="simulated GPU, no CUDA: test the proof itself")
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument(
        "--driver",
        choices=("vramctl", "direct"),
        default="vramctl",
        help="vramctl: `vramctl up` + POST /switch; direct: the protocol run here",
    )
    p.add_argument("--rounds", type=int, default=10, help="LLM -> SDXL -> LLM round trips per strategy (default 10)")
    p.add_argument("--llm-weights-mib", type=int, help="the LLM stand-in's fp16 weights (default 14336; dry run 1024)")
    p.add_argument("--llm-kv-mib", type=int, default=4096)
    p.add_argument("--sdxl-size", choices=("full", "tiny"), default="full")
    p.add_argument("--tts-mib", type=int, default=4096, help="the third model (no sleep API, rotation run): MiB it holds")
    p.add_argument(
        "--runs",
        help="which runs, in order, of cold, warm, checkpoint, rotation (default: all four; --dry-run: cold,warm, since the "
        "checkpoint runs need the driver and only fall back to stops without it)",
    )
    p.add_argument("--rotation-rounds", type=int, help="LLM -> SDXL -> TTS -> LLM rotations (default: --rounds)")
    p.add_argument("--out", help="JSON results file (default: $OUT/warm_proof.json when OUT is set)")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = "cold,warm" if args.dry_run else "cold,warm,checkpoint,rotation"
    if args.driver == "direct" and {"checkpoint", "rotation"} & set(args.runs.split(",")):
        p.error("--driver direct runs the sleep protocol only: drop checkpoint and rotation from --runs")
    out = args.out or (os.path.join(os.environ["OUT"], "warm_proof.json") if os.environ.get("OUT") else None)
    args.partial_out = f"{out}.partial" if out else None
    result = run(args)
    report(result)
    if out:
        Path(out).write_text(json.dumps(result, indent=2, default=str))
        print(f"results: {out}")
    return 0 if all(v["pass"] for v in result["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
