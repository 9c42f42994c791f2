"""An image the engine cannot use is found before anything is stopped for it
(the real engine, the stand-in image): the preflight checks the reference by
Docker's grammar and asks the engine, and a request for such a model is
refused while the running model keeps running."""

from __future__ import annotations

import time

import pytest

from tests.support.live_up import standin_model
from tests.support.ports import free_port
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.observed import WorkloadState
from vramctl.runtimes.docker import DockerRuntime
from vramctl.spec.models import DeploymentSpec, DesiredStateError
from vramctl.worker.actor import GpuWorker, WorkerSettings
from vramctl.worker.supervisor import holders_from


def spec(sdxl_image: str) -> DeploymentSpec:
    models = {name: standin_model(free_port(), 6000, load=0.2, stop=0.05, grace=3) for name in ("llm", "sdxl")}
    d = DeploymentSpec.model_validate({"gpu": 0, "activeModel": "llm", "models": models})
    # Past the spec's own validation, as a spec from an older vramctl would be.
    sdxl = d.models["sdxl"].model_copy(update={"image": sdxl_image})
    return d.model_copy(update={"models": {**d.models, "sdxl": sdxl}})


@pytest.mark.parametrize(
    ("image", "said"),
    [
        ("busybox\n--privileged", "is not a Docker image reference"),
        ("Busybox", "is not a Docker image reference"),
        ("UPPER/case", "invalid reference format"),  # the grammar allows a registry named UPPER; the engine does not
    ],
)
def test_the_preflight_names_an_image_the_engine_cannot_use(runtime: DockerRuntime, image: str, said: str) -> None:
    problem = runtime.preflight(spec(image), "sdxl")
    assert problem is not None and said in problem, problem


def test_a_switch_to_a_model_whose_image_is_refused_stops_nothing(runtime: DockerRuntime) -> None:
    d = spec("UPPER/case")
    gpu = SimulatedGpu(0, 16000, 0, 0.05, holders_from(runtime, lambda: d))
    w = GpuWorker(d, runtime, gpu, WorkerSettings(poll_interval_s=0.02, baseline_mib=0))
    w.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (w.status()["phase"] == "Ready" and w.status()["runningModels"] == ["llm"]):
            time.sleep(0.05)
        assert w.status()["runningModels"] == ["llm"], w.status()
        with pytest.raises(DesiredStateError, match=r"invalid reference format.*nothing was stopped"):
            w.request("sdxl", ())
        time.sleep(0.5)
        assert runtime.observe(d)["llm"].state is WorkloadState.RUNNING
        assert w.status()["activeModel"] == "llm"
    finally:
        w.request(None, ())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and w.status()["runningModels"]:
            time.sleep(0.05)
        w.stop()
