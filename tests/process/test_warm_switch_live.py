"""Warm switching live: ``vramctl up`` with the process runtime, the simulated
GPU (an asleep model holds the residue its server reports) and the Python
stand-in's sleep API. A warm switch and back, every fall-back reason,
eviction, and vramctl SIGKILLed while a model goes to sleep and while one wakes
(restarted, it finds the sleeping model and keeps it asleep)."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_up import LiveUp, free_port, standin

SLEEP_API = {"path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"}


def sleepy(vram: int = 11000, residue: int = 1024, cycles: int | None = None, **env: str) -> dict[str, Any]:
    m = standin(
        free_port(), vram=vram, **{"STANDIN_SLEEP_SECONDS": "0.1", "STANDIN_WAKE_SECONDS": "0.1", "STANDIN_RESIDUE_MIB": "600", **env}
    )
    m["switchStrategy"] = "sleep"
    m["sleep"] = {"level": 2, "maxResidueMiB": residue, **SLEEP_API, **({"maxCycles": cycles} if cycles else {})}
    m["startTimeoutSeconds"] = 4
    return m


def cfg(models: dict[str, Any], active: str = "llm") -> dict[str, Any]:
    return {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16000, "releaseDelaySeconds": 0.05},
        "gpus": [{"gpu": 0, "activeModel": active, "models": models}],
    }


@pytest.fixture
def live(tmp_path: Path) -> Iterator[list[LiveUp]]:
    ups: list[LiveUp] = []
    yield ups
    for up in ups:
        up.stop()
        up.kill_models()


def up(live: list[LiveUp], tmp: Path, models: dict[str, Any], active: str = "llm") -> LiveUp:
    u = LiveUp(tmp, cfg(models, active))
    live.append(u)
    u.start()
    return u


def model_states(u: LiveUp) -> dict[str, str]:
    """The state whose vramctl_model_state series is 1, per model."""
    with urllib.request.urlopen(u.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("vramctl_model_state{") and line.endswith(" 1.0"):
            labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1 : line.index("}")].split(","))
            out[labels["model"].strip('"')] = labels["state"].strip('"')
    return out


def metric(u: LiveUp, name: str, **labels: str) -> float:
    with urllib.request.urlopen(u.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def progress(u: LiveUp) -> list[tuple[str, str | None, str]]:
    with urllib.request.urlopen(u.url + "/status?since=0", timeout=10) as r:
        body = json.loads(r.read())
    return [(p["step"], p.get("model"), p.get("message", "")) for p in body.get("progress", [])]


def steps(u: LiveUp) -> list[tuple[str, str | None]]:
    return [(s, m) for s, m, _ in progress(u)]


def switch_to(u: LiveUp, model: str, **want: str) -> None:
    assert u.post({"model": model})[0] == 202
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        g = u.gpu()
        if g["phase"] == "Ready" and g["activeModel"] == model and g["observedGeneration"] >= g["desiredGeneration"]:
            got = model_states(u)
            if all(got.get(m) == v for m, v in want.items()):
                return
        time.sleep(0.05)
    raise AssertionError(f"{model} not ready with {want}: {u.gpu()} {model_states(u)}\n{u.log_text()[-3000:]}")


def no_violation(u: LiveUp) -> None:
    assert metric(u, "vramctl_exclusivity_violations_total") == 0


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
