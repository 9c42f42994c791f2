"""Two GPUs, one worker each: independence, a model on both GPUs, and the
invariant (at most one heavy model live per GPU) over random requests.

Each GPU has its own recording runtime (FakeRuntime: a model's name is its
ref, so one runtime per GPU) and a simulated GPU whose memory follows it;
the supervisor wires the cross-GPU claims and makes GPU 1's simulated
memory count the model on both GPUs, run by GPU 0's worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.support.builders import deployment, heavy, light
from tests.support.fakes import FakeRuntime
from tests.support.workers import wait_for
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings
from vramctl.worker.supervisor import Supervisor

RUN = WorkloadState.RUNNING
GPU_OF = {"a0": (0,), "b0": (0,), "big": (0, 1), "a1": (1,), "b1": (1,)}
HEAVY = frozenset(GPU_OF)


def specs(active0: str | None = None, active1: str | None = None) -> tuple[DeploymentSpec, DeploymentSpec]:
    d0 = deployment({"a0": heavy(8000), "b0": heavy(9000), "big": heavy(10000, gpus=[0, 1]), "t0": light(1000)}, gpu=0, activeModel=active0)
    d1 = deployment({"a1": heavy(8000), "b1": heavy(9000)}, gpu=1, activeModel=active1)
    return d0, d1


def simulated(d: DeploymentSpec, rt: FakeRuntime) -> SimulatedGpu:
    def holders() -> dict[str, int]:
        return {m: d.models[m].vram_mib or 0 for m, s in list(rt.states.items()) if s is RUN and m in d.models}

    return SimulatedGpu(d.gpu, 16000, 0, 0.0, holders)


def two_gpus(
    active0: str | None = None, active1: str | None = None, slow: Callable[[str, str], None] | None = None
) -> tuple[Supervisor, list[FakeRuntime], list[SimulatedGpu]]:
    rts, probes, workers = [], [], []
    for d in specs(active0, active1):
        rt = FakeRuntime(on_call=slow)
        probe = simulated(d, rt)
        w = GpuWorker(d, rt, probe, WorkerSettings(poll_interval_s=0.01, baseline_mib=0, resync_s=1))
        rts.append(rt)
        probes.append(probe)
        workers.append(w)
    return Supervisor(workers, rts[0], Metrics()), rts, probes


def live_heavy_by_gpu(rts: list[FakeRuntime]) -> dict[int, list[str]]:
    """Per GPU, the heavy models live on it (a model on both GPUs counts on each)."""
    out: dict[int, list[str]] = {0: [], 1: []}
    for rt in rts:
        for m, s in list(rt.states.items()):
            if s.live and m in HEAVY:
                for g in GPU_OF[m]:
                    out[g].append(m)
    return out


def steps(w: GpuWorker, model: str, step: str) -> list[float]:
    return [p["time"] for p in w.progress() if p["model"] == model and p["step"] == step]


# -- 1. independence: a slow switch on GPU 0 does not hold up GPU 1 ------------------------


def test_a_slow_switch_on_gpu0_does_not_hold_up_gpu1() -> None:
    # GPU 0's start of b0 is under way (its actuator thread inside the
    # runtime's start) until GPU 1 has switched to b1 and found it healthy, then
    # takes one more second; GPU 1's start waits until GPU 0's has begun. Were
    # GPU 1 held up by GPU 0, b1 would turn healthy only after the 5 s gate.
    b0_loading, b1_switched = threading.Event(), threading.Event()

    def slow(verb: str, model: str) -> None:
        if (verb, model) == ("start", "b0"):
            b0_loading.set()
            b1_switched.wait(5.0)
            time.sleep(1.0)
        elif (verb, model) == ("start", "b1"):
            b0_loading.wait(5.0)

    sup, rts, _ = two_gpus("a0", "a1", slow)
    w0, w1 = sup.workers[0], sup.workers[1]
    sup.start()
    try:
        assert wait_for(lambda: w0.status()["phase"] == "Ready" and w1.status()["phase"] == "Ready")
        w0.request("b0")
        w1.request("b1")
        assert wait_for(lambda: rts[1].states.get("b1") is RUN and w1.status()["phase"] == "Ready", timeout=4)
        b1_switched.set()
        assert rts[0].states.get("b0") is not RUN or w0.status()["phase"] != "Ready"  # GPU 0 still switching
        assert wait_for(lambda: w0.status()["phase"] == "Ready", timeout=10)
    finally:
        b1_switched.set()
        sup.stop()
    # From the workers' own records: GPU 1's switch began and ended while GPU 0's start was under way.
    [b0_starting], [b0_healthy] = steps(w0, "b0", "starting"), steps(w0, "b0", "healthy")
    [b1_healthy] = steps(w1, "b1", "healthy")
    assert b0_starting < b1_healthy < b0_healthy
    assert b0_healthy - b1_healthy >= 1.0  # the second GPU 0 spent loading after GPU 1 was done
    # GPU 1's switch was asked for after GPU 0's and ended before it.
    assert w1.published_status()["lastSwitch"]["durationSeconds"] < w0.published_status()["lastSwitch"]["durationSeconds"]


# -- 2. a model on both GPUs -----------------------------------------------------------------


def settle(sup: Supervisor, rts: list[FakeRuntime], ticks: int = 60) -> None:
    """Tick both workers in turn (inline stops and starts), checking the invariant after each tick."""
    for w in sup.workers.values():
        w.actuator.inline = True
    for _ in range(ticks):
        for w in sup.workers.values():
            w._drain(block=0.0)
            w._tick()
            assert all(len(ms) <= 1 for ms in live_heavy_by_gpu(rts).values()), live_heavy_by_gpu(rts)


def test_the_model_on_both_gpus_waits_for_gpu1_then_holds_both() -> None:
    sup, rts, probes = two_gpus("a0", "a1")
    w0, w1 = sup.workers[0], sup.workers[1]
    settle(sup, rts)
    assert (rts[0].states["a0"], rts[1].states["a1"]) == (RUN, RUN)

    w0.request("big")
    settle(sup, rts)
    # GPU 1 runs a1: big does not start; GPU 0 says why (a0 is stopped already: it was not wanted).
    assert rts[0].states.get("big") is None
    assert "gpu 1 is held by a1" in w0.status()["message"]
    assert w0.status()["phase"] == "Switching"

    w1.request(None)
    settle(sup, rts)
    assert rts[0].states["big"] is RUN and rts[1].states["a1"] is not RUN
    assert {p.model for p in probes[1].snapshot().processes} == {"big"}  # GPU 1's memory holds big
    assert probes[1].snapshot().memory.used_mib == 10000

    # While big holds GPU 1, GPU 1's heavy models wait; the plan says why.
    w1.request("b1")
    settle(sup, rts)
    assert rts[1].states.get("b1") is None
    assert "gpu 1 is held by big (a model on gpus 0, 1, run by gpu 0's worker)" in w1.status()["message"]

    # big leaves both GPUs at once: GPU 1's model starts once GPU 0's worker saw big stopped.
    w0.request("a0")
    settle(sup, rts)
    assert (rts[0].states["big"], rts[0].states["a0"], rts[1].states["b1"]) == (WorkloadState.EXITED, RUN, RUN)


def test_after_a_restart_gpu1_waits_for_gpu0s_first_look() -> None:
    """A supervisor restarted while big runs: GPU 1's worker must not start
    its model before GPU 0's worker has seen big."""
    sup, rts, _ = two_gpus(None, "b1")
    rts[0].states["big"] = RUN  # found running at start
    w1 = sup.workers[1]
    w1.actuator.inline = True
    for _ in range(5):
        w1._drain(block=0.0)
        w1._tick()
    assert rts[1].states.get("b1") is None
    assert "waiting for gpu 0's worker to look" in w1.status()["message"]


# -- the invariant over random requests ------------------------------------------------------

TARGETS0 = st.sampled_from(["a0", "b0", "big", None])
TARGETS1 = st.sampled_from(["a1", "b1", None])
EVENT = st.one_of(
    st.tuples(st.just(0), TARGETS0),
    st.tuples(st.just(1), TARGETS1),
    st.tuples(st.just("tick"), st.integers(0, 1)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start0=TARGETS0, start1=TARGETS1, events=st.lists(EVENT, max_size=30))
def test_at_most_one_heavy_model_per_gpu_over_random_requests(
    start0: str | None, start1: str | None, events: list[tuple[object, object]]
) -> None:
    sup, rts, _ = two_gpus(start0, start1)
    ws = sup.workers
    for w in ws.values():
        w.actuator.inline = True

    def check() -> None:
        live = live_heavy_by_gpu(rts)
        note(f"live: {live}")
        assert all(len(ms) <= 1 for ms in live.values()), live

    for kind, arg in events:
        if kind == "tick":
            assert isinstance(arg, int)
            w = ws[arg]
            w._drain(block=0.0)
            w._tick()
        else:
            assert isinstance(kind, int)
            ws[kind].request(arg if isinstance(arg, str) else None)
        check()
    # And no deadlock: GPU 1 freed, big (or whatever GPU 0 wants) ends up running.
    ws[1].request(None)
    ws[0].request("big")
    settle(sup, rts)
    assert rts[0].states.get("big") is RUN
    check()


def test_claims_take_all_or_nothing_under_contention() -> None:
    """Many threads race for the slots: the lead's big (both GPUs) against GPU 1's b1."""
    sup, _, _ = two_gpus()
    claims = sup.claims
    d0, d1 = sup.workers[0].spec, sup.workers[1].spec
    claims.publish(d0, [])
    claims.publish(d1, [])
    won: list[str] = []
    barrier = threading.Barrier(2)

    def race(d: DeploymentSpec, model: str) -> None:
        barrier.wait()
        if claims.take(d, model, 0) is None:
            won.append(model)

    threads = [threading.Thread(target=race, args=a) for a in ((d0, "big"), (d1, "b1"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
