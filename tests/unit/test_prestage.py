"""Pre-staged cold loads: the weights of the model the queue serves next,
when its start will be cold, are read into the page cache while the active
model serves, within MemAvailable. The pure plan, the weight paths a spec
declares or implies, the read itself on this machine's page cache (mincore
before and after), and the worker asking for it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.clock import ManualClock, until_async
from tests.support.fakes import FakeGpu, FakeRuntime
from vramctl.demand.desk import InboxHolder
from vramctl.host.pagecache import MIB, Prestager, Staged, evict, files_of, plan, prestage, resident_fraction
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING


@pytest.mark.parametrize(
    ("available", "margin", "take", "skip"),
    [
        (None, 0, [], ["a", "b", "c"]),  # unknown memory: nothing is read
        (10_000, 0, ["a", "b", "c"], []),
        (3_000, 0, ["a", "c"], ["b"]),  # in order, skipping what does not fit, taking what still does
        (3_000, 2_000, ["c"], ["a", "b"]),
        (0, 0, [], ["a", "b", "c"]),
    ],
)
def test_plan_stays_within_memavailable_less_the_margin(available: int | None, margin: int, take: list[str], skip: list[str]) -> None:
    files = [("a", 2000 * MIB), ("b", 1500 * MIB), ("c", 500 * MIB)]
    assert plan(files, available, margin) == (take, skip)


def test_files_of_walks_directories_in_order_and_bounded(tmp_path: Path) -> None:
    (tmp_path / "m" / "sub").mkdir(parents=True)
    for name in ("b.safetensors", "a.safetensors", "sub/c.bin"):
        (tmp_path / "m" / name).write_bytes(b"x" * 10)
    single = tmp_path / "one.safetensors"
    single.write_bytes(b"y" * 3)
    got = files_of([str(tmp_path / "m"), str(single), str(tmp_path / "missing")])
    assert [Path(f).name for f, _ in got] == ["a.safetensors", "b.safetensors", "c.bin", "one.safetensors"]
    assert [s for _, s in got] == [10, 10, 10, 3]
    assert len(files_of([str(tmp_path / "m")], limit=2)) == 2


def doc(**model: Any) -> dict[str, Any]:
    return {"models": {"m": {"class": "heavy", **model}}}


@pytest.mark.parametrize(
    ("model", "paths"),
    [
        ({"image": "i", "weights": ["/srv/a", "/srv/b"]}, ("/srv/a", "/srv/b")),
        # vLLM's model directory in the container, mapped back through the volume
        ({"engine": "vllm", "image": "i", "vllm": {"model": "/models/qwen"}, "volumes": ["/srv/models:/models:ro"]}, ("/srv/models/qwen",)),
        # a Hugging Face id is not a path; a path no volume holds is not known on the host
        ({"engine": "vllm", "image": "i", "vllm": {"model": "Qwen/Qwen2.5-7B-Instruct"}}, ()),
        ({"engine": "vllm", "image": "i", "vllm": {"model": "/models/qwen"}}, ()),
        (
            {"engine": "sdxl", "image": "i", "sdxl": {"modelPath": "/w/sdxl.safetensors"}, "volumes": ["/data/w:/w"]},
            ("/data/w/sdxl.safetensors",),
        ),
        # a local process sees the host's own paths
        ({"engine": "sdxl", "command": ["serve"], "sdxl": {"modelPath": "/w/sdxl.safetensors"}}, ("/w/sdxl.safetensors",)),
    ],
)
def test_weight_paths(model: dict[str, Any], paths: tuple[str, ...]) -> None:
    assert DeploymentSpec.model_validate(doc(**model)).models["m"].weight_paths == paths


def test_prestage_brings_dropped_files_into_the_page_cache(tmp_path: Path) -> None:
    big, small = tmp_path / "w1.safetensors", tmp_path / "w2.safetensors"
    big.write_bytes(os.urandom(48 * MIB))
    small.write_bytes(os.urandom(8 * MIB))
    for f in (big, small):
        evict(f)
    assert resident_fraction(str(big)) < 0.1 and resident_fraction(str(small)) < 0.1
    got = prestage([str(tmp_path)], available_mib=10_000, margin_mib=0)
    assert got.files == (str(big), str(small)) and got.bytes == 56 * MIB
    assert resident_fraction(str(big)) > 0.95 and resident_fraction(str(small)) > 0.95
    # Only what MemAvailable allows: the big file does not fit 20 MiB, the small one does.
    for f in (big, small):
        evict(f)
    got = prestage([str(tmp_path)], available_mib=20, margin_mib=0)
    assert got.files == (str(small),) and got.skipped == (str(big),)
    assert resident_fraction(str(big)) < 0.1 and resident_fraction(str(small)) > 0.95


def test_the_prestager_runs_one_at_a_time_once_per_cold_start() -> None:
    ran: list[tuple[str, ...]] = []

    def run(paths: Iterable[str], available: int | None) -> Staged:
        ran.append(tuple(paths))
        time.sleep(0.1)
        return Staged(tuple(paths), 1)

    p = Prestager(run, memory=lambda: 1000)
    assert p.request("sdxl", ["/a"]) and not p.request("flux", ["/b"])  # one at a time
    deadline = time.monotonic() + 5
    while "sdxl" not in p.staged and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not p.request("sdxl", ["/a"])  # done: not again until it was served
    p.forget("sdxl")
    assert p.request("sdxl", ["/a"]) and not p.request("sdxl", [])
    deadline = time.monotonic() + 5
    while len(ran) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == [("/a",), ("/a",)]


class RecordingPrestager(Prestager):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    def request(self, model: str, paths: Sequence[str]) -> bool:
        self.asked.append((model, tuple(paths)))
        return self.asked.count((model, tuple(paths))) == 1


def test_the_worker_prestages_the_model_the_queue_serves_next_while_the_active_one_serves() -> None:
    d = DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "llm",
            "switching": {"mode": "onDemand"},
            "queue": {"maxServeSeconds": 60, "drainTimeoutSeconds": 30, "serveCostFactor": None},
            "models": {
                "llm": {"image": "i", "vramMiB": 12000, "startTimeoutSeconds": 5, "weights": ["/srv/llm"]},
                "sdxl": {"image": "i", "vramMiB": 11000, "startTimeoutSeconds": 5, "weights": ["/srv/sdxl"]},
            },
        }
    )
    rt, clock, pre = FakeRuntime(states={"llm": RUN}), ManualClock(), RecordingPrestager()
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.01, baseline_mib=0, resync_s=1), clock=clock, prestager=pre)
    holder = InboxHolder(lambda _gpu, cmd: w.post(cmd), gpu_of=lambda _m: "0", clock=w.clock)
    w.start()

    async def go() -> None:
        g = await asyncio.wait_for(holder.demand("llm", ttl_seconds=3600), 5)
        assert pre.asked == []  # nothing waits for another model
        other = asyncio.ensure_future(holder.demand("sdxl", ttl_seconds=3600))
        # llm keeps serving (its hold, the window): sdxl waits, and its weights are read meanwhile.
        assert await until_async(lambda: bool(pre.asked), clock, w, step=0.0)
        assert set(pre.asked) == {("sdxl", ("/srv/sdxl",))}, pre.asked
        assert ("start", "sdxl") not in rt.calls
        assert any(p["step"] == "prestage" and p["model"] == "sdxl" for p in w.progress())
        holder.release(g.id)
        assert await until_async(other.done, clock, w, step=1.0)
        holder.release(other.result().id)

    try:
        asyncio.run(go())
        assert ("start", "sdxl") in rt.calls
    finally:
        w.stop()
