"""DockerRuntime against the real engine, with the stand-in model server.

Every container uses host networking and a port of its own on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

# `import docker.errors` also binds `docker`; ruff would sort a bare `import docker`
# as first-party because of the tests/docker package.
import docker.errors
import pytest
import yaml

from tests.support.docker_engine import STANDIN_TAG, TEST_OWNER_LABEL
from tests.support.exclusivity import ExclusivityRecorder
from vramctl.observed import WorkloadState
from vramctl.runtimes.base import (
    LABEL_CLASS,
    LABEL_DEPLOYMENT,
    LABEL_GPU,
    LABEL_INSTANCE,
    LABEL_MODEL,
    LABEL_SPEC_HASH,
    MANAGED_BY,
    PermanentError,
    Runtime,
    RuntimeFailure,
    StartError,
    StartEvent,
)
from vramctl.runtimes.docker import DockerRuntime
from vramctl.spec.models import ComposeConfig, DeploymentSpec

LOAD = 0.3  # stand-in load time, seconds
SLACK = 3.0  # container start + first successful probe on a slow CI machine


def standin(port: int, *, load: float = LOAD, stop: float = 0.2, grace: float = 3.0, cls: str = "heavy", **env: str) -> dict[str, Any]:
    return {
        "class": cls,
        "image": STANDIN_TAG,
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": str(load), "STANDIN_STOP_SECONDS": str(stop), **env},
        "health": {"path": "/health", "port": port},
        "stop": {"gracePeriodSeconds": grace},
    }


def spec(models: dict[str, dict[str, Any]], **fields: Any) -> DeploymentSpec:
    return DeploymentSpec.model_validate({"gpu": 0, "models": models, **fields})


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``pred`` until true; return the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


def container(client: docker.DockerClient, ref: str) -> Any:
    return client.containers.get(ref)


# ------------------------------------------------------------ basics


def test_satisfies_the_runtime_protocol(runtime: DockerRuntime) -> None:
    assert isinstance(runtime, Runtime)
    assert runtime.kind == "docker"


def test_start_becomes_healthy_then_stop_honours_the_stop_time(
    runtime: DockerRuntime, docker_client: docker.DockerClient, instance: str, free_port: Callable[[], int]
) -> None:
    port = free_port()
    d = spec({"llm": standin(port, stop=0.5)}, name="box")
    assert runtime.observe(d) == {}
    assert runtime.check_health(d, "llm") is False

    t0 = time.monotonic()
    ref = runtime.start(d, "llm")
    to_healthy = time.monotonic() - t0 + wait_until(lambda: runtime.check_health(d, "llm"), LOAD + SLACK, "llm healthy")
    assert to_healthy >= LOAD
    print(f"\nstart -> healthy: {to_healthy:.3f} s (load {LOAD} s)")

    c = container(docker_client, ref)
    assert c.name == f"vramctl-{instance}-gpu0-llm"
    labels = c.labels
    assert labels[MANAGED_BY] == "vramctl"
    assert labels[LABEL_INSTANCE] == instance
    assert labels[LABEL_MODEL] == "llm"
    assert labels[LABEL_GPU] == "0"
    assert labels[LABEL_CLASS] == "heavy"
    assert labels[LABEL_SPEC_HASH] == d.spec_hash("llm")
    assert labels[LABEL_DEPLOYMENT] == "box"
    assert c.attrs["HostConfig"]["NetworkMode"] == "host"
    assert c.attrs["Config"]["StopSignal"] == "SIGTERM"
    assert f"STANDIN_PORT={port}" in c.attrs["Config"]["Env"]

    w = runtime.observe(d)["llm"]
    assert (w.state, w.ref, w.drifted, w.heavy, w.ready) == (WorkloadState.RUNNING, ref, False, True, False)

    out = runtime.stop(d, "llm")
    print(f"stop (STANDIN_STOP_SECONDS=0.5, grace 3 s): {out.seconds:.3f} s")
    assert out.was_running and not out.killed
    assert out.exit_code == 0
    assert 0.45 <= out.seconds < 1.5
    w = runtime.observe(d)["llm"]
    assert (w.state, w.exit_code) == (WorkloadState.EXITED, 0)
    assert runtime.check_health(d, "llm") is False
    assert "standin: got SIGTERM, stopping in 0.5 s" in runtime.logs_tail(d, "llm", 5)


@pytest.mark.parametrize("grace", [1.0, 0.4])
def test_sigkill_exactly_after_the_grace_period(runtime: DockerRuntime, free_port: Callable[[], int], grace: float) -> None:
    d = spec({"stubborn": standin(free_port(), load=0.1, grace=grace, STANDIN_IGNORE_SIGTERM="1")})
    runtime.start(d, "stubborn")
    wait_until(lambda: runtime.check_health(d, "stubborn"), SLACK, "stubborn healthy")
    out = runtime.stop(d, "stubborn")
    print(f"\nstop ignoring SIGTERM, grace {grace} s: {out.seconds:.3f} s, killed={out.killed}")
    assert out.was_running and out.killed
    assert out.exit_code == 137
    assert grace <= out.seconds < grace + 0.5
    assert runtime.observe(d)["stubborn"].state is WorkloadState.EXITED


def test_stop_sends_the_spec_signal(runtime: DockerRuntime, free_port: Callable[[], int]) -> None:
    m = standin(free_port(), load=0.1, stop=0.2)
    d = spec({"llm": {**m, "stop": {"signal": "SIGINT", "gracePeriodSeconds": 2}}})
    runtime.start(d, "llm")
    wait_until(lambda: runtime.check_health(d, "llm"), SLACK, "llm healthy")
    out = runtime.stop(d, "llm")
    assert out.was_running and not out.killed and out.exit_code == 0
    assert "standin: got SIGINT, stopping in 0.2 s" in runtime.logs_tail(d, "llm")


def test_start_stop_remove_are_idempotent(runtime: DockerRuntime, docker_client: docker.DockerClient, free_port: Callable[[], int]) -> None:
    d = spec({"llm": standin(free_port(), load=0.1, stop=0.1)})
    out = runtime.stop(d, "llm")
    assert (out.was_running, out.killed) == (False, False)
    runtime.remove(d, "llm")
    runtime.pause(d, "llm")
    assert runtime.logs_tail(d, "llm") == []

    ref = runtime.start(d, "llm")
    assert runtime.start(d, "llm") == ref
    assert runtime.stop(d, "llm").was_running
    assert runtime.stop(d, "llm").was_running is False
    assert runtime.start(d, "llm") == ref  # same container, started again
    wait_until(lambda: runtime.check_health(d, "llm"), SLACK, "llm healthy again")
    runtime.remove(d, "llm")
    runtime.remove(d, "llm")
    assert runtime.observe(d) == {}
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(ref)


def test_spec_change_recreates_the_container(
    runtime: DockerRuntime, docker_client: docker.DockerClient, free_port: Callable[[], int]
) -> None:
    port = free_port()
    d1 = spec({"llm": standin(port, load=0.1, stop=0.1)}, env={"MODE": "a"})
    ref1 = runtime.start(d1, "llm")
    wait_until(lambda: runtime.check_health(d1, "llm"), SLACK, "llm healthy")

    d2 = spec({"llm": standin(port, load=0.1, stop=0.1)}, env={"MODE": "b"})
    assert d2.spec_hash("llm") != d1.spec_hash("llm")
    assert runtime.observe(d1)["llm"].drifted is False
    assert runtime.observe(d2)["llm"].drifted is True
    # health, start timeout, vramMiB and class do not shape the container
    d1b = spec({"llm": {**standin(port, load=0.1, stop=0.1), "vramMiB": 5, "startTimeoutSeconds": 9}}, env={"MODE": "a"})
    assert runtime.observe(d1b)["llm"].drifted is False

    runtime.stop(d2, "llm")
    ref2 = runtime.start(d2, "llm")
    assert ref2 != ref1
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(ref1)
    c = container(docker_client, ref2)
    assert c.labels[LABEL_SPEC_HASH] == d2.spec_hash("llm")
    assert "MODE=b" in c.attrs["Config"]["Env"]
    w = runtime.observe(d2)["llm"]
    assert (w.ref, w.drifted) == (ref2, False)


def test_drifted_and_running_is_stopped_gracefully_before_recreation(
    runtime: DockerRuntime, docker_client: docker.DockerClient, free_port: Callable[[], int]
) -> None:
    port = free_port()
    d1 = spec({"llm": standin(port, load=0.1, stop=0.1)})
    ref1 = runtime.start(d1, "llm")
    d2 = spec({"llm": standin(port, load=0.1, stop=0.1, EXTRA="1")})
    ref2 = runtime.start(d2, "llm")  # no stop in between: start must not run two at once
    assert ref2 != ref1
    wait_until(lambda: runtime.check_health(d2, "llm"), SLACK, "llm healthy")
    assert [c.id for c in docker_client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={runtime.instance}"})] == [ref2]


def test_a_model_removed_from_the_spec_is_still_observed_and_stopped(runtime: DockerRuntime, free_port: Callable[[], int]) -> None:
    d1 = spec({"old": standin(free_port(), load=0.1, stop=0.2, grace=6.0, cls="light")})
    runtime.start(d1, "old")
    d2 = spec({"new": standin(free_port())})
    w = runtime.observe(d2)["old"]
    assert w.state is WorkloadState.RUNNING and w.heavy is False and w.drifted is False
    out = runtime.stop(d2, "old")
    # Its own grace (6 s, from its labels: the spec no longer names it) lets its 0.2 s stop finish.
    assert out.was_running and not out.killed and 0.15 <= out.seconds < 5.5, out
    runtime.remove(d2, "old")
    assert runtime.observe(d2) == {}


def test_crash_is_observed_with_exit_code_and_logs(runtime: DockerRuntime, free_port: Callable[[], int]) -> None:
    d = spec({"flaky": standin(free_port(), load=0.1, STANDIN_CRASH_AFTER_SECONDS="0.5", STANDIN_EXIT_CODE="3")})
    runtime.start(d, "flaky")
    wait_until(lambda: runtime.observe(d)["flaky"].state is WorkloadState.EXITED, SLACK, "flaky exited")
    w = runtime.observe(d)["flaky"]
    assert w.exit_code == 3
    assert runtime.check_health(d, "flaky") is False
    tail = runtime.logs_tail(d, "flaky", 3)
    assert tail[-1] == "standin: crashing with exit code 3"
    assert len(tail) == 3
    out = runtime.stop(d, "flaky")
    assert (out.was_running, out.exit_code) == (False, 3)


def test_pause_then_start_unpauses(runtime: DockerRuntime, free_port: Callable[[], int]) -> None:
    d = spec({"llm": standin(free_port(), load=0.1, stop=0.3)})
    ref = runtime.start(d, "llm")
    wait_until(lambda: runtime.check_health(d, "llm"), SLACK, "llm healthy")
    runtime.pause(d, "llm")
    runtime.pause(d, "llm")  # idempotent
    assert runtime.observe(d)["llm"].state is WorkloadState.PAUSED
    assert runtime.check_health(d, "llm") is False
    assert runtime.start(d, "llm") == ref
    assert runtime.observe(d)["llm"].state is WorkloadState.RUNNING
    wait_until(lambda: runtime.check_health(d, "llm"), SLACK, "llm healthy after unpause")

    runtime.pause(d, "llm")
    out = runtime.stop(d, "llm")  # frozen: SIGKILLed as it is, never thawed to run beside the GPU's holder
    assert out.was_running and out.killed and out.exit_code == 137
    assert out.seconds < 0.3 + 1.0  # not its 0.3 s graceful stop after a thaw
    assert "got SIGTERM" not in "\n".join(runtime.logs_tail(d, "llm", 20))


def test_a_pause_that_lands_before_the_sigkill_takes_effect_does_not_hang_the_stop(
    runtime: DockerRuntime, free_port: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race seen under chaos: vramctl stops a model whose server outlives
    its grace period; as vramctl's SIGKILL goes out, the worker's gate pauses
    the same container (a start by hand came in between). With cgroup v1's
    freezer a frozen process keeps a pending SIGKILL until thawed: the
    container stays paused and the stop waited its whole 30 s, the switch with
    it. Here the race is laid out in that order on the real engine: the
    SIGKILL vramctl sends becomes "pause, then the signal straight to the
    process" (what the engine would have delivered had the pause come first)."""
    d = spec({"llm": standin(free_port(), load=0.1, grace=0.3, STANDIN_IGNORE_SIGTERM="1")})
    runtime.start(d, "llm")
    wait_until(lambda: runtime.check_health(d, "llm"), SLACK, "llm healthy")
    real_kill = docker.models.containers.Container.kill
    raced: list[str] = []

    def kill(self: docker.models.containers.Container, signal: str | int | None = None) -> Any:
        if signal == "SIGKILL" and not raced:
            self.pause()  # the gate, first
            self.reload()
            os.kill(int(self.attrs["State"]["Pid"]), 9)  # then the SIGKILL, to a frozen process
            raced.append(str(self.attrs["State"]["Status"]))
            return None
        return real_kill(self, signal=signal)

    monkeypatch.setattr(docker.models.containers.Container, "kill", kill)
    t0 = time.monotonic()
    out = runtime.stop(d, "llm")
    took = time.monotonic() - t0
    assert raced == ["paused"]
    assert out.was_running and out.killed and out.exit_code == 137, out
    assert runtime.observe(d)["llm"].state is WorkloadState.EXITED
    assert took < 0.3 + 5.0, f"the stop took {took:.1f} s"  # the grace, then a few seconds at most, not the 30 s wait


def test_missing_image_is_a_clear_start_error(runtime: DockerRuntime) -> None:
    d = spec({"ghost": {"image": "vramctl/does-not-exist:dev"}})
    with pytest.raises(StartError, match=r"image vramctl/does-not-exist:dev not found locally; build or pull it"):
        runtime.start(d, "ghost")
    assert runtime.observe(d) == {}


def test_a_container_that_cannot_start_is_a_failure_retried_with_back_off(runtime: DockerRuntime, tmp_path: Path) -> None:
    """The engine refusing to start a container is a failure (back-off), not
    "permanent until the spec changes": the same error comes from an engine
    in the middle of a restart."""
    d = spec({"broken": {"image": STANDIN_TAG, "volumes": [f"{tmp_path}:/standin.sh/sub"]}})  # a mount below a file
    with pytest.raises(RuntimeFailure, match="docker could not start") as failed:
        runtime.start(d, "broken")
    assert not isinstance(failed.value, PermanentError)
    assert runtime.observe(d)["broken"].state is WorkloadState.CREATED


def test_validate(runtime: DockerRuntime) -> None:
    d = spec(
        {
            "img": {"image": STANDIN_TAG},
            "proc": {"command": ["python", "-m", "server"]},
            "svc": {"composeService": "svc"},
        }
    )
    assert runtime.validate(d) == [
        ("models.proc.image", "the docker runtime needs image or composeService (command is for the process runtime)"),
        ("models.svc.composeService", "composeService needs a compose project: set compose.project (and compose.files)"),
    ]


def test_no_gpu_device_request_without_the_nvidia_runtime(
    runtime: DockerRuntime, docker_client: docker.DockerClient, free_port: Callable[[], int]
) -> None:
    assert "nvidia" not in (docker_client.info().get("Runtimes") or {}), "this test needs an engine without the nvidia runtime"
    d = spec({"llm": standin(free_port(), load=0.1, stop=0.1)})
    assert runtime.create_kwargs(d, "llm")["host_config"].get("DeviceRequests") is None
    ref = runtime.start(d, "llm")
    assert not container(docker_client, ref).attrs["HostConfig"].get("DeviceRequests")

    gpu_runtime = DockerRuntime(docker_client, instance=runtime.instance)
    gpu_runtime._nvidia = True  # what an engine with the nvidia runtime reports
    d3 = spec({"llm": standin(1234)}, gpu=3)
    (req,) = gpu_runtime.create_kwargs(d3, "llm")["host_config"]["DeviceRequests"]
    assert (req["Driver"], req["DeviceIDs"], req["Capabilities"]) == ("nvidia", ["3"], [["gpu"]])
    never = spec({"llm": {**standin(1234), "gpuRequest": "never"}}, gpu=3)
    assert gpu_runtime.create_kwargs(never, "llm")["host_config"].get("DeviceRequests") is None

    # gpuRequest: always asks even where the engine lists no nvidia runtime (CDI, Docker Desktop).
    always = spec({"llm": {**standin(1234), "gpuRequest": "always"}}, gpu=1)
    (req,) = runtime.create_kwargs(always, "llm")["host_config"]["DeviceRequests"]
    assert (req["Driver"], req["DeviceIDs"]) == ("nvidia", ["1"])


def test_ports_and_volumes(runtime: DockerRuntime, tmp_path: Path) -> None:
    d = spec(
        {
            "bridged": {"image": STANDIN_TAG, "networkMode": "bridge", "ports": ["18001:8000"], "volumes": [f"{tmp_path}:/data:ro"]},
            "hosted": {
                "image": STANDIN_TAG,
                "ports": ["18002:8000"],
                "args": ["--x"],
                "stop": {"signal": "INT", "gracePeriodSeconds": 2.5},
            },
        }
    )
    b = runtime.create_kwargs(d, "bridged")  # only inspected: no bridge network is used here
    assert b["host_config"]["PortBindings"] == {"8000/tcp": [{"HostIp": "", "HostPort": "18001"}]}
    assert b["host_config"]["Binds"] == [f"{tmp_path}:/data:ro"]
    h = runtime.create_kwargs(d, "hosted")
    assert h["host_config"]["NetworkMode"] == "host"
    assert h["host_config"].get("PortBindings") is None
    assert (h["command"], h["stop_signal"], h["stop_timeout"]) == (["--x"], "SIGINT", 3)


# ------------------------------------------------------------ ownership


def test_foreign_containers_are_never_listed_or_touched(
    runtime: DockerRuntime,
    docker_client: docker.DockerClient,
    make_instance: Callable[[], str],
    instance: str,
    free_port: Callable[[], int],
) -> None:
    other = make_instance()
    env = {"STANDIN_PORT": str(free_port()), "STANDIN_LOAD_SECONDS": "0.1", "STANDIN_STOP_SECONDS": "0.1"}
    unlabelled = docker_client.containers.run(
        STANDIN_TAG, name=f"vramctl-{instance}-gpu0-llm-copy", network_mode="host", detach=True,
        environment=env, labels={TEST_OWNER_LABEL: instance},
    )  # fmt: skip
    env2 = {**env, "STANDIN_PORT": str(free_port())}
    foreign_labels = {MANAGED_BY: "vramctl", LABEL_INSTANCE: other, LABEL_MODEL: "llm", LABEL_GPU: "0", LABEL_CLASS: "heavy"}
    other_instance = docker_client.containers.run(
        STANDIN_TAG, name=f"vramctl-{other}-gpu0-llm", network_mode="host", detach=True, environment=env2, labels=foreign_labels
    )
    d = spec({"llm": standin(free_port(), load=0.1, stop=0.1)})

    assert runtime.observe(d) == {}
    assert runtime.check_health(d, "llm") is False
    assert runtime.stop(d, "llm").was_running is False
    runtime.pause(d, "llm")
    runtime.remove(d, "llm")
    ref = runtime.start(d, "llm")
    assert ref not in (unlabelled.id, other_instance.id)
    assert set(runtime.observe(d)) == {"llm"} and runtime.observe(d)["llm"].ref == ref
    runtime.stop(d, "llm")
    runtime.remove(d, "llm")
    for c in (unlabelled, other_instance):
        c.reload()
        assert c.status == "running", f"{c.name} was touched"

    with pytest.raises(Exception, match="refusing to stop"):
        runtime._stop_container(other_instance, None)  # the defence-in-depth check itself
    with pytest.raises(Exception, match="refusing to remove"):
        runtime._remove_container(unlabelled)
    other_instance.reload()
    assert other_instance.status == "running"


def test_a_foreign_container_squatting_the_name_is_left_alone(
    runtime: DockerRuntime, docker_client: docker.DockerClient, instance: str, free_port: Callable[[], int]
) -> None:
    squatter = docker_client.containers.create(
        STANDIN_TAG, name=f"vramctl-{instance}-gpu0-llm", network_mode="host", labels={TEST_OWNER_LABEL: instance},
        environment={"STANDIN_PORT": str(free_port())},
    )  # fmt: skip
    d = spec({"llm": standin(free_port())})
    with pytest.raises(StartError, match="not managed by this vramctl instance"):
        runtime.start(d, "llm")
    squatter.reload()
    assert squatter.status == "created"
    assert runtime.observe(d) == {}


# ------------------------------------------------------------ compose


def write_compose(tmp_path: Path, big_port: int, rogue_port: int) -> Path:
    standin_env = {"STANDIN_LOAD_SECONDS": "0.3", "STANDIN_STOP_SECONDS": "0.2"}
    doc = {
        "services": {
            "big": {
                "image": STANDIN_TAG,
                "network_mode": "host",
                "profiles": ["big"],
                "restart": "no",
                "environment": {**standin_env, "STANDIN_PORT": str(big_port)},
                "labels": {MANAGED_BY: "vramctl", LABEL_MODEL: "big", LABEL_GPU: "0", LABEL_CLASS: "heavy"},
                "healthcheck": {
                    "test": ["CMD", "wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{big_port}/health"],
                    "interval": "200ms",
                    "timeout": "1s",
                    "retries": 50,
                },
                "stop_grace_period": "5s",
            },
            "rogue": {  # looks like a model server, but does not say it is vramctl's
                "image": STANDIN_TAG,
                "network_mode": "host",
                "environment": {**standin_env, "STANDIN_PORT": str(rogue_port)},
                "labels": {LABEL_MODEL: "rogue", LABEL_GPU: "0"},
            },
        }
    }
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def compose(project: str, file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["docker", "compose", "-p", project, "-f", str(file), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)


@pytest.fixture
def compose_stack(instance: str, tmp_path: Path, free_port: Callable[[], int], standin_image: str) -> Iterator[Path]:
    file = write_compose(tmp_path, free_port(), free_port())
    yield file
    subprocess.run(
        ["docker", "compose", "-p", instance, "-f", str(file), "--profile", "*", "down", "--remove-orphans", "-t", "1"],
        capture_output=True, check=False, timeout=120,
    )  # fmt: skip


def compose_spec() -> DeploymentSpec:
    return spec(
        {
            "big": {"composeService": "big", "health": {"dockerHealthcheck": True}, "stop": {"gracePeriodSeconds": 2}},
            "rogue": {"composeService": "rogue"},
        }
    )


def test_compose_service_is_created_adopted_and_stopped(
    make_runtime: Callable[..., DockerRuntime], docker_client: docker.DockerClient, instance: str, compose_stack: Path
) -> None:
    rt = make_runtime("vramctl-under-test", compose=ComposeConfig(project=instance, files=[str(compose_stack)]))
    d = compose_spec()
    assert rt.observe(d) == {}
    assert rt.validate(d) == []

    t0 = time.monotonic()
    ref = rt.start(d, "big")  # docker compose up --no-start (profile activated by name), then start
    c = container(docker_client, ref)
    assert c.labels["com.docker.compose.project"] == instance
    assert c.labels["com.docker.compose.service"] == "big"
    assert LABEL_INSTANCE not in c.labels
    healthy = wait_until(lambda: rt.check_health(d, "big"), 0.3 + SLACK, "big healthy (docker healthcheck)")
    print(f"\ncompose start -> docker-healthy: {time.monotonic() - t0:.3f} s (poll {healthy:.3f} s)")
    w = rt.observe(d)["big"]
    assert (w.state, w.ref, w.drifted, w.heavy) == (WorkloadState.RUNNING, ref, False, True)
    assert rt.start(d, "big") == ref

    rt.pause(d, "big")
    assert rt.observe(d)["big"].state is WorkloadState.PAUSED
    assert rt.start(d, "big") == ref
    out = rt.stop(d, "big")
    assert out.was_running and not out.killed and out.exit_code == 0 and out.seconds < 1.5
    assert rt.observe(d)["big"].state is WorkloadState.EXITED
    assert rt.start(d, "big") == ref  # the same compose container, never recreated
    rt.stop(d, "big")

    # The compose container is not this runtime's without the compose config.
    assert make_runtime("vramctl-under-test").observe(d) == {}


def test_compose_container_without_vramctl_label_is_refused(
    make_runtime: Callable[..., DockerRuntime], docker_client: docker.DockerClient, instance: str, compose_stack: Path
) -> None:
    rt = make_runtime("x", compose=ComposeConfig(project=instance, files=[str(compose_stack)]))
    d = compose_spec()
    with pytest.raises(StartError) as err:
        rt.start(d, "rogue")
    msg = str(err.value)
    assert f"{MANAGED_BY}: vramctl" in msg and "services.rogue.labels" in msg
    (c,) = docker_client.containers.list(all=True, filters={"label": [f"com.docker.compose.project={instance}"]})
    assert c.status == "created"  # compose created it; vramctl did not start it
    assert rt.observe(d) == {}
    compose(instance, compose_stack, "start", "rogue")
    assert rt.observe(d) == {}
    assert rt.stop(d, "rogue").was_running is False
    rt.remove(d, "rogue")
    c.reload()
    assert c.status == "running"


def test_watch_starts_reports_a_compose_up(
    make_runtime: Callable[..., DockerRuntime],
    docker_client: docker.DockerClient,
    instance: str,
    compose_stack: Path,
    exclusivity: ExclusivityRecorder,
) -> None:
    rt = make_runtime("watcher", compose=ComposeConfig(project=instance, files=[str(compose_stack)]))
    events: list[StartEvent] = []
    seen_at: list[float] = []

    def on_start(ev: StartEvent) -> None:
        seen_at.append(time.time())
        events.append(ev)

    stop = threading.Event()
    t = threading.Thread(target=rt.watch_starts, args=(on_start, stop.is_set), daemon=True)
    t.start()
    time.sleep(0.3)
    compose(instance, compose_stack, "up", "-d", "rogue")  # unlabelled: not reported
    compose(instance, compose_stack, "up", "-d", "big")
    wait_until(lambda: len(events) >= 1, 5, "start event")
    time.sleep(0.3)
    (ev,) = events
    assert (ev.model, ev.gpu, ev.heavy) == ("big", 0, True)
    d = compose_spec()
    assert rt.observe(d)["big"].ref == ev.ref
    started = container(docker_client, ev.ref).attrs["State"]["StartedAt"]  # RFC 3339 with nanoseconds
    started_at = datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00").timestamp()
    print(f"\nstart event delivered {seen_at[0] - started_at:.3f} s after the container started")
    assert seen_at[0] - started_at < 1.0
    t0 = time.monotonic()
    stop.set()
    t.join(3)
    assert not t.is_alive()
    print(f"watch_starts returned {time.monotonic() - t0:.3f} s after stop()")
    exclusivity.settle()
    assert exclusivity.holders(instance) == [f"{instance}-big-1"]


# ------------------------------------------------------------ the invariant recorder


def _heavy_standin(client: docker.DockerClient, key: str, name: str, port: int) -> Any:
    labels = {MANAGED_BY: "vramctl", LABEL_INSTANCE: key, LABEL_MODEL: name, LABEL_GPU: "7", LABEL_CLASS: "heavy"}
    env = {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0.1", "STANDIN_STOP_SECONDS": "0.1"}
    return client.containers.create(STANDIN_TAG, name=f"vramctl-{key}-gpu7-{name}", network_mode="host", labels=labels, environment=env)


def test_recorder_catches_two_heavy_holders(
    exclusivity: ExclusivityRecorder, docker_client: docker.DockerClient, instance: str, free_port: Callable[[], int]
) -> None:
    a = _heavy_standin(docker_client, instance, "a", free_port())
    b = _heavy_standin(docker_client, instance, "b", free_port())
    a.start()
    b.start()
    wait_until(lambda: bool(exclusivity.violations_for(instance)), 5, "violation recorded")
    (v,) = exclusivity.violations_for(instance)
    assert (v.gpu, {v.first, v.second}) == ("7", {a.name, b.name})
    assert abs(v.at - time.time()) < 10
    with pytest.raises(AssertionError, match="heavy exclusivity violated"):
        exclusivity.assert_no_violations(instance)
    a.remove(force=True)
    b.remove(force=True)
    exclusivity.settle()
    exclusivity.clear(instance)
    exclusivity.assert_no_violations(instance)


def test_recorder_counts_a_paused_start_as_gated(
    exclusivity: ExclusivityRecorder, docker_client: docker.DockerClient, instance: str, free_port: Callable[[], int]
) -> None:
    holder = _heavy_standin(docker_client, instance, "holder", free_port())
    newcomer = _heavy_standin(docker_client, instance, "newcomer", free_port())
    holder.start()
    newcomer.start()
    newcomer.pause()  # what vramctl's gate does to a start made behind its back
    holder.stop(timeout=1)
    newcomer.unpause()
    exclusivity.settle()
    assert exclusivity.violations_for(instance) == []
    assert exclusivity.holders(instance, 7) == [newcomer.name]
    (latency,) = [s for name, s in exclusivity.gate_latencies if name == newcomer.name]
    assert latency < 0.5
    assert exclusivity.max_gate_latency is not None and exclusivity.max_gate_latency >= latency
    print(f"\ngate latency (the test's own pause right after start): {latency:.3f} s")
