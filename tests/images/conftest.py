"""Helpers for the image tests: load images/ modules by path, free ports.

The modules under images/ are not part of the vramctl package (the supervisor
never imports torch): they are loaded here by file path, under names of their
own, and images/sdxl is put on sys.path so server.py's lazy
``import sdxl_pipeline`` finds its sibling, as it does in the image.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
SDXL_DIR = IMAGES / "sdxl"


def load_module(name: str, path: Path) -> ModuleType:
    """Import ``path`` as module ``name`` (once: later calls return the same module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sdxl_on_path() -> None:
    if str(SDXL_DIR) not in sys.path:
        sys.path.insert(0, str(SDXL_DIR))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- images built from the local bases (tests/images/test_image_builds.py) ----
#
# Nothing is pulled: images/base/build-local.sh makes Debian and CPU torch bases
# with debootstrap and `docker import`, and the images of images/ are built on
# them with their Dockerfiles unchanged (only the base arguments differ). The
# bases are made once per session, each image is built once per session.
# Builds reach the package indexes through the host's network (--network host,
# no bridge); every container runs with network host or none.

BUILD_LOCAL = IMAGES / "base" / "build-local.sh"
RESULTS = ROOT / "benchmarks" / "results" / "image_build.json"
SDXL_TAG = "vramctl/sdxl:ci"
SUPERVISOR_TAG = "vramctl/vramctl:ci"


class Timings:
    """Seconds taken by the image steps of this session, for the summary and
    benchmarks/results/image_build.json."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}
        self.started: float | None = None  # when the first base or image step began (time.monotonic)
        self.module_seconds: float | None = None  # from then to the end of test_image_builds.py

    def add(self, name: str, seconds: float, **detail: Any) -> None:
        self.steps[name] = {"seconds": round(seconds, 1), **detail}

    def complete(self) -> bool:
        return {"bases", "build_sdxl", "build_supervisor"} <= set(self.steps)


TIMINGS = Timings()


def docker_info(fmt: str) -> str:
    res = subprocess.run(["docker", "info", "--format", fmt], capture_output=True, text=True, timeout=30, check=False)
    return res.stdout.strip()


def docker_build(dockerfile: Path, context: Path, tag: str, build_args: dict[str, str], log: Path) -> tuple[int, float, str]:
    """``docker build --network host`` (the package indexes; no bridge), output to ``log``.
    Returns (exit status, seconds, the log's tail)."""
    cmd = ["docker", "build", "--network", "host", "--force-rm", "-f", str(dockerfile), "-t", tag]
    if os.environ.get("VRAMCTL_IMAGES_NO_CACHE") == "1":
        cmd.append("--no-cache")
    for key, value in build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    with log.open("w") as out:
        rc = subprocess.run([*cmd, str(context)], stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False).returncode
    text = log.read_text(errors="replace")
    return rc, time.monotonic() - started, text[-4000:]


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
