"""`docker compose restart` (or `docker restart`, or a quick stop and start
by hand) of the model vramctl runs is the user's act, not a crash (issue 18,
item 8): vramctl lets the container come back, waits for its health, and
says what happened; it does not fail it, back off, or stop what the user
just restarted. A real engine, the stand-in image, the worker with its
supervisor's event watcher."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import docker.errors
import pytest

from tests.support.live_up import standin_model
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.runtimes.docker import DockerRuntime
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings
from vramctl.worker.supervisor import Supervisor, holders_from

pytestmark = pytest.mark.docker


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def up(
    docker_client: docker.DockerClient, standin_image: str, instance: str, free_port: Callable[[], int]
) -> Iterator[tuple[GpuWorker, Any]]:
    port = free_port()
    d = DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "llm",
            "models": {
                "llm": standin_model(port, 9000, load=0.5, stop=0.1),
            },
        }
    )
    rt = DockerRuntime(docker_client, instance=instance)
    gpu = SimulatedGpu(0, 16000, 300, 0.05, holders_from(rt, lambda: d))
    s = WorkerSettings(poll_interval_s=0.05, baseline_mib=300, backoff_initial_s=30, resync_s=1)
    w = GpuWorker(d, rt, gpu, s)
    sup = Supervisor([w], rt, Metrics())
    sup.start()
    try:
        wait_until(lambda: w.status()["phase"] == "Ready", 30, "llm ready")
        (c,) = docker_client.containers.list(filters={"label": [f"vramctl.io/instance={instance}"]})
        yield w, c
    finally:
        sup.stop()
        for c in docker_client.containers.list(all=True, filters={"label": [f"vramctl.io/instance={instance}"]}):
            c.remove(force=True)


def steps(w: GpuWorker, since: int) -> list[str]:
    return [str(p["step"]) for p in w.progress(since)]


@pytest.mark.parametrize("how", ["restart", "stop-start"])
def test_a_restart_by_hand_of_the_active_model_is_the_users_act_not_a_crash(up: tuple[GpuWorker, Any], how: str) -> None:
    w, c = up
    seq = w.progress()[-1]["seq"]
    if how == "restart":
        c.restart(timeout=5)  # what `docker compose restart llm` does
    else:
        c.stop(timeout=5)  # `docker compose stop llm && docker compose start llm`
        c.start()
    wait_until(lambda: "restarted-outside" in steps(w, seq), 10, f"the restart said ({steps(w, seq)})")
    wait_until(lambda: w.status()["phase"] == "Ready" and "healthy" in steps(w, seq), 20, "llm healthy again")
    time.sleep(1.5)  # past any back-off vramctl would have taken
    got = steps(w, seq)
    assert "failed" not in got and "stopping" not in got and "starting" not in got, got
    c.reload()
    assert c.status == "running"
    st = w.status()
    assert st["phase"] == "Ready" and st["runningModels"] == ["llm"] and st["backoff"] == {}
    said = next(p["message"] for p in w.progress(seq) if p["step"] == "restarted-outside")
    assert "llm" in said and "restarted outside vramctl" in said
