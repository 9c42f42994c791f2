"""Fall-backs that really fall back, and faults found before anything stops.

- a wake that answers but never gets healthy stops the model at its start
  timeout and goes the cold way (stop, confirm the memory, start), without
  waiting out a second start timeout (issue 18, item 5);
- the sleep timeout is the model's own (``sleep.timeoutSeconds``, by default
  derived from its size), and a hung ``/sleep`` falls back at it (item 6);
- a health port already answered by a foreign server (a squatter) refuses
  the switch in the preflight, naming the port: the working model is never
  stopped for it, whether the squatter was there when the switch was asked
  or came between the request and the loop's look (item 7).

Recording fakes for the runtime and sleep API, a clock the test moves, and
a real HTTP server on 127.0.0.1 for the squatter.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from tests.support.clock import ManualClock
from tests.support.fakes import FakeGpu, FakeRuntime, FakeSleeper
from tests.support.ports import free_port
from vramctl.observed import WorkloadState
from vramctl.reconcile.warm import HttpSleeper
from vramctl.runtimes.sleepctl import SleepCallError, fallback_reason
from vramctl.spec.models import DeploymentSpec, DesiredStateError, ModelSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING


def sleepy(port: int, vram: int) -> dict[str, Any]:
    return {
        "image": "i",
        "vramMiB": vram,
        "startTimeoutSeconds": 5,
        "health": {"port": port, "path": "/health"},
        "switchStrategy": "sleep",
        "sleep": {"level": 2, "maxResidueMiB": 800, "path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"},
    }


def spec(llm_port: int, sdxl_port: int) -> DeploymentSpec:
    return DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "llm",
            "vramBudgetMiB": 15500,
            "models": {"llm": sleepy(llm_port, 12000), "sdxl": sleepy(sdxl_port, 11000)},
        }
    )


def rig(d: DeploymentSpec, rt: FakeRuntime, clock: ManualClock) -> GpuWorker:
    s = WorkerSettings(poll_interval_s=0.05, memory_timeout_s=30, backoff_initial_s=30, resync_s=5, baseline_mib=0)
    return GpuWorker(d, rt, FakeGpu(rt, d), s, sleeper=FakeSleeper(rt), clock=clock, sleep=clock.sleep)


def steps(w: GpuWorker) -> list[str]:
    return [str(p["step"]) for p in w.progress()]


# ------------------------------------------------------------------ item 5


def test_a_wake_never_healthy_is_stopped_at_its_start_timeout_and_started_cold() -> None:
    rt = FakeRuntime(states={"llm": RUN})
    clock = ManualClock()
    w = rig(spec(free_port(), free_port()), rt, clock)
    w.reconcile_once()
    w.request("sdxl", ())
    w.reconcile_once()
    assert rt.calls == [("sleep", "llm"), ("start", "sdxl")]
    at: dict[tuple[str, str], float] = {}

    def on_call(verb: str, model: str) -> None:
        at.setdefault((verb, model), clock())
        if (verb, model) == ("stop", "llm"):
            rt.never_healthy.discard("llm")  # a fresh process comes up fine

    rt.on_call = on_call
    rt.never_healthy.add("llm")  # the wake answers, health stays 503
    w.request("llm", ())
    w.reconcile_once(max_ticks=2000)
    assert rt.calls[2:] == [("sleep", "sdxl"), ("wake", "llm"), ("stop", "llm"), ("start", "llm")]
    # Stopped at its start timeout (5 s), not after a second one.
    assert 5.0 <= at[("stop", "llm")] - at[("wake", "llm")] < 6.0
    got = steps(w)
    after = got[got.index("SleepFallback") :]
    assert after.index("stopping") < after.index("stopped") < after.index("memory-free") < after.index("starting")
    assert w.status()["phase"] == "Ready" and w.model_states()["llm"] == "running"
    assert w.status()["lastSwitch"]["outcome"] == "success"


# ------------------------------------------------------------------ item 7


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def squatter() -> Iterator[int]:
    """A foreign server answering 200 on every path of a loopback port."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_a_squatted_health_port_refuses_the_switch_before_anything_stops(squatter: int) -> None:
    rt = FakeRuntime(states={"llm": RUN})
    w = rig(spec(free_port(), squatter), rt, ManualClock())
    w.reconcile_once()
    with pytest.raises(DesiredStateError) as err:
        w.request("sdxl", ())
    assert f"port {squatter}" in str(err.value) and "nothing was stopped" in str(err.value)
    assert err.value.field == "activeModel"
    w.reconcile_once()
    assert rt.calls == [] and rt.states["llm"] is RUN and w.desired.active == "llm"


def test_a_squatter_that_came_after_the_request_is_found_before_the_stop() -> None:
    port = free_port()
    rt = FakeRuntime(states={"llm": RUN})
    w = rig(spec(free_port(), port), rt, ManualClock())
    w.reconcile_once()
    w.request("sdxl", ())  # the port is free now
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Health)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        w.reconcile_once()
        assert ("sleep", "llm") not in rt.calls and ("stop", "llm") not in rt.calls and rt.states["llm"] is RUN
        st = w.status()
        assert st["phase"] == "Failed" and f"port {port}" in st["message"] and st["runningModels"] == ["llm"]
        assert any(c["type"] == "Degraded" and c["reason"] == "PortInUse" for c in st["conditions"])
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)
    w.request("sdxl", ())  # the squatter is gone: the switch goes ahead
    w.reconcile_once()
    assert rt.states["sdxl"] is RUN and w.status()["phase"] == "Ready"


def test_a_port_shared_with_the_model_it_replaces_is_not_a_squatter(squatter: int) -> None:
    """Two models on one port (one runs at a time): the running one answers
    its port; that is no reason to refuse the switch."""
    rt = FakeRuntime(states={"llm": RUN})
    w = rig(spec(squatter, squatter), rt, ManualClock())
    w.reconcile_once()
    w.request("sdxl", ())  # not refused in the preflight
    assert w.desired.active == "sdxl"


# ------------------------------------------------------------------ item 6


class _HungSleep(http.server.BaseHTTPRequestHandler):
    """A model server whose /sleep never answers (until the test ends)."""

    release = threading.Event()

    def do_POST(self) -> None:
        self.release.wait(30)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_sleep_timeout_is_the_models_own_and_a_hung_sleep_falls_back_at_it() -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HungSleep)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    port = int(srv.server_address[1])
    try:
        doc = sleepy(port, 12000)
        doc["sleep"]["timeoutSeconds"] = 0.5
        d = DeploymentSpec.model_validate({"gpu": 0, "activeModel": "llm", "models": {"llm": doc}})
        t0 = time.monotonic()
        with pytest.raises(SleepCallError) as err:
            HttpSleeper().sleep(d, "llm")
        assert time.monotonic() - t0 < 3  # its own 0.5 s, not a fixed 60 s
        assert fallback_reason(err.value, waking=False) == "SleepTimeout"
    finally:
        _HungSleep.release.set()
        srv.shutdown()
        srv.server_close()
        t.join(5)


@pytest.mark.parametrize(
    ("doc", "low", "high"),
    [
        ({"vramMiB": 2048, "sleep": {"level": 1, "hostMemoryMiB": 2048}}, 10, 20),  # small: seconds, not a minute
        (
            {"vramMiB": 14336, "sleep": {"level": 1, "hostMemoryMiB": 14336}},
            30,
            60,
        ),  # 14 GiB copied to pageable host memory: about 11 s measured
        ({"vramMiB": 14336, "sleep": {"level": 2}}, 10, 20),  # level 2 drops the weights: no copy
        ({"vramMiB": 14336, "sleep": {"level": 1, "hostMemoryMiB": 14336, "timeoutSeconds": 7}}, 7, 7),
    ],
)
def test_the_default_sleep_timeout_follows_the_models_size(doc: dict[str, Any], low: float, high: float) -> None:
    m = ModelSpec.model_validate(
        {
            "image": "i",
            "switchStrategy": "sleep",
            "health": {"port": 9, "path": "/h"},
            **doc,
            "sleep": {"path": "/sleep", "wakePath": "/wake_up", **doc["sleep"]},
        }
    )
    assert low <= m.sleep_timeout_seconds <= high


def test_a_sleep_timeout_that_is_not_positive_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        ModelSpec.model_validate(
            {
                "image": "i",
                "switchStrategy": "sleep",
                "health": {"port": 9, "path": "/h"},
                "sleep": {"path": "/sleep", "wakePath": "/wake_up", "timeoutSeconds": 0},
            }
        )
    assert "timeoutSeconds" in str(err.value)
