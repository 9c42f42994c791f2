#!/usr/bin/env python3
"""Scrape latency: ``generate_latest`` over vramctl's registry.

One GPU, three models (llm and tts running, sdxl stopped) on a worker whose
runtime answers from memory, so what is measured is the collector and the
GPU probe: the simulated GPU, or the real NVML probe (``--probe nvml``, on
a machine with an NVIDIA GPU). Prints p50/p95/max of N scrapes and, with
``--show``, one scrape's text. Not a test: timings are printed, not asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from prometheus_client import CollectorRegistry, generate_latest

from vramctl.gpu.base import GpuProbe
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.observed import Workload, WorkloadState
from vramctl.runtimes.base import StartEvent, StopOutcome
from vramctl.spec.models import DeploymentSpec
from vramctl.telemetry import VramctlCollector
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings
from vramctl.worker.supervisor import holders_from

SPEC = DeploymentSpec.model_validate(
    {
        "gpu": 0,
        "activeModel": "llm",
        "companions": ["tts"],
        "models": {
            "llm": {"image": "i", "vramMiB": 12000},
            "sdxl": {"image": "i", "vramMiB": 11000},
            "tts": {"class": "light", "image": "i", "vramMiB": 3500},
        },
    }
)


class StaticRuntime:
    """llm and tts running, sdxl stopped; every mutation is a no-op."""

    kind = "static"

    def __init__(self) -> None:
        self.states = {"llm": WorkloadState.RUNNING, "tts": WorkloadState.RUNNING, "sdxl": WorkloadState.EXITED}

    def observe(self, deployment: DeploymentSpec) -> dict[str, Workload]:
        return {m: Workload(m, s, ref=m, heavy=deployment.models[m].heavy) for m, s in self.states.items()}

    def start(self, deployment: DeploymentSpec, model: str) -> str:
        return model

    def stop(self, deployment: DeploymentSpec, model: str) -> StopOutcome:
        return StopOutcome(model, False, False, 0.0)

    def pause(self, deployment: DeploymentSpec, model: str) -> None:
        return None

    def check_health(self, deployment: DeploymentSpec, model: str) -> bool:
        return self.states.get(model) is WorkloadState.RUNNING

    def logs_tail(self, deployment: DeploymentSpec, model: str, lines: int = 20) -> list[str]:
        return []

    def remove(self, deployment: DeploymentSpec, model: str) -> None:
        return None

    def validate(self, deployment: DeploymentSpec) -> list[tuple[str, str]]:
        return []

    def owners(self, deployment: DeploymentSpec) -> Mapping[str, str]:
        return {}

    def watch_starts(self, on_start: Callable[[StartEvent], None], stop: Callable[[], bool]) -> None:
        return None

    def close(self) -> None:
        return None


def make_probe(kind: str, runtime: StaticRuntime) -> GpuProbe:
    if kind == "nvml":
        from vramctl.gpu.nvml import NvmlProbe

        return NvmlProbe(0)
    return SimulatedGpu(0, 16303, 400, 0.3, holders_from(runtime, lambda: SPEC))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", choices=["simulated", "nvml"], default="simulated")
    ap.add_argument("-n", type=int, default=2000, help="scrapes to time (default 2000)")
    ap.add_argument("--dcgm", action="store_true", help="with the DCGM-compatible set")
    ap.add_argument("--show", action="store_true", help="print one scrape's text")
    args = ap.parse_args()

    runtime = StaticRuntime()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    worker = GpuWorker(SPEC, runtime, make_probe(args.probe, runtime), WorkerSettings(baseline_mib=400), metrics=metrics)  # type: ignore[arg-type]
    worker.reconcile_once()
    registry.register(VramctlCollector(lambda: [worker], dcgm_compat=args.dcgm))
    for _ in range(100):  # warm up
        body = generate_latest(registry)
    samples = []
    for _ in range(args.n):
        t0 = time.perf_counter()
        body = generate_latest(registry)
        samples.append(time.perf_counter() - t0)
    q = statistics.quantiles(samples, n=100)
    print(
        f"generate_latest, 1 GPU / 3 models / {args.probe} probe{' / dcgm' if args.dcgm else ''}, n={args.n}: "
        f"p50 {q[49] * 1e3:.3f} ms, p95 {q[94] * 1e3:.3f} ms, max {max(samples) * 1e3:.3f} ms, {len(body)} bytes"
    )
    if args.show:
        print(body.decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
