"""A bounded chaos run on two simulated GPUs with the process runtime: GPU 0
runs a0 or b0, GPU 1 runs a1 or b1, and big holds both (``gpus: [0, 1]``,
run by GPU 0's worker).

80 random switch requests (either GPU, some freeing it, some asking for big
while GPU 1 is busy), the supervisor SIGKILLed 3 times at random points and
restarted on the same state file. A 5 ms /proc sampler reads every live
model process of the instance and the GPUs it sees (its
CUDA_VISIBLE_DEVICES: big sees "0,1"); a 50 ms status sampler reads what
each simulated GPU counts as its holders (the workers' model states, big on
both GPUs) from ``/status``. Checked: no
moment with two heavy models on one GPU by either sampler; afterwards big
runs on both GPUs once GPU 1 is freed, and the GPUs converge to a0 and b1
with nothing left over. The figures are printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.figures import report
from tests.support.live_up import LiveUp, free_port

pytestmark = pytest.mark.timeout(180)

REQUESTS, KILLS, BUDGET_S = 80, 3, 30.0
SEED = int(os.environ.get("VRAMCTL_CHAOS_SEED", "20261207"))
LOAD_S, STOP_S = 0.3, 0.2
TARGETS = {0: ("a0", "b0", "big", None), 1: ("a1", "b1", None)}
GPU_OF = {"a0": (0,), "b0": (0,), "big": (0, 1), "a1": (1,), "b1": (1,)}
HEAVY = frozenset(GPU_OF)


def standin(port: int, vram: int, **extra: Any) -> dict[str, Any]:
    return {
        "command": [sys.executable, "-m", "vramctl.demo.standin"],
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": str(LOAD_S), "STANDIN_STOP_SECONDS": str(STOP_S)},
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
        "startTimeoutSeconds": 20,
        "stop": {"gracePeriodSeconds": 3},
        "vramMiB": vram,
        **extra,
    }


def config() -> dict[str, Any]:
    return {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "releaseDelaySeconds": 0.05, "memoryTimeoutSeconds": 20},
        "backoffInitialSeconds": 0.5,
        "gpus": [
            {
                "gpu": 0,
                "activeModel": "a0",
                "models": {
                    "a0": standin(free_port(), 8000),
                    "b0": standin(free_port(), 9000),
                    "big": standin(free_port(), 10000, gpus=[0, 1]),
                },
            },
            {"gpu": 1, "activeModel": "a1", "models": {"a1": standin(free_port(), 8000), "b1": standin(free_port(), 9000)}},
        ],
    }


class ProcSampler:
    """Every 5 ms: the live model processes of ``instance`` and the GPUs each sees."""

    def __init__(self, instance: str) -> None:
        self.mark = f"VRAMCTL_INSTANCE={instance}".encode()
        self.overlaps: list[tuple[int, list[str]]] = []
        self.samples = 0
        self.both_gpus_seen = 0  # samples in which big was live with CUDA_VISIBLE_DEVICES=0,1
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def models(self) -> dict[int, tuple[str, tuple[int, ...]]]:
        """pid -> (model, the GPUs it sees)."""
        out: dict[int, tuple[str, tuple[int, ...]]] = {}
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                env = dict(e.split(b"=", 1) for e in (p / "environ").read_bytes().split(b"\0") if b"=" in e)
                state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if env.get(b"VRAMCTL_INSTANCE") == self.mark.split(b"=", 1)[1] and state not in ("Z", "T", "X"):
                gpus = tuple(int(g) for g in env.get(b"CUDA_VISIBLE_DEVICES", b"").decode().split(",") if g)
                out[int(p.name)] = (env.get(b"VRAMCTL_MODEL", b"?").decode(), gpus)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            per_gpu: dict[int, set[str]] = {0: set(), 1: set()}
            for model, gpus in self.models().values():
                if model in HEAVY:
                    for g in gpus:
                        per_gpu.setdefault(g, set()).add(model)
                if model == "big" and gpus == (0, 1):
                    self.both_gpus_seen += 1
            self.samples += 1
            self.overlaps += [(g, sorted(ms)) for g, ms in per_gpu.items() if len(ms) > 1]
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)


class HolderSampler:
    """Every 50 ms, by ``/status``: on each GPU, the heavy models its simulated
    GPU counts as holders (a model holding, starting, stopping, asleep or
    waking by its worker's last look; big on each of its GPUs)."""

    HOLDING = frozenset({"running", "starting", "stopping", "sleeping", "waking"})

    def __init__(self, v: LiveUp) -> None:
        self.v = v
        self.samples = 0
        self.overlaps: list[tuple[int, list[str]]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                gpus = self.v.status()["gpus"]
            except (OSError, ValueError, KeyError):
                continue  # being restarted
            self.samples += 1
            per_gpu: dict[int, set[str]] = {0: set(), 1: set()}
            for st in gpus.values():
                for m, state in (st.get("modelStates") or {}).items():
                    if m in HEAVY and state in self.HOLDING:
                        for g in GPU_OF[m]:
                            per_gpu[g].add(m)
            self.overlaps += [(g, sorted(ms)) for g, ms in per_gpu.items() if len(ms) > 1]

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)


def switch(v: LiveUp, gpu: int, model: str | None) -> bool:
    try:
        code, _ = v.post({"gpu": gpu, "model": model or ""})
    except (urllib.error.URLError, OSError):
        return False
    return 200 <= code < 300


@pytest.fixture
def up(tmp_path: Path) -> Iterator[LiveUp]:
    v = LiveUp(tmp_path, config())
    yield v
    v.stop()
    v.kill_models()


def test_chaos_two_gpus_with_a_model_on_both(up: LiveUp) -> None:
    v, rng = up, random.Random(SEED)
    sampler = ProcSampler(v.instance)
    holders: HolderSampler | None = None
    sent = accepted = kills = 0
    try:
        v.start()
        holders = HolderSampler(v)
        kill_at = set(rng.sample(range(10, REQUESTS - 5), KILLS))
        t0 = time.monotonic()
        for i in range(REQUESTS):
            if time.monotonic() - t0 > BUDGET_S:
                break
            if i in kill_at:
                time.sleep(rng.random() * 0.3)
                v.kill9()
                json.loads(v.state_path.read_text())  # never half-written
                v.start(wait_ready=False)
                kills += 1
            gpu = rng.choice((0, 0, 1))  # GPU 0 has three targets, big among them
            sent += 1
            accepted += switch(v, gpu, rng.choice(TARGETS[gpu]))
            time.sleep(rng.random() * (LOAD_S + STOP_S) / 2)
        chaos_s = time.monotonic() - t0

        # big, once GPU 1 is freed, holds both GPUs.
        t1 = time.monotonic()
        assert switch(v, 1, None) and switch(v, 0, "big")
        v.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["big"], timeout=30, gpu=0)
        big_s = time.monotonic() - t1
        assert any(m == "big" and gpus == (0, 1) for m, gpus in sampler.models().values())
        # Then back to one model per GPU.
        assert switch(v, 0, "a0") and switch(v, 1, "b1")
        v.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["a0"], timeout=30, gpu=0)
        v.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["b1"], timeout=30, gpu=1)
        time.sleep(0.3)
        left = sorted(m for m, _ in sampler.models().values())
    finally:
        sampler.stop()
        if holders is not None:
            holders.stop()
        v.stop()
    report(
        f"[chaos two gpus] {sent} requests ({accepted} accepted), {kills} SIGKILLs in {chaos_s:.0f}s; "
        f"{sampler.samples} /proc samples, big on both GPUs in {sampler.both_gpus_seen}, {holders.samples} holder samples; "
        f"moments with two heavy models on one GPU: {len(sampler.overlaps)} (/proc), {len(holders.overlaps)} (holders); "
        f"big started {big_s:.2f}s after GPU 1 was freed"
    )
    assert not sampler.overlaps, sampler.overlaps[:5]
    assert not holders.overlaps, holders.overlaps[:5]
    assert kills == KILLS
    assert left == ["a0", "b1"], f"orphans or missing models: {left}"
    for pid in sampler.models():
        os.kill(pid, signal.SIGKILL)
