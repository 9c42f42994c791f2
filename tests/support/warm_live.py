"""Helpers of the live warm-switching tests: stand-in models that can sleep,
a `vramctl up` config around them, and what its status and metrics say."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.live_up import LiveUp, free_port, standin

SLEEP_API = {"path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"}


def sleepy(vram: int = 11000, residue: int = 1024, cycles: int | None = None, **env: str) -> dict[str, Any]:
    m = standin(
        free_port(), vram=vram, **{"STANDIN_SLEEP_SECONDS": "0.1", "STANDIN_WAKE_SECONDS": "0.1", "STANDIN_RESIDUE_MIB": "600", **env}
    )
    m["switchStrategy"] = "sleep"
    m["sleep"] = {"level": 2, "maxResidueMiB": residue, **SLEEP_API, **({"maxCycles": cycles} if cycles else {})}
    m["startTimeoutSeconds"] = 4
    return m


def cfg(models: dict[str, Any], active: str = "llm") -> dict[str, Any]:
    return {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16000, "releaseDelaySeconds": 0.05},
        "gpus": [{"gpu": 0, "activeModel": active, "models": models}],
    }


def up(live: list[LiveUp], tmp: Path, models: dict[str, Any], active: str = "llm") -> LiveUp:
    u = LiveUp(tmp, cfg(models, active))
    live.append(u)
    u.start()
    return u


def model_states(u: LiveUp) -> dict[str, str]:
    """The state whose vramctl_model_state series is 1, per model."""
    with urllib.request.urlopen(u.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("vramctl_model_state{") and line.endswith(" 1.0"):
            labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1 : line.index("}")].split(","))
            out[labels["model"].strip('"')] = labels["state"].strip('"')
    return out


def metric(u: LiveUp, name: str, **labels: str) -> float:
    with urllib.request.urlopen(u.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def progress(u: LiveUp) -> list[tuple[str, str | None, str]]:
    with urllib.request.urlopen(u.url + "/status?since=0", timeout=10) as r:
        body = json.loads(r.read())
    return [(p["step"], p.get("model"), p.get("message", "")) for p in body.get("progress", [])]


def steps(u: LiveUp) -> list[tuple[str, str | None]]:
    return [(s, m) for s, m, _ in progress(u)]


def switch_to(u: LiveUp, model: str, **want: str) -> None:
    assert u.post({"model": model})[0] == 202
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        g = u.gpu()
        if g["phase"] == "Ready" and g["activeModel"] == model and g["observedGeneration"] >= g["desiredGeneration"]:
            got = model_states(u)
            if all(got.get(m) == v for m, v in want.items()):
                return
        time.sleep(0.05)
    raise AssertionError(f"{model} not ready with {want}: {u.gpu()} {model_states(u)}\n{u.log_text()[-3000:]}")


def no_violation(u: LiveUp) -> None:
    assert metric(u, "vramctl_exclusivity_violations_total") == 0
