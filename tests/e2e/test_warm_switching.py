"""Warm switching end to end: the real CLI and supervisor, the real Docker
engine, the busybox stand-in with STANDIN_SLEEP=1. The exclusivity recorder
(tests/conftest.py) does not count a container whose stand-in says it sleeps,
and fails any test during which two awake heavy containers overlapped."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import docker
import pytest

from tests.support.live_up import LiveUp, standin_model

pytestmark = pytest.mark.docker

SLEEP = {"level": 2, "maxResidueMiB": 1024, "path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"}


def sleepy(port: int, vram: int, **env: str) -> dict[str, Any]:
    m = standin_model(port, vram, load=0.3, **{"STANDIN_SLEEP": "1", "STANDIN_RESIDUE_MIB": "600", **env})
    return {**m, "switchStrategy": "sleep", "sleep": SLEEP, "startTimeoutSeconds": 10}


def config(llm: dict[str, Any], sdxl: dict[str, Any]) -> dict[str, Any]:
    return {
        "runtime": "docker",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16384, "releaseDelaySeconds": 0.2},
        "gpus": [{"gpu": 0, "activeModel": "llm", "models": {"llm": llm, "sdxl": sdxl}}],
    }


def running(client: docker.DockerClient, instance: str) -> list[str]:
    return sorted(c.labels["vramctl.io/model"] for c in client.containers.list(filters={"label": [f"vramctl.io/instance={instance}"]}))


def test_a_warm_switch_and_back_keeps_both_containers(
    vramctl: Callable[[dict[str, Any]], LiveUp],
    free_port: Callable[[], int],
    docker_client: docker.DockerClient,
    instance: str,
    exclusivity: Any,
) -> None:
    v = vramctl(config(sleepy(free_port(), 11000), sleepy(free_port(), 10000)))
    v.start()
    r = v.cli("switch", "sdxl", "--wait", "--timeout", "60")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "sleeping" in r.stdout and "stopping" not in r.stdout, r.stdout  # put to sleep, not stopped
    assert running(docker_client, instance) == ["llm", "sdxl"]  # llm sleeps in its container
    assert v.gpu()["asleepModels"] == ["llm"] and v.gpu()["runningModels"] == ["sdxl"]
    # The recorder judges sdxl's start when its gate window ends, asking llm whether
    # it sleeps at that moment: let it judge before llm is woken again.
    exclusivity.settle()
    r = v.cli("switch", "llm", "--wait", "--timeout", "60")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "waking" in r.stdout and "awake" in r.stdout, r.stdout
    assert v.gpu()["asleepModels"] == ["sdxl"] and v.gpu()["runningModels"] == ["llm"]


def test_a_failed_sleep_stops_the_container_and_goes_cold(
    vramctl: Callable[[dict[str, Any]], LiveUp], free_port: Callable[[], int], docker_client: docker.DockerClient, instance: str
) -> None:
    v = vramctl(config(sleepy(free_port(), 11000, STANDIN_SLEEP_STATUS="500"), sleepy(free_port(), 10000)))
    v.start()
    r = v.cli("switch", "sdxl", "--wait", "--timeout", "60")
    assert r.returncode == 0, r.stderr + r.stdout
    assert any(p["step"] == "SleepFallback" and "SleepFailed" in p["message"] for p in v.status_progress())
    assert running(docker_client, instance) == ["sdxl"]


def test_vramctl_killed_while_a_model_goes_to_sleep(
    vramctl: Callable[[dict[str, Any]], LiveUp], free_port: Callable[[], int], docker_client: docker.DockerClient, instance: str
) -> None:
    v = vramctl(config(sleepy(free_port(), 11000, STANDIN_SLEEP_SECONDS="2"), sleepy(free_port(), 10000)))
    v.start()
    req = urllib.request.Request(v.url + "/switch", data=json.dumps({"model": "sdxl"}).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    urllib.request.urlopen(req, timeout=10).read()
    deadline = time.time() + 10
    while not any(p["step"] == "sleeping" for p in v.status_progress()):
        assert time.time() < deadline
        time.sleep(0.02)
    v.kill9()
    v.start(wait_ready=False)
    g = v.wait(lambda g: g["phase"] == "Ready" and g["activeModel"] == "sdxl" and g["runningModels"] == ["sdxl"], 60)
    assert g.get("asleepModels") in (["llm"], None)
    assert "sdxl" in running(docker_client, instance)
