"""A model on several GPUs, started by the process runtime, sees each of them."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

from vramctl.observed import WorkloadState
from vramctl.runtimes.process import ProcessRuntime
from vramctl.spec.models import DeploymentSpec

SCRIPT = "import os; print('CVD=' + os.environ['CUDA_VISIBLE_DEVICES'], 'ORDER=' + os.environ['CUDA_DEVICE_ORDER'])"


def _env_seen(tmp_path: Path, gpu: int, gpus: list[int] | None) -> list[str]:
    job = {"command": [sys.executable, "-c", SCRIPT], **({"gpus": gpus} if gpus else {})}
    d = DeploymentSpec.model_validate({"gpu": gpu, "models": {"job": job}})
    rt = ProcessRuntime(tmp_path, instance="t" + uuid.uuid4().hex[:10])
    try:
        rt.start(d, "job")
        deadline = time.monotonic() + 10
        while rt.observe(d)["job"].state is not WorkloadState.EXITED:
            assert time.monotonic() < deadline, "the job did not exit"
            time.sleep(0.02)
        return rt.logs_tail(d, "job")
    finally:
        rt.close()


def test_a_model_on_two_gpus_gets_both_in_pci_bus_order(tmp_path: Path) -> None:
    assert "CVD=0,1 ORDER=PCI_BUS_ID" in _env_seen(tmp_path, 1, [1, 0])


def test_a_single_gpu_model_gets_its_gpu_as_before(tmp_path: Path) -> None:
    assert "CVD=1 ORDER=PCI_BUS_ID" in _env_seen(tmp_path, 1, None)
