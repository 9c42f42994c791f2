"""While the runtime (the Docker engine, the API server) cannot be asked,
the status says so (issue 18, item 9): phase ``Unknown`` with the engine
named in the message, every model that was seen ``unknown`` rather than
running, and ``vramctl status`` saying it on its first line. When the
runtime answers again the status is the loop's own again.

The worker runs on recording fakes with a clock the test moves; the CLI
reads a status document from a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.clock import ManualClock, until
from tests.support.fakes import FakeGpu, FakeRuntime
from tests.support.workers import three_heavy, wait_for
from vramctl.cli import main
from vramctl.observed import WorkloadState
from vramctl.reconcile.errors import Outage, classify
from vramctl.runtimes.base import TransientError
from vramctl.spec.models import DeploymentSpec
from vramctl.status.book import PHASES
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING


class EngineDown(FakeRuntime):
    """The fake runtime with an engine that can go away."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.down = threading.Event()
        self.kind = "docker"

    def observe(self, deployment: DeploymentSpec):  # type: ignore[no-untyped-def]
        if self.down.is_set():
            raise TransientError("Error while fetching server API version: connection refused")
        return super().observe(deployment)


def test_an_unreachable_engine_makes_the_phase_unknown_and_the_models_unknown() -> None:
    rt = EngineDown(states={"llm": RUN, "tts": RUN})
    d = three_heavy()
    d = DeploymentSpec.model_validate({**d.model_dump(by_alias=True, exclude_none=True), "companions": ["tts"]})
    clock = ManualClock()
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.02, baseline_mib=0, resync_s=5), clock=clock)
    w.start()
    try:
        assert wait_for(lambda: w.status()["phase"] == "Ready")
        rt.down.set()
        assert until(lambda: w.status()["phase"] == "Unknown", clock, w, step=1.0)
        st = w.status()
        assert "Docker engine" in st["message"] and "unreachable" in st["message"], st["message"]
        assert st["runningModels"] == [] and st["modelStates"] == {"llm": "unknown", "tts": "unknown"}
        assert st["activeModel"] == "llm"  # the desired state stays
        rt.down.clear()
        assert until(lambda: w.status()["phase"] == "Ready", clock, w, step=0.5)
        st = w.status()
        assert st["runningModels"] == ["llm", "tts"] and st["modelStates"] == {"llm": "running", "tts": "running"}
    finally:
        w.stop()


def test_unknown_is_a_documented_phase() -> None:
    assert "Unknown" in PHASES


class _Status(http.server.BaseHTTPRequestHandler):
    doc: dict[str, Any] = {}

    def do_GET(self) -> None:
        body = json.dumps(self.doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_vramctl_status_says_the_engine_is_unreachable_on_its_first_line(api: str, capsys: pytest.CaptureFixture[str]) -> None:
    message = "the Docker engine is unreachable (connection refused); models are unknown until it answers"
    _Status.doc = {
        "gpus": {
            "0": {"phase": "Unknown", "message": message, "activeModel": "llm", "runningModels": [], "modelStates": {"llm": "unknown"}},
            "1": {"phase": "Ready", "message": "sdxl ready", "activeModel": "sdxl", "runningModels": ["sdxl"]},
        }
    }
    assert main(["status", "--url", api]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Docker engine is unreachable" in lines[0], lines
    gpu0 = next(line for line in lines if line.startswith("gpu 0:"))
    assert "running=unknown" in gpu0 and "Unknown" in gpu0


def test_an_outage_of_hours_keeps_its_retry_bounded() -> None:
    """1,024 failed tries (17 minutes at 1 s) overflowed the back-off's
    exponent: every tick then failed as an internal error."""
    c = classify(TransientError("connection refused"))
    o = Outage(c, 0.0)
    delays = [o.again(c, float(i)) for i in range(5000)]
    assert delays[:4] == pytest.approx([0.2, 0.4, 0.8, 1.0]) and max(delays) == 1.0
