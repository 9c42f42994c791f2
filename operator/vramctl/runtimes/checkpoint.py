"""Warm switching for any CUDA server: the driver's checkpoint API.

The NVIDIA driver (570 or newer, Linux, not WSL2) can suspend a CUDA process
from outside: ``cuCheckpointProcessLock`` blocks its CUDA calls,
``...Checkpoint`` copies its device memory into host memory the driver owns
and releases every GPU resource, ``...Restore`` brings it back into the same
living process, ``...Unlock`` lets it run on. The process keeps its CPU
state, sockets and loaded Python, so nothing reloads: a switch for servers
that have no sleep API of their own (GPT-SoVITS, llama.cpp, ComfyUI).

Two parts, both behind the runtime boundary:

- ``CudaBindingsDriver``: NVIDIA's ``cuda-bindings`` package (the optional
  extra ``checkpoint``), the only module of vramctl that imports ``cuda``.
  ``load_driver`` loads it once, at start: the package, ``cuInit``, the
  driver's version (CUDA 12.8, driver 570, or newer) and the API's presence;
  ``Availability`` says what was found and why not (WSL2, no package, an old
  driver), for ``vramctl doctor`` and the worker's first line.
- ``CheckpointSleeper``: the worker's ``Sleeper`` for ``switchStrategy:
  checkpoint``. To sleep: find every CUDA process of the model in NVML's list
  (the probe attributes them: the process runtime's process group, the
  container's cgroup), refuse what will not fit host memory, lock them all
  with a timeout, checkpoint them together, and confirm with the probe that
  each left NVML's list. To wake: restore, unlock, confirm each is running
  and back on the GPU (the worker then waits for health). Any failure raises
  ``CheckpointError`` whose ``fallback`` is the ``SleepFallback`` reason:
  the worker stops the model and goes the cold way. A failed step is undone
  as far as the driver lets (restore, unlock) before the error is raised.

Health is no proof of a GPU: a checkpointed server's HTTP thread keeps
answering 200. ``is_sleeping`` therefore asks the driver
(``cuCheckpointProcessGetState``), never the server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from vramctl.host.memory import read_available_mib
from vramctl.host.procfs import read_stat
from vramctl.observed import GpuSnapshot
from vramctl.runtimes.sleepctl import FallbackReason, SleepCallError
from vramctl.spec.models import DeploymentSpec

log = logging.getLogger("vramctl.runtimes.checkpoint")

# CUDA 12.8 (driver 570) brought the checkpoint API.
MIN_CUDA_VERSION = 12080
# The driver's host copy of a checkpointed process was measured at about 1.1x its GPU bytes.
HOST_PER_GPU_BYTE = 1.1
# How often a confirmation looks at the GPU probe again.
CONFIRM_POLL_S = 0.02


class ProcessState(StrEnum):
    """``CUprocessState``: where a process stands in the checkpoint state machine."""

    RUNNING = "running"
    LOCKED = "locked"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"
    BUSY = "busy"  # checkpointing or restoring, in another caller's hands


class DriverError(Exception):
    """A driver call that did not succeed; ``code`` is the CUresult's name."""

    def __init__(self, call: str, pid: int, code: str) -> None:
        super().__init__(f"{call}(pid {pid}): {code}")
        self.call, self.pid, self.code = call, pid, code

    @property
    def refused(self) -> bool:
        """The driver says it cannot (managed memory, IPC, several GPUs): no retry will help."""
        return self.code in ("CUDA_ERROR_NOT_SUPPORTED", "CUDA_ERROR_NOT_PERMITTED")

    @property
    def timed_out(self) -> bool:
        return self.code in ("CUDA_ERROR_TIMEOUT", "CUDA_ERROR_NOT_READY")


class CheckpointDriver(Protocol):
    """The checkpoint calls on one process; each raises DriverError on failure."""

    def state(self, pid: int) -> ProcessState: ...

    def lock(self, pid: int, timeout_ms: int) -> None: ...

    def checkpoint(self, pid: int) -> None: ...

    def restore(self, pid: int) -> None: ...

    def unlock(self, pid: int) -> None: ...


@dataclass(frozen=True)
class Availability:
    """Whether checkpoint switching can run here, and why not."""

    available: bool
    why: str
    cuda_version: int | None = None  # cuDriverGetVersion: 12080 is CUDA 12.8
    binding: str | None = None  # "cuda-bindings 13.0.1"

    def describe(self) -> str:
        version = f"CUDA {self.cuda_version // 1000}.{self.cuda_version % 1000 // 10}" if self.cuda_version else "no driver"
        return f"{'available' if self.available else 'unavailable'} ({version}; {self.binding or 'no binding'}): {self.why}"


_STATE_NAMES = {
    "CU_PROCESS_STATE_RUNNING": ProcessState.RUNNING,
    "CU_PROCESS_STATE_LOCKED": ProcessState.LOCKED,
    "CU_PROCESS_STATE_CHECKPOINTED": ProcessState.CHECKPOINTED,
    "CU_PROCESS_STATE_FAILED": ProcessState.FAILED,
    "CU_PROCESS_STATE_CHECKPOINTING": ProcessState.BUSY,
    "CU_PROCESS_STATE_RESTORING": ProcessState.BUSY,
}


class CudaBindingsDriver:
    """The checkpoint API through ``cuda.bindings.driver`` (``cu``: that
    module, or a stand-in with the same calls in tests). The driver's calls
    are serialised: one switch at a time per worker, but the worker's look
    (``state``) may run beside the actuator's checkpoint."""

    def __init__(self, cu: Any) -> None:
        self.cu = cu
        self._lock = threading.Lock()
        self._ok = cu.CUresult.CUDA_SUCCESS

    def _check(self, call: str, pid: int, result: Sequence[Any]) -> Any:
        err = result[0]
        if err != self._ok:
            raise DriverError(call, pid, getattr(err, "name", str(err)))
        return result[1] if len(result) > 1 else None

    def state(self, pid: int) -> ProcessState:
        with self._lock:
            value = self._check("cuCheckpointProcessGetState", pid, self.cu.cuCheckpointProcessGetState(pid))
        return _STATE_NAMES.get(getattr(value, "name", ""), ProcessState.FAILED)

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = self.cu.CUcheckpointLockArgs()
        args.timeoutMs = timeout_ms
        with self._lock:
            self._check("cuCheckpointProcessLock", pid, self.cu.cuCheckpointProcessLock(pid, args))

    def checkpoint(self, pid: int) -> None:
        with self._lock:
            self._check("cuCheckpointProcessCheckpoint", pid, self.cu.cuCheckpointProcessCheckpoint(pid, None))

    def restore(self, pid: int) -> None:
        with self._lock:
            self._check("cuCheckpointProcessRestore", pid, self.cu.cuCheckpointProcessRestore(pid, None))

    def unlock(self, pid: int) -> None:
        with self._lock:
            self._check("cuCheckpointProcessUnlock", pid, self.cu.cuCheckpointProcessUnlock(pid, None))


def under_wsl2(proc_version: Path = Path("/proc/version")) -> bool:
    try:
        return "microsoft" in proc_version.read_text().lower()
    except OSError:
        return False


def open_driver(cu: Any, binding: str, wsl2: bool = False) -> tuple[CudaBindingsDriver | None, Availability]:
    """``cu`` (``cuda.bindings.driver`` or a stand-in) checked: cuInit, the
    driver's version, the checkpoint calls answering. Never raises."""
    if wsl2:
        return None, Availability(False, "WSL2 has no checkpoint API: models with switchStrategy checkpoint are stopped", binding=binding)
    try:
        init = cu.cuInit(0)
        if init[0] != cu.CUresult.CUDA_SUCCESS:
            return None, Availability(
                False, f"cuInit failed: {getattr(init[0], 'name', init[0])} (no GPU or driver here?)", binding=binding
            )
        err, version = cu.cuDriverGetVersion()
        if err != cu.CUresult.CUDA_SUCCESS:
            return None, Availability(False, f"cuDriverGetVersion failed: {getattr(err, 'name', err)}", binding=binding)
        version = int(version)
        if version < MIN_CUDA_VERSION:
            why = f"the driver supports CUDA {version // 1000}.{version % 1000 // 10}; the checkpoint API needs 12.8 (driver 570) or newer"
            return None, Availability(False, why, version, binding)
        # The API is there when asking about a process answers with a CUresult
        # (this process holds no CUDA context: an error code is expected).
        cu.cuCheckpointProcessGetState(os.getpid())
    except Exception as err:  # the library could not be loaded, or lacks the symbol
        return None, Availability(False, f"the driver's checkpoint API cannot be called: {err}", binding=binding)
    return CudaBindingsDriver(cu), Availability(True, "the driver's checkpoint API answers", version, binding)


_loaded: tuple[CudaBindingsDriver | None, Availability] | None = None
_load_lock = threading.Lock()


def load_driver() -> tuple[CudaBindingsDriver | None, Availability]:
    """The driver's checkpoint API, loaded once per process (at the worker's
    start, not at its first switch); without the ``cuda-bindings`` package the
    supervisor runs on and checkpoint switches fall back to stops."""
    global _loaded
    with _load_lock:
        if _loaded is None:
            try:
                from importlib.metadata import version

                from cuda.bindings import driver as cu  # the optional extra `checkpoint`

                binding = f"cuda-bindings {version('cuda-bindings')}"
            except Exception as err:
                _loaded = (
                    None,
                    Availability(False, f"the cuda-bindings package is not installed (pip install 'vramctl[checkpoint]'): {err}"),
                )
            else:
                _loaded = open_driver(cu, binding, under_wsl2())
        return _loaded


class CheckpointError(SleepCallError):
    """A checkpoint or restore that did not happen; ``fallback``: the SleepFallback reason."""

    def __init__(self, message: str, fallback: FallbackReason) -> None:
        super().__init__(message, "timeout" if fallback == "SleepTimeout" else "answer")
        self.fallback: FallbackReason = fallback


def rss_mib(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The process's resident memory (VmRSS), MiB; None when it cannot be read."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Checkpointed:
    """What one model's checkpoint left: its processes, when, and what they take."""

    pids: tuple[int, ...]
    gpu_mib: int  # what NVML showed them holding before
    started: tuple[int | None, ...] = ()  # each process's start time (clock ticks): a pid reused is not ours
    host_mib: int | None = None  # their RSS while checkpointed
    failed: bool = False  # a restore that did not come back: never taken for awake (the fall-back stops it)
    seconds: dict[str, float] = field(default_factory=dict)


class CheckpointSleeper:
    """``Sleeper`` for ``switchStrategy: checkpoint`` (see the module's docstring).

    ``snapshot``: the GPU probe's reading (with processes attributed to
    models). ``owners``: the runtime's ``{pid: model}`` map (``Runtime.owners``;
    a restarted supervisor finds its checkpointed models through it: they
    are no longer in NVML's list). ``available_mib``: the host's available
    memory, MiB (None: unknown, not checked).
    """

    def __init__(
        self,
        driver: CheckpointDriver | None,
        availability: Availability,
        snapshot: Callable[[], GpuSnapshot],
        owners: Callable[[DeploymentSpec], Mapping[str, str]] | None = None,
        lock_timeout_ms: int = 10_000,
        confirm_timeout_s: float = 10.0,
        available_mib: Callable[[], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        pause: Callable[[float], None] = time.sleep,
    ) -> None:
        self.driver, self.availability, self.snapshot, self.owners = driver, availability, snapshot, owners
        self.lock_timeout_ms, self.confirm_timeout_s = lock_timeout_ms, confirm_timeout_s
        self.available_mib = available_mib or read_available_mib
        self.clock, self.pause = clock, pause
        self.done: dict[str, Checkpointed] = {}  # models checkpointed by this sleeper
        self.warned = False
        # Models the driver said run, with nothing checkpointed by this sleeper
        # since: only this sleeper checkpoints them, so the worker's every look
        # need not list the runtime's owners, scan /proc and ask the driver again.
        self.awake: set[str] = set()

    # ---------------------------------------------------------------- sleep

    def sleep(self, spec: DeploymentSpec, model: str) -> int | None:
        """Checkpoint every CUDA process of ``model``; returns 0 (the MiB it keeps on the GPU)."""
        driver = self._driver()
        t0 = self.clock()
        snap = self.snapshot()
        if snap.processes is None:
            raise CheckpointError(f"the GPU probe cannot list processes here: cannot tell which are {model!r}'s", "CheckpointRefused")
        procs = [p for p in snap.processes if p.model == model]
        if not procs:
            raise CheckpointError(f"{model!r} has no CUDA process in NVML's list: nothing to checkpoint", "CheckpointRefused")
        pids = tuple(sorted(p.pid for p in procs))
        gpu_mib = sum(p.used_mib or 0 for p in procs)
        need = int(gpu_mib * HOST_PER_GPU_BYTE)
        free = self.available_mib()
        if free is not None and need > free:
            raise CheckpointError(
                f"checkpointing {model!r} needs about {need} MiB of host memory ({gpu_mib} MiB on the GPU x {HOST_PER_GPU_BYTE}); "
                f"{free} MiB are available",
                "CheckpointRefused",
            )
        for pid in pids:
            st = self._state(driver, pid, "CheckpointRefused")
            if st is not ProcessState.RUNNING:
                raise CheckpointError(f"{model!r} process {pid} is {st}, not running: cannot lock it", "CheckpointRefused")
        locked: list[int] = []
        try:
            for pid in pids:
                driver.lock(pid, self.lock_timeout_ms)
                locked.append(pid)
        except DriverError as err:
            self._undo(driver, locked, [])
            reason: FallbackReason = "SleepTimeout" if err.timed_out else "CheckpointRefused" if err.refused else "SleepFailed"
            raise CheckpointError(f"locking {model!r}: {err}", reason) from None
        t_locked = self.clock()
        saved: list[int] = []
        try:
            for pid in pids:
                driver.checkpoint(pid)
                saved.append(pid)
        except DriverError as err:
            self._undo(driver, locked, saved)
            raise CheckpointError(f"checkpointing {model!r}: {err}", "CheckpointRefused" if err.refused else "SleepFailed") from None
        t_saved = self.clock()
        record = Checkpointed(pids, gpu_mib, tuple(_start_ticks(pid) for pid in pids))
        self.done[model] = record
        left = self._wait_gone(model, pids)
        if left:
            raise CheckpointError(
                f"{model!r} checkpointed but NVML still lists {left} {self.confirm_timeout_s:g}s later", "ResidueOverLimit"
            )
        rss = [rss_mib(pid) for pid in pids]
        record.host_mib = sum(r for r in rss if r is not None) if any(r is not None for r in rss) else None
        record.seconds = {"lock": t_locked - t0, "checkpoint": t_saved - t_locked, "confirm": self.clock() - t_saved}
        declared = spec.models[model].sleep_settings.host_memory_mib if model in spec.models else None
        if record.host_mib is not None and declared is not None and record.host_mib > declared:
            log.warning(
                "gpu%d: %r takes %d MiB of host memory while checkpointed, more than its sleep.hostMemoryMiB %d "
                "(the host budget counts the declared figure): raise it",
                spec.gpu,
                model,
                record.host_mib,
                declared,
            )
        log.info(
            "gpu%d: %r checkpointed (pids %s): %d MiB off the GPU in %.2fs, host RSS %s MiB",
            spec.gpu,
            model,
            list(pids),
            gpu_mib,
            self.clock() - t0,
            record.host_mib,
        )
        return 0

    # ----------------------------------------------------------------- wake

    def wake(self, spec: DeploymentSpec, model: str) -> None:
        """Restore and unlock every checkpointed process of ``model``; returns once each runs and NVML lists it again."""
        driver = self._driver()
        t0 = self.clock()
        pids = self._pids(spec, model)
        if not pids:
            raise CheckpointError(f"no checkpointed process of {model!r} is known: nothing to restore", "WakeFailed")
        for pid in pids:
            try:
                st = driver.state(pid)
                if st is ProcessState.CHECKPOINTED:
                    driver.restore(pid)
                    st = ProcessState.LOCKED
                if st is ProcessState.LOCKED:
                    driver.unlock(pid)
                st = driver.state(pid)
            except DriverError as err:
                self._failed(model, pids)
                raise CheckpointError(f"restoring {model!r}: {err}", "WakeFailed") from None
            if st is not ProcessState.RUNNING:
                self._failed(model, pids)
                raise CheckpointError(f"{model!r} process {pid} is {st} after its restore, not running", "WakeFailed")
        missing = self._wait_back(model, pids)
        if missing:
            self._failed(model, pids)
            raise CheckpointError(f"{model!r} restored but NVML does not list {missing} {self.confirm_timeout_s:g}s later", "WakeFailed")
        rec = self.done.pop(model, None)
        log.info(
            "gpu%d: %r restored (pids %s): %s MiB back on the GPU in %.2fs",
            spec.gpu,
            model,
            list(pids),
            rec.gpu_mib if rec is not None else "?",
            self.clock() - t0,
        )

    def is_sleeping(self, spec: DeploymentSpec, model: str) -> bool | None:
        """The driver's word: True when a process of ``model`` is checkpointed
        (or locked); False when they run; None when none is known."""
        if self.driver is None:
            return None
        if model in self.awake and model not in self.done:
            return False
        pids = self._pids(spec, model)
        rec = self.done.get(model)
        if rec is not None and rec.failed:
            return True  # its restore failed: not awake, whatever the driver says; the fall-back stops it
        states = []
        for pid in pids:
            try:
                states.append(self.driver.state(pid))
            except DriverError:
                continue  # not a CUDA process (the exec gate, a helper), or gone
        if any(s in (ProcessState.CHECKPOINTED, ProcessState.LOCKED, ProcessState.BUSY) for s in states):
            return True
        if ProcessState.RUNNING in states:
            self.done.pop(model, None)
            self.awake.add(model)
            return False
        return None

    def host_mib(self, model: str) -> int | None:
        """The RSS of ``model``'s processes measured while checkpointed, MiB."""
        rec = self.done.get(model)
        return rec.host_mib if rec is not None else None

    # ------------------------------------------------------------- the parts

    def _failed(self, model: str, pids: tuple[int, ...]) -> None:
        rec = self.done.get(model)
        if rec is None:
            rec = self.done[model] = Checkpointed(pids, 0, tuple(_start_ticks(pid) for pid in pids))
        rec.failed = True

    def _driver(self) -> CheckpointDriver:
        if self.driver is None:
            if not self.warned:
                log.warning("checkpoint switching is %s", self.availability.describe())
                self.warned = True
            raise CheckpointError(f"checkpoint switching is {self.availability.describe()}", "CheckpointRefused")
        return self.driver

    @staticmethod
    def _state(driver: CheckpointDriver, pid: int, reason: FallbackReason) -> ProcessState:
        try:
            return driver.state(pid)
        except DriverError as err:
            raise CheckpointError(f"asking the driver about process {pid}: {err}", reason) from None

    def _undo(self, driver: CheckpointDriver, locked: Sequence[int], saved: Sequence[int]) -> None:
        """Back to running, as far as the driver lets: restore what was saved, unlock what was locked."""
        for pid in saved:
            try:
                driver.restore(pid)
            except DriverError as err:
                log.warning("undoing a checkpoint: %s", err)
        for pid in locked:
            try:
                driver.unlock(pid)
            except DriverError as err:
                log.warning("undoing a lock: %s", err)

    def _pids(self, spec: DeploymentSpec, model: str) -> tuple[int, ...]:
        rec = self.done.get(model)
        if rec is not None and rec.started != tuple(_start_ticks(pid) for pid in rec.pids):
            self.done.pop(model)  # stopped since (a fall-back, by hand): its processes are gone
            rec = None
        if rec is not None:
            return rec.pids
        if self.owners is None:
            return ()
        try:
            owners = self.owners(spec)
        except Exception:
            return ()
        return tuple(sorted({int(k) for k, m in owners.items() if m == model and k.isdigit()}))

    def _listed(self) -> set[int] | None:
        try:
            procs = self.snapshot().processes
        except Exception:
            return None
        return {p.pid for p in procs} if procs is not None else None

    def _wait_gone(self, model: str, pids: Sequence[int]) -> list[int]:
        deadline = self.clock() + self.confirm_timeout_s
        while True:
            listed = self._listed()
            left = sorted(set(pids) & listed) if listed is not None else list(pids)
            if not left or self.clock() >= deadline:
                return left
            self.pause(CONFIRM_POLL_S)

    def _wait_back(self, model: str, pids: Sequence[int]) -> list[int]:
        deadline = self.clock() + self.confirm_timeout_s
        while True:
            listed = self._listed()
            missing = sorted(set(pids) - listed) if listed is not None else list(pids)
            if not missing or self.clock() >= deadline:
                return missing
            self.pause(CONFIRM_POLL_S)


def _start_ticks(pid: int) -> int | None:
    st = read_stat(pid)
    return st.start_ticks if st is not None and not st.exited else None


class ServerSleeper(Protocol):
    """The model servers' own sleep API (the worker's ``HttpSleeper``)."""

    def sleep(self, spec: DeploymentSpec, model: str) -> int | None: ...

    def wake(self, spec: DeploymentSpec, model: str) -> None: ...

    def is_sleeping(self, spec: DeploymentSpec, model: str) -> bool | None: ...


class StrategySleeper:
    """Each model's own way to sleep: ``switchStrategy: checkpoint`` through
    the driver (``CheckpointSleeper``), ``sleep`` through its server's API;
    ``auto`` by the way chosen for it (``ways``: model -> ``"checkpoint"`` or
    ``"sleep"``, the loop's ``SleepBook.ways``), woken the way it went. The
    driver is loaded when a spec first names a checkpoint model or an auto
    model with ``sleep.checkpoint`` (at the worker's start for the spec it
    starts with: ``prepare``)."""

    def __init__(
        self,
        server: ServerSleeper,
        snapshot: Callable[[], GpuSnapshot],
        owners: Callable[[DeploymentSpec], Mapping[str, str]] | None = None,
        load: Callable[[], tuple[CheckpointDriver | None, Availability]] = load_driver,
    ) -> None:
        self.server, self.snapshot, self.owners, self.load = server, snapshot, owners, load
        self.checkpoint: CheckpointSleeper | None = None
        self.ways: Mapping[str, str] = {}

    def prepare(self, spec: DeploymentSpec) -> Availability | None:
        """Load the driver now when ``spec`` has a checkpoint model (or an auto
        model that may be checkpointed); its availability (None: no such model)."""
        if not any(m.switch_strategy == "checkpoint" or m.auto_checkpoint for m in spec.models.values()):
            return None
        cp = self._checkpoint()
        if not cp.availability.available:
            log.warning("gpu%d: checkpoint switching is %s; those models are stopped instead", spec.gpu, cp.availability.describe())
            cp.warned = True
        return cp.availability

    def _checkpoint(self) -> CheckpointSleeper:
        if self.checkpoint is None:
            driver, availability = self.load()
            self.checkpoint = CheckpointSleeper(driver, availability, self.snapshot, self.owners)
        return self.checkpoint

    def checkpoint_available(self) -> bool:
        """Whether the driver's checkpoint API works here (loaded once: at the
        worker's start by ``prepare``, else now)."""
        return self._checkpoint().availability.available

    def _of(self, spec: DeploymentSpec, model: str) -> ServerSleeper:
        m = spec.models.get(model)
        if m is not None and m.auto_checkpoint:
            return self._checkpoint() if self.ways.get(model) == "checkpoint" else self.server
        return self._checkpoint() if m is not None and m.switch_strategy == "checkpoint" else self.server

    def _checkpointed(self, spec: DeploymentSpec, model: str) -> bool:
        """An auto model the driver holds checkpointed (whatever way was chosen
        since: a restarted supervisor finds it by the driver's word)."""
        m = spec.models.get(model)
        if m is None or not m.auto_checkpoint:
            return False
        return self._checkpoint().is_sleeping(spec, model) is True

    def sleep(self, spec: DeploymentSpec, model: str) -> int | None:
        return self._of(spec, model).sleep(spec, model)

    def wake(self, spec: DeploymentSpec, model: str) -> None:
        if self._checkpointed(spec, model):
            self._checkpoint().wake(spec, model)
            return
        self._of(spec, model).wake(spec, model)

    def is_sleeping(self, spec: DeploymentSpec, model: str) -> bool | None:
        if self._checkpointed(spec, model):
            return True
        m = spec.models.get(model)
        if m is not None and m.auto_checkpoint:
            return self.server.is_sleeping(spec, model)
        return self._of(spec, model).is_sleeping(spec, model)
