"""NvmlProbe over a stand-in pynvml: what it reads, what it survives, what it costs.

The real library is exercised on a GPU machine by benchmarks/gpu_proof.py;
here every driver quirk the probe must survive is played by tests/unit/fake_nvml.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pynvml
import pytest

from tests.support.cgroup_samples import CID, DOCKER_V2_SYSTEMD, HOST_SESSION, K8S_V2_SYSTEMD_CONTAINERD, POD
from tests.support.fake_nvml import FakeNvml, FakeProc
from vramctl.gpu.base import GpuInfo, GpuProbe, ProbeError, ProbeTimeout
from vramctl.gpu.nvml import NvmlProbe, NvmlSession, NvmlUnavailable, nvml_facts, nvml_problem
from vramctl.observed import GpuMemory, GpuProcess


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def fake_proc(root: Path, pid: int, cgroup: str, pgid: int | None = None, start: int = 1000) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    g = pgid if pgid is not None else pid
    (d / "stat").write_text(f"{pid} (python3) S 1 {g} {g} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n")
    (d / "cgroup").write_text(cgroup)


def probe(nv: FakeNvml, tmp_path: Path, owners: Callable[[], Mapping[str, str]] | None = None, **kw: object) -> NvmlProbe:
    return NvmlProbe(0, owners, session=NvmlSession(nv), proc=tmp_path, **kw)  # type: ignore[arg-type]


def test_is_a_gpu_probe_with_device_info(tmp_path: Path) -> None:
    p = probe(FakeNvml(), tmp_path)
    assert isinstance(p, GpuProbe) and p.kind == "nvml"
    assert p.info() == GpuInfo(index=0, uuid="GPU-fake-0", name="NVIDIA H100 80GB HBM3", driver="580.95.05", total_mib=81559)


def test_snapshot_reads_memory_v2_and_telemetry(tmp_path: Path) -> None:
    nv = FakeNvml(used_mib=20500, reserved_mib=540)
    snap = probe(nv, tmp_path).snapshot()
    assert snap.memory == GpuMemory(total_mib=81559, used_mib=20500, reserved_mib=540)
    assert snap.memory.free_mib == 81559 - 20500 - 540
    assert (snap.utilization, snap.temperature_celsius, snap.power_watts) == (0.37, 41.0, 123.456)
    assert snap.processes == ()
    assert nv.calls["nvmlDeviceGetMemoryInfo"] == 0  # v1 never asked when v2 works


def test_memory_falls_back_to_v1_when_the_driver_lacks_v2(tmp_path: Path) -> None:
    nv = FakeNvml(used_mib=100, reserved_mib=400, v2=False)
    p = probe(nv, tmp_path)
    snap = p.snapshot()
    assert snap.memory == GpuMemory(total_mib=81559, used_mib=500, reserved_mib=0)  # v1: reserved counts as used
    assert p.memory_info_version == 1
    p.snapshot()
    assert nv.calls["nvmlDeviceGetMemoryInfo_v2"] == 1  # not asked again


def test_a_v2_failure_after_v2_worked_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    nv = FakeNvml()
    p = probe(nv, tmp_path)
    p.snapshot()
    nv.fail["nvmlDeviceGetMemoryInfo_v2"] = pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(ProbeError, match="GPU is lost"):
        p.snapshot()
    assert p.memory_info_version == 2
    assert p.last_good() is not None


def test_unsupported_fields_are_none_and_not_asked_again(tmp_path: Path) -> None:
    nv = FakeNvml(unsupported={"utilization", "temperature", "power"})
    p = probe(nv, tmp_path)
    for _ in range(3):
        snap = p.snapshot()
        assert (snap.utilization, snap.temperature_celsius, snap.power_watts) == (None, None, None)
    assert nv.calls["nvmlDeviceGetUtilizationRates"] == 1
    assert nv.calls["nvmlDeviceGetPowerUsage"] == 1


def test_a_transient_field_error_is_none_this_time_only(tmp_path: Path) -> None:
    nv = FakeNvml(fail={"nvmlDeviceGetTemperature": pynvml.NVML_ERROR_UNKNOWN})
    p = probe(nv, tmp_path)
    assert p.snapshot().temperature_celsius is None
    del nv.fail["nvmlDeviceGetTemperature"]
    assert p.snapshot().temperature_celsius == 41.0


def test_wsl2_processes_without_memory(tmp_path: Path) -> None:
    nv = FakeNvml(compute=[FakeProc(900, None)])
    snap = probe(nv, tmp_path).snapshot()
    assert snap.processes == (GpuProcess(pid=900, used_mib=None),)


def test_process_listing_not_supported_means_unknown(tmp_path: Path) -> None:
    nv = FakeNvml(processes_supported=False, compute=[FakeProc(900, 10)])
    p = probe(nv, tmp_path)
    assert p.snapshot().processes is None
    p.snapshot()
    assert nv.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 1  # remembered


def test_old_library_uses_v2_process_structs(tmp_path: Path) -> None:
    nv = FakeNvml(v3_processes=False, compute=[FakeProc(900, 1000)])
    assert probe(nv, tmp_path).snapshot().processes == (GpuProcess(pid=900, used_mib=1000),)


def test_compute_and_graphics_processes_merge_by_pid(tmp_path: Path) -> None:
    nv = FakeNvml(compute=[FakeProc(10, 2000), FakeProc(11, None)], graphics=[FakeProc(10, 50), FakeProc(12, 300), FakeProc(11, 40)])
    procs = probe(nv, tmp_path).snapshot().processes
    assert procs == (GpuProcess(10, 2000), GpuProcess(11, 40), GpuProcess(12, 300))


def test_processes_are_attributed_to_models_and_containers(tmp_path: Path) -> None:
    fake_proc(tmp_path, 4200, HOST_SESSION)  # our process-runtime server
    fake_proc(tmp_path, 4242, HOST_SESSION, pgid=4200)  # its worker, same process group
    fake_proc(tmp_path, 5000, DOCKER_V2_SYSTEMD)  # our container
    fake_proc(tmp_path, 5001, K8S_V2_SYSTEMD_CONTAINERD)  # a stranger's pod
    fake_proc(tmp_path, 5002, HOST_SESSION)  # a stranger on the host
    nv = FakeNvml(compute=[FakeProc(p, 100) for p in (4200, 4242, 5000, 5001, 5002, 5003)])
    owners = {"4200": "llm", CID: "sdxl"}
    procs = {p.pid: p for p in probe(nv, tmp_path, lambda: owners).snapshot().processes or ()}
    assert (procs[4200].model, procs[4200].container) == ("llm", None)
    assert (procs[4242].model, procs[4242].container) == ("llm", None)
    assert (procs[5000].model, procs[5000].container) == ("sdxl", CID[:12])
    assert (procs[5001].model, procs[5001].container) == (None, "7a0c5b1e9d8f")
    assert (procs[5002].model, procs[5002].container) == (None, None)
    assert (procs[5003].model, procs[5003].container) == (None, None)  # no /proc entry: another pid namespace


def test_owners_are_asked_again_only_for_new_pids_and_at_most_every_so_often(tmp_path: Path) -> None:
    clock = Clock()
    asked: list[float] = []
    owners: dict[str, str] = {}

    def ask() -> Mapping[str, str]:
        asked.append(clock.t)
        return dict(owners)

    nv = FakeNvml(compute=[FakeProc(10, 100)])
    p = probe(nv, tmp_path, ask, clock=clock)
    p.snapshot()
    p.snapshot()
    assert len(asked) == 1  # same pids: no new question
    owners["20"] = "sdxl"
    nv.compute.append(FakeProc(20, 100))  # a new pid appears...
    p.snapshot()
    assert len(asked) == 1  # ...but the last answer is 0 s old
    clock.t += 0.25
    snap = p.snapshot()
    assert len(asked) == 2
    assert {q.pid: q.model for q in snap.processes or ()} == {10: None, 20: "sdxl"}
    clock.t += 10  # the answer expires even when nothing changes
    p.snapshot()
    assert len(asked) == 3


def test_an_owners_failure_keeps_the_last_answer(tmp_path: Path) -> None:
    clock = Clock()
    answers: list[Mapping[str, str] | Exception] = [{"10": "llm"}, RuntimeError("docker is restarting")]

    def ask() -> Mapping[str, str]:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    p = probe(FakeNvml(compute=[FakeProc(10, 100)]), tmp_path, ask, clock=clock)
    assert p.snapshot().processes == (GpuProcess(10, 100, model="llm"),)
    clock.t += 10
    assert p.snapshot().processes == (GpuProcess(10, 100, model="llm"),)


def test_a_stuck_driver_call_times_out_and_later_calls_fail_fast(tmp_path: Path) -> None:
    nv = FakeNvml()
    p = probe(nv, tmp_path, timeout_s=0.2)
    good = p.snapshot()
    nv.hang.set()
    t0 = time.monotonic()
    with pytest.raises(ProbeTimeout, match=r"did not answer within 0\.2s"):
        p.snapshot()
    assert 0.2 <= time.monotonic() - t0 < 1.0
    time.sleep(0.25)
    t0 = time.monotonic()
    with pytest.raises(ProbeTimeout, match="has not returned for"):
        p.snapshot()  # the first call is still stuck: do not queue behind it
    assert time.monotonic() - t0 < 0.05
    last = p.last_good()
    assert last is not None and last[1] == good
    nv.hang.clear()
    nv.release.set()
    deadline = time.monotonic() + 5
    while True:  # the stuck call returns; the probe works again
        try:
            assert p.snapshot().memory == good.memory
            break
        except ProbeTimeout:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_session_initialises_once_across_threads() -> None:
    nv = FakeNvml()
    s = NvmlSession(nv)
    threads = [threading.Thread(target=s.init) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert nv.calls["nvmlInit"] == 1 and s.initialised
    s.shutdown()
    s.shutdown()
    assert nv.calls["nvmlShutdown"] == 1


def test_missing_library_and_missing_gpu_are_explained(tmp_path: Path) -> None:
    assert "not installed" in (nvml_problem(0, NvmlSession(FakeNvml(library=False))) or "")
    assert nvml_problem(3, NvmlSession(FakeNvml(devices=2))) == "GPU index 3 does not exist (NVML sees 2 GPU(s))"
    assert nvml_problem(1, NvmlSession(FakeNvml(devices=2))) is None
    with pytest.raises(NvmlUnavailable, match="not installed"):
        NvmlProbe(0, session=NvmlSession(FakeNvml(library=False)))
    with pytest.raises(NvmlUnavailable, match="GPU 2"):
        NvmlProbe(2, session=NvmlSession(FakeNvml()))


def test_the_real_library_is_absent_on_this_machine() -> None:
    """This machine has no NVIDIA driver: the real pynvml must say so, not crash."""
    problem = nvml_problem(0)
    assert problem is not None and "libnvidia-ml" in problem


def test_facts_for_doctor(tmp_path: Path) -> None:
    nv = FakeNvml(devices=2, compute=[FakeProc(1, None)])
    facts = nvml_facts(NvmlSession(nv))
    assert (facts.driver, facts.nvml_version, facts.cuda_driver_version) == ("580.95.05", "13.580.95.05", "13.0")
    assert [d.index for d in facts.devices] == [0, 1]
    d = facts.devices[0]
    assert (d.name, d.memory_info_version, d.processes, d.per_process_memory) == ("NVIDIA H100 80GB HBM3", 2, 1, False)


def test_the_thread_hand_off_costs_microseconds_not_milliseconds() -> None:
    """The NVML thread adds a queue put, a thread switch and a lock release
    to each call; a memory query itself is ~8 us on a real GPU."""
    s = NvmlSession(FakeNvml())
    s.init()
    for _ in range(200):
        s.call(lambda: None)
    direct, handed = [], []
    for _ in range(2000):
        t0 = time.perf_counter()
        (lambda: None)()
        t1 = time.perf_counter()
        s.call(lambda: None)
        t2 = time.perf_counter()
        direct.append(t1 - t0)
        handed.append(t2 - t1)
    overhead_us = (statistics.median(handed) - statistics.median(direct)) * 1e6
    print(f"NVML thread hand-off: median {overhead_us:.1f} us per call")
    assert overhead_us < 1000


def test_snapshot_cost_with_processes(tmp_path: Path) -> None:
    """A whole snapshot (memory, telemetry, 3 attributed processes) over the
    fake library: what the probe itself adds to the driver's time."""
    for pid in (10, 11, 12):
        fake_proc(tmp_path, pid, HOST_SESSION)
    p = probe(FakeNvml(compute=[FakeProc(10, 1), FakeProc(11, 1), FakeProc(12, 1)]), tmp_path, lambda: {"10": "llm"})
    for _ in range(50):
        p.snapshot()
    times = []
    for _ in range(500):
        t0 = time.perf_counter()
        p.snapshot()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"snapshot over fake NVML: p50 {times[250] * 1e6:.0f} us, p95 {times[475] * 1e6:.0f} us")
    assert times[475] < 0.005


def test_a_foreign_pod_is_named_for_the_blocked_message(tmp_path: Path) -> None:
    """Kubernetes: a GPU process that is not vramctl's is named by its Pod
    (cgroup -> pod uid -> namespace/name), and the memory wait says so."""
    from vramctl.reconcile.memory_gate import describe_process

    fake_proc(tmp_path, 5001, K8S_V2_SYSTEMD_CONTAINERD)  # a stranger's pod
    fake_proc(tmp_path, 5002, HOST_SESSION)  # a stranger on the host: no pod
    nv = FakeNvml(compute=[FakeProc(5001, 3000), FakeProc(5002, 100)])
    asked: list[str] = []

    def names(uid: str) -> str | None:
        asked.append(uid)
        return "ai/comfyui-7f9c" if uid == POD else None

    procs = {p.pid: p for p in probe(nv, tmp_path, lambda: {}, pod_names=names).snapshot().processes or ()}
    assert procs[5001].pod == "ai/comfyui-7f9c" and procs[5002].pod is None
    assert asked == [POD]
    assert describe_process(procs[5001]) == "pid 5001 (pod ai/comfyui-7f9c) 3000 MiB"
    # The API cannot tell: the uid still says which Pod.
    unnamed = probe(nv, tmp_path, lambda: {}, pod_names=lambda _uid: None).snapshot().processes or ()
    assert next(p for p in unnamed if p.pid == 5001).pod == f"uid {POD}"
