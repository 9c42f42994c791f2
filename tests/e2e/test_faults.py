"""Faults found when vramctl was tried as a user would, on the real engine
and the real `vramctl up`: each test failed on the supervisor before the
worker became an actor (or before the fix it names)."""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.support.exclusivity import ExclusivityRecorder
from tests.support.live_up import LiveUp, standin_model

pytestmark = pytest.mark.docker


def config(ports: dict[str, int], **gpu: Any) -> dict[str, Any]:
    models = {
        "llm": standin_model(ports["llm"], 9000),
        "sdxl": standin_model(ports["sdxl"], 10000),
    }
    models.update(gpu.pop("models", {}))
    return {
        "runtime": "docker",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16384, "releaseDelaySeconds": 0.1},
        "backoffInitialSeconds": 1,
        "gpus": [{"gpu": 0, "activeModel": "llm", "vramBudgetMiB": 15000, "models": models, **gpu}],
    }


@pytest.fixture
def ports(free_port: Callable[[], int]) -> dict[str, int]:
    return {m: free_port() for m in ("llm", "sdxl", "ghost", "busy")}


def live(client: docker.DockerClient, instance: str) -> dict[str, str]:
    cs = client.containers.list(all=True, filters={"label": [f"vramctl.io/instance={instance}"]})
    return {c.labels["vramctl.io/model"]: c.status for c in cs}


def test_a_missing_image_is_refused_before_the_working_model_is_stopped(
    vramctl: Callable[[dict[str, Any]], LiveUp], ports: dict[str, int], docker_client: docker.DockerClient, instance: str
) -> None:
    ghost = {**standin_model(ports["ghost"], 9000), "image": "vramctl/no-such-image:never"}
    v = vramctl(config(ports, models={"ghost": ghost}))
    v.start()
    v.wait(lambda g: g["phase"] == "Ready")
    r = v.cli("switch", "ghost", "--wait", "--timeout", "20")
    assert r.returncode != 0
    said = r.stdout + r.stderr
    assert "vramctl/no-such-image:never" in said and "not found locally" in said, said
    time.sleep(0.5)
    g = v.gpu()
    assert g["activeModel"] == "llm" and g["runningModels"] == ["llm"] and g["phase"] == "Ready"
    assert live(docker_client, instance).get("llm") == "running"


def test_a_port_served_by_something_else_is_not_taken_for_health(
    vramctl: Callable[[dict[str, Any]], LiveUp], ports: dict[str, int], docker_client: docker.DockerClient, instance: str
) -> None:
    """Something already answers sdxl's health port: vramctl must not call
    sdxl healthy (its own container cannot even bind the port), and finds it
    in the preflight: the switch is refused with the reason before llm is
    stopped."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    squatter = http.server.ThreadingHTTPServer(("127.0.0.1", ports["sdxl"]), Ok)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    try:
        v = vramctl(config(ports))
        v.start()
        v.wait(lambda g: g["phase"] == "Ready")
        r = v.cli("switch", "sdxl", "--wait", "--timeout", "20")
        assert r.returncode != 0, r.stdout
        said = r.stdout + r.stderr
        assert f"port {ports['sdxl']}" in said and "something else serves it" in said, said
        g = v.gpu()
        assert g["activeModel"] == "llm" and g["phase"] == "Ready", g  # refused before anything stopped
        assert live(docker_client, instance).get("sdxl") != "running" and live(docker_client, instance).get("llm") == "running"
    finally:
        squatter.shutdown()
        squatter.server_close()


def test_a_crash_soon_after_healthy_backs_off_with_its_exit_code(
    vramctl: Callable[[dict[str, Any]], LiveUp], ports: dict[str, int]
) -> None:
    flaky = standin_model(ports["llm"], 9000, load=0.2, STANDIN_CRASH_AFTER_SECONDS="1.5", STANDIN_EXIT_CODE="7")
    v = vramctl(config(ports, models={"llm": flaky}))
    v.start(wait_ready=False)
    g = v.wait(lambda g: g["phase"] == "Failed", timeout=30)
    assert "exit code 7" in g["message"] and "attempt 1" in g["message"], g["message"]
    # The next crash after the retry counts on: a crash loop backs off longer, never "Ready / Switching" forever.
    g = v.wait(lambda g: g["phase"] == "Failed" and "attempt 2" in g["message"], timeout=30)
    assert "retrying in 2s" in g["message"]
    assert "crashing with exit code 7" in g["message"]  # its last log lines


def test_a_hand_start_right_after_vramctls_own_start_is_gated(
    vramctl: Callable[[dict[str, Any]], LiveUp],
    ports: dict[str, int],
    docker_client: docker.DockerClient,
    instance: str,
    exclusivity: ExclusivityRecorder,
) -> None:
    """vramctl started llm; within its old 10 s own-start window someone
    starts sdxl's container by hand: it is paused at once, not run beside llm."""
    v = vramctl(config(ports))
    v.start()
    v.wait(lambda g: g["phase"] == "Ready")
    r = v.cli("switch", "sdxl", "--wait", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    r = v.cli("switch", "llm", "--wait", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    sdxl = next(
        c
        for c in docker_client.containers.list(all=True, filters={"label": [f"vramctl.io/instance={instance}"]})
        if c.labels["vramctl.io/model"] == "sdxl"
    )
    sdxl.start()  # by hand, a second after vramctl's own start of llm
    exclusivity.settle()
    assert not exclusivity.violations_for(instance), exclusivity.violations_for(instance)
    lat = [s for name, s in exclusivity.gate_latencies if "sdxl" in name]
    assert lat, "the hand start was not paused"
    v.wait(lambda g: g["activeModel"] == "sdxl" and g["phase"] == "Ready", timeout=30)


def test_a_container_removed_by_hand_moves_the_status_at_once(
    vramctl: Callable[[dict[str, Any]], LiveUp], ports: dict[str, int], docker_client: docker.DockerClient, instance: str
) -> None:
    v = vramctl({**config(ports), "resyncSeconds": 30})
    v.start()
    v.wait(lambda g: g["phase"] == "Ready")
    llm = next(c for c in docker_client.containers.list(filters={"label": [f"vramctl.io/instance={instance}"]}))
    t0 = time.monotonic()
    llm.remove(force=True)
    v.wait(lambda g: g["phase"] != "Ready" or "llm" not in g["runningModels"], timeout=5)
    assert time.monotonic() - t0 < 2.0  # docker's events, not the 30 s resync


@pytest.mark.parametrize("on_removed", ["recreate", "release"])
def test_compose_down_is_said_and_handled_as_configured(
    vramctl: Callable[[dict[str, Any]], LiveUp],
    ports: dict[str, int],
    docker_client: docker.DockerClient,
    instance: str,
    on_removed: str,
) -> None:
    v = vramctl(config(ports, onRemoved=on_removed))
    v.start()
    v.wait(lambda g: g["phase"] == "Ready")
    for c in docker_client.containers.list(filters={"label": [f"vramctl.io/instance={instance}"]}):
        c.remove(force=True)  # what `docker compose down` does
    # First the removal is said: until the worker has seen it, its status is the
    # one from before, already "Ready with llm" (on a loaded machine, a while).
    deadline = time.monotonic() + 20
    said = []
    while not said and time.monotonic() < deadline:
        said = [p for p in v.status_progress() if p["step"] == "removed-outside"]
        time.sleep(0.05)
    if on_removed == "recreate":
        v.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["llm"], timeout=20)
    else:
        v.wait(lambda g: g["phase"] == "Idle" and g["activeModel"] is None, timeout=20)
        time.sleep(1.0)
        assert "llm" not in live(docker_client, instance)  # not recreated
    assert said and "removed outside vramctl" in said[0]["message"] and f"onRemoved: {on_removed}" in said[0]["message"]
    assert "removed outside vramctl" in v.log_text()


def test_a_profile_up_that_also_starts_a_service_without_profile_keeps_the_active_model(
    vramctl: Callable[[dict[str, Any]], LiveUp],
    free_port: Callable[[], int],
    docker_client: docker.DockerClient,
    instance: str,
    exclusivity: ExclusivityRecorder,
    tmp_path: Path,
) -> None:
    """painter (profile img) holds the GPU; `docker compose --profile img
    --profile tts up -d` also starts chat (no profile): painter keeps it."""
    ports = {"chat": free_port(), "painter": free_port(), "tts": free_port()}

    def svc(model: str, cls: str, profile: str | None) -> dict[str, Any]:
        s: dict[str, Any] = {
            "image": "vramctl/standin:dev",
            "network_mode": "host",
            "environment": {"STANDIN_PORT": str(ports[model]), "STANDIN_LOAD_SECONDS": "0.3", "STANDIN_STOP_SECONDS": "0.2"},
            "labels": {
                "app.kubernetes.io/managed-by": "vramctl",
                "vramctl.io/model": model,
                "vramctl.io/gpu": "0",
                "vramctl.io/class": cls,
            },
        }
        if profile:
            s["profiles"] = [profile]
        return s

    cf = tmp_path / "docker-compose.yml"
    cf.write_text(
        yaml.safe_dump(
            {"services": {"chat": svc("chat", "heavy", None), "painter": svc("painter", "heavy", "img"), "tts": svc("tts", "light", "tts")}}
        )
    )
    models = {
        m: {
            "class": "light" if m == "tts" else "heavy",
            "composeService": m,
            "health": {"path": "/health", "port": ports[m], "intervalSeconds": 0.05},
            "vramMiB": 3000 if m == "tts" else 11000,
        }
        for m in ports
    }
    v = vramctl(
        {
            "runtime": "docker",
            "compose": {"project": instance, "files": [str(cf)]},
            "gpuProbe": {"kind": "simulated", "releaseDelaySeconds": 0.05},
            "gpus": [{"gpu": 0, "activeModel": "painter", "vramBudgetMiB": 15000, "models": models}],
        }
    )
    v.start()
    v.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["painter"])
    subprocess.run(
        ["docker", "compose", "-p", instance, "-f", str(cf), "--profile", "img", "--profile", "tts", "up", "-d"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    g = v.wait(lambda g: g["phase"] == "Ready" and "chat" not in g["runningModels"] and "tts" in g["runningModels"], timeout=20)
    assert g["activeModel"] == "painter" and "painter" in g["runningModels"]
    notes = [p["message"] for p in v.status_progress() if p["step"] == "gated" and p["model"] == "chat"]
    assert notes and "painter' keeps the GPU" in notes[0], notes
    exclusivity.assert_no_violations(instance)


def test_a_restart_policy_restarting_the_model_being_started_is_a_crash_not_an_intruder(
    vramctl: Callable[[dict[str, Any]], LiveUp],
    free_port: Callable[[], int],
    docker_client: docker.DockerClient,
    instance: str,
    tmp_path: Path,
) -> None:
    """A compose service with `restart: always` crashes while it starts; docker
    restarts it. That is the model crashing (Failed, CrashLoop or Crashed,
    back-off), never "started outside vramctl" (no gating, no pause)."""
    port = free_port()
    svc = {
        "image": "vramctl/standin:dev",
        "network_mode": "host",
        "restart": "always",
        "environment": {
            "STANDIN_PORT": str(port),
            "STANDIN_LOAD_SECONDS": "5",
            "STANDIN_CRASH_AFTER_SECONDS": "0.5",
            "STANDIN_EXIT_CODE": "3",
        },
        "labels": {
            "app.kubernetes.io/managed-by": "vramctl",
            "vramctl.io/model": "llm",
            "vramctl.io/gpu": "0",
            "vramctl.io/class": "heavy",
        },
    }
    cf = tmp_path / "docker-compose.yml"
    cf.write_text(yaml.safe_dump({"services": {"llm": svc}}))
    model = {
        "composeService": "llm",
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
        "vramMiB": 9000,
        "startTimeoutSeconds": 30,
    }
    v = vramctl(
        {
            "runtime": "docker",
            "compose": {"project": instance, "files": [str(cf)]},
            "gpuProbe": {"kind": "simulated", "releaseDelaySeconds": 0.05},
            "backoffInitialSeconds": 5,
            "gpus": [{"gpu": 0, "activeModel": "llm", "models": {"llm": model}}],
        }
    )
    v.start(wait_ready=False)
    g = v.wait(lambda g: g["phase"] == "Failed", timeout=30)
    assert "crash" in g["message"].lower() and "llm" in g["message"], g["message"]
    steps = [p["step"] for p in v.status_progress()]
    assert "gated" not in steps, steps
    time.sleep(1.0)
    c = docker_client.containers.list(all=True, filters={"label": f"com.docker.compose.project={instance}"})[0]
    c.reload()
    assert c.status != "paused"  # never frozen as an intruder
