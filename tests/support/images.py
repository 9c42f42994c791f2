"""What the image tests share: load images/ modules by path, the local
bases' build script, ``docker build``, the timings of the image steps.

The modules under images/ are not part of the vramctl package (the supervisor
never imports torch): they are loaded here by file path, under names of their
own, and images/sdxl is put on sys.path so server.py's lazy
``import sdxl_pipeline`` finds its sibling, as it does in the image.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
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

    def to_json(self) -> str:
        return json.dumps({"steps": self.steps, "started": self.started, "module_seconds": self.module_seconds})

    def update_from_json(self, text: str) -> None:
        doc = json.loads(text)
        self.steps.update(doc["steps"])
        self.started = self.started or doc["started"]
        self.module_seconds = doc["module_seconds"] if doc["module_seconds"] is not None else self.module_seconds

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


def summary(terminalreporter: Any, timings: Timings) -> None:
    """The image steps' section of the session's summary; the JSON once every step ran."""
    if not timings.steps:
        return
    terminalreporter.section("image builds (seconds)")
    for name, step in timings.steps.items():
        extra = ", ".join(f"{k} {v}" for k, v in step.items() if k not in ("seconds", "images"))
        terminalreporter.write_line(f"{name:<24} {step['seconds']:>7.1f}  {extra}")
    if timings.complete():
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
            "from_scratch": all(not isinstance(v, str) for v in timings.steps["bases"]["each"].values())
            and all(s.get("steps_from_cache") == 0 for k, s in timings.steps.items() if k.startswith("build_")),
            "module_seconds": None if timings.module_seconds is None else round(timings.module_seconds, 1),
            "steps": timings.steps,
        }
        # The committed figures are rewritten only when asked (VRAMCTL_RECORD_RESULTS=1): a test run leaves the checkout clean.
        out = RESULTS if os.environ.get("VRAMCTL_RECORD_RESULTS") == "1" else Path(tempfile.gettempdir()) / "vramctl-image_build.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        terminalreporter.write_line(f"written to {out}")
