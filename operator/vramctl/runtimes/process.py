"""Runtime adapter for local processes: a model is ``command + args`` run here.

For machines without docker (and for the demo). The hard part is not starting
processes but finding them again: vramctl may be SIGKILLed and restarted while
its model servers keep running, and it must then adopt them, never start a
second heavy model beside them, and never signal a stranger's process.

Ownership and identity
    Each workload has a record ``{state_dir}/proc/{instance}-gpu{gpu}-{model}.json``
    holding its pid, process group, the kernel's start time of the pid
    (``/proc/<pid>/stat`` field 22, clock ticks since boot), the boot id, the
    spec hash and class. Records are replaced atomically (temp file +
    ``os.replace``), so a supervisor killed mid-write leaves the old or the new
    record, never half of one. A pid counts as ours only while it exists with
    the recorded start time on the recorded boot; anything else is pid reuse
    and is reported absent and never signalled. Only the records of this
    instance and GPU are read.

Process groups
    Models start in a new session (``start_new_session=True``), so pgid = pid
    and the whole tree of a multi-process server gets the stop signal. The
    group is signalled only while it provably is ours: the leader is alive
    with the recorded start time (a live or zombie leader pins the group id,
    which the kernel never hands out while it is in use), or, once the leader
    is gone during a stop, a group member that was already running when the
    leader was last seen still exists (it pins the id the same way). The
    remaining race -- the process exits and its pid is recycled between the
    check and the signal, microseconds apart -- is the one every pid-based
    tool has; pid_max makes it practically impossible.

States
    ``RUNNING``; ``PAUSED`` when the leader is stopped (state ``T``, SIGSTOP);
    ``EXITED`` when the leader is gone or a zombie -- state ``Z`` with no
    thread left: the kernel shows Z as soon as the main thread is gone, while
    other threads may still run -- with ``exit_code`` when it is known (we
    reaped it through the ``Popen`` kept since ``start``; the code is then
    written into the record so it survives restarts); absent (left out of
    ``observe``) when there is no record or the pid was reused. Exit codes
    follow the shell/docker convention: killed by signal N is ``128 + N``.

Leftover group members
    When observe finds the leader exited but other members of its group still
    running (workers of a crashed server, which would hold GPU memory with
    nobody to stop them), it SIGKILLs the group: a model lives and dies with
    its main process. This is only possible while the zombie leader pins the
    group; leftovers of an *adopted* leader that init already reaped cannot be
    proven ours and are left alone (they then show up on a real GPU as memory
    held by processes that are not vramctl's).

Known gap
    A supervisor SIGKILLed between ``fork`` and writing the record (a few
    hundred microseconds) leaves an unrecorded process. Such a process can be
    found by hand: every model gets ``VRAMCTL_INSTANCE``, ``VRAMCTL_GPU`` and
    ``VRAMCTL_MODEL`` in its environment.

Logs
    stdout and stderr of a model are appended to
    ``{state_dir}/logs/{instance}-gpu{gpu}-{model}.log``, with a ``--- vramctl``
    line at each start and at each exit vramctl sees. A log over 16 MiB is
    moved to ``.log.1`` at the next start. ``remove`` keeps the log.

Concurrency
    Safe to call from several threads (a worker per GPU, the API, the
    simulated GPU's holders): start/stop/pause/remove of one model are
    serialised by a per-model lock; observe takes no long lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from vramctl.host.procfs import ProcStat, read_stat
from vramctl.observed import Workload, WorkloadState
from vramctl.runtimes.base import PermanentError, StartError, StartEvent, StopOutcome, TransientError, check_instance
from vramctl.runtimes.health import http_ready
from vramctl.spec.models import DeploymentSpec, StopSpec

log = logging.getLogger(__name__)

RECORD_VERSION = 1
LOG_ROTATE_BYTES = 16 * 1024 * 1024
POLL_SECONDS = 0.02  # how often stop() looks whether the group is gone
STATE_CHANGE_SECONDS = 2.0  # how long pause/unpause wait for the kernel to show T / not T
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ /proc


def _group_members(pgid: int, exclude: int) -> list[ProcStat]:
    """Processes of group ``pgid`` other than ``exclude`` that have not exited."""
    out = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == exclude:
                continue
            st = read_stat(int(entry.name))
            if st is not None and st.pgid == pgid and not st.exited:
                out.append(st)
    return out


def _uptime_ticks() -> int:
    """Now, in the clock of field 22 (boot time, ticks), rounded down."""
    try:
        seconds = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # 0 proves nothing: no leftover member can start before it
    return int(seconds * _CLK_TCK)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _exit_code(returncode: int) -> int:
    """Popen's -N (killed by signal N) as the shell and docker write it."""
    return 128 - returncode if returncode < 0 else returncode


# ------------------------------------------------------------------ records


@dataclass(frozen=True)
class _Record:
    instance: str
    gpu: int
    model: str
    pid: int
    pgid: int
    start_ticks: int
    boot_id: str
    spec_hash: str
    model_class: str
    stop_signal: str
    grace_period_seconds: float
    command: list[str]
    started_at: float  # wall clock, for people reading the file
    exit_code: int | None = None
    version: int = RECORD_VERSION

    @classmethod
    def parse(cls, data: Any) -> _Record:
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            raise ValueError("not a version-1 process record")
        rec = cls(**data)
        for name in ("instance", "model", "spec_hash", "model_class", "stop_signal", "boot_id"):
            if not isinstance(getattr(rec, name), str):
                raise ValueError(f"{name} is not a string")
        for name in ("gpu", "pid", "pgid", "start_ticks"):
            if not isinstance(getattr(rec, name), int) or getattr(rec, name) < 0:
                raise ValueError(f"{name} is not a non-negative integer")
        if rec.exit_code is not None and not isinstance(rec.exit_code, int):
            raise ValueError("exit_code is not an integer")
        if not isinstance(rec.grace_period_seconds, int | float):
            raise ValueError("grace_period_seconds is not a number")
        if not isinstance(rec.command, list):
            raise ValueError("command is not a list")
        if rec.pid <= 1 or rec.pgid <= 1:
            raise ValueError("pid/pgid must be > 1")  # never signal init or "every process"
        return rec

    @property
    def ref(self) -> str:
        return str(self.pid)


class _Leader(Enum):
    ALIVE = "alive"
    STOPPED = "stopped"  # SIGSTOP: paused
    ZOMBIE = "zombie"  # exited, not reaped yet: still pins pid and group
    GONE = "gone"
    FOREIGN = "foreign"  # the pid now belongs to someone else (or another boot)


def _leader(rec: _Record, boot_id: str) -> tuple[_Leader, ProcStat | None]:
    if rec.boot_id and boot_id and rec.boot_id != boot_id:
        return _Leader.FOREIGN, None  # recorded before a reboot: nothing of it survives
    st = read_stat(rec.pid)
    if st is None:
        return _Leader.GONE, None
    if st.start_ticks != rec.start_ticks:
        return _Leader.FOREIGN, st
    if st.exited:
        return _Leader.ZOMBIE, st
    if st.state == "T":
        return _Leader.STOPPED, st
    return _Leader.ALIVE, st


# ------------------------------------------------------------------ runtime


class ProcessRuntime:
    """Runtime whose workloads are local processes tracked by pid records."""

    kind = "process"
    # After SIGKILL a process can only linger in uninterruptible sleep (a
    # driver call); past this, stop() gives up with an error instead of hanging.
    kill_timeout_seconds = 30.0

    def __init__(self, state_dir: Path, instance: str = "default") -> None:
        check_instance(instance)
        self.state_dir = Path(state_dir)
        self.instance = instance
        self._proc_dir = self.state_dir / "proc"
        self._log_dir = self.state_dir / "logs"
        self._proc_dir.mkdir(parents=True, exist_ok=True)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._boot_id = _boot_id()
        self._lock = threading.Lock()  # guards the dicts and sets below
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # by record key
        self._op_locks: dict[str, threading.RLock] = {}
        self._stopping: set[str] = set()
        self._warned: set[Path] = set()

    # -------------------------------------------------------------- paths

    def _key(self, gpu: int, model: str) -> str:
        return f"{self.instance}-gpu{gpu}-{model}"

    def _record_path(self, gpu: int, model: str) -> Path:
        return self._proc_dir / f"{self._key(gpu, model)}.json"

    def log_path(self, gpu: int, model: str) -> Path:
        """Where the model's stdout and stderr go."""
        return self._log_dir / f"{self._key(gpu, model)}.log"

    @contextlib.contextmanager
    def _op(self, key: str) -> Iterator[None]:
        with self._lock:
            lock = self._op_locks.setdefault(key, threading.RLock())
        with lock:
            yield

    # -------------------------------------------------------------- records

    def _load(self, path: Path) -> _Record | None:
        try:
            data = json.loads(path.read_text())
            return _Record.parse(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as err:
            with self._lock:
                first = path not in self._warned
                self._warned.add(path)
            if first:
                log.warning("ignoring unreadable process record %s: %s", path, err)
            return None

    def _write(self, rec: _Record) -> None:
        path = self._record_path(rec.gpu, rec.model)
        # A unique temp name: two threads may persist the same record at once.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(asdict(rec), f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _records(self, gpu: int) -> list[_Record]:
        out = []
        for path in sorted(self._proc_dir.glob(f"{self._key(gpu, '')}*.json")):
            rec = self._load(path)
            # The glob is a prefix match: instance "a" would also see the files
            # of an instance named "a-gpu0-x"; the record's own fields decide.
            if rec is not None and rec.instance == self.instance and rec.gpu == gpu and path.name == f"{self._key(gpu, rec.model)}.json":
                out.append(rec)
        return out

    def _record_exit(self, rec: _Record, code: int) -> None:
        """Write the exit code into the record, unless it was replaced meanwhile."""
        current = self._load(self._record_path(rec.gpu, rec.model))
        if current is None or current.pid != rec.pid or current.start_ticks != rec.start_ticks or current.exit_code is not None:
            return
        self._write(replace(current, exit_code=code))
        self._log_line(rec.gpu, rec.model, f"{rec.model} (pid {rec.pid}) exited with code {code}")

    def _log_line(self, gpu: int, model: str, text: str) -> None:
        with contextlib.suppress(OSError), open(self.log_path(gpu, model), "a") as f:
            f.write(f"--- vramctl {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {text}\n")

    # -------------------------------------------------------------- state

    def _child(self, rec: _Record) -> subprocess.Popen[bytes] | None:
        with self._lock:
            proc = self._children.get(self._key(rec.gpu, rec.model))
        return proc if proc is not None and proc.pid == rec.pid else None

    def _reap(self, rec: _Record, persist: bool = True) -> int | None:
        """Collect the exit status of an exited leader when it is our child
        (None when someone else's child: init reaps it); ``persist`` writes it
        into the record (a planned cleanup or a stop; observation never writes)."""
        if rec.exit_code is not None:
            return rec.exit_code
        proc = self._child(rec)
        if proc is None:
            return None
        try:
            returncode = proc.wait(timeout=1.0)  # exited already: returns at once
        except subprocess.TimeoutExpired:
            return None
        code = _exit_code(returncode)
        if persist:
            self._record_exit(rec, code)
        return code

    def _status(self, rec: _Record) -> tuple[WorkloadState | None, int | None, bool]:
        """State, exit code and whether something is left to clean up
        (processes of its group, an exit not yet recorded); state None = absent.
        Reads only: cleaning up is ``cleanup``'s job, when the plan says so."""
        if rec.exit_code is not None:
            return WorkloadState.EXITED, rec.exit_code, False
        leader, _ = _leader(rec, self._boot_id)
        if leader is _Leader.ALIVE:
            return WorkloadState.RUNNING, None, False
        if leader is _Leader.STOPPED:
            return WorkloadState.PAUSED, None, False
        if leader is _Leader.FOREIGN:
            return None, None, False
        key = self._key(rec.gpu, rec.model)
        with self._lock:
            stopping = key in self._stopping
        if stopping:
            return WorkloadState.EXITED, None, False  # stop() cleans up and reaps
        # A zombie pins the group id: whatever is still in the group is ours,
        # and useless without its main process.
        # Not reaped then: the zombie must keep pinning the group until cleanup kills it.
        if leader is _Leader.ZOMBIE and _group_members(rec.pgid, exclude=rec.pid):
            return WorkloadState.EXITED, None, True
        return WorkloadState.EXITED, self._reap(rec, persist=False), self._child(rec) is not None

    def _workload(self, deployment: DeploymentSpec, rec: _Record) -> Workload | None:
        state, code, leftover = self._status(rec)
        if state is None:
            return None
        spec = deployment.models.get(rec.model)
        # A model no longer in the spec is not "drifted": the planner stops it
        # for not being in the spec, which says more.
        drifted = spec is not None and deployment.spec_hash(rec.model) != rec.spec_hash
        return Workload(
            model=rec.model, state=state, ref=rec.ref, drifted=drifted, exit_code=code, heavy=rec.model_class == "heavy", leftover=leftover
        )

    def preflight(self, deployment: DeploymentSpec, model: str) -> str | None:
        """The command's executable can be found and run."""
        spec = deployment.models.get(model)
        if spec is None or not spec.command:
            return f"{model!r} has no `command`: the process runtime runs `command` + `args` as a local process"
        env = {**os.environ, **deployment.merged_env(model)}
        try:
            _check_executable(model, deployment.process_argv(model)[0], env.get("PATH", os.defpath))
        except StartError as err:
            return str(err)
        return None

    def cleanup(self, deployment: DeploymentSpec, model: str) -> None:
        """Kill what an exited model left in its process group and record its
        exit. Only a group pinned by the model's own zombie leader is touched."""
        key = self._key(deployment.gpu, model)
        with self._op(key):
            rec = self._load(self._record_path(deployment.gpu, model))
            if rec is None or rec.exit_code is not None:
                return
            leader, _ = _leader(rec, self._boot_id)
            if leader in (_Leader.ALIVE, _Leader.STOPPED, _Leader.FOREIGN):
                return  # not exited (or not ours): nothing to clean up
            if leader is _Leader.ZOMBIE:
                members = _group_members(rec.pgid, exclude=rec.pid)
                if members:
                    log.warning(
                        "%s exited but left %d process(es) of its group running (%s): killing them",
                        model,
                        len(members),
                        ", ".join(str(m.pid) for m in members),
                    )
                    self._killpg(rec, signal.SIGKILL)
            self._reap(rec)

    # -------------------------------------------------------------- signals

    def _killpg(self, rec: _Record, sig: int) -> None:
        """Signal the group; callers have just proven it is ours."""
        try:
            os.killpg(rec.pgid, sig)
        except ProcessLookupError:
            pass  # the whole group exited in between: nothing left to signal
        except PermissionError as err:
            raise PermanentError(f"cannot signal {rec.model} (process group {rec.pgid}): {err.strerror}") from err

    def _group_alive(self, rec: _Record, seen_ticks: int | None) -> tuple[bool, int | None]:
        """Whether any process of the workload still runs and provably is ours.

        ``seen_ticks``: boot-clock ticks, read *before* a check that found the
        leader holding its pid. Returns the new value of it.
        """
        before = _uptime_ticks()
        leader, _ = _leader(rec, self._boot_id)
        if leader in (_Leader.ALIVE, _Leader.STOPPED):
            return True, before
        if leader is _Leader.FOREIGN:
            return False, seen_ticks
        members = _group_members(rec.pgid, exclude=rec.pid)
        if leader is _Leader.ZOMBIE:
            return bool(members), before  # the zombie pins the group id
        # Leader gone: a member running since before the leader was last seen
        # has held the group id all along, so every member is ours.
        if seen_ticks is not None and any(m.start_ticks < seen_ticks for m in members):
            return True, seen_ticks
        return False, seen_ticks

    def _wait_state(self, rec: _Record, stopped: bool) -> None:
        """Wait (bounded) until the kernel shows the leader stopped / not stopped."""
        deadline = time.monotonic() + STATE_CHANGE_SECONDS
        while time.monotonic() < deadline:
            leader, _ = _leader(rec, self._boot_id)
            if (leader is _Leader.STOPPED) == stopped or leader not in (_Leader.ALIVE, _Leader.STOPPED):
                return
            time.sleep(0.002)

    # -------------------------------------------------------------- Runtime

    def observe(self, deployment: DeploymentSpec) -> dict[str, Workload]:
        """This instance's workloads on the deployment's GPU, by model name,
        including models no longer in the spec. ``ready`` is left False."""
        out: dict[str, Workload] = {}
        for rec in self._records(deployment.gpu):
            w = self._workload(deployment, rec)
            if w is not None:
                out[rec.model] = w
        return out

    def start(self, deployment: DeploymentSpec, model: str) -> str:
        """Start ``model`` (or SIGCONT it when paused; restart it on drift);
        a running, undrifted model is left alone. Returns the pid as text.
        Raises StartError with a reason (no command, executable not found)."""
        spec = deployment.models.get(model)
        if spec is None:
            raise StartError(f"{model} is not one of the models: {', '.join(sorted(deployment.models))}")
        if not spec.command:
            raise StartError(f"{model} has no `command`: the process runtime runs `command` + `args` as a local process")
        with self._op(self._key(deployment.gpu, model)):
            rec = self._load(self._record_path(deployment.gpu, model))
            if rec is not None:
                state, _, _ = self._status(rec)
                current = rec.spec_hash == deployment.spec_hash(model)
                if state is WorkloadState.RUNNING and current:
                    return rec.ref
                if state is WorkloadState.PAUSED and current:
                    self._killpg(rec, signal.SIGCONT)
                    self._wait_state(rec, stopped=False)
                    return rec.ref
                if state in (WorkloadState.RUNNING, WorkloadState.PAUSED):
                    log.info("%s: spec changed, restarting it", model)
                    self.stop(deployment, model)
            return self._spawn(deployment, model)

    def _spawn(self, deployment: DeploymentSpec, model: str) -> str:
        spec = deployment.models[model]
        assert spec.command  # checked by start()
        argv = deployment.process_argv(model)  # command, the engine's flags, args
        env = dict(os.environ)
        # Pin the model to its GPU (a model on several GPUs: to each of them,
        # e.g. "0,1"), numbered as NVML numbers them (PCI bus order), unless
        # the spec says otherwise.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in deployment.gpus_of(model))
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env.update(deployment.merged_env(model))
        # Ownership marks, like the docker labels: who started this process.
        env.update({"VRAMCTL_INSTANCE": self.instance, "VRAMCTL_GPU": str(deployment.gpu), "VRAMCTL_MODEL": model})
        _check_executable(model, argv[0], env.get("PATH", os.defpath))

        log_path = self.log_path(deployment.gpu, model)
        with contextlib.suppress(OSError):
            if log_path.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(log_path, log_path.with_name(log_path.name + ".1"))
        spec_hash = deployment.spec_hash(model)
        # One line per event in the log, even for a `python -c` script argument.
        shown = shlex.join(argv).replace("\n", "\\n")
        self._log_line(deployment.gpu, model, f"starting {model} (spec {spec_hash}): {shown}")
        # Record before exec: the child waits on a pipe until its record is
        # written, and only then execs the model. A supervisor killed in
        # between closes the pipe, and the child exits without running
        # anything: no child of vramctl can outlive its record unseen.
        go_r, go_w = os.pipe()
        try:
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(
                    [*_GATE, *argv],
                    stdin=go_r,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # own group: the stop signal reaches its workers too
                    close_fds=True,
                )
        except OSError as err:
            os.close(go_w)
            raise StartError(f"cannot start {model}: {argv[0]!r}: {err.strerror or err}") from err
        finally:
            os.close(go_r)

        try:
            # Until we reap it the child exists (at worst as a zombie), so its
            # stat line is there to read even if it exited at once.
            st = read_stat(proc.pid)
            if st is None:
                raise OSError(f"/proc/{proc.pid}/stat is unreadable")
            rec = _Record(
                instance=self.instance,
                gpu=deployment.gpu,
                model=model,
                pid=proc.pid,
                pgid=st.pgid,
                start_ticks=st.start_ticks,
                boot_id=self._boot_id,
                spec_hash=spec_hash,
                model_class=spec.model_class,
                stop_signal=spec.stop.signal,
                grace_period_seconds=spec.stop.grace_period_seconds,
                command=argv,
                started_at=time.time(),
            )
            self._write(rec)
        except OSError as err:
            # Untracked, it could never be stopped after a restart: undo.
            os.close(go_w)  # the gate sees EOF: it never execs the model
            proc.kill()
            proc.wait()
            raise StartError(f"cannot start {model}: cannot record its process in {self._proc_dir}: {err}") from err
        try:
            os.write(go_w, b"go\n")  # recorded: let it exec the model
        finally:
            os.close(go_w)
        with self._lock:
            old = self._children.get(self._key(deployment.gpu, model))
            self._children[self._key(deployment.gpu, model)] = proc
        if old is not None:
            old.poll()  # reap a predecessor that exited unobserved
        return rec.ref

    def stop(self, deployment: DeploymentSpec, model: str) -> StopOutcome:
        """Send the model's stop signal to its process group (SIGCONT first if
        paused), wait up to its grace period, then SIGKILL the group; return
        once every provable member has exited. Absent or exited: success."""
        key = self._key(deployment.gpu, model)
        with self._op(key):
            with self._lock:
                self._stopping.add(key)
            try:
                return self._stop(deployment, model)
            finally:
                with self._lock:
                    self._stopping.discard(key)

    def _stop(self, deployment: DeploymentSpec, model: str) -> StopOutcome:
        rec = self._load(self._record_path(deployment.gpu, model))
        if rec is None or rec.exit_code is not None:
            return StopOutcome(model, was_running=False, killed=False, seconds=0.0, exit_code=rec.exit_code if rec else None)
        spec = deployment.models.get(model)
        # The record keeps the stop settings for models no longer in the spec.
        stop = spec.stop if spec is not None else StopSpec(signal=rec.stop_signal, grace_period_seconds=rec.grace_period_seconds)

        t0 = time.monotonic()
        leader, _ = _leader(rec, self._boot_id)
        was_running = leader in (_Leader.ALIVE, _Leader.STOPPED)
        alive, seen = self._group_alive(rec, None)
        deadline = t0 + stop.grace_period_seconds
        killed = False
        if alive and leader is _Leader.STOPPED:
            # Frozen (gated before it could allocate, or paused): continuing it
            # for a graceful stop would let it run beside the GPU's holder for
            # its whole grace period. SIGKILL ends a stopped process at once.
            self._killpg(rec, signal.SIGKILL)
            killed = True
        elif alive:
            self._killpg(rec, stop.signum)
        kill_deadline = t0 + self.kill_timeout_seconds
        while alive:
            now = time.monotonic()
            if not killed and now >= deadline:
                # Re-proven just above (alive): the group is still ours.
                self._killpg(rec, signal.SIGKILL)
                killed = True
                kill_deadline = now + self.kill_timeout_seconds
            elif killed and now >= kill_deadline:
                waited = f"{self.kill_timeout_seconds:.0f}s"
                raise TransientError(f"{model} (pid {rec.pid}) is still there {waited} after SIGKILL (stuck in the kernel?)")
            time.sleep(POLL_SECONDS if killed else max(0.0, min(POLL_SECONDS, deadline - now)))
            alive, seen = self._group_alive(rec, seen)
        seconds = time.monotonic() - t0
        code = self._reap(rec)
        return StopOutcome(model, was_running=was_running, killed=killed, seconds=seconds, exit_code=code)

    def pause(self, deployment: DeploymentSpec, model: str) -> None:
        """SIGSTOP the model's group; returns once the kernel shows it stopped.
        Absent, exited or already paused: nothing to do."""
        with self._op(self._key(deployment.gpu, model)):
            rec = self._load(self._record_path(deployment.gpu, model))
            if rec is None or rec.exit_code is not None:
                return
            leader, _ = _leader(rec, self._boot_id)
            if leader is _Leader.ALIVE:
                self._killpg(rec, signal.SIGSTOP)
                self._wait_state(rec, stopped=True)

    def check_health(self, deployment: DeploymentSpec, model: str) -> bool:
        """Running, and the HTTP health path (when set) answers 2xx."""
        spec = deployment.models.get(model)
        rec = self._load(self._record_path(deployment.gpu, model))
        if spec is None or rec is None:
            return False
        state, _, _ = self._status(rec)
        if state is not WorkloadState.RUNNING:
            return False  # a paused server may accept the connection but never answers
        h = deployment.health_of(model)
        if h is not None and h.path is not None and h.port is not None:
            return http_ready(h.host, h.port, h.path, timeout=1.0)
        return True

    def logs_tail(self, deployment: DeploymentSpec, model: str, lines: int = 20) -> list[str]:
        """The last ``lines`` lines of the model's log file ([] when none)."""
        return _tail(self.log_path(deployment.gpu, model), lines)

    def remove(self, deployment: DeploymentSpec, model: str) -> None:
        """Stop the model and forget it (delete its record; keep its log)."""
        key = self._key(deployment.gpu, model)
        with self._op(key):
            self.stop(deployment, model)
            self._record_path(deployment.gpu, model).unlink(missing_ok=True)
            with self._lock:
                proc = self._children.pop(key, None)
            if proc is not None:
                proc.poll()

    def validate(self, deployment: DeploymentSpec) -> list[tuple[str, str]]:
        """Problems that keep this deployment from running as local processes.

        Paths are relative to the deployment spec, in the YAML's spelling
        (``models.<name>.command``); the caller prefixes where the deployment
        sits (``gpus[0].`` in a config file, ``spec.`` in a ModelDeployment).
        """
        problems: list[tuple[str, str]] = []
        for name, m in sorted(deployment.models.items()):
            if not m.command:
                problems.append((f"models.{name}.command", "the process runtime needs `command` (the executable and its arguments)"))
            if m.health is not None and m.health.docker_healthcheck:
                problems.append(
                    (
                        f"models.{name}.health.dockerHealthcheck",
                        "the process runtime has no docker healthcheck: use health.path and health.port",
                    )
                )
        return problems

    def owners(self, deployment: DeploymentSpec) -> dict[str, str]:
        """``{pid: model, pgid: model}`` (as text) of this GPU's workloads whose
        leader is provably ours: alive, stopped, or a zombie (which pins the
        group, so its remaining members are ours too). A GPU process is then
        ours when its pid, group or session is listed (``gpu.cgroups``)."""
        out: dict[str, str] = {}
        for rec in self._records(deployment.gpu):
            if rec.exit_code is not None:
                continue
            leader, _ = _leader(rec, self._boot_id)
            if leader in (_Leader.ALIVE, _Leader.STOPPED, _Leader.ZOMBIE):
                out[str(rec.pid)] = rec.model
                out[str(rec.pgid)] = rec.model
        return out

    def watch_starts(self, on_start: Callable[[StartEvent], None], stop: Callable[[], bool]) -> None:
        """Returns at once: nobody else starts vramctl's processes."""
        return None

    def close(self) -> None:
        """Reap children that have exited. Running models are left running:
        they outlive the supervisor and are adopted by the next one."""
        with self._lock:
            children = list(self._children.values())
        for proc in children:
            proc.poll()


# The exec gate: wait for one line on stdin (written once the pid record is
# on disk), then exec the model with stdin from /dev/null; EOF (the
# supervisor died first) exits 111 without running it. Same pid, group and
# start time as the model, so the record proves the model.
_GATE = ["/bin/sh", "-c", 'read -r _ || exit 111; exec "$@" </dev/null', "vramctl-exec-gate"]


def _check_executable(model: str, exe: str, path: str) -> None:
    """Raise StartError naming ``exe`` when it cannot be run (a clearer message
    than exec's, and before anything is written to the log)."""
    if os.sep in exe:
        if not os.path.isfile(exe):
            raise StartError(f"cannot start {model}: executable {exe!r} does not exist")
        if not os.access(exe, os.X_OK):
            raise StartError(f"cannot start {model}: {exe!r} is not executable (chmod +x?)")
    elif shutil.which(exe, path=path) is None:
        raise StartError(f"cannot start {model}: executable {exe!r} was not found on PATH ({path})")


def _tail(path: Path, lines: int) -> list[str]:
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos, block, data = end, 8192, b""
            # Read backwards in growing blocks until enough lines are in hand.
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
                block *= 2
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]
