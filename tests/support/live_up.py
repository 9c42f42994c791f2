"""A live ``vramctl up``, started as a user starts it, on loopback: the one
harness of the process, e2e and hostile tests.

``config()`` is the demo stack with the process runtime and a simulated GPU
(stand-in model servers as local processes, no Docker needed); ``standin()``
is one such model, ``standin_model()`` the same stand-in as a container of
the stand-in image (the docker runtime's tests).

``LiveUp.start()`` runs ``vramctl up`` and waits for ``/healthz`` (and, by
default, for a settled GPU 0); it refuses to start a second process while the
first still runs, so none is ever lost track of. ``LiveUp.stop()`` ends
vramctl; ``LiveUp.kill_models()`` SIGKILLs the process group of every model
record of its state dir whose pid still has the recorded start time, so a
test never leaves a model behind. The ``live_up`` fixture of tests/conftest.py
does both at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.support.docker_engine import STANDIN_TAG
from tests.support.ports import free_port

STANDIN = [sys.executable, "-m", "vramctl.demo.standin"]


def standin(port: int, cls: str = "heavy", vram: int = 6000, **env: str) -> dict[str, Any]:
    """A stand-in model server as a local process (the process runtime)."""
    return {
        "class": cls,
        "command": STANDIN,
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0.2", "STANDIN_STOP_SECONDS": "0.05", **env},
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
        "stop": {"gracePeriodSeconds": 5},
        "startTimeoutSeconds": 20,
        "vramMiB": vram,
    }


def standin_model(
    port: int, vram: int, cls: str = "heavy", load: float = 0.5, stop: float = 0.2, grace: float = 5, **env: str
) -> dict[str, Any]:
    """A stand-in model server as a container of the stand-in image (the docker runtime)."""
    return {
        "class": cls,
        "image": STANDIN_TAG,
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": str(load), "STANDIN_STOP_SECONDS": str(stop), **env},
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
        "stop": {"gracePeriodSeconds": grace},
        "startTimeoutSeconds": 20,
        "vramMiB": vram,
    }


def config(**extra_args: list[str]) -> dict[str, Any]:
    models = {"llm": standin(free_port()), "sdxl": standin(free_port()), "tts": standin(free_port(), cls="light", vram=2000)}
    for name, args in extra_args.items():
        models[name]["args"] = args
    return {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16000, "releaseDelaySeconds": 0.05},
        "gpus": [{"gpu": 0, "activeModel": "llm", "models": models}],
    }


def _start_ticks(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(raw[raw.rfind(b")") + 2 :].split()[19])


class LiveUp:
    """``vramctl up`` as a user runs it, plus the CLI around it. ``instance``:
    the vramctl instance (a Docker test passes its own, whose containers its
    fixture removes); ``extra_args`` are appended to the command line."""

    def __init__(self, tmp: Path, cfg: dict[str, Any] | None = None, *, instance: str | None = None, port: int | None = None) -> None:
        self.tmp = tmp
        self.instance = instance or "h" + uuid.uuid4().hex[:10]
        self.config_path = tmp / "vramctl.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg or config()))
        self.state_path = tmp / "state" / "state.json"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.extra_args: list[str] = []  # e.g. ["--gateway", "127.0.0.1:PORT"]

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "vramctl", "up",
            "--config", str(self.config_path),
            "--state", str(self.state_path),
            "--listen", f"127.0.0.1:{self.port}",
            "--instance", self.instance,
            *self.extra_args,
        ]  # fmt: skip

    def start(self, wait_ready: bool = True, preexec_fn: Callable[[], None] | None = None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise AssertionError(f"vramctl up (pid {self.proc.pid}) still runs: stop or kill it before starting another")
        log = self.tmp / f"vramctl-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(
            self.argv(), stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec_fn
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vramctl up exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=0.5).read()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("vramctl up did not answer /healthz within 30 s")
        if wait_ready:
            self.wait(lambda g: g["phase"] in ("Ready", "Idle") and g["observedGeneration"] >= g["desiredGeneration"])

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/status", timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def status_progress(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/status?since=0", timeout=5) as r:
            return json.loads(r.read()).get("progress", [])  # type: ignore[no-any-return]

    def gpu(self, gpu: int = 0) -> dict[str, Any]:
        return self.status()["gpus"][str(gpu)]  # type: ignore[no-any-return]

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0, gpu: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        g: dict[str, Any] = {}
        while time.monotonic() < deadline:
            g = self.gpu(gpu)
            if pred(g):
                return g
            time.sleep(0.05)
        raise AssertionError(f"not met within {timeout}s; last status {json.dumps(g, indent=1)}\n{self.log_text()[-3000:]}")

    def post(self, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + "/switch", data=json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``vramctl ARGS`` against this instance's API."""
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill_models(self) -> None:
        for path in (self.state_path.parent / "proc").glob(f"{self.instance}-*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                rec = json.loads(path.read_text())
                if rec["pid"] > 1 and rec["pgid"] > 1 and _start_ticks(rec["pid"]) == rec["start_ticks"]:
                    os.killpg(rec["pgid"], signal.SIGKILL)
