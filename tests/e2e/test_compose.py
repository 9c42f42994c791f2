"""Compose mode: vramctl adopts the demo stack's containers, and a heavy
profile started by hand (`docker compose --profile sdxl up -d`) is gated."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.support.live_up import LiveUp

pytestmark = pytest.mark.docker

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "compose" / "demo" / "docker-compose.yml"


def test_manual_compose_up_is_gated_and_handed_over(
    vramctl: Callable[[dict[str, Any]], LiveUp],
    free_port: Callable[[], int],
    docker_client: docker.DockerClient,
    instance: str,
    exclusivity: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ports = {"llm": free_port(), "sdxl": free_port(), "tts": free_port()}
    for m, key in (("llm", "LLM"), ("sdxl", "SDXL"), ("tts", "TTS")):
        monkeypatch.setenv(f"{key}_PORT", str(ports[m]))
    monkeypatch.setenv("LLM_LOAD_SECONDS", "0.5")
    monkeypatch.setenv("LLM_STOP_SECONDS", "0.5")
    monkeypatch.setenv("SDXL_LOAD_SECONDS", "0.5")
    models = {
        m: {
            "class": "light" if m == "tts" else "heavy",
            "composeService": m,
            "health": {"path": "/health", "port": ports[m], "intervalSeconds": 0.05},
            "startTimeoutSeconds": 20,
            "vramMiB": 3000 if m == "tts" else 11000,
        }
        for m in ports
    }
    cfg = {
        "runtime": "docker",
        "compose": {"project": instance, "files": [str(COMPOSE_FILE)]},
        "gpuProbe": {"kind": "simulated", "releaseDelaySeconds": 0.2},
        "gpus": [{"gpu": 0, "activeModel": "llm", "companions": ["tts"], "models": models}],
    }
    v = vramctl(cfg)
    v.start()  # compose has never run: vramctl creates llm and tts through compose, then starts them
    running = {
        c.labels["com.docker.compose.service"]
        for c in docker_client.containers.list(filters={"label": f"com.docker.compose.project={instance}"})
    }
    assert running == {"llm", "tts"}

    gated_before = len(exclusivity.gate_latencies)
    subprocess.run(
        ["docker", "compose", "-p", instance, "-f", str(COMPOSE_FILE), "--profile", "sdxl", "up", "-d"],
        check=True,
        capture_output=True,
        env=dict(os.environ),
        timeout=60,
    )
    g = v.wait(lambda g: g["activeModel"] == "sdxl" and g["phase"] == "Ready" and "sdxl" in g["runningModels"], timeout=30)
    assert "llm" not in g["runningModels"] and "tts" in g["runningModels"]  # the companion fits beside sdxl and stays

    steps = [p["step"] for p in v.status_progress()]
    assert "gated" in steps
    after = steps[steps.index("gated") :]
    assert after.index("stopped") < after.index("memory-free") < after.index("starting") < after.index("healthy")
    exclusivity.assert_no_violations(instance)
    sdxl_gates = [s for name, s in exclusivity.gate_latencies[gated_before:] if name.endswith("sdxl-1")]
    assert sdxl_gates, exclusivity.gate_latencies
    print(f"gate latency (start -> pause) of the hand-started sdxl: {sdxl_gates[0] * 1000:.0f} ms")
    assert sdxl_gates[0] < 0.5

    # The state file now says sdxl: a restarted supervisor keeps it.
    v.stop()
    v.start()
    assert v.gpu()["activeModel"] == "sdxl"
