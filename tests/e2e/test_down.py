"""The docker runtime at the end of ``vramctl up``, and ``vramctl down``, on
the real engine with the stand-in image: a graceful stop leaves the
containers running (as compose does) and says so; ``down`` stops and removes
the containers vramctl created and says which."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import docker

from tests.support.live_up import LiveUp, standin_model

MANAGED = "app.kubernetes.io/managed-by=vramctl"


def cfg(free_port: Callable[[], int]) -> dict[str, Any]:
    models = {
        "llm": standin_model(free_port(), 11000, load=0.2, stop=0.05),
        "tts": standin_model(free_port(), 2000, cls="light", load=0.2, stop=0.05),
    }
    return {
        "runtime": "docker",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16000, "releaseDelaySeconds": 0.05},
        "gpus": [{"gpu": 0, "activeModel": "llm", "companions": ["tts"], "models": models}],
    }


def containers(client: docker.DockerClient, instance: str) -> dict[str, str]:
    """{name: status} of this instance's containers."""
    found = client.containers.list(all=True, filters={"label": [MANAGED, f"vramctl.io/instance={instance}"]})
    return {c.name: c.status for c in found}


def test_up_keeps_containers_and_down_removes_those_it_created(
    vramctl: Callable[[dict[str, Any]], LiveUp], docker_client: docker.DockerClient, instance: str, free_port: Callable[[], int]
) -> None:
    u = vramctl(cfg(free_port))
    u.start()
    u.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["llm", "tts"])
    running = containers(docker_client, instance)
    assert sorted(running.values()) == ["running", "running"], running
    assert u.proc is not None
    u.proc.send_signal(signal.SIGTERM)
    u.proc.wait(30)
    assert "models keep running (the docker runtime); `vramctl down` stops them" in u.log_text()
    assert containers(docker_client, instance) == running  # as compose leaves them
    r = subprocess.run(
        [sys.executable, "-m", "vramctl", "down", "--config", str(u.config_path), "--state", str(u.state_path), "--instance", instance],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert containers(docker_client, instance) == {}
    for model in ("llm", "tts"):
        assert any(line.startswith(f"gpu0: stopped {model} (docker ") and line.endswith("; removed its container") for line in r.stdout.splitlines()), r.stdout
