"""sleepctl against the Python stand-in: sleep, wake and state calls, each
failure as its reason, the stand-in's sleep behaviour (health still answers,
model requests 503 with Retry-After, residue growth), and the simulated GPU
that learns residues from the servers."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.builders import deployment
from tests.support.ports import free_port
from vramctl.gpu.simulated import SimulatedGpu, with_residues
from vramctl.observed import GpuMemory, GpuProcess, GpuSnapshot
from vramctl.runtimes import sleepctl
from vramctl.runtimes.sleepctl import SleepCallError
from vramctl.spec.engines import SDXL_SLEEP_API, VLLM_SLEEP_API, SleepApi

STANDIN = [sys.executable, "-m", "vramctl.demo.standin"]
API = SleepApi("/sleep", "/wake_up", "/is_sleeping")


def request(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def wait_ready(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.02)
    pytest.fail(f"stand-in on {port} not ready within {timeout}s")


@pytest.fixture
def standin() -> Iterator[Callable[..., int]]:
    procs: list[subprocess.Popen[str]] = []

    def start(**env: str) -> int:
        port = free_port()
        full = {**os.environ, "STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0", "STANDIN_STOP_SECONDS": "0"}
        full.update({f"STANDIN_{k.upper()}": v for k, v in env.items()})
        procs.append(subprocess.Popen(STANDIN, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        wait_ready(port)
        return port

    yield start
    for p in procs:
        p.kill()
        p.communicate(timeout=5)


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def test_a_sleep_cycle_through_the_client(standin: Callable[..., int]) -> None:
    port = standin(sleep_seconds="0.6", wake_seconds="0.2", residue_mib="700")
    assert sleepctl.is_sleeping(url(port), API, 2) is False
    reply = sleepctl.sleep(url(port), API, 1, timeout=5)
    assert reply.status == 200 and reply.seconds >= 0.6
    assert reply.residue_mib == 700
    assert sleepctl.is_sleeping(url(port), API, 2) is True
    # Asleep: health still answers, model requests are refused with a hint when to retry.
    assert request(port, "GET", "/health")[0] == 200
    status, headers, _ = request(port, "POST", "/v1/completions", {"model": "m", "prompt": "x"})
    assert (status, headers.get("retry-after")) == (503, "1")
    # A second sleep while asleep answers at once.
    assert sleepctl.sleep(url(port), API, 1, timeout=5).seconds < 0.6  # not a second 0.6 s sleep
    woke = sleepctl.wake(url(port), API, timeout=5)
    assert woke.seconds >= 0.2
    assert sleepctl.is_sleeping(url(port), API, 2) is False
    assert request(port, "POST", "/v1/completions", {"model": "m", "prompt": "x"})[0] == 200


def test_state_during_a_transition_is_not_asleep(standin: Callable[..., int]) -> None:
    port = standin(sleep_seconds="0.6")
    t = threading.Thread(target=sleepctl.sleep, args=(url(port), API, 2, 5))
    t.start()
    time.sleep(0.2)
    try:
        state = sleepctl.state(url(port), API, 2)
        assert state is not None and state.body["state"] == "sleeping" and state.body["is_sleeping"] is False
        assert request(port, "POST", "/v1/embeddings", {"model": "m", "input": "x"})[0] == 503
    finally:
        t.join(timeout=5)
    state = sleepctl.state(url(port), API, 2)
    assert state is not None and state.body["level"] == 2 and state.body["is_sleeping"] is True


def test_residue_grows_with_each_cycle_when_told_to(standin: Callable[..., int]) -> None:
    port = standin(sleep_seconds="0", wake_seconds="0", residue_mib="500", residue_growth_mib="100")
    seen = []
    for _ in range(3):
        seen.append(sleepctl.sleep(url(port), API, 1, 5).residue_mib)
        sleepctl.wake(url(port), API, 5)
    assert seen == [500, 600, 700]


def test_failures_carry_their_reason(standin: Callable[..., int]) -> None:
    failing = standin(sleep_status="500")
    with pytest.raises(SleepCallError) as info:
        sleepctl.sleep(url(failing), API, 1, 5)
    assert (info.value.reason, info.value.status) == ("status", 500)
    assert "HTTP 500" in str(info.value) and "/sleep?level=1" in str(info.value)
    assert sleepctl.is_sleeping(url(failing), API, 2) is False  # a failed sleep leaves it awake

    slow = standin(sleep_seconds="2")
    with pytest.raises(SleepCallError) as info:
        sleepctl.sleep(url(slow), API, 1, 0.3)
    assert info.value.reason == "timeout" and "0.3 s" in str(info.value)

    with pytest.raises(SleepCallError) as info:
        sleepctl.wake(url(free_port()), API, 1)
    assert info.value.reason == "unreachable"

    with pytest.raises(SleepCallError) as info:  # /health answers text, not {"is_sleeping": ...}
        sleepctl.is_sleeping(url(failing), SleepApi("/sleep", "/wake_up", "/health"), 2)
    assert info.value.reason == "answer"

    with pytest.raises(SleepCallError) as info:
        sleepctl.sleep(url(failing), SleepApi("/nowhere", "/wake_up", None), 1, 2)
    assert (info.value.reason, info.value.status) == ("status", 404)
    assert sleepctl.is_sleeping(url(failing), SleepApi("/s", "/w", None), 2) is None


def test_bad_level_and_bad_url_are_refused(standin: Callable[..., int]) -> None:
    port = standin()
    with pytest.raises(SleepCallError) as info:
        sleepctl.sleep(url(port), API, 3, 2)
    assert info.value.status == 400
    assert sleepctl.is_sleeping(url(port), API, 2) is False
    with pytest.raises(ValueError, match="http://host:port"):
        sleepctl.sleep("unix:///x", API, 1, 1)


def test_vllm_sleeps_with_mode_wait_and_sdxl_without() -> None:
    assert VLLM_SLEEP_API.sleep_target(1) == "/sleep?level=1&mode=wait"
    assert SDXL_SLEEP_API.sleep_target(2) == "/sleep?level=2"
    assert SleepApi("/admin?token=x", "/w", None).sleep_target(1) == "/admin?token=x&level=1"


def test_wake_broken_leaves_health_failing(standin: Callable[..., int]) -> None:
    port = standin(sleep_seconds="0", wake_seconds="0", wake_broken="1")
    sleepctl.sleep(url(port), API, 1, 5)
    assert request(port, "GET", "/health")[0] == 200
    sleepctl.wake(url(port), API, 5)
    assert request(port, "GET", "/health")[0] == 503


def sleepy_spec(port: int, **sleep: Any) -> Any:
    return deployment(
        {
            "llm": {
                "command": STANDIN,
                "vramMiB": 12000,
                "switchStrategy": "sleep",
                "sleep": {"level": 2, "path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping", **sleep},
                "health": {"path": "/health", "port": port},
            },
            "other": {"command": STANDIN, "vramMiB": 3000},
        }
    )


def test_target_of_a_model() -> None:
    spec = sleepy_spec(18111, maxResidueMiB=900, maxCycles=4)
    t = sleepctl.target_of(spec, "llm")
    assert t is not None
    assert (t.base_url, t.api, t.level, t.max_residue_mib, t.max_cycles) == ("http://127.0.0.1:18111", API, 2, 900, 4)
    assert sleepctl.target_of(spec, "other") is None
    vllm = deployment(
        {"llm": {"engine": "vllm", "image": "v", "vllm": {"model": "m", "port": 8001}, "switchStrategy": "sleep", "sleep": {"level": 2}}}
    )
    t = sleepctl.target_of(vllm, "llm")
    assert t is not None and t.base_url == "http://127.0.0.1:8001" and t.api == VLLM_SLEEP_API


def test_the_simulated_gpu_sees_what_the_server_keeps_asleep(standin: Callable[..., int]) -> None:
    port = standin(sleep_seconds="0", wake_seconds="0", residue_mib="640")
    spec = sleepy_spec(port)
    residue = sleepctl.asleep_residue(lambda: spec)
    gpu = SimulatedGpu(0, 16000, 200, 0.0, with_residues(lambda: {"llm": 12000, "other": 3000}, residue))
    assert gpu.snapshot().memory.used_mib == 200 + 15000
    assert residue("other") is None and residue("gone") is None
    sleepctl.sleep(f"http://127.0.0.1:{port}", API, 2, 5)
    assert residue("llm") == 640
    assert gpu.snapshot().memory.used_mib == 200 + 640 + 3000
    sleepctl.wake(f"http://127.0.0.1:{port}", API, 5)
    assert gpu.snapshot().memory.used_mib == 200 + 15000


def test_an_unreachable_server_counts_as_awake() -> None:
    spec = sleepy_spec(free_port())
    assert sleepctl.asleep_residue(lambda: spec, timeout=0.2)("llm") is None


def snap(used: int, procs: list[tuple[str | None, int | None]] | None) -> GpuSnapshot:
    processes = None if procs is None else tuple(GpuProcess(pid=i + 1, used_mib=mib, model=m) for i, (m, mib) in enumerate(procs))
    return GpuSnapshot(memory=GpuMemory(total_mib=81559, used_mib=used), processes=processes)


@pytest.mark.parametrize(
    ("snapshot", "others", "expected"),
    [
        (snap(9000, [("llm", 600), ("llm", 100), ("sdxl", 8000)]), 0, 700),  # per process: its own processes
        (snap(9000, [("sdxl", 8000)]), 0, 0),  # no process left: nothing held
        (snap(9000, None), 8000, 500),  # WSL2: device level over the baseline (500) less the others
        (snap(9000, [("llm", None), ("sdxl", 8000)]), 8000, 500),  # a process without a figure: device level too
        (snap(400, None), 0, 0),  # under the baseline: never negative
    ],
    ids=["per-process", "gone", "device-level", "no-figure", "never-negative"],
)
def test_held_mib(snapshot: GpuSnapshot, others: int, expected: int) -> None:
    assert sleepctl.held_mib(snapshot, "llm", 500, others) == expected


@pytest.mark.parametrize(
    ("previous", "now", "growing"),
    [
        ([], 900, False),
        ([600], 700, False),
        ([600], 728, False),  # within the tolerance (128)
        ([600], 729, True),
        ([600, 900], 800, False),
        ([600, 700, 800], 900, True),
    ],
)
def test_residue_growing(previous: list[int], now: int, growing: bool) -> None:
    assert sleepctl.residue_growing(previous, now) is growing


def test_fallback_reasons() -> None:
    assert sleepctl.fallback_reason(SleepCallError("x", "timeout"), waking=False) == "SleepTimeout"
    assert sleepctl.fallback_reason(SleepCallError("x", "status", 500), waking=False) == "SleepFailed"
    assert sleepctl.fallback_reason(SleepCallError("x", "unreachable"), waking=True) == "WakeFailed"
