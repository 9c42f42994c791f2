"""The images of images/, built here and started: no registry, no GPU.

images/base/build-local.sh makes the bases (Debian minbase roots made with
debootstrap and `docker import`, and a CPU torch on the bookworm one); the SDXL
image and the supervisor image are built on them with their Dockerfiles
unchanged, through the base arguments alone (session fixtures in conftest.py:
each is built once per session). Then:

- the SDXL image refuses to start without a GPU (its preflight), and with the
  preflight off serves the tiny random pipeline on the CPU: /health 503 -> 200,
  /generate a PNG, the same seed the same image;
- the supervisor image runs `vramctl up` against this machine's Docker engine
  through the mounted socket, deployed by compose/docker-compose.yml's vramctl
  service (a local image tag, no GPU reservation, a test config of stand-in
  models), and switches the stand-in containers;
- a broken requirement in a scratch copy of the build context fails the build.

Every container runs with network host or none (loopback only, never a bridge).
These tests FAIL, never skip, when an image cannot be built.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.docker_engine import TEST_OWNER_LABEL
from tests.support.exclusivity import ExclusivityRecorder
from tests.support.images import IMAGES, ROOT, TIMINGS, docker_build

# Building the bases and an image is part of the first test's setup.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]

COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"


@pytest.fixture(scope="module", autouse=True)
def _module_clock() -> Iterator[None]:
    """The module's wall time, the session fixtures' builds included (they set up first)."""
    started = time.monotonic()
    yield
    TIMINGS.module_seconds = time.monotonic() - min(started, TIMINGS.started or started)


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {res.returncode}:\n{res.stdout}{res.stderr}")
    return res


def get(url: str, body: Any = None, timeout: float = 60) -> tuple[int, bytes, str]:
    """(status, body, content type); OSError while nothing listens."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def network_modes(*labels: str) -> dict[str, str]:
    """{container name: network mode} of the containers carrying any of ``labels``."""
    out: dict[str, str] = {}
    for label in labels:
        ids = docker("ps", "-aq", "--filter", f"label={label}").stdout.split()
        if ids:
            for line in docker("inspect", "-f", "{{.Name}} {{.HostConfig.NetworkMode}}", *ids).stdout.splitlines():
                name, mode = line.split()
                out[name.lstrip("/")] = mode
    return out


@pytest.fixture
def owned() -> Iterator[str]:
    """A label value for the containers a test runs by hand; removed at teardown."""
    owner = f"img{uuid.uuid4().hex[:8]}"
    yield owner
    ids = docker("ps", "-aq", "--filter", f"label={TEST_OWNER_LABEL}={owner}", check=False).stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)


# -- the SDXL image ------------------------------------------------------------


def test_sdxl_image_keeps_the_bases_torch_and_has_no_xformers(sdxl_image: str) -> None:
    code = "import torch, importlib.util as u; print(torch.__version__, u.find_spec('xformers') is None)"
    res = docker("run", "--rm", "--network", "none", "--entrypoint", "python", sdxl_image, "-c", code)
    assert res.stdout.split() == ["2.13.0+cpu", "True"], res.stdout + res.stderr


def test_sdxl_image_refuses_to_start_without_a_gpu(sdxl_image: str, owned: str) -> None:
    started = time.monotonic()
    res = docker("run", "--rm", "--network", "none", "--label", f"{TEST_OWNER_LABEL}={owned}", sdxl_image, check=False, timeout=120)
    TIMINGS.add("sdxl_preflight_refusal", time.monotonic() - started)
    output = res.stdout + res.stderr
    fails = [line for line in output.splitlines() if line.startswith("preflight: FAIL")]
    assert res.returncode == 1, output
    assert len(fails) == 2, output
    assert "CPU-only build" in fails[0] and "no CUDA device" in fails[1], fails
    assert "preflight: exit 1; not starting python" in res.stderr
    assert "listening" not in output  # the server never started


def test_sdxl_image_serves_the_tiny_pipeline_on_the_cpu(sdxl_image: str, owned: str, free_port: Callable[[], int]) -> None:
    from PIL import Image

    port = free_port()
    name = f"{owned}-sdxl"
    env = {"VRAMCTL_PREFLIGHT": "0", "SDXL_RANDOM_INIT": "tiny", "SDXL_DEVICE": "cpu", "PORT": str(port), "HF_HUB_OFFLINE": "1"}
    env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    started = time.monotonic()
    docker("run", "-d", "--name", name, "--network", "host", "--label", f"{TEST_OWNER_LABEL}={owned}", *env_args, sdxl_image)
    base = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status, _, _ = get(base + "/health", timeout=5)
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            if status == 200:
                break
        except OSError:
            if docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
                break
        time.sleep(0.1)
    healthy_after = time.monotonic() - started
    logs = docker("logs", name, check=False)
    assert statuses and statuses[-1] == 200, f"/health answered {statuses}:\n{logs.stdout}{logs.stderr}"
    assert 503 in statuses, statuses  # listening while the pipeline loads
    TIMINGS.add("first_start_sdxl", healthy_after, until="GET /health 200 (tiny pipeline, CPU)")
    assert "preflight: skipped (VRAMCTL_PREFLIGHT=0)" in logs.stderr

    body = {"prompt": "a lighthouse at dusk", "steps": 2, "width": 64, "height": 96, "seed": 7}
    status, first, ctype = get(base + "/generate", body)
    assert status == 200 and ctype == "image/png", first[:300]
    with Image.open(io.BytesIO(first)) as im:
        assert (im.format, im.size) == ("PNG", (64, 96))
    status, again, _ = get(base + "/generate", body)
    assert status == 200 and again == first  # the same seed, the same image
    status, other, _ = get(base + "/generate", {**body, "seed": 8})
    assert status == 200 and other != first
    status, reply, _ = get(base + "/generate", {**body, "width": 65})
    assert status == 400 and json.loads(reply)["field"] == "width"

    # The image's HEALTHCHECK probes the same path inside the container.
    deadline = time.monotonic() + 30
    while docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() != "healthy":
        assert time.monotonic() < deadline, docker("inspect", "-f", "{{json .State.Health}}", name).stdout
        time.sleep(0.5)

    assert network_modes(f"{TEST_OWNER_LABEL}={owned}") == {name: "host"}
    docker("stop", "-t", "20", name, timeout=60)  # SIGTERM to the server (PID 1 after the entrypoint's exec)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"


@pytest.mark.parametrize("level", [1, 2])
def test_sdxl_image_sleeps_and_wakes_in_the_container(sdxl_image: str, owned: str, free_port: Callable[[], int], level: int) -> None:
    """Warm switching against the built image: asleep, image requests get 503
    with Retry-After (never a hang); after the wake the same seed gives the
    same image (level 1: host buffers; level 2: rebuilt from disk)."""
    port = free_port()
    name = f"{owned}-sdxl-sleep{level}"
    env = {
        "VRAMCTL_PREFLIGHT": "0",
        "SDXL_RANDOM_INIT": "tiny",
        "SDXL_DEVICE": "cpu",
        "PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "SDXL_SLEEP": "1",
    }
    env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    docker("run", "-d", "--name", name, "--network", "host", "--label", f"{TEST_OWNER_LABEL}={owned}", *env_args, sdxl_image)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if get(base + "/health", timeout=5)[0] == 200:
                break
        time.sleep(0.1)
    body = {"prompt": "a lighthouse at dusk", "steps": 2, "width": 64, "height": 64, "seed": 7}
    status, before, _ = get(base + "/generate", body)
    assert status == 200, before[:300]
    status, reply, _ = get(f"{base}/sleep?level={level}", {})
    assert status == 200 and json.loads(reply)["is_sleeping"] is True, reply
    assert json.loads(get(base + "/is_sleeping")[1])["is_sleeping"] is True
    req = urllib.request.Request(base + "/generate", data=json.dumps(body).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as asleep:
        urllib.request.urlopen(req, timeout=10)
    assert asleep.value.code == 503 and asleep.value.headers.get("Retry-After")
    status, reply, _ = get(base + "/wake_up", {})
    assert status == 200 and json.loads(reply)["is_sleeping"] is False, reply
    status, after, _ = get(base + "/generate", body)
    assert status == 200 and after == before  # the same weights after the cycle
    docker("stop", "-t", "20", name, timeout=60)


# -- a broken requirement fails the build --------------------------------------


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        pytest.param("vramctl-no-such-package==0.0.1", "No matching distribution found for vramctl-no-such-package", id="missing-package"),
        pytest.param("torch==2.12.0", "The user requested (constraint) torch==2.13.0", id="torch-other-than-the-bases"),
    ],
)
def test_a_broken_requirement_fails_the_sdxl_build(local_bases: dict[str, str], tmp_path: Path, line: str, expect: str) -> None:
    context = tmp_path / "images"
    for part in ("sdxl", "common"):
        shutil.copytree(IMAGES / part, context / part)
    reqs = context / "sdxl" / "requirements.txt"
    reqs.write_text(f"{line}\n" + reqs.read_text())
    tag = f"vramctl/sdxl:broken-{uuid.uuid4().hex[:8]}"
    try:
        rc, seconds, tail = docker_build(
            context / "sdxl" / "Dockerfile", context, tag, {"TORCH_IMAGE": local_bases["TORCH_IMAGE"]}, tmp_path / "b.log"
        )
        TIMINGS.add(f"broken_build_{line.split('==')[0]}", seconds, exit=rc)
        assert rc != 0, f"the build passed with {line!r} in requirements.txt:\n{tail}"
        assert expect in tail, tail
        assert docker("image", "inspect", tag, check=False).returncode != 0
    finally:
        docker("image", "rm", tag, check=False)
        # The steps before the failing one stay as untagged images: the last one
        # goes, with its parents that nothing else uses.
        done = re.findall(r"^ ---> ([0-9a-f]{12})$", (tmp_path / "b.log").read_text(errors="replace"), re.M)
        if done:
            docker("image", "rm", done[-1], check=False)


# -- the supervisor image, as compose/docker-compose.yml deploys it --------------


def standin(port: int, vram: int) -> dict[str, Any]:
    return {
        "class": "heavy",
        "image": "vramctl/standin:dev",
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0.5", "STANDIN_STOP_SECONDS": "0.2"},
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
        "stop": {"gracePeriodSeconds": 5},
        "startTimeoutSeconds": 20,
        "vramMiB": vram,
    }


def test_supervisor_image_switches_the_standins_through_the_socket(
    supervisor_image: str,
    standin_image: str,
    instance: str,
    free_port: Callable[[], int],
    exclusivity: ExclusivityRecorder,
    tmp_path: Path,
) -> None:
    api, llm, sdxl = free_port(), free_port(), free_port()
    config = tmp_path / "vramctl.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "runtime": "docker",
                "gpuProbe": {"kind": "simulated", "totalMiB": 16384, "releaseDelaySeconds": 0.2},
                "gpus": [
                    {
                        "gpu": 0,
                        "activeModel": "llm",
                        "vramBudgetMiB": 15000,
                        "models": {"llm": standin(llm, 9000), "sdxl": standin(sdxl, 10000)},
                    }
                ],
            }
        )
    )
    # What differs from the shipped service: the local image tag, no GPU
    # reservation (no nvidia runtime here), this test's config, API port and
    # instance. Host network, host PID namespace, the socket and the state
    # volume are the file's own.
    override = tmp_path / "override.yml"
    override.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "vramctl": {
                        "image": supervisor_image,
                        "deploy": {},
                        "command": [
                            *("up", "--config", "/etc/vramctl/vramctl.yaml", "--state", "/var/lib/vramctl/state.json"),
                            *("--listen", f"127.0.0.1:{api}", "--instance", instance),
                        ],
                        "volumes": [f"{config}:/etc/vramctl/vramctl.yaml:ro"],
                    }
                }
            }
        ).replace("deploy: {}", "deploy: !reset {}")
    )
    compose = ["compose", "-p", instance, "-f", str(COMPOSE_FILE), "-f", str(override)]
    rendered = json.loads(docker(*compose, "config", "--format", "json", "vramctl").stdout)["services"]["vramctl"]
    assert rendered["network_mode"] == "host" and rendered["pid"] == "host" and "deploy" not in rendered
    assert any(v["target"] == "/var/run/docker.sock" for v in rendered["volumes"])

    url = f"http://127.0.0.1:{api}"
    try:
        started = time.monotonic()
        docker(*compose, "up", "-d", "--no-build", "--pull", "never", "vramctl", timeout=120)
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(url + "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = docker(*compose, "logs", "vramctl", check=False)
                raise AssertionError(f"the supervisor container never answered {url}/healthz:\n{logs.stdout[-3000:]}{logs.stderr[-2000:]}")
            time.sleep(0.1)
        TIMINGS.add("first_start_supervisor", time.monotonic() - started, until="GET /healthz 200 (docker compose up)")

        def running() -> set[str]:
            ids = docker("ps", "-q", "--filter", f"label=vramctl.io/instance={instance}").stdout.split()
            if not ids:
                return set()
            return set(docker("inspect", "-f", '{{ index .Config.Labels "vramctl.io/model" }}', *ids).stdout.split())

        def switch(model: str) -> str:
            res = docker(
                *compose,
                "exec",
                "-T",
                "-e",
                f"VRAMCTL_URL={url}",
                "vramctl",
                "vramctl",
                "switch",
                model,
                "--wait",
                "--timeout",
                "60",
                check=False,
            )
            assert res.returncode == 0, res.stdout + res.stderr + docker(*compose, "logs", "vramctl", check=False).stdout[-3000:]
            return res.stdout

        deadline = time.monotonic() + 60
        while running() != {"llm"}:
            assert time.monotonic() < deadline, f"llm never came up: {running()}\n" + docker(*compose, "logs", "vramctl").stdout[-3000:]
            time.sleep(0.2)
        out = switch("sdxl")
        for step in ("stopping", "stopped", "memory-free", "starting", "healthy"):
            assert step in out, f"no {step!r} in the switch's progress:\n{out}"
        out = out[out.index("stopping") :]  # the progress before it may be llm's own start
        assert out.index("memory-free") < out.index("starting") < out.index("healthy"), out
        assert running() == {"sdxl"}
        assert get(f"http://127.0.0.1:{sdxl}/health")[0] == 200
        switch("llm")
        assert running() == {"llm"}
        status = json.loads(get(url + "/status")[1])["gpus"]["0"]
        assert status["phase"] == "Ready" and status["lastSwitch"]["from"] == "sdxl" and status["lastSwitch"]["to"] == "llm"
        exclusivity.assert_no_violations(instance)

        modes = network_modes(f"vramctl.io/instance={instance}", f"com.docker.compose.project={instance}")
        assert f"{instance}-vramctl-1" in modes and set(modes.values()) == {"host"}, modes
        assert docker("network", "ls", "-q", "--filter", f"name={instance}").stdout.strip() == ""  # compose made no network
        vc = json.loads(docker("inspect", f"{instance}-vramctl-1").stdout)[0]
        assert vc["HostConfig"]["PidMode"] == "host" and vc["RestartCount"] == 0
        res = docker(*compose, "exec", "-T", "vramctl", "docker", "compose", "version")  # the CLI plugin the compose mode uses
        assert "Docker Compose version v2" in res.stdout or "Docker Compose version 2" in res.stdout, res.stdout
    finally:
        docker(*compose, "down", "-v", "--timeout", "20", check=False, timeout=120)
