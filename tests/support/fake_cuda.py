"""A stand-in for ``cuda.bindings.driver``: the checkpoint calls, recorded,
playing the driver's state machine per process (RUNNING -> LOCKED ->
CHECKPOINTED -> LOCKED -> RUNNING), with failures injectable at each step.

``FakeCu`` has the names vramctl's binding uses (``CUresult``,
``CUprocessState``, ``CUcheckpointLockArgs``, ``cuInit``,
``cuDriverGetVersion``, ``cuCheckpointProcess*``), each returning the tuple
the real module returns. ``FakeCudaGpu`` is a GPU probe whose NVML process
list follows the fake driver: a checkpointed process leaves it (unless
``keep_listed`` says the memory was not released).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from vramctl.gpu.base import GpuInfo
from vramctl.observed import GpuMemory, GpuProcess, GpuSnapshot


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_NOT_INITIALIZED = 3
    CUDA_ERROR_NO_DEVICE = 100
    CUDA_ERROR_NOT_READY = 600
    CUDA_ERROR_NOT_PERMITTED = 800
    CUDA_ERROR_NOT_SUPPORTED = 801
    CUDA_ERROR_TIMEOUT = 909
    CUDA_ERROR_ILLEGAL_STATE = 401
    CUDA_ERROR_UNKNOWN = 999


class CUprocessState(enum.IntEnum):
    CU_PROCESS_STATE_RUNNING = 0
    CU_PROCESS_STATE_LOCKED = 1
    CU_PROCESS_STATE_CHECKPOINTED = 2
    CU_PROCESS_STATE_FAILED = 3


class CUcheckpointLockArgs:
    def __init__(self) -> None:
        self.timeoutMs = 0


S = CUprocessState
Result = CUresult
State = CUprocessState
LockArgs = CUcheckpointLockArgs
OK = CUresult.CUDA_SUCCESS


@dataclass
class FakeCu:
    """``processes``: pid -> state (only these are CUDA processes).
    ``fail``: call name (``lock``, ``checkpoint``, ``restore``, ``unlock``,
    ``state``) -> the Result it returns (once per pid while set; the
    state does not move). ``version``: cuDriverGetVersion's answer;
    ``init``: cuInit's; ``missing``: the API's symbols absent (AttributeError)."""

    processes: dict[int, State] = field(default_factory=dict)
    fail: dict[str, Result] = field(default_factory=dict)
    version: int = 13000
    init: Result = OK
    missing: bool = False
    calls: list[tuple[str, int]] = field(default_factory=list)
    lock_timeouts: list[int] = field(default_factory=list)
    CUresult: ClassVar[type[Result]] = Result
    CUprocessState: ClassVar[type[State]] = State
    CUcheckpointLockArgs: ClassVar[type[LockArgs]] = LockArgs

    def cuInit(self, flags: int) -> tuple[Result]:
        return (self.init,)

    def cuDriverGetVersion(self) -> tuple[Result, int]:
        return OK, self.version

    def _step(self, call: str, pid: int, want: State, to: State) -> tuple[Result]:
        if self.missing:
            raise AttributeError(f"cuCheckpointProcess{call.title()} not found in libcuda.so.1")
        self.calls.append((call, pid))
        if call in self.fail:
            return (self.fail[call],)
        st = self.processes.get(pid)
        if st is None:
            return (Result.CUDA_ERROR_INVALID_VALUE,)
        if st is not want:
            return (Result.CUDA_ERROR_ILLEGAL_STATE,)
        self.processes[pid] = to
        return (OK,)

    def cuCheckpointProcessGetState(self, pid: int) -> tuple[Result, State | None]:
        if self.missing:
            raise AttributeError("cuCheckpointProcessGetState not found in libcuda.so.1")
        if "state" in self.fail:
            return self.fail["state"], None
        st = self.processes.get(pid)
        return (OK, st) if st is not None else (Result.CUDA_ERROR_INVALID_VALUE, None)

    def cuCheckpointProcessLock(self, pid: int, args: LockArgs) -> tuple[Result]:
        self.lock_timeouts.append(args.timeoutMs)
        return self._step("lock", pid, S.CU_PROCESS_STATE_RUNNING, S.CU_PROCESS_STATE_LOCKED)

    def cuCheckpointProcessCheckpoint(self, pid: int, args: object) -> tuple[Result]:
        return self._step("checkpoint", pid, S.CU_PROCESS_STATE_LOCKED, S.CU_PROCESS_STATE_CHECKPOINTED)

    def cuCheckpointProcessRestore(self, pid: int, args: object) -> tuple[Result]:
        return self._step("restore", pid, S.CU_PROCESS_STATE_CHECKPOINTED, S.CU_PROCESS_STATE_LOCKED)

    def cuCheckpointProcessUnlock(self, pid: int, args: object) -> tuple[Result]:
        return self._step("unlock", pid, S.CU_PROCESS_STATE_LOCKED, S.CU_PROCESS_STATE_RUNNING)

    def steps(self) -> list[str]:
        """The calls without their pids."""
        return [c for c, _ in self.calls]


@dataclass
class FakeCudaGpu:
    """A GPU probe over the fake driver: each process of ``holders()`` (pid ->
    (model, MiB)) is in NVML's list unless the driver has it checkpointed;
    ``keep_listed``: checkpointed pids that stay listed (memory not
    released); ``hide``: running pids missing from the list (a restore that
    did not come back)."""

    cu: FakeCu
    holders: Callable[[], Mapping[int, tuple[str, int]]]
    total_mib: int = 81559
    keep_listed: set[int] = field(default_factory=set)
    hide: set[int] = field(default_factory=set)
    kind: str = "fake"

    def info(self) -> GpuInfo:
        return GpuInfo(0, "GPU-fake-0", "Fake", "580.0", self.total_mib)

    def snapshot(self) -> GpuSnapshot:
        procs = []
        for pid, (model, mib) in sorted(self.holders().items()):
            st = self.cu.processes.get(pid)
            if pid in self.hide or (st is S.CU_PROCESS_STATE_CHECKPOINTED and pid not in self.keep_listed):
                continue
            procs.append(GpuProcess(pid=pid, used_mib=mib, model=model))
        return GpuSnapshot(GpuMemory(self.total_mib, sum(p.used_mib or 0 for p in procs)), tuple(procs))
