"""switchStrategy checkpoint through the real binding and strategy code
(``CudaBindingsDriver``, ``CheckpointSleeper``, ``StrategySleeper``) over a
fake ``cuda.bindings.driver`` that plays the driver's state machine: the
calls made and their order, every process of the model taken together, and
each failure undone as far as the driver lets and raised with its
SleepFallback reason."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.support.fake_cuda import CUresult, FakeCu, FakeCudaGpu, S
from vramctl.runtimes import sleepctl
from vramctl.runtimes.checkpoint import (
    Availability,
    CheckpointError,
    CheckpointSleeper,
    StrategySleeper,
    open_driver,
    rss_mib,
)
from vramctl.spec.models import DeploymentSpec, ModelSpec

LLM_PIDS = (4101, 4102)  # a server and its worker process
TTS_PID = 4200


def spec() -> DeploymentSpec:
    return DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "llm",
            "models": {
                "llm": {"command": ["llm"], "vramMiB": 20000, "switchStrategy": "checkpoint", "sleep": {"hostMemoryMiB": 22000}},
                "tts": {"command": ["tts"], "vramMiB": 4000, "switchStrategy": "checkpoint", "sleep": {"hostMemoryMiB": 4500}},
                "web": {"command": ["web"], "vramMiB": 9000},
            },
        }
    )


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def pause(self, s: float) -> None:
        self.t += s


def rig(free_mib: int | None = 200_000, **cu_kw: Any) -> tuple[FakeCu, FakeCudaGpu, CheckpointSleeper]:
    cu = FakeCu(
        processes={LLM_PIDS[0]: S.CU_PROCESS_STATE_RUNNING, LLM_PIDS[1]: S.CU_PROCESS_STATE_RUNNING, TTS_PID: S.CU_PROCESS_STATE_RUNNING},
        **cu_kw,
    )
    gpu = FakeCudaGpu(cu, lambda: {LLM_PIDS[0]: ("llm", 12000), LLM_PIDS[1]: ("llm", 6000), TTS_PID: ("tts", 3000)})
    driver, availability = open_driver(cu, "fake-bindings 1.0")
    assert driver is not None, availability
    clock = Clock()
    sleeper = CheckpointSleeper(
        driver,
        availability,
        gpu.snapshot,
        lock_timeout_ms=2500,
        confirm_timeout_s=1.0,
        available_mib=lambda: free_mib,
        clock=clock,
        pause=clock.pause,
    )
    return cu, gpu, sleeper


def states(cu: FakeCu) -> dict[int, str]:
    return {pid: st.name.removeprefix("CU_PROCESS_STATE_") for pid, st in cu.processes.items()}


# ------------------------------------------------------------ at start


def test_the_driver_is_checked_at_start() -> None:
    driver, a = open_driver(FakeCu(), "fake-bindings 1.0")
    assert driver is not None and a.available and a.cuda_version == 13000
    assert "CUDA 13.0" in a.describe()


@pytest.mark.parametrize(
    ("cu", "wsl2", "why"),
    [
        (FakeCu(version=12040), False, "needs 12.8 (driver 570) or newer"),
        (FakeCu(init=CUresult.CUDA_ERROR_NO_DEVICE), False, "cuInit failed: CUDA_ERROR_NO_DEVICE"),
        (FakeCu(missing=True), False, "cannot be called"),
        (FakeCu(), True, "WSL2 has no checkpoint API"),
    ],
)
def test_where_the_api_is_missing_the_reason_is_said(cu: FakeCu, wsl2: bool, why: str) -> None:
    driver, a = open_driver(cu, "fake-bindings 1.0", wsl2=wsl2)
    assert driver is None and not a.available
    assert why in a.why


# ------------------------------------------------------------ away and back


def test_away_and_back_takes_every_process_of_the_model_together() -> None:
    cu, gpu, sl = rig()
    d = spec()
    assert sl.sleep(d, "llm") == 0
    assert cu.steps() == ["lock", "lock", "checkpoint", "checkpoint"]
    assert {pid for _, pid in cu.calls} == set(LLM_PIDS)  # the other model's process is never touched
    assert cu.lock_timeouts == [2500, 2500]
    assert states(cu) == {LLM_PIDS[0]: "CHECKPOINTED", LLM_PIDS[1]: "CHECKPOINTED", TTS_PID: "RUNNING"}
    assert [p.model for p in gpu.snapshot().processes or ()] == ["tts"]  # they left NVML's list
    assert sl.done["llm"].gpu_mib == 18000
    assert sl.is_sleeping(d, "llm") is True
    assert sl.is_sleeping(d, "tts") is None  # never checkpointed, no runtime map: unknown (the book decides)
    cu.calls.clear()
    sl.wake(d, "llm")
    assert cu.steps() == ["restore", "unlock", "restore", "unlock"]
    assert states(cu)[LLM_PIDS[0]] == "RUNNING" and states(cu)[LLM_PIDS[1]] == "RUNNING"
    assert "llm" not in sl.done
    assert sorted(p.pid for p in gpu.snapshot().processes or ()) == [*LLM_PIDS, TTS_PID]


def test_a_restarted_supervisor_finds_a_checkpointed_model_through_the_runtime() -> None:
    cu, gpu, sl = rig()
    sl.sleep(spec(), "llm")
    again = CheckpointSleeper(sl.driver, sl.availability, gpu.snapshot, owners=lambda d: {str(LLM_PIDS[0]): "llm", "abc123": "tts"})
    assert again.is_sleeping(spec(), "llm") is True
    assert again.is_sleeping(spec(), "tts") is None
    again.confirm_timeout_s = 0.5
    again.wake(spec(), "llm")  # restores what it found: the leader
    assert states(cu)[LLM_PIDS[0]] == "RUNNING"


# ------------------------------------------------------------ fall-backs


def test_a_lock_timeout_unlocks_what_was_locked() -> None:
    cu, _, sl = rig()
    cu.fail["lock"] = CUresult.CUDA_ERROR_TIMEOUT
    with pytest.raises(CheckpointError) as err:
        sl.sleep(spec(), "llm")
    assert err.value.fallback == "SleepTimeout"
    assert sleepctl.fallback_reason(err.value, waking=False) == "SleepTimeout"
    assert set(states(cu).values()) == {"RUNNING"}


def test_a_second_lock_that_fails_unlocks_the_first() -> None:
    cu, _, sl = rig()
    cu.processes[LLM_PIDS[1]] = S.CU_PROCESS_STATE_RUNNING
    real = cu.cuCheckpointProcessLock

    def lock(pid: int, args: Any) -> Any:
        return (CUresult.CUDA_ERROR_NOT_SUPPORTED,) if pid == LLM_PIDS[1] else real(pid, args)

    cu.cuCheckpointProcessLock = lock  # type: ignore[method-assign]
    with pytest.raises(CheckpointError) as err:
        sl.sleep(spec(), "llm")
    assert err.value.fallback == "CheckpointRefused"  # the driver says it cannot (IPC, managed memory)
    assert cu.calls[-1] == ("unlock", LLM_PIDS[0])
    assert set(states(cu).values()) == {"RUNNING"}


@pytest.mark.parametrize(
    ("code", "reason"), [(CUresult.CUDA_ERROR_UNKNOWN, "SleepFailed"), (CUresult.CUDA_ERROR_NOT_SUPPORTED, "CheckpointRefused")]
)
def test_a_checkpoint_that_fails_leaves_the_processes_running(code: CUresult, reason: str) -> None:
    cu, _, sl = rig()
    cu.fail["checkpoint"] = code
    with pytest.raises(CheckpointError) as err:
        sl.sleep(spec(), "llm")
    assert err.value.fallback == reason
    assert cu.steps()[-2:] == ["unlock", "unlock"]
    assert set(states(cu).values()) == {"RUNNING"}
    assert "llm" not in sl.done


def test_memory_not_released_is_over_the_residue() -> None:
    _, gpu, sl = rig()
    gpu.keep_listed = {LLM_PIDS[1]}
    with pytest.raises(CheckpointError) as err:
        sl.sleep(spec(), "llm")
    assert err.value.fallback == "ResidueOverLimit"
    assert str(LLM_PIDS[1]) in str(err.value)
    assert sl.clock() >= 1.0  # it waited out confirm_timeout_s


def test_a_checkpoint_that_would_not_fit_host_memory_is_refused_before_the_lock() -> None:
    cu, _, sl = rig(free_mib=15000)
    with pytest.raises(CheckpointError) as err:
        sl.sleep(spec(), "llm")
    assert err.value.fallback == "CheckpointRefused"
    assert "19800 MiB of host memory" in str(err.value)  # 18000 MiB on the GPU x 1.1
    assert cu.calls == []


def test_a_model_with_no_process_on_the_gpu_is_refused() -> None:
    cu, gpu, sl = rig()
    gpu.hide = set(LLM_PIDS)
    with pytest.raises(CheckpointError, match="no CUDA process") as err:
        sl.sleep(spec(), "llm")
    assert err.value.fallback == "CheckpointRefused" and cu.calls == []


@pytest.mark.parametrize("step", ["restore", "unlock"])
def test_a_restore_that_fails_is_a_failed_wake(step: str) -> None:
    cu, _, sl = rig()
    sl.sleep(spec(), "llm")
    cu.fail[step] = CUresult.CUDA_ERROR_UNKNOWN
    with pytest.raises(CheckpointError) as err:
        sl.wake(spec(), "llm")
    assert err.value.fallback == "WakeFailed"
    assert sleepctl.fallback_reason(err.value, waking=True) == "WakeFailed"
    assert sl.is_sleeping(spec(), "llm") is True  # never taken for awake: the fall-back stops it


def test_a_restored_process_that_does_not_come_back_to_the_gpu_is_a_failed_wake() -> None:
    _, gpu, sl = rig()
    sl.sleep(spec(), "llm")
    gpu.hide = {LLM_PIDS[0]}
    with pytest.raises(CheckpointError, match="does not list") as err:
        sl.wake(spec(), "llm")
    assert err.value.fallback == "WakeFailed"
    assert sl.is_sleeping(spec(), "llm") is True  # running per the driver, but not back on the GPU


def test_without_the_api_every_checkpoint_is_refused_with_the_reason() -> None:
    gpu = FakeCudaGpu(FakeCu(), dict)
    sl = CheckpointSleeper(None, Availability(False, "WSL2 has no checkpoint API"), gpu.snapshot)
    with pytest.raises(CheckpointError, match="WSL2 has no checkpoint API") as err:
        sl.sleep(spec(), "llm")
    assert err.value.fallback == "CheckpointRefused"
    assert sl.is_sleeping(spec(), "llm") is None


# ------------------------------------------------------------ by strategy


class ServerSleeper:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def sleep(self, spec: DeploymentSpec, model: str) -> int | None:
        self.calls.append(("sleep", model))
        return 700

    def wake(self, spec: DeploymentSpec, model: str) -> None:
        self.calls.append(("wake", model))

    def is_sleeping(self, spec: DeploymentSpec, model: str) -> bool | None:
        return False


def test_each_model_sleeps_its_own_way_and_the_driver_is_loaded_at_start() -> None:
    cu, gpu, _ = rig()
    loads: list[int] = []

    def load() -> Any:
        loads.append(1)
        return open_driver(cu, "fake-bindings 1.0")

    server = ServerSleeper()
    s = StrategySleeper(server, gpu.snapshot, load=load)
    d = spec()
    plain = DeploymentSpec.model_validate({"gpu": 0, "models": {"web": {"command": ["web"]}}})
    assert s.prepare(plain) is None and loads == []  # no checkpoint model: nothing loaded
    a = s.prepare(d)
    assert a is not None and a.available and loads == [1]
    assert s.sleep(d, "llm") == 0 and s.sleep(d, "web") == 700
    s.wake(d, "llm")
    assert server.calls == [("sleep", "web")]
    assert loads == [1]  # once


# ------------------------------------------------------------ the spec


def test_the_spec_of_a_checkpoint_model() -> None:
    m = spec().models["llm"]
    assert m.warm_switch and m.sleep_api is None and m.host_memory_asleep_mib == 22000
    with pytest.raises(ValidationError, match=r"sleep\.hostMemoryMiB"):
        ModelSpec.model_validate({"command": ["x"], "switchStrategy": "checkpoint"})
    with pytest.raises(ValidationError, match=r"remove sleep\.path"):
        ModelSpec.model_validate({"command": ["x"], "switchStrategy": "checkpoint", "sleep": {"hostMemoryMiB": 1, "path": "/sleep"}})
    with pytest.raises(ValidationError, match="heavy"):
        ModelSpec.model_validate({"command": ["x"], "class": "light", "switchStrategy": "checkpoint", "sleep": {"hostMemoryMiB": 1}})
    # any engine: the SDXL server with its own sleep API off
    sd = ModelSpec.model_validate(
        {
            "engine": "sdxl",
            "sdxl": {"modelPath": "/m.safetensors"},
            "image": "i",
            "switchStrategy": "checkpoint",
            "sleep": {"hostMemoryMiB": 18000},
        }
    )
    assert sd.sleep_api is None and sd.warm_switch


def test_rss_is_read_from_proc(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Name:\tpython\nVmRSS:\t 10485760 kB\n")
    assert rss_mib(7, tmp_path) == 10240
    assert rss_mib(8, tmp_path) is None


def test_a_checkpoint_that_takes_more_host_memory_than_declared_is_said(caplog: pytest.LogCaptureFixture) -> None:
    me = os.getpid()  # a real process: its RSS is read from /proc
    cu = FakeCu(processes={me: S.CU_PROCESS_STATE_RUNNING})
    gpu = FakeCudaGpu(cu, lambda: {me: ("llm", 100)})
    driver, availability = open_driver(cu, "fake")
    sl = CheckpointSleeper(driver, availability, gpu.snapshot, available_mib=lambda: None)
    d = DeploymentSpec.model_validate(
        {"gpu": 0, "models": {"llm": {"command": ["x"], "switchStrategy": "checkpoint", "sleep": {"hostMemoryMiB": 1}}}}
    )
    with caplog.at_level(logging.WARNING, logger="vramctl.runtimes.checkpoint"):
        sl.sleep(d, "llm")
    rss = sl.host_mib("llm")
    assert rss is not None and rss > 1
    assert f"takes {rss} MiB of host memory while checkpointed, more than its sleep.hostMemoryMiB 1" in caplog.text


def test_doctor_says_whether_checkpoint_switching_is_available() -> None:
    from vramctl.doctor import Facts, checks
    from vramctl.spec.models import Config

    cfg = Config.model_validate(
        {"runtime": "process", "gpus": [{"name": "g", "gpu": 0, "models": spec().model_dump(by_alias=True)["models"]}]}
    )

    def line(a: Availability) -> tuple[str, str]:
        f = Facts(cfg, "test.yaml", "no NVML here", True, "no engine", None, a)
        c = next(c for c in checks(f) if c.name == "checkpoint")
        return c.level, c.message

    level, msg = line(Availability(False, "WSL2 has no checkpoint API: models with switchStrategy checkpoint are stopped"))
    assert level == "WARN" and "WSL2 has no checkpoint API" in msg and "g/llm, g/tts will be stopped instead" in msg
    level, msg = line(Availability(True, "the driver's checkpoint API answers", 13000, "cuda-bindings 13.0"))
    assert level == "OK" and "available (CUDA 13.0; cuda-bindings 13.0)" in msg


def test_a_restarted_supervisor_finds_a_checkpointed_container_by_its_host_pids(tmp_path: Path) -> None:
    """The docker runtime names its models by container id; a checkpointed
    process has left NVML's list, so only /proc still ties it to its model.
    Before, a restarted supervisor asked the driver about no pid at all and
    took the checkpointed container (whose /health still answers) for awake."""
    from tests.support.cgroup_samples import CID, DOCKER_V2_SYSTEMD, HOST_SESSION
    from vramctl.gpu.cgroups import with_container_processes

    for pid, text in ((LLM_PIDS[0], DOCKER_V2_SYSTEMD), (LLM_PIDS[1], DOCKER_V2_SYSTEMD), (999, HOST_SESSION)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
    (tmp_path / "self").mkdir()
    cu, gpu, sl = rig()
    sl.sleep(spec(), "llm")

    by_container = CheckpointSleeper(sl.driver, sl.availability, gpu.snapshot, owners=lambda d: {CID: "llm"})
    assert by_container.is_sleeping(spec(), "llm") is None  # what the container id alone tells the driver: nothing

    found = with_container_processes({CID: "llm"}, proc=tmp_path)
    assert found == {CID: "llm", str(LLM_PIDS[0]): "llm", str(LLM_PIDS[1]): "llm"}  # not the host session's process
    again = CheckpointSleeper(sl.driver, sl.availability, gpu.snapshot, owners=lambda d: with_container_processes({CID: "llm"}, proc=tmp_path))
    assert again.is_sleeping(spec(), "llm") is True
    again.confirm_timeout_s = 0.5
    again.wake(spec(), "llm")
    assert states(cu)[LLM_PIDS[0]] == "RUNNING" and states(cu)[LLM_PIDS[1]] == "RUNNING"


def test_owners_by_pid_are_not_scanned(tmp_path: Path) -> None:
    from vramctl.gpu.cgroups import with_container_processes

    assert with_container_processes({"4101": "llm"}, proc=tmp_path / "absent") == {"4101": "llm"}


def test_an_awake_model_is_asked_about_once_not_at_every_look() -> None:
    """The worker asks at every look whether a checkpoint model sleeps. Once
    the driver said it runs, and until this sleeper checkpoints it, the
    answer is known: no listing of the runtime's owners (a container listing
    under docker, a /proc scan), no driver calls."""
    cu, _, sl = rig()
    asked: list[str] = []

    def counting(d: DeploymentSpec) -> dict[str, str]:
        asked.append("owners")
        return {str(LLM_PIDS[0]): "llm", str(LLM_PIDS[1]): "llm", str(TTS_PID): "tts"}

    sl.owners = counting
    assert sl.is_sleeping(spec(), "llm") is False
    calls = len(cu.calls)
    for _ in range(5):
        assert sl.is_sleeping(spec(), "llm") is False
    assert asked == ["owners"] and len(cu.calls) == calls
    sl.sleep(spec(), "llm")
    assert sl.is_sleeping(spec(), "llm") is True  # checkpointed by this sleeper: the driver's word again
    sl.wake(spec(), "llm")
    assert sl.is_sleeping(spec(), "llm") is False
