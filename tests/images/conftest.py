"""Fixtures of the image tests: the local bases and the images built on them
(once per session), the SDXL server with a gated fake engine and the real one
on the CPU (helpers in tests/support/images.py and tests/support/sdxl.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import (
    BUILD_LOCAL,
    IMAGES,
    ROOT,
    SDXL_TAG,
    SUPERVISOR_TAG,
    TIMINGS,
    docker_build,
)
from tests.support.sdxl import FakeEngine, RealServer, request, server, start_server


@pytest.fixture(scope="session")
def local_bases() -> dict[str, str]:
    """{"PYTHON_IMAGE": trixie base, "TORCH_IMAGE": CPU torch base, ...}; FAILS when they cannot be made."""
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.fail("the Docker engine does not answer; run `bash .ci/setup-infra.sh`", pytrace=False)
    TIMINGS.started = TIMINGS.started or time.monotonic()
    force = ["--force"] if os.environ.get("VRAMCTL_IMAGES_NO_CACHE") == "1" else []
    started = time.monotonic()
    # trixie alone, beside bookworm and the torch base made on it: two chains at once.
    runs = [
        subprocess.Popen(["bash", str(BUILD_LOCAL), *force, *targets], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for targets in (["trixie"], ["bookworm", "torch"])
    ]
    outputs = [run.communicate(timeout=1200) for run in runs]
    seconds = time.monotonic() - started
    for run, (_, err) in zip(runs, outputs, strict=True):
        if run.returncode != 0:
            pytest.fail(f"images/base/build-local.sh {' '.join(map(str, run.args[2:]))} failed (exit {run.returncode}):\n{err[-4000:]}", pytrace=False)
    stdout = "".join(out for out, _ in outputs)
    stderr = "".join(err for _, err in outputs)
    bases = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    assert {"PYTHON_IMAGE", "TORCH_IMAGE"} <= set(bases), stdout
    # Its own lines say what each base took ("built TAG in N s") or that it was there.
    each: dict[str, float | str] = {}
    for m in re.finditer(r"^build-local: (?:built (\S+) in ([\d.]+) s|(\S+) is up to date)$", stderr, re.M):
        tag = m.group(1) or m.group(3)
        kind = "torch" if "/torch:" in tag else tag.split(":")[1].split("-")[0]
        each[kind] = float(m.group(2)) if m.group(2) else "up to date"
    TIMINGS.add("bases", seconds, each=each, images=bases)
    return bases


def image_id(tag: str) -> str:
    res = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], capture_output=True, text=True, check=False)
    return res.stdout.strip()


def built_image(name: str, dockerfile: Path, context: Path, tag: str, args: dict[str, str], logs: Path) -> str:
    before = image_id(tag)
    rc, seconds, tail = docker_build(dockerfile, context, tag, args, logs / f"{name}.log")
    if rc != 0:
        pytest.fail(f"docker build of {dockerfile.relative_to(ROOT)} failed (exit {rc}):\n{tail}", pytrace=False)
    if before and before != image_id(tag):  # the image this tag named before, unless a container still uses it
        subprocess.run(["docker", "image", "rm", before], capture_output=True, check=False)
    size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True, check=True).stdout)
    text = (logs / f"{name}.log").read_text(errors="replace")
    steps = {"steps": len(re.findall(r"^Step \d+/\d+ :", text, re.M)), "steps_from_cache": text.count("Using cache")}
    TIMINGS.add(f"build_{name}", seconds, tag=tag, size_mb=round(size / 2**20), **steps, **args)
    return tag


@pytest.fixture(scope="session")
def sdxl_image(local_bases: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """images/sdxl/Dockerfile built on the CPU torch base (context images/)."""
    logs = tmp_path_factory.mktemp("build-logs")
    return built_image("sdxl", IMAGES / "sdxl" / "Dockerfile", IMAGES, SDXL_TAG, {"TORCH_IMAGE": local_bases["TORCH_IMAGE"]}, logs)


@pytest.fixture(scope="session")
def supervisor_image(local_bases: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """images/vramctl/Dockerfile built on the trixie base (context: the repository)."""
    logs = tmp_path_factory.mktemp("build-logs")
    return built_image(
        "supervisor", IMAGES / "vramctl" / "Dockerfile", ROOT, SUPERVISOR_TAG, {"PYTHON_IMAGE": local_bases["PYTHON_IMAGE"]}, logs
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """The image steps' timings travel with each teardown report: the summary
    (tests/conftest.py) is written where the reports arrive, an xdist worker's too."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "teardown" and TIMINGS.steps:
        report.user_properties.append(("image_timings", TIMINGS.to_json()))


# -- the SDXL server (tests/images/test_sdxl_*.py) -------------------------


@pytest.fixture
def gated() -> Iterator[tuple[str, threading.Event, FakeEngine, Any]]:
    gate = threading.Event()
    engine = FakeEngine()

    def load() -> FakeEngine:
        assert gate.wait(30), "the test never opened the gate"
        return engine

    app = server.App(load)
    httpd = server.make_server(app, server.ServerConfig("127.0.0.1", 0))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    app.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", gate, engine, app
    finally:
        gate.set()
        app.stop()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def real() -> Iterator[RealServer]:
    proc, log, base = start_server({"SDXL_RANDOM_INIT": "tiny", "SDXL_DEVICE": "cpu"})
    statuses: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = request(base, "/health", timeout=5)
            statuses.append(r.status)
            if r.status == 200:
                break
        except OSError:
            pass  # not listening yet
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"the SDXL server never became healthy (statuses {statuses[-3:]}):\n{''.join(log)}", pytrace=False)
    srv = RealServer(base, proc, statuses, log)
    yield srv
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the SDXL server ignored SIGTERM for 10 s", pytrace=False)
    assert rc == 0, "".join(log)
