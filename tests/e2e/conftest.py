"""A real ``vramctl up`` subprocess against the real Docker engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# What the chaos and gateway runs measured, shown in the session's summary
# (CI runs `pytest -q`: the figures are read there).
FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("end-to-end figures (chaos, gateway)")
        for line in FIGURES:
            terminalreporter.write_line(line)


STANDIN = "vramctl/standin:dev"


def standin_model(
    port: int, vram: int, cls: str = "heavy", load: float = 0.5, stop: float = 0.2, grace: float = 5, **env: str
) -> dict[str, Any]:
    return {
        "class": cls,
        "image": STANDIN,
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": str(load), "STANDIN_STOP_SECONDS": str(stop), **env},
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
        "stop": {"gracePeriodSeconds": grace},
        "startTimeoutSeconds": 20,
        "vramMiB": vram,
    }


class VramctlProc:
    """``vramctl up`` as a user runs it, plus the CLI around it."""

    def __init__(self, tmp: Path, config: dict[str, Any], api_port: int, instance: str) -> None:
        self.tmp, self.api_port, self.instance = tmp, api_port, instance
        self.config_path = tmp / "vramctl.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.state_path = tmp / "state.json"
        self.url = f"http://127.0.0.1:{api_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.extra_args: list[str] = []  # e.g. ["--gateway", "127.0.0.1:PORT"]

    def start(self, wait_ready: bool = True) -> None:
        log = self.tmp / f"vramctl-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vramctl",
                "up",
                "--config",
                str(self.config_path),
                "--state",
                str(self.state_path),
                "--listen",
                f"127.0.0.1:{self.api_port}",
                "--instance",
                self.instance,
                *self.extra_args,
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vramctl up exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=0.5).read()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("vramctl up did not answer /healthz within 20 s")
        if wait_ready:
            self.wait(lambda g: g["phase"] in ("Ready", "Idle") and g["observedGeneration"] >= g["desiredGeneration"])

    def status_progress(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/status?since=0", timeout=5) as r:
            return json.loads(r.read()).get("progress", [])  # type: ignore[no-any-return]

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/status", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def gpu(self, gpu: int = 0) -> dict[str, Any]:
        return self.status()["gpus"][str(gpu)]  # type: ignore[no-any-return]

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0, gpu: int = 0) -> dict[str, Any]:
        deadline = time.time() + timeout
        g: dict[str, Any] = {}
        while time.time() < deadline:
            g = self.gpu(gpu)
            if pred(g):
                return g
            time.sleep(0.05)
        raise AssertionError(f"condition not met within {timeout}s; last status: {json.dumps(g, indent=1)}\n{self.log_text()[-3000:]}")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vramctl", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "VRAMCTL_URL": self.url},
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def vramctl(
    tmp_path: Path, instance: str, free_port: Callable[[], int], standin_image: str
) -> Iterator[Callable[[dict[str, Any]], VramctlProc]]:
    made: list[VramctlProc] = []

    def make(config: dict[str, Any]) -> VramctlProc:
        v = VramctlProc(tmp_path, config, free_port(), instance)
        made.append(v)
        return v

    yield make
    for v in made:
        v.stop()
