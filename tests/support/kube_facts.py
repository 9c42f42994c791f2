"""``KubeFacts`` of a made-up node where every ``vramctl doctor --kubernetes``
check passes; a test changes the facts it is about."""

from __future__ import annotations

from typing import Any

from vramctl.doctor import KubeFacts
from vramctl.gpu.nvml import NvmlFacts

NVML = NvmlFacts(driver="580.65", nvml_version="12.580", cuda_driver_version="13.0")


def facts(**kw: Any) -> KubeFacts:
    base: dict[str, Any] = {
        "node": "rtx5080",
        "api": None,
        "runtime_class": "nvidia",
        "runtime_class_handler": "nvidia",
        "gpu_allocatable": 1,
        "gpu_mode": "runtimeClass",
        "nvml": NVML,
    }
    base.update(kw)
    return KubeFacts(**base)
