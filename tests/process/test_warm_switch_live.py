"""Warm switching live: ``vramctl up`` with the process runtime, the simulated
GPU (an asleep model holds the residue its server reports) and the Python
stand-in's sleep API. A warm switch and back, every fall-back reason,
eviction, and vramctl SIGKILLed while a model goes to sleep and while one wakes
(restarted, it finds the sleeping model and keeps it asleep)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.support.live_up import LiveUp
from tests.support.warm_live import metric, model_states, no_violation, progress, sleepy, steps, switch_to, up


def test_a_warm_switch_and_back(live: list[LiveUp], tmp_path: Path) -> None:
    u = up(live, tmp_path, {"llm": sleepy(), "sdxl": sleepy()})
    switch_to(u, "sdxl", llm="asleep", sdxl="running")
    switch_to(u, "llm", llm="running", sdxl="asleep")
    got = steps(u)
    for step in [("sleeping", "llm"), ("asleep", "llm"), ("sleeping", "sdxl"), ("waking", "llm"), ("awake", "llm")]:
        assert step in got, got
    assert ("stopping", "llm") not in got and ("starting", "llm") not in got[got.index(("sleeping", "llm")) :]
    assert metric(u, "vramctl_switch_duration_seconds_count", strategy="warm") == 1
    assert metric(u, "vramctl_model_sleep_residue_bytes", model="llm") == 600 * (1 << 20)
    no_violation(u)


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"STANDIN_SLEEP_STATUS": "500"}, "SleepFailed"),
        ({"STANDIN_RESIDUE_MIB": "3000"}, "ResidueOverLimit"),
    ],
)
def test_a_sleep_that_fails_goes_the_cold_way(live: list[LiveUp], tmp_path: Path, env: dict[str, str], reason: str) -> None:
    u = up(live, tmp_path, {"llm": sleepy(**env), "sdxl": sleepy()})
    switch_to(u, "sdxl", sdxl="running")
    assert model_states(u)["llm"] in ("stopped", "absent")
    assert any(s == "SleepFallback" and m == "llm" and reason in msg for s, m, msg in progress(u)), progress(u)
    assert metric(u, "vramctl_sleep_fallbacks_total", reason=reason) == 1
    no_violation(u)


def test_a_residue_growing_across_cycles_goes_the_cold_way(live: list[LiveUp], tmp_path: Path) -> None:
    u = up(live, tmp_path, {"llm": sleepy(STANDIN_RESIDUE_GROWTH_MIB="300"), "sdxl": sleepy()})
    switch_to(u, "sdxl", llm="asleep")
    switch_to(u, "llm", llm="running")
    switch_to(u, "sdxl", sdxl="running")
    assert metric(u, "vramctl_sleep_fallbacks_total", reason="ResidueGrowing") == 1
    assert model_states(u)["llm"] in ("stopped", "absent")


def test_max_cycles_goes_the_cold_way(live: list[LiveUp], tmp_path: Path) -> None:
    u = up(live, tmp_path, {"llm": sleepy(cycles=1), "sdxl": sleepy()})
    switch_to(u, "sdxl", llm="asleep")
    switch_to(u, "llm", llm="running")
    switch_to(u, "sdxl", sdxl="running")
    assert metric(u, "vramctl_sleep_fallbacks_total", reason="MaxCycles") == 1
    assert model_states(u)["llm"] in ("stopped", "absent")


def test_a_wake_that_never_becomes_healthy_goes_the_cold_way(live: list[LiveUp], tmp_path: Path) -> None:
    u = up(live, tmp_path, {"llm": sleepy(STANDIN_WAKE_BROKEN="1"), "sdxl": sleepy()})
    switch_to(u, "sdxl", llm="asleep")
    switch_to(u, "llm", llm="running", sdxl="asleep")
    got = steps(u)
    assert ("waking", "llm") in got and ("SleepFallback", "llm") in got and ("starting", "llm") in got
    assert metric(u, "vramctl_sleep_fallbacks_total", reason="WakeFailed") == 1
    no_violation(u)


def test_sleeping_models_are_evicted_least_recently_used_first(live: list[LiveUp], tmp_path: Path) -> None:
    # 11000 + two residues of 3000 do not fit 16000 - 256: the oldest sleeper goes.
    u = up(live, tmp_path, {"a": sleepy(residue=3000), "b": sleepy(residue=3000), "c": sleepy(residue=3000)}, active="a")
    switch_to(u, "b", a="asleep")
    switch_to(u, "c", b="asleep", c="running")
    assert model_states(u)["a"] in ("stopped", "absent")
    assert any(s == "stopping" and m == "a" and "evicted" in msg for s, m, msg in progress(u))
    no_violation(u)


@pytest.mark.parametrize("during", ["sleeping", "waking"])
def test_vramctl_killed_while_a_model_sleeps_or_wakes(live: list[LiveUp], tmp_path: Path, during: str) -> None:
    slow = {"STANDIN_SLEEP_SECONDS": "1.5"} if during == "sleeping" else {"STANDIN_WAKE_SECONDS": "1.5"}
    models = {"llm": sleepy(**slow), "sdxl": sleepy()}
    u = up(live, tmp_path, models)
    if during == "waking":
        switch_to(u, "sdxl", llm="asleep")
        target = "llm"
    else:
        target = "sdxl"
    assert u.post({"model": target})[0] == 202
    deadline = time.monotonic() + 10
    while (during, "llm") not in steps(u):
        assert time.monotonic() < deadline, steps(u)
        time.sleep(0.02)
    assert u.proc is not None
    u.proc.send_signal(signal.SIGKILL)
    u.proc.wait(5)
    u.start(wait_ready=False)  # the same state dir: it adopts the models it finds
    other = "llm" if target == "sdxl" else "sdxl"
    switch_to_existing(u, target, other)
    no_violation(u)


def switch_to_existing(u: LiveUp, model: str, other: str) -> None:
    """Ready with ``model`` running and ``other`` asleep (kept asleep) or stopped; never both awake."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        g = u.gpu()
        got = model_states(u)
        assert not (got.get(model) == "running" and got.get(other) == "running"), got
        if (
            g["phase"] == "Ready"
            and g["activeModel"] == model
            and got.get(model) == "running"
            and got.get(other) in ("asleep", "stopped", "absent")
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"{u.gpu()} {model_states(u)}\n{u.log_text()[-3000:]}")
