"""The gateway and holds through a real `vramctl up --gateway` (process
runtime, the Python stand-ins answering OpenAI-shaped requests), driven by
the official `openai` client: requests for two heavy models from 20
concurrent clients each get a correct answer, no request is cut by a
switch, and no two heavy models ever run at once (a /proc sampler)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.support.openai_mix import IMAGE, TOKENS, one
from tests.support.ports import free_port

STANDIN = [sys.executable, "-m", "vramctl.demo.standin"]


class Up:
    def __init__(self, tmp: Path, instance: str, mode: str = "onDemand") -> None:
        self.instance = instance
        self.api, self.gw = free_port(), free_port()
        ports = {"llm": free_port(), "sdxl": free_port()}

        def model(m: str) -> dict[str, Any]:
            return {
                "command": STANDIN,
                "vramMiB": 11000,
                "servedModelName": "qwen-7b" if m == "llm" else "sdxl-base",
                "env": {
                    "STANDIN_PORT": str(ports[m]),
                    "STANDIN_LOAD_SECONDS": "0.3",
                    "STANDIN_STOP_SECONDS": "0.1",
                    "STANDIN_TOKEN_SECONDS": "0.01",
                    "STANDIN_KEEPALIVE": "1",
                },
                "health": {"path": "/health", "port": ports[m], "intervalSeconds": 0.05},
                "stop": {"gracePeriodSeconds": 3},
            }

        cfg = {
            "runtime": "process",
            "gpuProbe": {"kind": "simulated", "releaseDelaySeconds": 0.05},
            "gpus": [
                {
                    "gpu": 0,
                    "activeModel": "llm",
                    "vramBudgetMiB": 15000,
                    "queue": {"maxServeSeconds": 3, "drainTimeoutSeconds": 2},
                    "switching": {"mode": mode},
                    "models": {"llm": model("llm"), "sdxl": model("sdxl")},
                }
            ],
        }
        (tmp / "vramctl.yaml").write_text(yaml.safe_dump(cfg))
        self.log = tmp / "up.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vramctl", "up", "--config", str(tmp / "vramctl.yaml"), "--state", str(tmp / "state.json"),
             "--listen", f"127.0.0.1:{self.api}", "--gateway", f"127.0.0.1:{self.gw}", "--instance", instance],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.state_dir = tmp

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api}/status", timeout=5) as r:
            return json.loads(r.read())["gpus"]["0"]  # type: ignore[no-any-return]

    def wait(self, pred: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        g: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                g = self.status()
                if pred(g):
                    return g
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"not reached: {g}\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        for rec in (self.state_dir / "proc").glob("*.json"):
            with contextlib.suppress(ProcessLookupError, KeyError, ValueError):
                os.killpg(int(json.loads(rec.read_text())["pgid"]), signal.SIGKILL)


class Overlaps:
    """Samples /proc every few ms: two heavy stand-ins of the instance running at once."""

    def __init__(self, instance: str) -> None:
        self.mark = f"VRAMCTL_INSTANCE={instance}".encode()
        self.found: list[list[str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            models = set()
            for p in Path("/proc").iterdir():
                if p.name.isdigit():
                    try:
                        env = (p / "environ").read_bytes().split(b"\0")
                        state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    except OSError:
                        continue
                    if self.mark in env and state not in ("Z", "T"):
                        models |= {e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"VRAMCTL_MODEL=")}
            if len(models) > 1:
                self.found.append(sorted(models))
            time.sleep(0.003)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    u = Up(tmp_path, "gw" + uuid.uuid4().hex[:8])
    try:
        u.wait(lambda g: g["phase"] == "Ready")
        yield u
    finally:
        u.close()


def test_openai_clients_for_two_models_through_the_gateway(up: Up) -> None:
    watch = Overlaps(up.instance)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.gw}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        listed = {m.id for m in client.models.list().data}
        assert {"qwen-7b", "sdxl-base"} <= listed

        t0 = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda i: one(client, i), range(120)))
        took = time.monotonic() - t0
    finally:
        watch.stop()
    bad = [(i, r) for i, r in enumerate(results) if r not in (IMAGE, TOKENS)]
    assert not bad, bad[:5]
    assert not watch.found, watch.found[:3]
    switches = sum(1 for line in up.log.read_text().splitlines() if "switch-started" in line or "started (" in line)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{up.api}/metrics", timeout=5).read().decode()
    counted = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vramctl_gateway_requests_total{")
    }
    by_model = {k: v for k, v in counted.items() if 'code="200"' in k}
    assert sum(v for k, v in by_model.items() if 'model="llm"' in k) == 90, counted
    assert sum(v for k, v in by_model.items() if 'model="sdxl"' in k) == 30, counted
    assert "vramctl_queue_depth" in metrics and "vramctl_holds" in metrics
    print(f"\n[gateway e2e] 120 requests (90 chat, 30 images) from 20 clients in {took:.1f}s; no overlap; {switches} start lines")


def test_vramctl_hold_holds_for_a_commands_life(up: Up) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vramctl", "hold", "sdxl", "--url", f"http://127.0.0.1:{up.api}", "--ttl", "30", "--",
         sys.executable, "-c", "import time; time.sleep(0.5); print('drew')"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "drew" in r.stdout
    g = up.status()
    assert g["activeModel"] == "sdxl" and g["queue"]["holds"] == {}  # switched for it, released after


def test_declared_mode_refuses_holds_on_other_models(tmp_path: Path) -> None:
    """switching.mode declared (the default): the spec decides; a hold on a
    model that does not run is refused with 409 naming the mode, one on the
    running model is granted."""
    u = Up(tmp_path, "gw" + uuid.uuid4().hex[:8], mode="declared")
    try:
        u.wait(lambda g: g["phase"] == "Ready")
        hold = [sys.executable, "-m", "vramctl", "hold", "--url", f"http://127.0.0.1:{u.api}", "--wait", "5"]
        refused = subprocess.run([*hold, "sdxl", "--", "true"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 75, refused.stdout + refused.stderr
        assert "switching.mode declared" in refused.stderr + refused.stdout
        granted = subprocess.run([*hold, "llm", "--", "true"], capture_output=True, text=True, timeout=60)
        assert granted.returncode == 0, granted.stdout + granted.stderr
        assert u.status()["activeModel"] == "llm"
    finally:
        u.close()


def holding(up: Up, model: str, seconds: float) -> subprocess.Popen[str]:
    """`vramctl hold MODEL -- sleep SECONDS`, running."""
    return subprocess.Popen(
        [sys.executable, "-m", "vramctl", "hold", "--url", f"http://127.0.0.1:{up.api}", "--ttl", "30", model, "--",
         sys.executable, "-c", f"import time; time.sleep({seconds})"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def end(hold: subprocess.Popen[str]) -> None:
    """SIGKILL the hold and its command (its process group): neither is left behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(hold.pid, signal.SIGKILL)
    hold.wait()


def switch(up: Up, model: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """`vramctl switch MODEL --wait [flags]`, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "vramctl", "switch", model, *flags, "--wait", "--url", f"http://127.0.0.1:{up.api}", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_post_switch_waits_for_live_holds_unless_forced(up: Up) -> None:
    """POST /switch is a demand like any other: while a hold is live on the
    running model it is queued and switches only after the drain; --force
    switches at once and the holder's renew answers 409."""
    hold = holding(up, "llm", 1.5)
    try:
        up.wait(lambda g: g["queue"]["holds"] == {"llm": 1}, timeout=20)
        t0 = time.monotonic()
        r = switch(up, "sdxl")
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stdout + r.stderr
        assert "queued" in r.stdout and "sdxl holds gpu 0" in r.stdout
        assert took >= 1.0  # it waited for the hold (1.5 s command) rather than cutting it
        assert hold.wait(30) == 0  # the holder's command ran to its end undisturbed
    finally:
        end(hold)
    # Forced: at once, whatever holds say.
    hold2 = holding(up, "sdxl", 20)
    try:
        up.wait(lambda g: g["queue"]["holds"] == {"sdxl": 1}, timeout=20)
        r = switch(up, "llm", "--force")
        assert r.returncode == 0 and "queued" not in r.stdout, r.stdout + r.stderr
        up.wait(lambda g: g["queue"]["holds"] == {}, timeout=10)  # the cut hold was revoked
    finally:
        end(hold2)
