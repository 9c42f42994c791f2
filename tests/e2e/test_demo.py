"""The README's main job: `vramctl up` with no config runs the embedded demo
stack (docker runtime here, since the engine answers and has the image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

pytestmark = pytest.mark.docker


def _get(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


@pytest.mark.parametrize("runtime_env", ["docker", "process"])
def test_up_without_config_runs_the_demo(
    tmp_path: Path, free_port: Callable[[], int], instance: str, standin_image: str, docker_client: docker.DockerClient, runtime_env: str
) -> None:
    port = free_port()
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    if runtime_env == "process":
        env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"  # a machine without docker
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vramctl", "up", "--listen", f"127.0.0.1:{port}", "--instance", instance],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 40
        g: dict = {}  # type: ignore[type-arg]
        while time.time() < deadline:
            try:
                g = _get(url + "/status")["gpus"]["0"]
                if g["phase"] == "Ready" and g["runningModels"] == ["llm", "tts"]:
                    break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        else:
            raise AssertionError(f"demo did not come up: {g}\n{log.read_text()}")
        st = _get(url + "/status")
        assert st["runtime"] == runtime_env
        assert any("SIMULATED" in n for n in st["notes"]), st["notes"]  # said plainly: no real GPU here
        text = log.read_text()
        assert "embedded demo" in text and "SIMULATED" in text
        if runtime_env == "docker":
            running = {
                c.labels["vramctl.io/model"] for c in docker_client.containers.list(filters={"label": f"vramctl.io/instance={instance}"})
            }
            assert running == {"llm", "tts"}
        r = subprocess.run(
            [sys.executable, "-m", "vramctl", "switch", "sdxl", "--wait", "--url", url], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "sdxl holds gpu 0" in r.stdout
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert 'vramctl_switches_total{gpu="0",outcome="success"} 2.0' in metrics  # start-up (none -> llm) and llm -> sdxl
        assert 'vramctl_active_model{gpu="0",model="sdxl"} 1.0' in metrics
        assert (tmp_path / "vramctl" / "state.json").exists()
        # free the GPU so nothing is left behind
        r = subprocess.run(
            [sys.executable, "-m", "vramctl", "switch", "", "--wait", "--url", url], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        assert _get(url + "/status")["gpus"]["0"]["runningModels"] == []
    finally:
        proc.terminate()
        proc.wait(20)
