"""What the image tests share: load images/ modules by path, the local
bases' build script, ``docker build``, the timings of the image steps.

The modules under images/ are not part of the vramctl package (the supervisor
never imports torch): they are loaded here by file path, under names of their
own, and images/sdxl is put on sys.path so server.py's lazy
``import sdxl_pipeline`` finds its sibling, as it does in the image.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

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


