"""The real GPU probe: NVML through nvidia-ml-py (``import pynvml``).

Why NVML and not ``nvidia-smi``: one memory query costs about 8 us in
process, a spawned ``nvidia-smi`` tens of milliseconds (it initialises NVML
itself every time). The probe is polled every 50 ms during a switch and on
every Prometheus scrape, so that difference is the whole budget.

One library, one thread
    NVML is initialised once per process (``NvmlSession``: idempotent,
    thread-safe, shut down at exit; init costs about 11 ms) and every call
    runs on the session's single worker thread. A driver call that hangs
    (a GPU falling off the bus, a wedged driver) then cannot hang the
    supervisor or a scrape: the caller waits at most ``timeout_s`` and gets
    ``ProbeTimeout``, and while that call is still stuck, later calls fail at
    once instead of queueing behind it. The hand-off costs tens of
    microseconds (measured in tests/unit/test_nvml_probe.py), a few times a
    memory query and far below a millisecond. The supervisor treats
    ``ProbeTimeout`` as "memory unknown", never as free; ``last_good()``
    keeps the last reading for exporters that want to show it as stale.

What is read, and what happens when the card cannot say
    - memory: info v2 (``used`` excludes the driver-reserved memory, which v1
      counts as used); v1 when the driver does not know v2, with reserved 0.
    - utilization, temperature, power: None when NotSupported (asked again
      never) or on any other error (asked again next time).
    - processes: compute (v3, else v2) plus graphics; a pid in both counts
      once. ``used_mib`` None where NVML has no per-process memory (WSL2,
      WDDM); ``processes`` None when listing them is not supported at all.
    Each process is attributed through ``gpu.cgroups``: ``container`` when
    its cgroup names one, ``model`` when the runtime's ``owners()`` claims
    its pid, process group, session or container.

Only this module imports pynvml (an import-linter contract).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import pynvml

from vramctl.gpu.base import GpuInfo, ProbeError, ProbeTimeout
from vramctl.gpu.cgroups import CgroupOwner, owner_model, read_cgroup, short_id
from vramctl.host.procfs import ProcStat as StatIds
from vramctl.host.procfs import read_stat
from vramctl.observed import GpuMemory, GpuProcess, GpuSnapshot

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_TIMEOUT_S = 2.0  # one snapshot: a handful of calls of microseconds each
INIT_TIMEOUT_S = 10.0  # nvmlInit can take seconds on a cold driver
OWNERS_TTL_S = 5.0  # re-ask the runtime which pids/containers are ours at least this often...
OWNERS_MIN_INTERVAL_S = 0.05  # ...and at most this often when an unknown pid shows up

T = TypeVar("T")


class NvmlUnavailable(Exception):
    """NVML cannot be used here; the message says why (no library, no driver, no such GPU)."""


def _code(err: BaseException) -> int | None:
    value = getattr(err, "value", None)
    return value if isinstance(value, int) else None


# Errors that mean "this card / driver cannot do that", as opposed to "failed now".
_UNSUPPORTED = {
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    pynvml.NVML_ERROR_INVALID_ARGUMENT,
}


class _Job(Generic[T]):
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = threading.Lock()
        self.done.acquire()
        self.result: T | None = None
        self.error: BaseException | None = None


class NvmlSession:
    """NVML for this process: one init, one thread that makes every call.

    ``nvml`` is the pynvml module; tests pass a stand-in with the same names.
    """

    def __init__(self, nvml: Any = pynvml) -> None:
        self.nv = nvml
        self._lock = threading.Lock()  # the thread's creation
        self._init_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None
        self._initialised = False

    @property
    def initialised(self) -> bool:
        return self._initialised

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    t = threading.Thread(target=self._run, name="vramctl-nvml", daemon=True)
                    t.start()
                    self._thread = t

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._busy_since = time.monotonic()
            try:
                job.result = job.fn()
            except BaseException as err:  # handed to the caller, who re-raises it
                job.error = err
            finally:
                self._busy_since = None
                job.done.release()

    def call(self, fn: Callable[[], T], timeout: float = DEFAULT_TIMEOUT_S) -> T:
        """Run ``fn`` on the NVML thread; its result, or its exception.

        Raises ProbeTimeout when it takes longer than ``timeout``, and at once
        while an earlier call has been stuck for longer than ``timeout``.
        """
        if threading.current_thread() is self._thread:
            return fn()  # already on the NVML thread (nvml_facts): queueing would wait on ourselves
        since = self._busy_since
        if since is not None and time.monotonic() - since > timeout:
            raise ProbeTimeout(f"an NVML call has not returned for {time.monotonic() - since:.1f}s (driver stuck?); GPU state unknown")
        self._ensure_thread()
        job: _Job[T] = _Job(fn)
        self._jobs.put(job)
        if not job.done.acquire(timeout=timeout):
            raise ProbeTimeout(f"NVML did not answer within {timeout:.1f}s; GPU state unknown")
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def init(self, timeout: float = INIT_TIMEOUT_S) -> None:
        """Initialise NVML once (later calls return at once). Raises NvmlUnavailable."""
        if self._initialised:
            return
        with self._init_lock:
            if self._initialised:
                return
            try:
                self.call(self.nv.nvmlInit, timeout)
            except ProbeTimeout as err:
                raise NvmlUnavailable(f"nvmlInit did not return within {timeout:.0f}s ({err})") from None
            except Exception as err:
                raise NvmlUnavailable(describe_error(err)) from None
            self._initialised = True
        atexit.register(self.shutdown)

    def _call_quietly(self, fn: Callable[[], object]) -> None:
        try:
            self.call(fn, 1.0)
        except Exception as err:
            log.debug("NVML call during shutdown failed: %s", err)

    def shutdown(self) -> None:
        """Shut NVML down (at most about a second; never hangs exit)."""
        with self._init_lock:
            was, self._initialised = self._initialised, False
        if was:
            self._call_quietly(self.nv.nvmlShutdown)


_default_lock = threading.Lock()
_default: NvmlSession | None = None


def default_session() -> NvmlSession:
    """The process-wide session over the real pynvml."""
    global _default
    with _default_lock:
        if _default is None:
            _default = NvmlSession()
        return _default


def describe_error(err: BaseException) -> str:
    """An NVML error as a person should read it."""
    code = _code(err)
    if code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return "the NVML library (libnvidia-ml.so.1) is not installed: no NVIDIA driver here"
    if code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return "the NVIDIA kernel driver is not loaded"
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return "no permission to open the NVIDIA device files"
    if code == pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return "NVML library and kernel driver versions differ (driver updated without a reboot?)"
    return f"NVML error: {err}" if code is not None else f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------- facts


@dataclass(frozen=True)
class DeviceFacts:
    index: int
    name: str
    uuid: str
    memory: GpuMemory
    memory_info_version: int  # 2, or 1 when the driver lacks v2
    processes: int | None  # on the GPU now; None when NVML cannot list them
    per_process_memory: bool | None  # None: no process to tell by


@dataclass(frozen=True)
class NvmlFacts:
    driver: str
    nvml_version: str
    cuda_driver_version: str
    devices: tuple[DeviceFacts, ...] = field(default_factory=tuple)


def nvml_problem(index: int | None = None, session: NvmlSession | None = None) -> str | None:
    """Why the NVML probe cannot be used (for GPU ``index``), or None when it can."""
    s = session or default_session()
    try:
        s.init()
        count = int(s.call(s.nv.nvmlDeviceGetCount))
    except NvmlUnavailable as err:
        return str(err)
    except Exception as err:
        return describe_error(err)
    if index is not None and not 0 <= index < count:
        return f"GPU index {index} does not exist (NVML sees {count} GPU(s))"
    return None


def nvml_facts(session: NvmlSession | None = None) -> NvmlFacts:
    """Driver, versions and every GPU with its memory (for ``vramctl doctor``).
    Raises NvmlUnavailable."""
    s = session or default_session()
    s.init()
    nv = s.nv

    def read() -> NvmlFacts:
        cuda = _optional(lambda: nv.nvmlSystemGetCudaDriverVersion())
        devices = []
        for i in range(int(nv.nvmlDeviceGetCount())):
            probe = NvmlProbe(i, session=s, _handle=nv.nvmlDeviceGetHandleByIndex(i))
            raw = probe._read()
            procs = raw.processes
            devices.append(
                DeviceFacts(
                    index=i,
                    name=str(nv.nvmlDeviceGetName(probe._handle)),
                    uuid=str(nv.nvmlDeviceGetUUID(probe._handle)),
                    memory=raw.memory,
                    memory_info_version=2 if probe._mem_v2 else 1,
                    processes=len(procs) if procs is not None else None,
                    per_process_memory=None if not procs else all(used is not None for _, used in procs),
                )
            )
        return NvmlFacts(
            driver=str(nv.nvmlSystemGetDriverVersion()),
            nvml_version=str(_optional(lambda: nv.nvmlSystemGetNVMLVersion()) or "?"),
            cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else "?",
            devices=tuple(devices),
        )

    try:
        return s.call(read, INIT_TIMEOUT_S)
    except (ProbeTimeout, NvmlUnavailable):
        raise
    except Exception as err:
        raise NvmlUnavailable(describe_error(err)) from None


def running_under_wsl2(proc_version: Path = Path("/proc/version")) -> bool:
    """WSL2 (its kernel says "microsoft"): NVML there has no per-process memory."""
    try:
        return "microsoft" in proc_version.read_text().lower()
    except OSError:
        return False


def _optional(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception:
        return None


# ----------------------------------------------------------------- probe


@dataclass(frozen=True)
class _Raw:
    memory: GpuMemory
    utilization: float | None
    temperature: float | None
    power: float | None
    processes: list[tuple[int, int | None]] | None  # (pid, used bytes)


@dataclass
class _Known:
    stat: StatIds | None
    cgroup: CgroupOwner | None


class NvmlProbe:
    """GpuProbe over NVML for GPU ``index``.

    ``owners``: returns what vramctl runs on this GPU, as
    ``{pid or container id: model}`` (``Runtime.owners``). It is asked again
    when a pid it did not know appears on the GPU (at most every
    ``OWNERS_MIN_INTERVAL_S``) and at least every ``OWNERS_TTL_S``; it is
    called with the probe's lock held and must not call back into the probe.
    Raises NvmlUnavailable when NVML or the GPU is not there.
    """

    kind = "nvml"

    def __init__(
        self,
        index: int,
        owners: Callable[[], Mapping[str, str]] | None = None,
        *,
        session: NvmlSession | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        proc: Path = Path("/proc"),
        clock: Callable[[], float] = time.monotonic,
        pod_names: Callable[[str], str | None] | None = None,
        _handle: Any = None,
    ) -> None:
        """``pod_names``: a Kubernetes pod uid -> "namespace/name" (the Pod
        runtime's lookup), to name a GPU process that is not vramctl's."""
        self.index = index
        self._pod_names = pod_names
        self.session = session or default_session()
        self.nv = self.session.nv
        self.timeout_s = timeout_s
        self._owners = owners
        self._proc = proc
        self._clock = clock
        self._mem_v2: bool | None = None  # None: not tried yet
        self._unsupported: set[str] = set()
        self._proc_fns: dict[str, Callable[[Any], Any] | None] = {}
        self._info: GpuInfo | None = None
        self._lock = threading.Lock()
        self._owner_map: Mapping[str, str] = {}
        self._owner_read_at = float("-inf")
        self._owner_pids: frozenset[int] = frozenset()
        self._known: dict[int, _Known] = {}
        self._last_good: tuple[float, GpuSnapshot] | None = None
        if _handle is not None:  # nvml_facts: already on the NVML thread
            self._handle = _handle
            return
        self.session.init()
        try:
            self._handle = self.session.call(lambda: self.nv.nvmlDeviceGetHandleByIndex(index), timeout_s)
        except ProbeTimeout as err:
            raise NvmlUnavailable(f"GPU {index}: {err}") from None
        except Exception as err:
            raise NvmlUnavailable(f"GPU {index}: {describe_error(err)}") from None

    # ------------------------------------------------------------ port

    def info(self) -> GpuInfo:
        if self._info is None:
            nv, h = self.nv, self._handle

            def read() -> GpuInfo:
                return GpuInfo(
                    index=self.index,
                    uuid=str(nv.nvmlDeviceGetUUID(h)),
                    name=str(nv.nvmlDeviceGetName(h)),
                    driver=str(nv.nvmlSystemGetDriverVersion()),
                    total_mib=self._memory().total_mib,
                )

            self._info = self._call(read)
        return self._info

    def snapshot(self) -> GpuSnapshot:
        """Memory, telemetry and attributed processes now. Raises ProbeError
        (ProbeTimeout) when NVML cannot be read: the state is then unknown."""
        raw = self._call(self._read)
        procs = None if raw.processes is None else self._attribute(raw.processes)
        snap = GpuSnapshot(
            memory=raw.memory,
            processes=procs,
            utilization=raw.utilization,
            temperature_celsius=raw.temperature,
            power_watts=raw.power,
        )
        self._last_good = (self._clock(), snap)
        return snap

    def last_good(self) -> tuple[float, GpuSnapshot] | None:
        """(clock time, snapshot) of the last successful snapshot, for showing a stale value."""
        return self._last_good

    @property
    def memory_info_version(self) -> int | None:
        """2 or 1 once memory was read; None before."""
        return None if self._mem_v2 is None else (2 if self._mem_v2 else 1)

    # ------------------------------------------------------ NVML thread

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return self.session.call(fn, self.timeout_s)
        except ProbeError:
            raise
        except Exception as err:
            raise ProbeError(f"GPU {self.index}: {describe_error(err)}") from err

    def _read(self) -> _Raw:
        nv, h = self.nv, self._handle
        return _Raw(
            memory=self._memory(),
            utilization=self._field("utilization", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
            temperature=self._field("temperature", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
            power=self._field("power", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            processes=self._processes(),
        )

    def _memory(self) -> GpuMemory:
        nv, h = self.nv, self._handle
        if self._mem_v2 is not False:
            try:
                m = nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)
            except Exception as err:
                if self._mem_v2 or _code(err) not in _UNSUPPORTED:
                    raise
                self._mem_v2 = False
                log.info(
                    "gpu %d: NVML memory info v2 is not supported (%s); using v1, which counts reserved memory as used", self.index, err
                )
            else:
                self._mem_v2 = True
                return GpuMemory(total_mib=m.total // MIB, used_mib=m.used // MIB, reserved_mib=m.reserved // MIB)
        m = nv.nvmlDeviceGetMemoryInfo(h)
        return GpuMemory(total_mib=m.total // MIB, used_mib=m.used // MIB)

    def _field(self, name: str, fn: Callable[[], float]) -> float | None:
        if name in self._unsupported:
            return None
        try:
            return fn()
        except Exception as err:
            if _code(err) in _UNSUPPORTED:
                self._unsupported.add(name)
                log.info("gpu %d: NVML cannot report %s here (%s)", self.index, name, err)
            return None

    def _list(self, kind: str) -> list[Any] | None:
        """Processes of ``kind`` (compute, graphics): the newest struct version
        the library has; None when the driver cannot list them."""
        if kind not in self._proc_fns:
            base = f"nvmlDeviceGet{kind.capitalize()}RunningProcesses"
            for name in (base + "_v3", base + "_v2"):
                candidate = getattr(self.nv, name, None)
                if candidate is None:
                    continue
                try:
                    result = candidate(self._handle)
                except Exception as err:
                    if _code(err) == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                        continue
                    if _code(err) in _UNSUPPORTED:
                        break
                    raise
                self._proc_fns[kind] = candidate
                return list(result)
            self._proc_fns[kind] = None
            log.info("gpu %d: NVML cannot list %s processes here", self.index, kind)
            return None
        fn = self._proc_fns[kind]
        if fn is None:
            return None
        return list(fn(self._handle))

    def _processes(self) -> list[tuple[int, int | None]] | None:
        try:
            compute = self._list("compute")
        except Exception as err:
            log.debug("gpu %d: listing compute processes failed: %s", self.index, err)
            return None  # unknown this time; memory still counts
        if compute is None:
            return None
        try:
            graphics = self._list("graphics") or []
        except Exception as err:
            log.debug("gpu %d: listing graphics processes failed: %s", self.index, err)
            graphics = []
        used: dict[int, int | None] = {}
        for p in [*compute, *graphics]:
            pid, mem = int(p.pid), p.usedGpuMemory
            mem = int(mem) if mem is not None else None
            if pid in used:
                prev = used[pid]
                mem = max(prev, mem) if prev is not None and mem is not None else (prev if mem is None else mem)
            used[pid] = mem
        return sorted(used.items())

    # --------------------------------------------------- caller thread

    def _attribute(self, raw: list[tuple[int, int | None]]) -> tuple[GpuProcess, ...]:
        pids = frozenset(pid for pid, _ in raw)
        with self._lock:
            owners = self._owners_for(pids)
            out = []
            known: dict[int, _Known] = {}
            for pid, used in raw:
                k = self._ids(pid)
                known[pid] = k
                model = owner_model(pid, owners, k.cgroup, k.stat)
                cid = k.cgroup.container_id if k.cgroup is not None else None
                uid = k.cgroup.pod_uid if k.cgroup is not None else None
                out.append(
                    GpuProcess(
                        pid=pid,
                        used_mib=None if used is None else used // MIB,
                        model=model,
                        container=short_id(cid) if cid else None,
                        pod=self._pod_name(uid) if uid is not None and model is None else None,
                    )
                )
            self._known = known  # forget pids that left the GPU
        return tuple(out)

    def _pod_name(self, uid: str) -> str:
        name = None
        if self._pod_names is not None:
            try:
                name = self._pod_names(uid)
            except Exception as err:  # the API may be away: the uid still says which Pod
                log.debug("gpu %d: naming pod %s: %s", self.index, uid, err)
        return name or f"uid {uid}"

    def _ids(self, pid: int) -> _Known:
        stat = read_stat(pid, self._proc)
        prev = self._known.get(pid)
        if prev is not None and prev.stat is not None and stat is not None and prev.stat.start_ticks == stat.start_ticks:
            return _Known(stat, prev.cgroup)  # same process: its cgroup did not move
        return _Known(stat, read_cgroup(pid, self._proc) if stat is not None else None)

    def _owners_for(self, pids: frozenset[int]) -> Mapping[str, str]:
        if self._owners is None:
            return self._owner_map
        now = self._clock()
        age = now - self._owner_read_at
        if age >= OWNERS_TTL_S or (not pids <= self._owner_pids and age >= OWNERS_MIN_INTERVAL_S):
            try:
                self._owner_map = dict(self._owners())
            except Exception as err:  # keep the last answer: better than calling our own model a stranger
                log.warning("gpu %d: could not ask the runtime which processes are ours (%s)", self.index, err)
            self._owner_read_at = now
            self._owner_pids = pids
        return self._owner_map
