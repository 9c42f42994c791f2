"""`vramctl up` stopped with SIGTERM while it waits for a model to become
healthy: it exits within 2 s and burns no CPU while it waits (the worker
used to spin on its interrupt, about a million health checks a second)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

from tests.support.ports import free_port

STANDIN = [sys.executable, "-m", "vramctl.demo.standin"]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def test_sigterm_during_a_health_wait_exits_promptly_without_spinning(tmp_path: Path) -> None:
    model_port, api_port = free_port(), free_port()
    config = {
        "runtime": "process",
        "gpus": [
            {
                "gpu": 0,
                "activeModel": "llm",
                "models": {
                    "llm": {
                        "command": STANDIN,
                        "vramMiB": 8000,
                        "env": {"STANDIN_PORT": str(model_port), "STANDIN_LOAD_SECONDS": "120", "STANDIN_STOP_SECONDS": "0.1"},
                        "health": {"path": "/health", "port": model_port, "intervalSeconds": 0.1},
                        "startTimeoutSeconds": 300,
                        "stop": {"gracePeriodSeconds": 2},
                    }
                },
            }
        ],
    }
    cfg = tmp_path / "vramctl.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = tmp_path / "up.log"
    instance = "sig" + uuid.uuid4().hex[:8]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vramctl", "up", "--config", str(cfg), "--state", str(tmp_path / "state.json"),
         "--listen", f"127.0.0.1:{api_port}", "--instance", instance],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        phase = ""
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/status", timeout=2) as r:
                    g = json.loads(r.read())["gpus"]["0"]
                phase = g["phase"]
                if phase == "Switching" and any((tmp_path / "proc").glob("*llm.json")):  # started, waiting for health
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"llm never started ({phase}):\n{log.read_text()}")
        time.sleep(0.5)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(2.0)
        used = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        assert used < 0.25, f"vramctl used {used:.0%} of a core while waiting for health"
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        took = time.monotonic() - t_term
        assert took < 2.0, f"vramctl up took {took:.2f}s to exit after SIGTERM:\n{log.read_text()}"
        assert proc.returncode == 0, log.read_text()
        print(f"\n[sigterm] cpu while waiting {used:.1%} of a core; exit {took:.3f}s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # The model outlives the supervisor by design (adopted by the next one): end it here.
        for rec in (tmp_path / "proc").glob("*.json"):
            data = json.loads(rec.read_text())
            with contextlib.suppress(ProcessLookupError, KeyError, ValueError):
                os.killpg(int(data["pgid"]), signal.SIGKILL)
