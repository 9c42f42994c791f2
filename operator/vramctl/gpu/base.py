"""The GPU probe port.

A probe answers "how much memory is used/total, and which processes hold it".
Probes must be cheap (they are polled every ~50 ms during a switch) and must
never raise for a field the hardware cannot report: per-process data is None
when unknown (WSL2 has none).

A probe that cannot answer at all (NVML call stuck in the driver, GPU lost)
raises ``ProbeError``; ``ProbeTimeout`` when a call did not return in time.
Callers treat either as "memory unknown": never as free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vramctl.observed import GpuSnapshot


class ProbeError(Exception):
    """The probe could not read the GPU this time; the reading is unknown."""


class ProbeTimeout(ProbeError):
    """A driver call did not return within the probe's timeout."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    driver: str
    total_mib: int


@runtime_checkable
class GpuProbe(Protocol):
    kind: str  # "nvml" | "simulated"

    def info(self) -> GpuInfo: ...

    def snapshot(self) -> GpuSnapshot: ...
