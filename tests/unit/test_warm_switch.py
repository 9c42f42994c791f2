"""Warm switching through the real worker on recording fakes (FakeSleeper):
a switch puts the old model to sleep and a switch back wakes it; every
fall-back reason stops the model and goes the cold way with a SleepFallback
step; sleeping models are evicted cheapest to bring back cold first (the
cost book), least recently used among equals; a restarted
worker finds its sleeping models and keeps them asleep."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.support.clock import ManualClock, until
from tests.support.fakes import FakeGpu, FakeRuntime, FakeSleeper
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings

RUN = WorkloadState.RUNNING


def sleepy(port: int, vram: int = 12000, residue: int = 800, **sleep: Any) -> dict[str, Any]:
    return {
        "image": "i",
        "vramMiB": vram,
        "startTimeoutSeconds": 1,
        "health": {"port": port, "path": "/health"},
        "switchStrategy": "sleep",
        "sleep": {"level": 2, "maxResidueMiB": residue, "path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping", **sleep},
    }


def spec(budget: int = 15500, **llm_sleep: Any) -> DeploymentSpec:
    return DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "llm",
            "vramBudgetMiB": budget,
            "models": {
                "llm": sleepy(19001, 12000, **llm_sleep),
                "sdxl": sleepy(19002, 11000),
                "cold": {"image": "i", "vramMiB": 9000, "startTimeoutSeconds": 1},
            },
        }
    )


def rig(d: DeploymentSpec, rt: FakeRuntime, clock: ManualClock | None = None) -> tuple[GpuWorker, FakeSleeper, Metrics]:
    gpu = FakeGpu(rt, d)
    metrics = Metrics(CollectorRegistry())
    s = WorkerSettings(poll_interval_s=0.01, memory_timeout_s=5, backoff_initial_s=30, resync_s=5, baseline_mib=0)
    sleeper = FakeSleeper(rt)
    clock = clock or ManualClock()  # waits (a wake's health, idle) pass in no real time
    w = GpuWorker(d, rt, gpu, s, metrics=metrics, sleeper=sleeper, clock=clock, sleep=clock.sleep)
    return w, sleeper, metrics


def steps(w: GpuWorker) -> list[tuple[str, str | None]]:
    return [(p["step"], p.get("model")) for p in w.progress()]


def switch(w: GpuWorker, model: str | None) -> None:
    w.request(model, ())
    w.reconcile_once()


def test_a_switch_puts_the_old_model_to_sleep_and_a_switch_back_wakes_it() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, _, metrics = rig(spec(), rt)
    w.reconcile_once()
    switch(w, "sdxl")
    assert rt.calls == [("sleep", "llm"), ("start", "sdxl")]
    assert w.model_states()["llm"] == "asleep" and w.model_states()["sdxl"] == "running"
    switch(w, "llm")
    assert rt.calls[2:] == [("sleep", "sdxl"), ("wake", "llm")]
    assert w.model_states() == {"llm": "running", "sdxl": "asleep", "cold": "absent"}
    assert w.status()["runningModels"] == ["llm"] and w.status()["asleepModels"] == ["sdxl"]
    assert w.status()["phase"] == "Ready"
    got = steps(w)
    for step in [("sleeping", "sdxl"), ("asleep", "sdxl"), ("waking", "llm"), ("awake", "llm")]:
        assert step in got
    assert ("stopping", "llm") not in got
    reg = metrics.registry
    assert reg.get_sample_value("vramctl_switch_duration_seconds_count", {"gpu": "0", "strategy": "warm"}) == 1
    assert reg.get_sample_value("vramctl_switch_duration_seconds_count", {"gpu": "0", "strategy": "cold"}) == 1
    assert reg.get_sample_value("vramctl_model_sleep_residue_bytes", {"gpu": "0", "model": "sdxl"}) == 500 * (1 << 20)
    assert reg.get_sample_value("vramctl_exclusivity_violations_total", {"gpu": "0"}) == 0


def test_a_model_that_cannot_sleep_is_stopped_and_the_switch_goes_on_cold() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, sleeper, metrics = rig(spec(), rt)
    w.reconcile_once()
    sleeper.fail_sleep["llm"] = "status"
    switch(w, "sdxl")
    assert rt.calls == [("sleep", "llm"), ("stop", "llm"), ("start", "sdxl")]
    assert ("SleepFallback", "llm") in steps(w)
    assert metrics.registry.get_sample_value("vramctl_sleep_fallbacks_total", {"gpu": "0", "reason": "SleepFailed"}) == 1
    assert w.status()["phase"] == "Ready"


def test_a_sleep_that_times_out_falls_back() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, sleeper, metrics = rig(spec(), rt)
    w.reconcile_once()
    sleeper.fail_sleep["llm"] = "timeout"
    switch(w, "sdxl")
    assert ("stop", "llm") in rt.calls and rt.states["sdxl"] is RUN
    assert metrics.registry.get_sample_value("vramctl_sleep_fallbacks_total", {"gpu": "0", "reason": "SleepTimeout"}) == 1


def test_a_residue_over_the_limit_falls_back() -> None:
    rt = FakeRuntime(states={"llm": RUN}, residue={"llm": 3000})  # maxResidueMiB 800
    w, _, metrics = rig(spec(residueSettleSeconds=0.1), rt)
    w.reconcile_once()
    switch(w, "sdxl")
    assert rt.calls == [("sleep", "llm"), ("stop", "llm"), ("start", "sdxl")]
    assert any(p["step"] == "SleepFallback" and "3000 MiB" in p["message"] for p in w.progress())
    assert metrics.registry.get_sample_value("vramctl_sleep_fallbacks_total", {"gpu": "0", "reason": "ResidueOverLimit"}) == 1


def test_a_residue_growing_across_cycles_falls_back() -> None:
    rt = FakeRuntime(states={"llm": RUN}, residue={"llm": 100})
    w, sleeper, metrics = rig(spec(), rt)
    sleeper.grow["llm"] = 200  # 300, 500, ...
    w.reconcile_once()
    switch(w, "sdxl")
    switch(w, "llm")
    assert ("stop", "llm") not in rt.calls
    switch(w, "sdxl")  # second sleep: 500 MiB > 300 + 128
    assert rt.calls[-2:] == [("stop", "llm"), ("wake", "sdxl")]
    assert metrics.registry.get_sample_value("vramctl_sleep_fallbacks_total", {"gpu": "0", "reason": "ResidueGrowing"}) == 1
    switch(w, "llm")  # started cold: a fresh process
    assert rt.calls[-2:] == [("sleep", "sdxl"), ("start", "llm")]


def test_a_wake_that_fails_or_is_not_healthy_in_time_falls_back_to_a_cold_start() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, sleeper, metrics = rig(spec(), rt)
    w.reconcile_once()
    switch(w, "sdxl")
    sleeper.fail_wake["llm"] = "unreachable"
    switch(w, "llm")
    assert rt.calls[-4:] == [("sleep", "sdxl"), ("wake", "llm"), ("stop", "llm"), ("start", "llm")]
    assert w.model_states()["llm"] == "running"
    switch(w, "sdxl")
    rt.never_healthy.add("llm")  # woken, never healthy (startTimeoutSeconds 1)
    w.request("llm", ())
    w.reconcile_once(max_ticks=30)
    for _ in range(200):
        w.reconcile_once(max_ticks=5)
        if ("stop", "llm") in rt.calls[6:]:
            break
    assert ("wake", "llm") in rt.calls[6:] and ("stop", "llm") in rt.calls[6:]
    assert metrics.registry.get_sample_value("vramctl_sleep_fallbacks_total", {"gpu": "0", "reason": "WakeFailed"}) == 2


def test_max_cycles_stops_the_model_instead_of_a_sleep() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, _, metrics = rig(spec(maxCycles=1), rt)
    w.reconcile_once()
    switch(w, "sdxl")
    switch(w, "llm")
    switch(w, "sdxl")
    assert rt.calls == [("sleep", "llm"), ("start", "sdxl"), ("sleep", "sdxl"), ("wake", "llm"), ("stop", "llm"), ("wake", "sdxl")]
    assert metrics.registry.get_sample_value("vramctl_sleep_fallbacks_total", {"gpu": "0", "reason": "MaxCycles"}) == 1
    switch(w, "llm")  # cold started: its cycles start over
    assert rt.calls[-2:] == [("sleep", "sdxl"), ("start", "llm")]


def four_sleepers() -> DeploymentSpec:
    return DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "a",  # no vramBudgetMiB: the GPU's 16000 MiB less the 256 MiB margin
            "models": {m: sleepy(19010 + i, 11000, 2000) for i, m in enumerate(("a", "b", "c", "d"))},
        }
    )


def cold_starts(w: GpuWorker, **seconds: float) -> None:
    """The cost book's cold starts (three each: a start the test makes, measured 0 s, leaves the median)."""
    for m, s in seconds.items():
        for _ in range(3):
            w.reporter.costs.record(m, "start", s)


def test_sleeping_models_are_evicted_cheapest_to_bring_back_cold_first() -> None:
    rt = FakeRuntime(states={"a": RUN}, residue={m: 1500 for m in "abcd"})
    w, _, _ = rig(four_sleepers(), rt)
    cold_starts(w, a=60.0, b=20.0, c=20.0, d=20.0)  # a: a vLLM cold start; the others cheaper
    w.reconcile_once()
    switch(w, "b")
    switch(w, "c")
    switch(w, "d")  # three residues beside d do not fit: a is the least recently used, but b is cheaper to bring back
    assert ("stop", "b") in rt.calls and ("stop", "a") not in rt.calls
    assert w.model_states()["a"] == "asleep" and w.model_states()["c"] == "asleep"


def test_sleeping_models_equally_costly_are_evicted_least_recently_used_first() -> None:
    rt = FakeRuntime(states={"a": RUN}, residue={m: 1500 for m in "abcd"})
    w, _, _ = rig(four_sleepers(), rt)
    cold_starts(w, a=20.0, b=20.0, c=20.0, d=20.0)
    w.reconcile_once()
    switch(w, "b")  # 11000 + a 2000 fits 15744
    switch(w, "c")  # 11000 + a 2000 + b 2000 = 15000 fits
    assert ("stop", "a") not in rt.calls
    switch(w, "d")  # 11000 + three residues does not: a (least recently used) goes
    assert ("stop", "a") in rt.calls and ("stop", "b") not in rt.calls
    assert w.model_states()["b"] == "asleep" and w.model_states()["c"] == "asleep"
    switch(w, "b")  # woken; c and d sleep
    assert rt.calls[-1] == ("wake", "b")


def test_a_restarted_worker_finds_its_sleeping_models_and_keeps_them_asleep() -> None:
    rt = FakeRuntime(states={"llm": RUN, "sdxl": RUN}, asleep={"llm"})
    d = spec()
    w, _, metrics = rig(d.model_copy(update={"active_model": "sdxl"}), rt)
    w.request("sdxl", ())
    w.reconcile_once()
    assert rt.calls == []
    assert w.model_states()["llm"] == "asleep" and w.status()["phase"] == "Ready"
    assert metrics.registry.get_sample_value("vramctl_exclusivity_violations_total", {"gpu": "0"}) == 0
    switch(w, "llm")
    assert rt.calls == [("sleep", "sdxl"), ("wake", "llm")]


def test_a_model_with_switch_strategy_stop_is_stopped_as_before() -> None:
    rt = FakeRuntime(states={"cold": RUN})
    w, _, _ = rig(spec(), rt)
    switch(w, "sdxl")
    assert rt.calls == [("stop", "cold"), ("start", "sdxl")]


def test_freeing_the_gpu_stops_sleeping_models_too_and_idle_sleep_keeps_them_asleep() -> None:
    """`vramctl switch ''` (and idle action free) frees the GPU: a model that
    can sleep is stopped, and so is one already asleep (nothing of them stays
    on the GPU or in host memory). Idle action sleep puts it to sleep instead."""
    rt = FakeRuntime(states={"llm": RUN})
    w, _, _ = rig(spec(), rt)
    w.reconcile_once()
    switch(w, "sdxl")
    assert w.model_states()["llm"] == "asleep"
    switch(w, None)
    assert rt.calls[-2:] == [("stop", "llm"), ("stop", "sdxl")] or rt.calls[-2:] == [("stop", "sdxl"), ("stop", "llm")]
    assert ("sleep", "sdxl") not in rt.calls
    assert w.status()["phase"] == "Idle" and "asleepModels" not in w.status()

    rt2 = FakeRuntime(states={"llm": RUN})
    w2, _, _ = rig(spec(), rt2)
    w2.reconcile_once()
    w2.request(None, (), source="idle (sleep)", keep_asleep=True)
    w2.reconcile_once()
    assert rt2.calls == [("sleep", "llm")] and w2.model_states()["llm"] == "asleep"
    assert w2.desired.keep_asleep


@pytest.mark.parametrize(("action", "calls", "state"), [("sleep", [("sleep", "llm")], "asleep"), ("free", [("stop", "llm")], "stopped")])
def test_idle_sleep_puts_the_model_to_sleep_and_idle_free_stops_it(action: str, calls: list[tuple[str, str]], state: str) -> None:
    base = spec().model_dump(by_alias=True, exclude_none=True)
    d = DeploymentSpec.model_validate({**base, "idle": {"afterSeconds": 0.3, "action": action}})
    rt = FakeRuntime(states={"llm": RUN})
    clock = ManualClock()
    w, _, _ = rig(d, rt, clock)
    w.start()
    try:
        t0 = clock()
        assert until(lambda: w.model_states().get("llm") == state, clock, w, step=0.05)
        assert clock() - t0 >= 0.3  # after idle.afterSeconds
        assert rt.calls == calls and w.model_states()["llm"] == state
        assert w.status()["phase"] == "Idle"
    finally:
        w.stop()


def test_a_sleep_with_no_start_after_it_is_still_checked_and_said() -> None:
    """Sleeping the GPU's model with nothing to start after it (idle action
    sleep, `switch --sleep`): the residue check and its `asleep` step used to
    run only inside the memory wait before a start, so no start, no check:
    no `asleep` event for /events and the page, and a model holding more than
    its maxResidueMiB stayed on the GPU for good."""
    rt = FakeRuntime(states={"llm": RUN}, residue={"llm": 500})  # within maxResidueMiB 800
    w, _, _ = rig(spec(residueSettleSeconds=0.1), rt)
    w.reconcile_once()
    w.request(None, (), source="idle (sleep)", keep_asleep=True)
    w.reconcile_once()
    assert rt.calls == [("sleep", "llm")]
    assert ("asleep", "llm") in steps(w)
    assert w.model_states()["llm"] == "asleep" and w.status()["phase"] == "Idle"


def test_a_sleep_with_no_start_after_it_over_its_residue_limit_is_stopped() -> None:
    rt = FakeRuntime(states={"llm": RUN}, residue={"llm": 3000})  # maxResidueMiB 800
    w, _, metrics = rig(spec(residueSettleSeconds=0.1), rt)
    w.reconcile_once()
    w.request(None, (), source="idle (sleep)", keep_asleep=True)
    w.reconcile_once()
    assert rt.calls == [("sleep", "llm"), ("stop", "llm")]
    assert any(p["step"] == "SleepFallback" and "3000 MiB" in p["message"] for p in w.progress())
    assert metrics.registry.get_sample_value("vramctl_sleep_fallbacks_total", {"gpu": "0", "reason": "ResidueOverLimit"}) == 1
    assert w.model_states()["llm"] == "stopped" and w.status()["phase"] == "Idle"


def test_the_memory_free_message_says_which_model_slept_and_which_exited() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w, _, _ = rig(spec(), rt)
    w.reconcile_once()
    switch(w, "sdxl")  # llm goes to sleep
    freed = [p["message"] for p in w.progress() if p["step"] == "memory-free"]
    assert freed and "llm went to sleep" in freed[-1] and "exited" not in freed[-1], freed
    switch(w, "cold")  # sdxl goes to sleep; llm, asleep, stays (it fits) or is stopped
    freed = [p["message"] for p in w.progress() if p["step"] == "memory-free"]
    assert "sdxl went to sleep" in freed[-1], freed
