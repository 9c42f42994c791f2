"""The worker's protocol on recording fakes: order of effects, Blocked,
back-off, coalescing, gating, conditions. Real engines are in tests/docker."""

from __future__ import annotations

import pytest

from tests.support.fakes import FakeClock, FakeGpu, FakeRuntime
from tests.support.workers import spec
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec, DesiredStateError
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING


class Sink:
    def __init__(self) -> None:
        self.writes: list[dict[str, object]] = []

    def write_status(self, gpu: int, status: dict[str, object]) -> None:
        self.writes.append(status)


def worker(rt: FakeRuntime, d: DeploymentSpec | None = None, **settings: object) -> tuple[GpuWorker, FakeGpu, Sink]:
    d = d or spec()
    gpu = FakeGpu(rt, d)
    sink = Sink()
    s = WorkerSettings(poll_interval_s=0.001, memory_timeout_s=0.05, backoff_initial_s=2, backoff_max_s=16, baseline_mib=0)
    for k, v in settings.items():
        setattr(s, k, v)
    return GpuWorker(d, rt, gpu, s, status_sink=sink), gpu, sink


def test_switch_stops_waits_then_starts_and_records() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, gpu, _ = worker(rt)
    w.reconcile_once()
    assert rt.calls == []
    assert w.status()["phase"] == "Ready"
    w.request("sdxl", ())
    snaps_before = gpu.snapshots
    w.reconcile_once()
    assert rt.calls == [("stop", "llm"), ("start", "sdxl")]
    assert gpu.snapshots > snaps_before  # memory was confirmed between stop and start
    st = w.status()
    assert st["phase"] == "Ready" and st["runningModels"] == ["sdxl"]
    assert st["lastSwitch"]["from"] == "llm" and st["lastSwitch"]["to"] == "sdxl" and st["lastSwitch"]["outcome"] == "success"
    steps = [p["step"] for p in w.progress()]
    assert steps.index("stopped") < steps.index("memory-free") < steps.index("starting") < steps.index("healthy")


def test_second_pass_does_nothing() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, _, sink = worker(rt)
    w.request("sdxl", ())
    w.reconcile_once()
    calls, writes = list(rt.calls), len(sink.writes)
    w.reconcile_once()
    assert rt.calls == calls
    assert len(sink.writes) == writes  # status written only when it changed


def test_foreign_process_blocks_and_names_it() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, gpu, _ = worker(rt)
    gpu.foreign[4242] = 9000
    w.request("sdxl", ())
    w.reconcile_once()
    assert ("start", "sdxl") not in rt.calls
    st = w.status()
    assert st["phase"] == "Blocked"
    assert "pid 4242" in st["message"] and "stranger" in st["message"]
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "MemoryNotReleased"
    gpu.foreign.clear()
    w.reconcile_once()
    assert rt.calls[-1] == ("start", "sdxl")
    assert w.status()["phase"] == "Ready"


def test_crash_on_start_fails_with_logs_and_backs_off() -> None:
    clock = FakeClock()
    rt = FakeRuntime(states={"llm": RUN}, crash_on_start={"sdxl"})
    d = spec()
    gpu = FakeGpu(rt, d)
    s = WorkerSettings(poll_interval_s=0.001, memory_timeout_s=1, backoff_initial_s=2, backoff_max_s=16, baseline_mib=0)
    w = GpuWorker(d, rt, gpu, s, clock=clock)
    w.request("sdxl", ())
    w.reconcile_once()
    st = w.status()
    assert st["phase"] == "Failed" and "exit code 3" in st["message"] and "sdxl: boom" in st["message"]
    starts = lambda: sum(1 for c in rt.calls if c == ("start", "sdxl"))  # noqa: E731
    assert starts() == 1
    for _ in range(5):  # no thrashing: passes within the back-off window start nothing
        w.reconcile_once()
    assert starts() == 1
    clock.t += 2.01
    w.reconcile_once()
    assert starts() == 2
    clock.t += 2.01  # second failure doubled the wait to 4 s
    w.reconcile_once()
    assert starts() == 2
    clock.t += 2.0
    w.reconcile_once()
    assert starts() == 3
    assert w.status()["backoff"]["sdxl"] == pytest.approx(8, abs=0.1)


def test_start_error_is_failed_not_crash() -> None:
    rt = FakeRuntime(fail_start={"llm": "image i not found locally"})
    w, _, _ = worker(rt)
    w.reconcile_once()
    st = w.status()
    assert st["phase"] == "Failed" and "image i not found" in st["message"]


def test_health_timeout_stops_the_model() -> None:
    clock = FakeClock()
    rt = FakeRuntime(never_healthy={"llm"})
    probe = rt.check_health

    def slow_probe(deployment: DeploymentSpec, model: str) -> bool:
        clock.t += 1  # each probe "takes" a second; startTimeoutSeconds is 5
        return probe(deployment, model)

    rt.check_health = slow_probe  # type: ignore[method-assign]
    d = spec()
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.001, baseline_mib=0), clock=clock)
    w.reconcile_once()
    assert rt.calls == [("start", "llm"), ("stop", "llm")]
    assert w.status()["phase"] == "Failed" and "did not become healthy" in w.status()["message"]


def test_latest_request_wins_and_stop_in_flight_completes() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, _, _ = worker(rt)

    def during(verb: str, model: str) -> None:
        if (verb, model) == ("stop", "llm"):
            w.request("sdxl", ())  # arrives while llm is being stopped...
            w.request(None, ())  # ...and is superseded at once: free the GPU

    rt.on_call = during
    w.request("sdxl", ())
    w.reconcile_once()  # the stop finishes; the start of sdxl is abandoned
    assert rt.calls == [("stop", "llm")]
    w.reconcile_once()
    assert rt.calls == [("stop", "llm")]
    assert w.status()["phase"] == "Idle"


def test_companion_that_does_not_fit_is_rejected_and_nothing_changes() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, _, _ = worker(rt)
    gen = w.desired.generation
    with pytest.raises(DesiredStateError, match=r"llm 12000 \+ big 5000 = 17000 MiB > vramBudgetMiB 15500"):
        w.request("llm", ("big",))
    assert w.desired.generation == gen
    w.reconcile_once()
    assert rt.calls == []


def test_gated_start_is_paused_and_becomes_desired() -> None:
    from vramctl.runtimes.base import StartEvent

    rt = FakeRuntime(states={"llm": RUN, "tts": RUN})
    w, _, _ = worker(rt, spec(companions=["tts"]))
    w.reconcile_once()
    rt.states["sdxl"] = RUN  # docker compose --profile sdxl up -d
    w.gate_start(StartEvent("sdxl", 0, "abc", True))
    assert rt.calls == []  # only queued: the worker's loop decides
    w.reconcile_once()
    assert w.desired.active == "sdxl" and w.desired.companions == ("tts",)
    assert rt.calls == [("pause", "sdxl"), ("stop", "llm"), ("start", "sdxl")]
    assert rt.states == {"llm": WorkloadState.EXITED, "tts": RUN, "sdxl": RUN}


def test_own_start_is_not_gated() -> None:
    from vramctl.runtimes.base import StartEvent

    rt = FakeRuntime()
    w, _, _ = worker(rt)

    def echo(verb: str, model: str) -> None:
        if verb == "start":
            w.gate_start(StartEvent(model, 0, model, True))

    rt.on_call = echo
    w.reconcile_once()
    assert ("pause", "llm") not in rt.calls


def test_conditions_flip_times_only_on_change() -> None:
    clock_wall = FakeClock()
    rt = FakeRuntime(states={"llm": RUN})
    d = spec()
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.001, baseline_mib=0), wall=clock_wall)
    w.reconcile_once()
    ready = lambda: next(c for c in w.status()["conditions"] if c["type"] == "Ready")  # noqa: E731
    t1 = ready()["lastTransitionTime"]
    clock_wall.t += 3600
    w.reconcile_once()
    assert ready()["lastTransitionTime"] == t1 and ready()["status"] == "True"


def test_switch_keeps_companions_that_fit_and_drops_the_rest() -> None:
    models = {
        "llm": {"image": "i", "vramMiB": 10000},
        "sdxl": {"image": "i", "vramMiB": 12000},
        "tts": {"class": "light", "image": "i", "vramMiB": 3000},
        "big": {"class": "light", "image": "i", "vramMiB": 2000},
    }
    d = spec(models=models, companions=["tts", "big"], vramBudgetMiB=15500)  # 10000 + 3000 + 2000 fits
    rt = FakeRuntime(states={"llm": RUN, "tts": RUN, "big": RUN})
    w, _, _ = worker(rt, d)
    w.reconcile_once()
    assert w.request("sdxl").companions == ("tts",)  # sdxl 12000 + tts 3000 fits; + big 2000 would not
    w.reconcile_once()
    assert any(p["step"] == "dropped" and p["model"] == "big" for p in w.progress())
    assert rt.states["big"] is WorkloadState.EXITED and rt.states["tts"] is RUN
    assert w.request(None).companions == ()  # "no model" frees the whole GPU
