"""Fixtures of the image tests: the local bases and the images built on them
(once per session), the SDXL server with a gated fake engine and the real one
on the CPU (helpers in tests/support/images.py and tests/support/sdxl.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import (
    BUILD_LOCAL,
    IMAGES,
    RESULTS,
    ROOT,
    SDXL_TAG,
    SUPERVISOR_TAG,
    TIMINGS,
    docker_build,
    docker_info,
)
from tests.support.sdxl import FakeEngine, RealServer, request, server, start_server


@pytest.fixture(scope="session")
def local_bases() -> dict[str, str]:
    """{"PYTHON_IMAGE": trixie base, "TORCH_IMAGE": CPU torch base, ...}; FAILS when they cannot be made."""
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.fail("the Docker engine does not answer; run `bash .ci/setup-infra.sh`", pytrace=False)
    TIMINGS.started = TIMINGS.started or time.monotonic()
    cmd = ["bash", str(BUILD_LOCAL)]
    if os.environ.get("VRAMCTL_IMAGES_NO_CACHE") == "1":
        cmd.append("--force")
    started = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    seconds = time.monotonic() - started
    if res.returncode != 0:
        pytest.fail(f"images/base/build-local.sh failed (exit {res.returncode}):\n{res.stderr[-4000:]}", pytrace=False)
    bases = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert {"PYTHON_IMAGE", "TORCH_IMAGE"} <= set(bases), res.stdout
    # Its own lines say what each base took ("built TAG in N s") or that it was there.
    each: dict[str, float | str] = {}
    for m in re.finditer(r"^build-local: (?:built (\S+) in ([\d.]+) s|(\S+) is up to date)$", res.stderr, re.M):
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


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TIMINGS.steps:
        return
    terminalreporter.section("image builds (seconds)")
    for name, step in TIMINGS.steps.items():
        extra = ", ".join(f"{k} {v}" for k, v in step.items() if k not in ("seconds", "images"))
        terminalreporter.write_line(f"{name:<24} {step['seconds']:>7.1f}  {extra}")
    if TIMINGS.complete():
        doc = {
            "what": "images/base/build-local.sh, then docker build of images/sdxl and images/vramctl on those bases, then first starts",
            "command": "python3 -m pytest -q tests/images/test_image_builds.py",
            "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {
                "cpus": os.cpu_count(),
                "docker_storage_driver": docker_info("{{.Driver}}"),
                "docker_server": docker_info("{{.ServerVersion}}"),
            },
            # Nothing reused: every base made and every build step run in this session.
            "from_scratch": all(not isinstance(v, str) for v in TIMINGS.steps["bases"]["each"].values())
            and all(s.get("steps_from_cache") == 0 for k, s in TIMINGS.steps.items() if k.startswith("build_")),
            "module_seconds": None if TIMINGS.module_seconds is None else round(TIMINGS.module_seconds, 1),
            "steps": TIMINGS.steps,
        }
        # The committed figures are rewritten only when asked (VRAMCTL_RECORD_RESULTS=1): a test run leaves the checkout clean.
        out = RESULTS if os.environ.get("VRAMCTL_RECORD_RESULTS") == "1" else Path(tempfile.gettempdir()) / "vramctl-image_build.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        terminalreporter.write_line(f"written to {out}")


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


@pytest.fixture(scope="module")
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
