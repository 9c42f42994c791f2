"""What becomes of the models when ``vramctl up`` (process runtime) stops,
and ``vramctl down``, with real processes of the Python stand-in:

- a graceful stop (SIGTERM, Ctrl-C) stops its models, the sleeping one too,
  and says which;
- ``--keep-models`` leaves them running, and the next ``up`` adopts them
  (the same pids, no second start);
- a SIGKILLed ``up`` leaves them for adoption; ``vramctl down`` stops them
  and says what it did; ``down`` against a running ``up`` stops it too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_up import LiveUp, free_port, standin

SLEEP_API = {"path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"}


def sleepy() -> dict[str, Any]:
    m = standin(free_port(), vram=11000, STANDIN_SLEEP_SECONDS="0.05", STANDIN_WAKE_SECONDS="0.05", STANDIN_RESIDUE_MIB="600")
    m["switchStrategy"] = "sleep"
    m["sleep"] = {"level": 2, "maxResidueMiB": 1024, **SLEEP_API}
    return m


def cfg() -> dict[str, Any]:
    models = {"llm": sleepy(), "sdxl": standin(free_port(), vram=11000), "tts": standin(free_port(), cls="light", vram=2000)}
    return {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16000, "releaseDelaySeconds": 0.05},
        "gpus": [{"gpu": 0, "activeModel": "llm", "companions": ["tts"], "models": models}],
    }


@pytest.fixture
def u(tmp_path: Path) -> Iterator[LiveUp]:
    up = LiveUp(tmp_path, cfg())
    try:
        yield up
    finally:
        up.stop()
        up.kill_models()


def alive(u: LiveUp) -> dict[str, int]:
    """{model: pid} of every model process of this instance that still runs (recorded pid with its start time)."""
    out = {}
    for path in sorted((u.state_path.parent / "proc").glob(f"{u.instance}-*.json")):
        rec = json.loads(path.read_text())
        try:
            fields = Path(f"/proc/{rec['pid']}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[19]) == rec["start_ticks"]:
            out[rec["model"]] = rec["pid"]
    return out


def llm_asleep_sdxl_running(u: LiveUp) -> dict[str, int]:
    """Switch to sdxl: llm goes to sleep (its process stays), sdxl and tts run."""
    assert u.post({"model": "sdxl", "companions": ["tts"]})[0] == 202
    u.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["sdxl", "tts"] and g.get("asleepModels") == ["llm"])
    pids = alive(u)
    assert sorted(pids) == ["llm", "sdxl", "tts"]
    return pids


def terminate(u: LiveUp, sig: int = signal.SIGTERM) -> str:
    assert u.proc is not None
    u.proc.send_signal(sig)
    u.proc.wait(60)
    return u.log_text()


def down(u: LiveUp, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramctl", "down", "--config", str(u.config_path), "--state", str(u.state_path), "--instance", u.instance, *extra],
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_a_graceful_stop_stops_the_models_sleepers_too_and_says_so(u: LiveUp) -> None:
    u.start()
    llm_asleep_sdxl_running(u)
    log = terminate(u)
    assert u.proc is not None and u.proc.returncode == 0, log
    assert alive(u) == {}
    for model in ("llm", "sdxl", "tts"):
        assert f"stopped {model}" in log, log
    assert "--keep-models" in log  # the way to keep them is named


def test_keep_models_leaves_them_running_and_the_next_up_adopts_them(u: LiveUp) -> None:
    u.extra_args = ["--keep-models"]
    u.start()
    before = llm_asleep_sdxl_running(u)
    log = terminate(u)
    assert "models keep running" in log, log
    assert alive(u) == before
    u.extra_args = []
    u.start(wait_ready=False)
    g = u.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["sdxl", "tts"])
    assert g.get("asleepModels") == ["llm"]
    assert alive(u) == before  # adopted: the same processes, nothing started again


def test_a_killed_up_leaves_its_models_and_down_stops_them_and_says_what_it_did(u: LiveUp) -> None:
    u.start()
    before = llm_asleep_sdxl_running(u)
    terminate(u, signal.SIGKILL)
    assert alive(u) == before  # left for adoption, as a crash leaves them
    r = down(u)
    assert r.returncode == 0, r.stdout + r.stderr
    assert alive(u) == {}
    for model in ("llm", "sdxl", "tts"):
        assert f"stopped {model} (pid {before[model]})" in r.stdout, r.stdout
    again = down(u)
    assert again.returncode == 0 and "nothing runs" in again.stdout, again.stdout


def test_down_stops_a_running_up_and_its_models(u: LiveUp) -> None:
    u.start()
    before = llm_asleep_sdxl_running(u)
    t0 = time.monotonic()
    r = down(u)
    assert r.returncode == 0, r.stdout + r.stderr
    assert u.proc is not None and u.proc.poll() == 0, u.log_text()  # it ended gracefully
    assert f"stopped vramctl up (pid {u.proc.pid})" in r.stdout, r.stdout
    assert alive(u) == {}
    for model in ("llm", "sdxl", "tts"):
        assert f"stopped {model} (pid {before[model]})" in r.stdout, r.stdout
    assert time.monotonic() - t0 < 30
