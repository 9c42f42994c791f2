"""What the status page reads beside the events (``web.page``): each GPU's
memory split by model, residues and foreign processes apart, read from a
real simulated GPU; the files it serves and their policy."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web

from tests.support.builders import demo
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.spec.models import DeploymentSpec
from vramctl.web.page import CSP, FILES, StatusPage, memory_view
from vramctl.worker.actor import GpuWorker


@dataclass
class _Worker:
    """The parts of a worker that ``memory_view`` reads."""

    probe: SimulatedGpu
    spec: DeploymentSpec = field(default_factory=demo)
    states: dict[str, str] = field(default_factory=dict)
    baseline_mib: int | None = 300

    def model_states(self) -> dict[str, str]:
        return self.states


def test_memory_is_split_by_model_with_residues_and_foreign_processes_apart() -> None:
    holders = {"llm": 12000, "sdxl": 600}
    gpu = SimulatedGpu(index=0, total_mib=16000, baseline_mib=300, release_delay_seconds=0.0, holders=lambda: holders)
    gpu.add_foreign(4242, 1500)
    w = _Worker(gpu, states={"llm": "running", "sdxl": "asleep", "tts": "exited"})
    view = memory_view(cast(GpuWorker, w))
    assert view == {
        "totalMiB": 16000,
        "usedMiB": 300 + 12000 + 600 + 1500,
        "baselineMiB": 300,
        "models": {"llm": 12000, "sdxl": 600},
        "asleep": ["sdxl"],
        "foreignMiB": 1500,
        "otherMiB": 0,
    }
    holders.clear()  # everything gone: an empty bar (but the foreign process)
    w.states = {}
    view = memory_view(cast(GpuWorker, w))
    assert view["models"] == {} and view["foreignMiB"] == 1500 and view["usedMiB"] == 1800


def test_every_file_is_served_with_the_policy_and_nothing_else() -> None:
    page = StatusPage()
    assert set(page.files) == set(FILES)

    async def get(path: str) -> web.StreamResponse:
        from aiohttp.test_utils import make_mocked_request

        return await page.handle(make_mocked_request("GET", path))

    for path, ctype in [("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/app.css", "text/css")]:
        resp: Any = asyncio.run(get(path))
        assert resp.status == 200 and resp.headers["Content-Type"].startswith(ctype)
        assert resp.headers["Content-Security-Policy"] == CSP and resp.headers["X-Content-Type-Options"] == "nosniff"
    assert asyncio.run(get("/static/../api.py")).status == 404
    assert asyncio.run(get("/static/nothing.js")).status == 404
