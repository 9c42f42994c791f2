"""Two-stage idle live: ``vramctl up`` with the process runtime, the
simulated GPU and the Python stand-in's sleep API. Quiet for
``idle.sleepAfterSeconds``: the model sleeps and its process lives on (the
next use is a wake); quiet for ``idle.stopAfterSeconds``: the process is
stopped and the GPU is free."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.support.live_up import LiveUp
from tests.support.warm_live import model_states, sleepy, steps


def model_pid(u: LiveUp, model: str) -> int:
    recs = [json.loads(p.read_text()) for p in (u.state_path.parent / "proc").glob(f"{u.instance}-*.json")]
    pids = [r["pid"] for r in recs if r.get("model") == model]
    assert len(pids) == 1, recs
    return int(pids[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and ") Z " not in Path(f"/proc/{pid}/stat").read_text()


def wait(cond: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(cond())  # type: ignore[operator]


def test_idle_sleeps_then_stops(live: list[LiveUp], tmp_path: Path) -> None:
    cfg = {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16000, "releaseDelaySeconds": 0.05},
        "gpus": [
            {
                "gpu": 0,
                "activeModel": "llm",
                "switching": {"mode": "onDemand"},
                "idle": {"sleepAfterSeconds": 1.5, "stopAfterSeconds": 4},
                "models": {"llm": sleepy()},
            }
        ],
    }
    u = LiveUp(tmp_path, cfg)
    live.append(u)
    u.start()
    assert wait(lambda: model_states(u).get("llm") == "running")
    t0 = time.monotonic()
    pid = model_pid(u, "llm")
    assert wait(lambda: model_states(u).get("llm") == "asleep"), u.log_text()[-3000:]
    assert time.monotonic() - t0 >= 1.0
    assert alive(pid)  # asleep: the process (its context, its host memory) lives on
    assert wait(lambda: model_states(u).get("llm") in ("stopped", "absent") and u.gpu()["phase"] == "Idle"), u.log_text()[-3000:]
    assert time.monotonic() - t0 >= 3.0
    assert wait(lambda: not alive(pid), 10)
    got = steps(u)
    # (no "asleep" step: the residue is verified before a next start, and none comes)
    assert ("sleeping", "llm") in got and ("stopped", "llm") in got[got.index(("sleeping", "llm")) :], str(got)
