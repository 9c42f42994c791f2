"""The simulated GPU makes a start wait for the memory, through the real
composition (``app.build``: the process runtime, the worker, the simulated
GPU following the worker's published model states) with stand-in model
servers as real processes.

A stopped model's memory is freed ``releaseDelaySeconds`` after it left the
GPU, whoever looked at the GPU in between: the next heavy model's start comes
at least that long after the previous one was seen stopped, with the
worker's baseline learned (as ``vramctl up`` runs) or configured (as most
tests run it), and the progress says how long the release took.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_up import standin
from tests.support.ports import free_port
from vramctl.app import Built, build
from vramctl.reconcile.memory_gate import Baseline
from vramctl.runtimes.teardown import take_down
from vramctl.spec.models import parse_config
from vramctl.worker.actor import GpuWorker

DELAY = 0.4


def config() -> dict[str, Any]:
    return {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16000, "releaseDelaySeconds": DELAY},
        "gpus": [{"gpu": 0, "activeModel": "llm", "models": {"llm": standin(free_port()), "sdxl": standin(free_port())}}],
    }


@pytest.fixture
def built(tmp_path: Path) -> Iterator[Built]:
    b = build(parse_config(config(), "test.yaml"), tmp_path / "state.json", instance="rel" + tmp_path.name[-8:].replace("_", ""))
    try:
        yield b
    finally:
        w = b.supervisor.workers[0]
        try:
            w.request(None, ())
            wait(w, lambda s: s["phase"] == "Idle" and not s["runningModels"], 20)
        finally:
            w.stop()
            take_down(b.supervisor.runtime, [w.spec], remove_created=False)  # whatever is left, never a process behind
            b.supervisor.stop()


def wait(w: GpuWorker, pred: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    s: dict[str, Any] = {}
    while time.monotonic() < deadline:
        s = w.status()
        if pred(s):
            return s
        time.sleep(0.02)
    raise AssertionError(f"not met within {timeout}s: {s}")


def ready(w: GpuWorker, model: str) -> None:
    wait(w, lambda s: s["phase"] == "Ready" and s["activeModel"] == model and s["runningModels"] == [model], 30)


@pytest.mark.parametrize("baseline", ["learned", "configured"])
def test_a_start_waits_out_the_release_delay_after_the_previous_model_stopped(built: Built, baseline: str) -> None:
    w = built.supervisor.workers[0]
    if baseline == "configured":
        # As WorkerSettings(baseline_mib=0) makes it: the worker then reads the
        # probe only while it waits for memory, never between a start and a stop.
        w._rec.baseline = Baseline(0, True, True)
    built.supervisor.start()
    ready(w, "llm")
    for target in ("sdxl", "llm", "sdxl"):
        w.request(target, ())
        ready(w, target)
    notes = w.progress()
    stopped = [p for p in notes if p["step"] == "stopped"]
    started = [p for p in notes if p["step"] == "starting"][1:]  # the first start had nothing to wait for
    assert len(stopped) == 3 and len(started) == 3, notes
    for stop, start in zip(stopped, started, strict=True):
        gap = start["time"] - stop["time"]
        assert gap >= DELAY - 0.02, f"{start['model']} started {gap:.3f}s after {stop['model']} stopped (releaseDelaySeconds {DELAY})"
    freed = [p["message"] for p in notes if p["step"] == "memory-free" and "exited" in p["message"]]
    assert len(freed) == 3, notes
    for message in freed:
        after = float(message.split(", ")[-1].split("s after")[0])
        # Counted from the exit as the worker recorded it, which can trail the
        # moment the simulated GPU saw the model go by a loaded machine's
        # scheduling; the start-after-stop gaps above are the exact check.
        assert after >= DELAY - 0.1, message
