"""A stand-in for the pynvml module: the names NvmlProbe calls, with knobs.

Errors are pynvml's own classes (constructible without the library), so the
probe's error handling is exercised exactly as on a real driver. Knobs model
the cards and drivers we must survive: no memory info v2, WSL2 (no
per-process memory), fields a card does not support, a call that hangs.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1 << 20


@dataclass
class FakeProc:
    pid: int
    used_mib: int | None  # None: WSL2 / WDDM, NVML_VALUE_NOT_AVAILABLE


@dataclass
class FakeNvml:
    total_mib: int = 81559
    used_mib: int = 5
    reserved_mib: int = 500
    compute: list[FakeProc] = field(default_factory=list)
    graphics: list[FakeProc] = field(default_factory=list)
    devices: int = 1
    v2: bool = True
    v3_processes: bool = True
    processes_supported: bool = True
    unsupported: set[str] = field(default_factory=set)  # utilization, temperature, power
    fail: dict[str, int] = field(default_factory=dict)  # function name -> NVML error code, raised once per call
    library: bool = True
    calls: Counter[str] = field(default_factory=Counter)
    # Set `hang` to make the next call block until `release` is set.
    hang: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    # pynvml's names
    NVMLError = pynvml.NVMLError
    nvmlMemory_v2 = pynvml.nvmlMemory_v2
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def _enter(self, name: str) -> None:
        self.calls[name] += 1
        if self.hang.is_set():
            self.release.wait(30)
        if name in self.fail:
            raise pynvml.NVMLError(self.fail[name])

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if not self.library:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < self.devices:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return ("handle", index)

    def nvmlDeviceGetName(self, h: Any) -> str:
        self._enter("nvmlDeviceGetName")
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        self._enter("nvmlDeviceGetUUID")
        return f"GPU-fake-{h[1]}"

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "580.95.05"

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._enter("nvmlSystemGetNVMLVersion")
        return "13.580.95.05"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion")
        return 13000

    def nvmlDeviceGetMemoryInfo(self, h: Any, version: int | None = None) -> Any:
        if version is not None:
            self._enter("nvmlDeviceGetMemoryInfo_v2")
            if not self.v2:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            free = self.total_mib - self.used_mib - self.reserved_mib
            return SimpleNamespace(
                total=self.total_mib * MIB, used=self.used_mib * MIB, reserved=self.reserved_mib * MIB, free=free * MIB, version=version
            )
        self._enter("nvmlDeviceGetMemoryInfo")
        used = self.used_mib + self.reserved_mib  # v1 counts reserved as used
        return SimpleNamespace(total=self.total_mib * MIB, used=used * MIB, free=(self.total_mib - used) * MIB)

    def _field(self, name: str, fn: str, value: Any) -> Any:
        self._enter(fn)
        if name in self.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:
        return self._field("utilization", "nvmlDeviceGetUtilizationRates", SimpleNamespace(gpu=37, memory=12))

    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:
        return int(self._field("temperature", "nvmlDeviceGetTemperature", 41))

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        return int(self._field("power", "nvmlDeviceGetPowerUsage", 123456))

    def _procs(self, fn: str, procs: list[FakeProc], v3: bool) -> list[Any]:
        self._enter(fn)
        if v3 and not self.v3_processes:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if not self.processes_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=None if p.used_mib is None else p.used_mib * MIB) for p in procs]

    def nvmlDeviceGetComputeRunningProcesses_v3(self, h: Any) -> list[Any]:
        return self._procs("nvmlDeviceGetComputeRunningProcesses_v3", self.compute, True)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, h: Any) -> list[Any]:
        return self._procs("nvmlDeviceGetComputeRunningProcesses_v2", self.compute, False)

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, h: Any) -> list[Any]:
        return self._procs("nvmlDeviceGetGraphicsRunningProcesses_v3", self.graphics, True)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, h: Any) -> list[Any]:
        return self._procs("nvmlDeviceGetGraphicsRunningProcesses_v2", self.graphics, False)
