"""switchStrategy auto live: ``vramctl up`` with the process runtime, the
simulated GPU and the Python stand-in's sleep API. A switch away from an
auto model takes the way that costs less and fits, and the progress says
which and why: a sleep where it fits, a stop where its level-1 copy would
pin more than ``pinnedMemoryCeilingMiB``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.live_up import LiveUp
from tests.support.warm_live import model_states, no_violation, progress, sleepy, switch_to


def auto_llm() -> dict[str, Any]:
    m = sleepy()
    m["switchStrategy"] = "auto"
    m["sleep"] = {**m["sleep"], "level": 1, "hostMemoryMiB": 1000}
    return m


@pytest.mark.parametrize(("ceiling", "way", "state"), [(None, "sleep", "asleep"), (100, "stop", "stopped")])
def test_an_auto_model_goes_the_way_that_fits(live: list[LiveUp], tmp_path: Path, ceiling: int | None, way: str, state: str) -> None:
    gpu: dict[str, Any] = {"gpu": 0, "activeModel": "llm", "models": {"llm": auto_llm(), "sdxl": sleepy()}}
    if ceiling is not None:
        gpu["pinnedMemoryCeilingMiB"] = ceiling
    cfg = {"runtime": "process", "gpuProbe": {"kind": "simulated", "totalMiB": 16000, "releaseDelaySeconds": 0.05}, "gpus": [gpu]}
    u = LiveUp(tmp_path, cfg)
    live.append(u)
    u.start()
    switch_to(u, "sdxl", sdxl="running")
    assert model_states(u)["llm"] in ((state,) if state == "asleep" else ("stopped", "absent"))
    ways = [msg for s, m, msg in progress(u) if s == "way" and m == "llm"]
    assert len(ways) == 1 and ways[0].startswith(f"'llm' goes away by {way}: "), ways
    if ceiling is not None:
        assert "sleep does not fit (1000 MiB of pinned memory, over the ceiling of 100 MiB)" in ways[0]
    no_violation(u)
