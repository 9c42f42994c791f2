"""SimulatedGpu: memory = baseline + holders + still-releasing + foreign, with a fake clock."""

from __future__ import annotations

import threading
import time

import pytest

from vramctl.gpu.base import GpuInfo, GpuProbe
from vramctl.gpu.simulated import SimulatedGpu, with_residues
from vramctl.observed import GpuProcess


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(holders: dict[str, int], *, total: int = 16000, baseline: int = 300, delay: float = 0.5) -> tuple[SimulatedGpu, FakeClock]:
    clock = FakeClock()
    gpu = SimulatedGpu(index=1, total_mib=total, baseline_mib=baseline, release_delay_seconds=delay, holders=lambda: holders, clock=clock)
    return gpu, clock


def test_is_a_gpu_probe_with_simulated_info() -> None:
    gpu, _ = make({})
    assert isinstance(gpu, GpuProbe)
    assert gpu.kind == "simulated"
    assert gpu.info() == GpuInfo(index=1, uuid="SIM-GPU-1", name="Simulated GPU", driver="simulated", total_mib=16000)


def test_empty_gpu_shows_only_the_baseline() -> None:
    gpu, _ = make({}, baseline=450)
    snap = gpu.snapshot()
    assert (snap.memory.total_mib, snap.memory.used_mib, snap.memory.free_mib) == (16000, 450, 15550)
    assert snap.processes == ()


def test_holders_add_their_memory_and_appear_as_processes() -> None:
    gpu, _ = make({"llm": 12000, "tts": 3500})
    snap = gpu.snapshot()
    assert snap.memory.used_mib == 300 + 12000 + 3500
    assert snap.processes == (GpuProcess(pid=0, used_mib=12000, model="llm"), GpuProcess(pid=0, used_mib=3500, model="tts"))


def test_release_delay_is_honoured_exactly_from_the_first_snapshot_that_sees_the_model_gone() -> None:
    holders = {"llm": 12000}
    gpu, clock = make(holders, delay=0.5)
    assert gpu.snapshot().memory.used_mib == 12300

    del holders["llm"]
    clock.t = 110.0  # the model left at some point; this snapshot is the first to notice
    snap = gpu.snapshot()
    assert snap.memory.used_mib == 12300
    assert snap.processes == (GpuProcess(pid=0, used_mib=12000, model="llm"),)

    clock.t = 110.499999
    assert gpu.snapshot().memory.used_mib == 12300
    clock.t = 110.5  # noticed + delay: free
    snap = gpu.snapshot()
    assert snap.memory.used_mib == 300
    assert snap.processes == ()


def test_zero_delay_frees_at_the_snapshot_that_notices() -> None:
    holders = {"llm": 12000}
    gpu, _ = make(holders, delay=0.0)
    gpu.snapshot()
    holders.clear()
    assert gpu.snapshot().memory.used_mib == 300


def test_a_model_back_within_the_delay_counts_twice_like_two_allocations() -> None:
    holders = {"llm": 1000}
    gpu, clock = make(holders, delay=0.5)
    gpu.snapshot()
    holders.clear()
    gpu.snapshot()  # t=100: llm releasing until 100.5
    holders["llm"] = 1000
    clock.t = 100.2
    snap = gpu.snapshot()
    assert snap.memory.used_mib == 300 + 2000
    assert [p.model for p in snap.processes or ()] == ["llm", "llm"]
    clock.t = 100.5
    assert gpu.snapshot().memory.used_mib == 1300


def test_foreign_processes_hold_memory_with_no_model_and_free_it_at_once() -> None:
    gpu, _ = make({"llm": 1000}, delay=5.0)
    gpu.add_foreign(4242, 2000)
    snap = gpu.snapshot()
    assert snap.memory.used_mib == 300 + 1000 + 2000
    assert GpuProcess(pid=4242, used_mib=2000, model=None) in (snap.processes or ())
    gpu.add_foreign(4242, 500)  # replaces, does not add
    assert gpu.snapshot().memory.used_mib == 1800
    gpu.remove_foreign(4242)
    gpu.remove_foreign(4242)  # idempotent
    snap = gpu.snapshot()
    assert snap.memory.used_mib == 1300
    assert all(p.model is not None for p in snap.processes or ())


def test_used_is_not_capped_so_overcommit_is_visible() -> None:
    gpu, _ = make({"a": 10000, "b": 10000}, total=16000, baseline=0)
    m = gpu.snapshot().memory
    assert m.used_mib == 20000
    assert m.free_mib < 0


def test_a_failing_holders_callback_keeps_the_last_known_holders() -> None:
    calls = {"n": 0}

    def holders() -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("runtime unreachable")
        return {"llm": 1000}

    gpu = SimulatedGpu(0, 16000, 0, 0.0, holders, clock=FakeClock())
    assert gpu.snapshot().memory.used_mib == 1000
    assert gpu.snapshot().memory.used_mib == 1000  # not "freed" by the error


@pytest.mark.parametrize(
    ("total", "baseline", "delay"),
    [(0, 0, 0.0), (100, -1, 0.0), (100, 0, -0.1)],
)
def test_invalid_settings_are_refused(total: int, baseline: int, delay: float) -> None:
    with pytest.raises(ValueError):
        SimulatedGpu(0, total, baseline, delay, dict)


def test_concurrent_snapshots_stay_consistent() -> None:
    holders: dict[str, int] = {}
    lock = threading.Lock()

    def read() -> dict[str, int]:
        with lock:
            return dict(holders)

    gpu = SimulatedGpu(0, 16000, 100, 0.0, read)
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            for _ in range(300):
                used = gpu.snapshot().memory.used_mib
                assert used in (100, 1100)
        except BaseException as err:  # collected for the main thread
            errors.append(err)

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(300):
        with lock:
            if i % 2:
                holders["m"] = 1000
            else:
                holders.pop("m", None)
    for t in threads:
        t.join(timeout=10)
    assert not errors


def test_a_model_going_to_sleep_keeps_its_residue_and_frees_the_rest_after_the_delay() -> None:
    holders = {"llm": 12000, "sdxl": 9000}
    asleep: dict[str, int] = {}
    clock = FakeClock()
    gpu = SimulatedGpu(1, 24000, 300, 0.5, with_residues(lambda: holders, asleep.get), clock=clock)
    assert gpu.snapshot().memory.used_mib == 300 + 21000
    asleep["llm"] = 600
    # Noticed now; the 11400 MiB freed by the sleep are torn down like an exit.
    assert gpu.snapshot().memory.used_mib == 300 + 21000
    clock.t += 0.49
    assert gpu.snapshot().memory.used_mib == 300 + 21000
    clock.t += 0.01
    snap = gpu.snapshot()
    assert snap.memory.used_mib == 300 + 600 + 9000
    assert GpuProcess(pid=0, used_mib=600, model="llm") in snap.processes
    del asleep["llm"]  # a wake takes its memory back at once
    assert gpu.snapshot().memory.used_mib == 300 + 21000


def test_a_residue_is_never_more_than_the_reservation_and_a_failing_question_counts_all() -> None:
    def residue(model: str) -> int | None:
        if model == "sdxl":
            raise RuntimeError("no answer")
        return 99999

    sleepy = with_residues(lambda: {"llm": 12000, "sdxl": 9000}, residue)
    assert sleepy() == {"llm": 12000, "sdxl": 9000}


def test_a_model_that_came_and_went_between_two_snapshots_is_released_only_after_the_delay() -> None:
    holders: dict[str, int] = {}
    clock = FakeClock()
    gpu = SimulatedGpu(0, 16000, 0, 0.5, lambda: holders, clock=clock)
    assert gpu.snapshot().memory.used_mib == 0
    holders["llm"] = 6000
    gpu.sample()  # a look between the snapshots (the sampler's)
    del holders["llm"]
    clock.t += 0.1
    snap = gpu.snapshot()
    assert snap.memory.used_mib == 6000  # seen leaving at this snapshot: releasing until +0.5 s
    assert snap.processes == (GpuProcess(pid=0, used_mib=6000, model="llm"),)
    clock.t += 0.5
    assert gpu.snapshot().memory.used_mib == 0


def test_the_sampler_looks_by_itself_and_ends_with_close() -> None:
    holders: dict[str, int] = {}
    before = set(threading.enumerate())  # other tests' simulated GPUs in this process have samplers of the same name
    gpu = SimulatedGpu(0, 16000, 0, 5.0, lambda: holders, sample_seconds=0.01)
    try:
        holders["llm"] = 6000
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and gpu._last.get("llm") != 6000:
            time.sleep(0.01)
        del holders["llm"]  # gone before any snapshot was taken
        assert gpu.snapshot().memory.used_mib == 6000
    finally:
        gpu.close()
    sampler = [t for t in threading.enumerate() if t.name == "vramctl-simgpu0" and t not in before]
    assert sampler, "no sampler thread was started"
    for t in sampler:
        t.join(5)
    assert not any(t.is_alive() for t in sampler)


def test_sample_seconds_is_bounded() -> None:
    with pytest.raises(ValueError, match="sample_seconds"):
        SimulatedGpu(0, 16000, 0, 0.3, dict, sample_seconds=0)
