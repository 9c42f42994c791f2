"""Specs and workers the unit tests run on recording fakes.

``spec``: llm and sdxl heavy, tts and big light, a 15.5 GB budget.
``three_heavy``: llm, sdxl and img heavy, tts light (the actor's tests).
``start`` / ``loading``: a worker on its loop thread with an ``InboxHolder``
wired to it, its desired model healthy or not yet; ``queued``: ``three_heavy``
with a demand queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.support.fakes import FakeGpu, FakeRuntime
from vramctl.demand.desk import InboxHolder
from vramctl.observed import WorkloadState
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import GpuWorker, WorkerSettings

RUN = WorkloadState.RUNNING


def spec(**kw: object) -> DeploymentSpec:
    doc = {
        "gpu": 0,
        "activeModel": "llm",
        "vramBudgetMiB": 15500,
        "models": {
            "llm": {"image": "i", "vramMiB": 12000, "startTimeoutSeconds": 5},
            "sdxl": {"image": "i", "vramMiB": 11000, "startTimeoutSeconds": 5},
            "tts": {"class": "light", "image": "i", "vramMiB": 3000},
            "big": {"class": "light", "image": "i", "vramMiB": 5000},
        },
    }
    doc.update(kw)
    return DeploymentSpec.model_validate(doc)


def three_heavy(timeout: float = 30, image: str = "i") -> DeploymentSpec:
    return DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "activeModel": "llm",
            "vramBudgetMiB": 15500,
            "models": {
                "llm": {"image": image, "vramMiB": 12000, "startTimeoutSeconds": timeout},
                "sdxl": {"image": image, "vramMiB": 11000, "startTimeoutSeconds": timeout},
                "img": {"image": image, "vramMiB": 9000, "startTimeoutSeconds": timeout},
                "tts": {"class": "light", "image": image, "vramMiB": 3000},
            },
        }
    )


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def queued(**queue: float) -> DeploymentSpec:
    d = three_heavy()
    return DeploymentSpec.model_validate(
        {**d.model_dump(by_alias=True, exclude_none=True), "queue": {"maxServeSeconds": 2, "drainTimeoutSeconds": 1, **queue}}
    )


def start(d: DeploymentSpec) -> tuple[GpuWorker, FakeRuntime, InboxHolder]:
    rt = FakeRuntime(states={"llm": RUN})
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.01, baseline_mib=0, resync_s=1))
    w.start()
    assert wait_for(lambda: w.status()["phase"] == "Ready")
    return w, rt, InboxHolder(lambda _gpu, cmd: w.post(cmd), gpu_of=lambda _m: "0", clock=w.clock)


def loading(d: DeploymentSpec) -> tuple[GpuWorker, FakeRuntime, InboxHolder]:
    """A worker just started, its desired model (llm) not healthy until the test says so."""
    rt = FakeRuntime(states={}, never_healthy={"llm"})
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(poll_interval_s=0.01, baseline_mib=0, resync_s=1))
    w.start()
    return w, rt, InboxHolder(lambda _gpu, cmd: w.post(cmd), gpu_of=lambda _m: "0", clock=w.clock)
