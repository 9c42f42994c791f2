"""End to end: the real CLI and supervisor process, the real Docker engine,
the stand-in image. The session-wide exclusivity recorder (tests/conftest.py)
fails any test during which two heavy containers of one GPU ran at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import docker
import pytest

from tests.support.docker_engine import STANDIN_TAG
from tests.support.live_up import LiveUp, standin_model

pytestmark = pytest.mark.docker


def config(ports: dict[str, int], **gpu: Any) -> dict[str, Any]:
    models = {
        "llm": standin_model(ports["llm"], 9000),
        "sdxl": standin_model(ports["sdxl"], 10000),
        "tts": standin_model(ports["tts"], 3000, cls="light"),
        "big": standin_model(ports["big"], 6000, cls="light"),
    }
    return {
        "runtime": "docker",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16384, "releaseDelaySeconds": 0.2},
        "backoffInitialSeconds": 1,
        "gpus": [{"gpu": 0, "activeModel": "llm", "vramBudgetMiB": 15000, "models": models, **gpu}],
    }


def containers(client: docker.DockerClient, instance: str, running_only: bool = True) -> dict[str, Any]:
    cs = client.containers.list(all=not running_only, filters={"label": [f"vramctl.io/instance={instance}"]})
    return {c.labels["vramctl.io/model"]: c for c in cs}


@pytest.fixture
def ports(free_port: Callable[[], int]) -> dict[str, int]:
    return {m: free_port() for m in ("llm", "sdxl", "tts", "big")}


def test_llm_sdxl_llm_with_companion(
    vramctl: Callable[[dict[str, Any]], LiveUp], ports: dict[str, int], docker_client: docker.DockerClient, instance: str
) -> None:
    v = vramctl(config(ports, companions=["tts"]))
    v.start()
    assert sorted(containers(docker_client, instance)) == ["llm", "tts"]

    r = v.cli("switch", "sdxl", "--wait", "--timeout", "60")
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout
    for step in ("stopping", "stopped", "waiting-memory", "memory-free", "starting", "healthy"):
        assert step in out, f"missing step {step!r} in:\n{out}"
    assert out.index("stopping") < out.index("memory-free") < out.index("starting") < out.index("healthy")
    assert sorted(containers(docker_client, instance)) == ["sdxl", "tts"]  # the companion stayed
    g = v.gpu()
    assert g["lastSwitch"]["from"] == "llm" and g["lastSwitch"]["to"] == "sdxl" and g["lastSwitch"]["outcome"] == "success"

    r = v.cli("switch", "llm", "--wait")
    assert r.returncode == 0, r.stderr
    assert sorted(containers(docker_client, instance)) == ["llm", "tts"]

    # The injected environment: global env, then the model's own.
    env = dict(e.split("=", 1) for e in containers(docker_client, instance)["llm"].attrs["Config"]["Env"])
    assert env["STANDIN_PORT"] == str(ports["llm"])

    metrics = v.cli("status", "--json").stdout
    assert '"phase": "Ready"' in metrics


def test_companion_that_does_not_fit_is_rejected_and_nothing_starts(
    vramctl: Callable[[dict[str, Any]], LiveUp], ports: dict[str, int], docker_client: docker.DockerClient, instance: str
) -> None:
    v = vramctl(config(ports))
    v.start()
    before = {m: c.id for m, c in containers(docker_client, instance, running_only=False).items()}
    r = v.cli("switch", "sdxl", "--companions", "big", "--wait")
    assert r.returncode == 2
    assert "sdxl 10000 + big 6000 = 16000 MiB > vramBudgetMiB 15000 MiB" in r.stderr
    time.sleep(0.5)
    after = containers(docker_client, instance, running_only=False)
    assert {m: c.id for m, c in after.items()} == before  # nothing created, nothing stopped
    assert after["llm"].status == "running"
    assert v.gpu()["activeModel"] == "llm"


def test_sigterm_ignored_is_killed_after_grace(
    vramctl: Callable[[dict[str, Any]], LiveUp], ports: dict[str, int], docker_client: docker.DockerClient, instance: str
) -> None:
    cfg = config(ports)
    cfg["gpus"][0]["models"]["llm"] = standin_model(ports["llm"], 9000, grace=1.0, STANDIN_IGNORE_SIGTERM="1")
    v = vramctl(cfg)
    v.start()
    t0 = time.monotonic()
    r = v.cli("switch", "sdxl", "--wait")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "killed after its grace period" in r.stdout
    assert 1.0 <= took < 6.0
    llm = containers(docker_client, instance, running_only=False)["llm"]
    assert llm.attrs["State"]["ExitCode"] == 137


def test_crash_on_start_fails_with_logs_and_backs_off(
    vramctl: Callable[[dict[str, Any]], LiveUp], ports: dict[str, int], docker_client: docker.DockerClient, instance: str
) -> None:
    cfg = config(ports)
    cfg["gpus"][0]["models"]["sdxl"] = standin_model(ports["sdxl"], 10000, load=5, STANDIN_CRASH_AFTER_SECONDS="0.3", STANDIN_EXIT_CODE="3")
    v = vramctl(cfg)
    v.start()
    r = v.cli("switch", "sdxl", "--wait")
    assert r.returncode == 1
    assert "Failed" in r.stderr and "exit code 3" in r.stderr
    assert "crashing with exit code 3" in r.stderr  # the last log lines travel with the failure
    g = v.gpu()
    degraded = next(c for c in g["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "Crashed"
    # Retried with back-off (1 s, 2 s, 4 s, ...), not in a loop: count container starts over ~4 s.
    t_end = time.monotonic() + 4.0
    starts = 0
    since = int(time.time()) - 1
    while time.monotonic() < t_end:
        time.sleep(0.5)
    cid = containers(docker_client, instance, running_only=False)["sdxl"].id
    events = docker_client.events(since=since, until=int(time.time()) + 1, decode=True, filters={"container": cid, "event": "start"})
    starts = sum(1 for _ in events)
    assert 1 <= starts <= 3, f"{starts} starts in ~4 s: back-off is not working"
    assert containers(docker_client, instance).get("llm") is None  # no thrashing back to llm behind the user's back


def test_unlabelled_containers_are_never_touched(
    vramctl: Callable[[dict[str, Any]], LiveUp],
    ports: dict[str, int],
    docker_client: docker.DockerClient,
    instance: str,
    free_port: Callable[[], int],
) -> None:
    # Same image, a name that looks like ours, a model label but no managed-by: not vramctl's.
    stranger = docker_client.containers.run(
        STANDIN_TAG,
        name=f"vramctl-{instance}-gpu0-sdxl-stranger",
        detach=True,
        network_mode="host",
        environment={"STANDIN_PORT": str(free_port()), "STANDIN_LOAD_SECONDS": "0"},
        labels={"vramctl-test.owner": instance, "vramctl.io/model": "llm", "vramctl.io/gpu": "0"},
    )
    try:
        v = vramctl(config(ports))
        v.start()
        assert v.cli("switch", "sdxl", "--wait").returncode == 0
        assert v.cli("switch", "", "--wait").returncode == 0
        stranger.reload()
        assert stranger.status == "running"
        assert stranger.attrs["State"]["StartedAt"] == docker_client.api.inspect_container(stranger.id)["State"]["StartedAt"]
        assert stranger.attrs["RestartCount"] == 0
        assert containers(docker_client, instance) == {}
    finally:
        stranger.remove(force=True)


def test_supervisor_killed_mid_switch_converges(
    vramctl: Callable[[dict[str, Any]], LiveUp],
    ports: dict[str, int],
    docker_client: docker.DockerClient,
    instance: str,
    exclusivity: Any,
) -> None:
    cfg = config(ports)
    cfg["gpus"][0]["models"]["llm"] = standin_model(ports["llm"], 9000, stop=1.5)
    cfg["gpus"][0]["models"]["sdxl"] = standin_model(ports["sdxl"], 10000, load=1.5)
    v = vramctl(cfg)
    for kill_at in ("stopping", "starting"):
        v.start()
        target = "sdxl" if v.gpu()["activeModel"] == "llm" else "llm"
        r = v.cli("switch", target)
        assert r.returncode == 0, r.stderr
        v.wait(lambda g, k=kill_at: k in _steps(v), timeout=20)
        v.kill9()
        v.start(wait_ready=False)
        g = v.wait(lambda g, t=target: g["phase"] == "Ready" and g["runningModels"] == [t], timeout=30)
        assert g["activeModel"] == target
        assert sorted(containers(docker_client, instance)) == [target]
        v.stop()
    exclusivity.assert_no_violations(instance)


def _steps(v: LiveUp) -> set[str]:
    import json
    import urllib.request

    with urllib.request.urlopen(v.url + "/status?since=0", timeout=5) as r:
        return {p["step"] for p in json.loads(r.read()).get("progress", [])}
