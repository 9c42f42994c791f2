"""Engines through the process runtime: a vLLM model's argv is its
``command`` followed by the rendered flags and its args, it gets the injected
environment, it is probed on the engine's own health path, and a changed
gpuMemoryUtilization restarts it.

The Python stand-in ignores its arguments, so it can play ``vllm serve``.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ports import free_port
from vramctl.runtimes.process import ProcessRuntime
from vramctl.spec.models import DeploymentSpec

STANDIN = [sys.executable, "-m", "vramctl.demo.standin"]


def spec(port: int, utilization: float) -> DeploymentSpec:
    model: dict[str, Any] = {
        "engine": "vllm",
        "command": STANDIN,
        "vllm": {"model": "Qwen/Qwen2.5-7B-Instruct", "gpuMemoryUtilization": utilization, "port": port},
        "args": ["--enforce-eager"],
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0.1", "STANDIN_STOP_SECONDS": "0.1"},
        "stop": {"gracePeriodSeconds": 3},
    }
    return DeploymentSpec.model_validate({"gpu": 0, "models": {"llm": model}})


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[ProcessRuntime]:
    rt = ProcessRuntime(tmp_path, instance="e" + uuid.uuid4().hex[:10])
    yield rt
    for path in (tmp_path / "proc").glob("*.json"):
        rec = json.loads(path.read_text())
        d = DeploymentSpec.model_validate({"gpu": rec["gpu"], "models": {rec["model"]: {"command": ["true"]}}})
        rt.remove(d, rec["model"])  # stops it (proven ours by its start time) and forgets it
    rt.close()


def wait_healthy(rt: ProcessRuntime, d: DeploymentSpec, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not rt.check_health(d, "llm"):
        assert time.monotonic() < deadline, "not healthy in time"
        time.sleep(0.02)


def test_vllm_engine_argv_env_health_and_restart_on_a_new_utilization(runtime: ProcessRuntime, tmp_path: Path) -> None:
    port = free_port()
    d = spec(port, 0.85)
    ref = runtime.start(d, "llm")
    wait_healthy(runtime, d)  # GET /health on vllm.port: no `health:` was written

    rec = json.loads(next((tmp_path / "proc").glob("*.json")).read_text())
    assert rec["command"] == [
        *STANDIN,
        *("--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory-utilization", "0.85", "--port", str(port)),
        "--enforce-eager",
    ]
    environ = dict(
        item.split("=", 1) for item in Path(f"/proc/{ref}/environ").read_bytes().decode().split("\0") if "=" in item
    )  # the live process's own environment
    assert environ["XFORMERS_DISABLED"] == "1" and environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"

    d2 = spec(port, 0.8)
    assert runtime.observe(d2)["llm"].drifted
    ref2 = runtime.start(d2, "llm")
    assert ref2 != ref
    wait_healthy(runtime, d2)
    rec = json.loads(next((tmp_path / "proc").glob("*.json")).read_text())
    assert "0.8" in rec["command"] and "0.85" not in rec["command"]
