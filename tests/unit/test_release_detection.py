"""Step 3 of the switching protocol: the old holder's memory is really back
before the next model starts. Recording fakes and the simulated GPU."""

from __future__ import annotations

import time

import pytest

from tests.support.fakes import FakeGpu, FakeRuntime
from vramctl.gpu.base import GpuInfo, ProbeTimeout
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.observed import GpuMemory, GpuProcess, GpuSnapshot, WorkloadState
from vramctl.planner import WaitForMemory
from vramctl.reconcile.memory_gate import foreign_holders, memory_problem
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings
from vramctl.worker.supervisor import holders_from

RUN, EXITED = WorkloadState.RUNNING, WorkloadState.EXITED


def spec(**kw: object) -> DeploymentSpec:
    doc = {
        "gpu": 0,
        "activeModel": "llm",
        "vramBudgetMiB": 15500,
        "models": {
            "llm": {"image": "i", "vramMiB": 12000, "startTimeoutSeconds": 5},
            "sdxl": {"image": "i", "vramMiB": 11000, "startTimeoutSeconds": 5},
            "tts": {"class": "light", "image": "i", "vramMiB": 3000},
        },
    }
    doc.update(kw)
    return DeploymentSpec.model_validate(doc)


def settings(**kw: object) -> WorkerSettings:
    s = WorkerSettings(poll_interval_s=0.01, memory_timeout_s=5, backoff_initial_s=2, backoff_max_s=16)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def timed(rt: FakeRuntime) -> dict[tuple[str, str], float]:
    """When each runtime call happened (monotonic)."""
    at: dict[tuple[str, str], float] = {}
    rt.on_call = lambda verb, model: at.setdefault((verb, model), time.monotonic())
    return at


def steps(w: GpuWorker) -> list[str]:
    return [p["step"] for p in w.progress()]


def note(w: GpuWorker, step: str) -> str:
    return next(str(p["message"]) for p in w.progress() if p["step"] == step)


# ------------------------------------------------------- simulated GPU, real time


def test_next_model_starts_only_after_the_release_and_the_latency_is_recorded() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    d = spec()
    gpu = SimulatedGpu(0, 16303, 300, 0.25, holders_from(rt, lambda: d))
    w = GpuWorker(d, rt, gpu, settings())
    w.reconcile_once()
    assert w.baseline_mib is None or w.baseline_mib == 300  # llm is live: an estimate at most
    at = timed(rt)
    w.request("sdxl", ())
    w.reconcile_once()
    assert rt.calls[-2:] == [("stop", "llm"), ("start", "sdxl")]
    assert at[("start", "sdxl")] - at[("stop", "llm")] >= 0.25
    assert w.last_release_seconds is not None and 0.25 <= w.last_release_seconds < 2.0  # the 0.25 s release, with room for a busy machine
    msg = note(w, "memory-free")
    assert "after llm exited" in msg and f"{w.last_release_seconds:.3f}s" in msg
    assert w.status()["phase"] == "Ready"


def test_a_model_that_exited_before_the_plan_is_still_waited_for() -> None:
    """llm crashed on its own: nothing to stop, but its memory is still being
    torn down when sdxl is asked for."""
    rt = FakeRuntime(states={"llm": RUN})
    d = spec()
    gpu = SimulatedGpu(0, 81559, 0, 0.3, holders_from(rt, lambda: d))  # big card: sdxl would "fit" beside it
    w = GpuWorker(d, rt, gpu, settings())
    w.reconcile_once()  # the baseline estimate's snapshot: the simulated GPU sees llm
    assert w.baseline_mib == 0
    rt.states["llm"] = EXITED
    at = timed(rt)
    t0 = time.monotonic()
    w.request("sdxl", ())
    w.reconcile_once()
    assert ("stop", "llm") not in rt.calls
    assert at[("start", "sdxl")] - t0 >= 0.3


def test_baseline_is_learned_only_when_nothing_of_ours_is_on_the_gpu() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    d = spec()
    gpu = SimulatedGpu(0, 16303, 450, 0.2, holders_from(rt, lambda: d))
    w = GpuWorker(d, rt, gpu, settings())
    w.request(None)
    w.reconcile_once()  # stops llm; its memory is released over the next 0.2 s
    rt.on_call = None
    w.reconcile_once()  # nothing live, but llm still on the GPU: not a baseline
    assert w.baseline_mib in (None, 450)
    time.sleep(0.25)
    w.reconcile_once()
    assert w.baseline_mib == 450


# ------------------------------------------------------- foreign processes


def test_a_foreign_process_blocks_quickly_and_is_named_with_its_container() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    d = spec()
    gpu = FakeGpu(rt, d)
    w = GpuWorker(d, rt, gpu, settings(baseline_mib=0, memory_timeout_s=60, foreign_grace_s=0.1))
    w.reconcile_once()
    gpu.foreign[4242] = 9000
    t0 = time.monotonic()
    w.request("sdxl", ())
    w.reconcile_once()
    assert time.monotonic() - t0 < 5  # not the 60 s memory timeout
    assert ("start", "sdxl") not in rt.calls
    st = w.status()
    assert st["phase"] == "Blocked"
    assert "not vramctl's" in st["message"] and "pid 4242 (container stranger) 9000 MiB" in st["message"]
    assert "the next model is not started" in st["message"]
    assert w.last_release_seconds is None
    gpu.foreign.clear()
    w.reconcile_once()
    assert rt.calls[-1] == ("start", "sdxl") and w.status()["phase"] == "Ready"


def test_a_small_foreign_process_inside_the_baseline_does_not_block() -> None:
    """A desktop's Xorg (graphics, 300 MiB) was there when the baseline was learned."""
    rt = FakeRuntime()
    d = spec(activeModel=None)
    gpu = FakeGpu(rt, d)
    gpu.foreign[1500] = 300
    w = GpuWorker(d, rt, gpu, settings(foreign_grace_s=0.0))
    w.reconcile_once()
    assert w.baseline_mib == 300
    w.request("llm", ())
    w.reconcile_once()
    w.request("sdxl", ())
    w.reconcile_once()
    assert rt.calls == [("start", "llm"), ("stop", "llm"), ("start", "sdxl")]
    assert w.status()["phase"] == "Ready"


def snap(used: int, procs: tuple[GpuProcess, ...] | None, total: int = 16000) -> GpuSnapshot:
    return GpuSnapshot(GpuMemory(total, used), procs)


WAIT = WaitForMemory(released=("llm",), need_free_mib=11000, max_used_mib=256)


@pytest.mark.parametrize(
    ("s", "problem", "culprits"),
    [
        (snap(100, ()), None, []),
        (snap(100, None), None, []),  # WSL2: memory alone decides
        (snap(12100, (GpuProcess(7, 12000, "llm"),)), "still held by llm (pid 7, 12000 MiB)", []),
        (snap(12100, (GpuProcess(7, None, "llm"),)), "still held by llm (pid 7)", []),
        # Released from the list but not yet from memory: a release under way, not a stranger.
        (snap(12100, (GpuProcess(9, 300, container="abc"),)), "12100 MiB used", []),
        (snap(9100, (GpuProcess(9, 9000, container="abc"),)), "pid 9 (container abc) 9000 MiB", [GpuProcess(9, 9000, container="abc")]),
        # WSL2: a process without a figure cannot be shown to be the reason.
        (snap(9100, (GpuProcess(9, None),)), "held by processes that are not vramctl's: pid 9", []),
        (snap(9100, None), "9100 MiB used, 6900 MiB free, need 11000 MiB free and at most 256 MiB used", []),
    ],
)
def test_memory_problem_and_foreign_holders(s: GpuSnapshot, problem: str | None, culprits: list[GpuProcess]) -> None:
    got = memory_problem(s, WAIT)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got
    assert foreign_holders(s, WAIT) == culprits


def test_kept_companions_are_not_lingering() -> None:
    s = snap(3200, (GpuProcess(5, 3000, "tts"),))
    w = WaitForMemory(released=("llm",), need_free_mib=11000, max_used_mib=3256)
    assert memory_problem(s, w, frozenset({"tts"})) is None
    assert memory_problem(s, w) == "still held by tts (pid 5, 3000 MiB)"


# ------------------------------------------------------- unknown baseline, failing probe


def test_baseline_is_estimated_from_per_process_figures_after_a_restart() -> None:
    """Restarted while llm runs on a GPU whose baseline is 700 MiB: a baseline
    of 0 would make the bound 256 MiB and block every switch."""
    rt = FakeRuntime(states={"llm": RUN})
    d = spec()
    gpu = FakeGpu(rt, d, baseline_mib=700)
    w = GpuWorker(d, rt, gpu, settings(memory_timeout_s=0.2))
    w.reconcile_once()
    assert w.baseline_mib == 700
    w.request("sdxl", ())
    w.reconcile_once()
    assert rt.calls[-1] == ("start", "sdxl") and w.status()["phase"] == "Ready"


def test_without_per_process_figures_an_unknown_baseline_drops_the_bound() -> None:
    """WSL2 after a restart: no baseline can be known yet; the switch goes by
    free memory, which on a 16 GB card proves llm's 12 GB came back."""
    rt = FakeRuntime(states={"llm": RUN})
    d = spec()
    gpu = FakeGpu(rt, d, baseline_mib=700, per_process=False)
    w = GpuWorker(d, rt, gpu, settings(memory_timeout_s=0.2))
    w.reconcile_once()
    assert w.baseline_mib is None
    w.request("sdxl", ())
    w.reconcile_once()
    assert rt.calls[-1] == ("start", "sdxl")
    assert "at most" not in note(w, "waiting-memory")
    w.request("llm", ())
    w.reconcile_once()
    assert rt.calls[-2:] == [("stop", "sdxl"), ("start", "llm")]
    w.request(None)
    w.reconcile_once()
    w.reconcile_once()  # nothing of ours live: now it is learned
    assert w.baseline_mib == 700


class FlakyProbe:
    """A probe whose driver stops answering for ``fail`` snapshots."""

    kind = "flaky"

    def __init__(self, inner: FakeGpu, fail: int) -> None:
        self.inner, self.fail = inner, fail

    def info(self) -> GpuInfo:
        return self.inner.info()

    def snapshot(self) -> GpuSnapshot:
        if self.fail > 0:
            self.fail -= 1
            raise ProbeTimeout("NVML did not answer within 2.0s; GPU state unknown")
        return self.inner.snapshot()


def test_a_probe_that_does_not_answer_is_never_taken_as_free() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    d = spec()
    probe = FlakyProbe(FakeGpu(rt, d), fail=0)
    w = GpuWorker(d, rt, probe, settings(baseline_mib=0, memory_timeout_s=0.2))
    w.reconcile_once()
    probe.fail = 10**6
    w.request("sdxl", ())
    w.reconcile_once()
    assert ("start", "sdxl") not in rt.calls
    st = w.status()
    assert st["phase"] == "Blocked" and "the GPU probe did not answer" in st["message"]
    probe.fail = 3  # answers again after a few polls
    for _ in range(5):  # Blocked is settled: each call looks once more
        w.reconcile_once()
    assert rt.calls[-1] == ("start", "sdxl")


def test_a_companion_started_after_the_heavy_model_does_not_wait_for_it() -> None:
    """llm is started by the same plan before tts: its processes on the GPU are
    not leftovers of anything, and tts must not wait for them to leave."""
    rt = FakeRuntime()
    d = spec(companions=["tts"])
    gpu = SimulatedGpu(0, 16303, 300, 0.2, holders_from(rt, lambda: d))
    w = GpuWorker(d, rt, gpu, settings(memory_timeout_s=1))
    t0 = time.monotonic()
    w.reconcile_once()
    assert rt.calls == [("start", "llm"), ("start", "tts")]
    assert time.monotonic() - t0 < 0.5
    assert w.status()["phase"] == "Ready"
