"""ProcessRuntime against real processes of the Python stand-in.

Every test gets its own state dir and instance; the teardown SIGKILLs the
process group of every record that still names a live process with the
recorded start time, and every helper process a test spawned.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ports import free_port
from vramctl.observed import WorkloadState
from vramctl.runtimes.base import Runtime, StartError
from vramctl.runtimes.process import ProcessRuntime
from vramctl.spec.models import DeploymentSpec

STANDIN = [sys.executable, "-m", "vramctl.demo.standin"]


# ------------------------------------------------------------------ helpers


def stat_of(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a pid, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def running(pid: int) -> bool:
    """Exists and has not exited: a zombie has, unless threads of it still
    run (the leader shows Z as soon as its main thread is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    fields = raw[raw.rfind(b")") + 2 :].split()
    state, threads = fields[0].decode(), int(fields[17])
    return state != "X" and not (state == "Z" and threads <= 1)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what} not met within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - t0


def standin(
    port: int,
    *,
    load: float = 0.2,
    stop: float = 0.2,
    grace: float = 3.0,
    cls: str = "heavy",
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    health: bool = True,
) -> dict[str, Any]:
    m: dict[str, Any] = {
        "class": cls,
        "command": command or STANDIN,
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": str(load), "STANDIN_STOP_SECONDS": str(stop), **(env or {})},
        "stop": {"signal": "SIGTERM", "gracePeriodSeconds": grace},
        "vramMiB": 1000,
    }
    if health:
        m["health"] = {"path": "/health", "port": port, "intervalSeconds": 0.05}
    return m


def deployment(gpu: int = 0, **models: dict[str, Any]) -> DeploymentSpec:
    return DeploymentSpec.model_validate({"gpu": gpu, "models": models})


def record_path(state_dir: Path, instance: str, gpu: int, model: str) -> Path:
    return state_dir / "proc" / f"{instance}-gpu{gpu}-{model}.json"


class Env:
    """A test's state dir, instance name, runtimes and helper processes."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.instance = "t" + uuid.uuid4().hex[:10]
        self.runtimes: list[ProcessRuntime] = []
        self.helpers: list[subprocess.Popen[Any]] = []
        self.pids: list[int] = []  # loose pids to SIGKILL at the end (checked by start time)

    def runtime(self, instance: str | None = None) -> ProcessRuntime:
        rt = ProcessRuntime(self.state_dir, instance=instance or self.instance)
        self.runtimes.append(rt)
        return rt

    def helper(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(argv, **kw)
        self.helpers.append(p)
        return p

    def teardown(self) -> None:
        killed = []
        for path in (self.state_dir / "proc").glob("*.json"):
            rec = json.loads(path.read_text())
            st = stat_of(rec["pid"])
            if st is not None and st[1] == rec["start_ticks"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(rec["pgid"], signal.SIGKILL)
                killed.append(rec["pid"])
        for pid in self.pids:
            if stat_of(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for h in self.helpers:
            if h.poll() is None:
                h.kill()
            h.wait(timeout=5)
            for pipe in (h.stdin, h.stdout, h.stderr):
                if pipe is not None:
                    pipe.close()
        for pid in killed:
            wait_for(lambda pid=pid: not running(pid), what=f"pid {pid} gone")  # type: ignore[misc]
        for rt in self.runtimes:
            rt.close()  # reaps the children killed above


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.teardown()


def worker_pid(rt: ProcessRuntime, d: DeploymentSpec) -> int | None:
    """The pid a test server printed as ``WORKER_PID <pid>`` (whole lines only:
    the log is read while the server writes it)."""
    for line in rt.logs_tail(d, "srv"):
        m = re.fullmatch(r"WORKER_PID (\d+)", line)
        if m:
            return int(m.group(1))
    return None


def healthy(rt: ProcessRuntime, d: DeploymentSpec, model: str) -> Callable[[], bool]:
    return lambda: rt.check_health(d, model)


# ------------------------------------------------------------------ tests


def test_implements_the_runtime_port(env: Env) -> None:
    rt = env.runtime()
    assert isinstance(rt, Runtime)
    assert rt.kind == "process"
    assert rt.observe(deployment(m=standin(free_port()))) == {}


def test_start_runs_the_command_and_health_turns_ready_after_the_load_time(env: Env) -> None:
    rt = env.runtime()
    port = free_port()
    d = deployment(llm=standin(port, load=0.3))
    t0 = time.monotonic()
    ref = rt.start(d, "llm")
    w = rt.observe(d)["llm"]
    assert (w.state, w.ref, w.drifted, w.heavy, w.ready) == (WorkloadState.RUNNING, ref, False, True, False)
    assert not rt.check_health(d, "llm")
    wait_for(healthy(rt, d, "llm"), what="health")
    assert time.monotonic() - t0 >= 0.3
    # New session: the model leads its own process group.
    assert os.getpgid(int(ref)) == int(ref)
    rec = json.loads(record_path(env.state_dir, env.instance, 0, "llm").read_text())
    assert rec["pid"] == int(ref)
    assert rec["start_ticks"] == stat_of(int(ref))[1]  # type: ignore[index]
    assert rec["spec_hash"] == d.spec_hash("llm")
    assert rec["model_class"] == "heavy"
    assert any("standin: loading (0.3 s)" in line for line in rt.logs_tail(d, "llm"))


def test_env_is_the_environment_plus_the_merged_spec_env(env: Env) -> None:
    rt = env.runtime()
    script = "import os; print('X=' + os.environ['X'], 'Y=' + os.environ['Y'], 'HOME' in os.environ, os.environ['VRAMCTL_MODEL'])"
    d = DeploymentSpec.model_validate(
        {"env": {"X": "global", "Y": "global"}, "models": {"job": {"command": [sys.executable, "-c", script], "env": {"Y": "model"}}}}
    )
    rt.start(d, "job")
    wait_for(lambda: rt.observe(d)["job"].state is WorkloadState.EXITED, what="exit")
    assert rt.observe(d)["job"].exit_code == 0
    assert "X=global Y=model True job" in rt.logs_tail(d, "job")


def test_stop_honours_the_servers_stop_time(env: Env) -> None:
    rt = env.runtime()
    d = deployment(llm=standin(free_port(), load=0.05, stop=0.3, grace=3.0))
    pid = int(rt.start(d, "llm"))
    wait_for(healthy(rt, d, "llm"), what="health")  # its SIGTERM handler is installed by now
    out = rt.stop(d, "llm")
    assert (out.model, out.was_running, out.killed, out.exit_code) == ("llm", True, False, 0)
    assert 0.3 <= out.seconds < 1.5
    assert not running(pid)
    w = rt.observe(d)["llm"]
    assert (w.state, w.exit_code) == (WorkloadState.EXITED, 0)
    assert not rt.check_health(d, "llm")
    assert any("got SIGTERM, stopping in 0.3 s" in line for line in rt.logs_tail(d, "llm"))


def test_a_server_ignoring_sigterm_is_killed_after_the_grace_period(env: Env) -> None:
    rt = env.runtime()
    d = deployment(llm=standin(free_port(), load=0.05, grace=0.3, env={"STANDIN_IGNORE_SIGTERM": "1"}))
    pid = int(rt.start(d, "llm"))
    wait_for(healthy(rt, d, "llm"), what="health")
    out = rt.stop(d, "llm")
    assert out.killed and out.was_running
    assert 0.3 <= out.seconds < 3.0  # the model's 0.3 s grace, not the 10 s default
    assert out.exit_code == 128 + signal.SIGKILL
    assert not running(pid)
    assert rt.observe(d)["llm"].exit_code == 137


def test_a_crash_is_exited_with_its_code_and_the_log_says_why(env: Env) -> None:
    rt = env.runtime()
    d = deployment(llm=standin(free_port(), load=5, env={"STANDIN_CRASH_AFTER_SECONDS": "0.2", "STANDIN_EXIT_CODE": "3"}))
    rt.start(d, "llm")
    wait_for(lambda: rt.observe(d)["llm"].state is WorkloadState.EXITED, what="crash")
    w = rt.observe(d)["llm"]
    assert (w.state, w.exit_code, w.state.live) == (WorkloadState.EXITED, 3, False)
    assert w.leftover  # the exit is not recorded yet: observing never writes, a planned cleanup does
    assert rt.observe(d)["llm"].leftover  # observing twice changed nothing
    rt.cleanup(d, "llm")
    assert not rt.observe(d)["llm"].leftover
    tail = rt.logs_tail(d, "llm", 5)
    assert "standin: crashing with exit code 3" in tail
    assert "exited with code 3" in tail[-1]
    # Exited already: stopping it is a quick success, the code stays known.
    out = rt.stop(d, "llm")
    assert (out.was_running, out.killed, out.exit_code) == (False, False, 3)


def test_pause_freezes_the_group_and_start_resumes_it(env: Env) -> None:
    rt = env.runtime()
    d = deployment(llm=standin(free_port(), load=0.05))
    ref = rt.start(d, "llm")
    wait_for(healthy(rt, d, "llm"), what="health")
    rt.pause(d, "llm")
    assert stat_of(int(ref))[0] == "T"  # type: ignore[index]
    assert rt.observe(d)["llm"].state is WorkloadState.PAUSED
    assert not rt.check_health(d, "llm")  # answered without waiting on the frozen server
    rt.pause(d, "llm")  # idempotent
    assert rt.start(d, "llm") == ref
    assert rt.observe(d)["llm"].state is WorkloadState.RUNNING
    wait_for(healthy(rt, d, "llm"), what="health after resume")


def test_a_paused_model_is_killed_frozen_never_thawed_to_stop(env: Env) -> None:
    """A gated (paused) start must not run again beside the GPU's holder for
    its grace period: it is SIGKILLed while stopped."""
    rt = env.runtime()
    d = deployment(llm=standin(free_port(), load=0.05, stop=2.0, grace=3.0))
    ref = rt.start(d, "llm")
    wait_for(healthy(rt, d, "llm"), what="health")
    rt.pause(d, "llm")
    t0 = time.monotonic()
    out = rt.stop(d, "llm")
    assert (out.was_running, out.killed) == (True, True)
    assert time.monotonic() - t0 < 1.0  # not its 2 s graceful stop, nor the 3 s grace period
    assert "got SIGTERM" not in "\n".join(rt.logs_tail(d, "llm", 20))  # it never ran again to handle a signal
    assert not running(int(ref))


def test_spec_drift_restarts_with_a_new_pid(env: Env) -> None:
    rt = env.runtime()
    port = free_port()
    d1 = deployment(llm=standin(port, load=0.05, stop=0.05))
    old = int(rt.start(d1, "llm"))
    wait_for(healthy(rt, d1, "llm"), what="health")
    d2 = deployment(llm=standin(port, load=0.05, stop=0.05, env={"MODEL_REVISION": "2"}))
    assert rt.observe(d2)["llm"].drifted
    # Health, vramMiB and class are not part of the hash: no drift for them.
    d3 = deployment(llm={**standin(port, load=0.05, stop=0.05), "vramMiB": 2000, "startTimeoutSeconds": 9})
    assert not rt.observe(d3)["llm"].drifted
    new = int(rt.start(d2, "llm"))
    assert new != old
    assert not running(old)
    w = rt.observe(d2)["llm"]
    assert (w.state, w.ref, w.drifted) == (WorkloadState.RUNNING, str(new), False)
    wait_for(healthy(rt, d2, "llm"), what="health of the new process")


def test_a_paused_model_whose_spec_changed_is_restarted_not_resumed(env: Env) -> None:
    rt = env.runtime()
    port = free_port()
    d1 = deployment(llm=standin(port, load=0.05, stop=0.05))
    old = rt.start(d1, "llm")
    wait_for(healthy(rt, d1, "llm"), what="health")
    rt.pause(d1, "llm")
    d2 = deployment(llm=standin(port, load=0.05, stop=0.05, env={"MODEL_REVISION": "2"}))
    new = rt.start(d2, "llm")
    assert new != old
    assert not running(int(old))
    wait_for(healthy(rt, d2, "llm"), what="health of the new process")


def test_start_and_stop_are_idempotent(env: Env) -> None:
    rt = env.runtime()
    d = deployment(llm=standin(free_port(), load=0.05, stop=0.05))
    out = rt.stop(d, "llm")  # never started
    assert (out.was_running, out.killed, out.seconds) == (False, False, 0.0)
    ref = rt.start(d, "llm")
    assert rt.start(d, "llm") == ref
    wait_for(healthy(rt, d, "llm"), what="health")
    assert rt.stop(d, "llm").was_running
    again = rt.stop(d, "llm")
    assert (again.was_running, again.killed) == (False, False)
    # Exited: start makes a new process.
    assert rt.start(d, "llm") != ref


def test_a_second_runtime_over_the_same_state_adopts_the_process(env: Env) -> None:
    rt1 = env.runtime()
    d = deployment(llm=standin(free_port(), load=0.05, stop=0.1))
    ref = rt1.start(d, "llm")
    wait_for(healthy(rt1, d, "llm"), what="health")

    rt2 = env.runtime()  # the restarted supervisor: no Popen, only the record
    w = rt2.observe(d)["llm"]
    assert (w.state, w.ref, w.drifted) == (WorkloadState.RUNNING, ref, False)
    assert rt2.check_health(d, "llm")
    assert rt2.start(d, "llm") == ref  # adopted, not started twice
    out = rt2.stop(d, "llm")
    assert (out.was_running, out.killed) == (True, False)
    assert not running(int(ref))
    assert rt2.observe(d)["llm"].state is WorkloadState.EXITED
    # The original parent still learns the exit code.
    assert rt1.observe(d)["llm"].exit_code == 0


def test_processes_survive_a_sigkilled_supervisor_and_are_adopted(env: Env) -> None:
    port = free_port()
    spec = {"models": {"llm": standin(port, load=0.05, stop=0.1)}}
    supervisor = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from vramctl.runtimes.process import ProcessRuntime
        from vramctl.spec.models import DeploymentSpec
        rt = ProcessRuntime(Path({str(env.state_dir)!r}), instance={env.instance!r})
        print(rt.start(DeploymentSpec.model_validate({spec!r}), "llm"), flush=True)
        time.sleep(60)
        """
    )
    sup = env.helper([sys.executable, "-c", supervisor], stdout=subprocess.PIPE, text=True)
    assert sup.stdout is not None
    pid = int(sup.stdout.readline())
    env.pids.append(pid)
    sup.kill()
    sup.wait(timeout=5)
    assert running(pid)

    rt = env.runtime()
    d = deployment(llm=standin(port, load=0.05, stop=0.1))
    w = rt.observe(d)["llm"]
    assert (w.state, w.ref) == (WorkloadState.RUNNING, str(pid))
    wait_for(healthy(rt, d, "llm"), what="health of the adopted process")
    out = rt.stop(d, "llm")
    assert (out.was_running, out.killed) == (True, False)
    assert 0.1 <= out.seconds < 1.5
    assert not running(pid)
    w = rt.observe(d)["llm"]
    assert w.state is WorkloadState.EXITED
    assert w.exit_code is None  # not our child: the exit code went to its new parent


def test_a_record_whose_start_time_does_not_match_is_absent_and_never_signalled(env: Env) -> None:
    rt = env.runtime()
    d = deployment(llm=standin(free_port(), load=0.05, stop=0.05))
    rt.start(d, "llm")
    wait_for(healthy(rt, d, "llm"), what="health")
    rt.stop(d, "llm")

    # An unrelated process leading its own group now "has" the recorded pid.
    stranger = env.helper(["sleep", "30"], start_new_session=True)
    path = record_path(env.state_dir, env.instance, 0, "llm")
    rec = json.loads(path.read_text())
    assert rec["start_ticks"] != stat_of(stranger.pid)[1]  # type: ignore[index]
    rec.update(pid=stranger.pid, pgid=stranger.pid, exit_code=None)
    path.write_text(json.dumps(rec))

    assert "llm" not in rt.observe(d)
    assert not rt.check_health(d, "llm")
    rt.pause(d, "llm")
    out = rt.stop(d, "llm")
    assert (out.was_running, out.killed) == (False, False)
    rt.remove(d, "llm")
    assert not path.exists()
    assert stranger.poll() is None
    assert stat_of(stranger.pid)[0] != "T"  # type: ignore[index]

    # Same start time but recorded on another boot: not ours either.
    rec.update(start_ticks=stat_of(stranger.pid)[1], boot_id="00000000-0000-0000-0000-000000000000")  # type: ignore[index]
    path.write_text(json.dumps(rec))
    assert "llm" not in rt.observe(d)
    rt.stop(d, "llm")
    assert stranger.poll() is None


def test_a_missing_executable_is_a_start_error_naming_it(env: Env) -> None:
    rt = env.runtime()
    d = deployment(
        a={"command": ["/nonexistent/vramctl-no-such-server", "--port", "1"]},
        b={"command": ["vramctl-no-such-server-on-path"]},
    )
    with pytest.raises(StartError, match="/nonexistent/vramctl-no-such-server"):
        rt.start(d, "a")
    with pytest.raises(StartError, match="vramctl-no-such-server-on-path"):
        rt.start(d, "b")
    assert rt.observe(d) == {}


def test_a_model_without_command_cannot_start_and_fails_validation(env: Env) -> None:
    rt = env.runtime()
    d = deployment(
        img={"image": "vramctl/standin:dev"},
        dock={"command": STANDIN, "health": {"dockerHealthcheck": True}},
        ok=standin(free_port()),
    )
    assert rt.validate(d) == [
        ("models.dock.health.dockerHealthcheck", "the process runtime has no docker healthcheck: use health.path and health.port"),
        ("models.img.command", "the process runtime needs `command` (the executable and its arguments)"),
    ]
    with pytest.raises(StartError, match="command"):
        rt.start(d, "img")


def test_leftover_group_members_are_killed_after_the_grace_period(env: Env) -> None:
    # The leader dies on SIGTERM at once; its worker ignores SIGTERM.
    script = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        ignore = lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)
        worker = subprocess.Popen(["sleep", "30"], preexec_fn=ignore)
        sys.stdout.write(f"WORKER_PID {worker.pid}\\n")
        sys.stdout.flush()
        time.sleep(30)
        """
    )
    rt = env.runtime()
    d = deployment(srv={"command": [sys.executable, "-c", script], "stop": {"gracePeriodSeconds": 0.3}})
    rt.start(d, "srv")
    wait_for(lambda: worker_pid(rt, d) is not None, what="worker start")
    worker = worker_pid(rt, d) or 0
    env.pids.append(worker)
    assert running(worker)
    out = rt.stop(d, "srv")
    assert out.killed
    assert 0.3 <= out.seconds < 3.0  # the model's 0.3 s grace, not the 10 s default
    assert out.exit_code == 128 + signal.SIGTERM  # the leader itself went on SIGTERM
    wait_for(lambda: not running(worker), timeout=1.0, what="worker gone")


def test_a_crashed_leaders_leftover_workers_are_reported_by_observe_and_killed_by_cleanup(env: Env) -> None:
    script = textwrap.dedent(
        """
        import os, subprocess, sys
        worker = subprocess.Popen(["sleep", "30"])
        sys.stdout.write(f"WORKER_PID {worker.pid}\\n")
        sys.stdout.flush()
        os._exit(5)
        """
    )
    rt = env.runtime()
    d = deployment(srv={"command": [sys.executable, "-c", script]})
    rt.start(d, "srv")
    wait_for(lambda: worker_pid(rt, d) is not None, what="worker start")
    worker = worker_pid(rt, d) or 0
    env.pids.append(worker)
    wait_for(lambda: rt.observe(d)["srv"].state is WorkloadState.EXITED, what="leader exit")
    assert rt.observe(d)["srv"].leftover
    time.sleep(0.2)
    assert running(worker)  # observing has no side effects: a scrape never kills anything
    rt.cleanup(d, "srv")  # what the plan does next (Cleanup)
    wait_for(lambda: not running(worker), timeout=1.0, what="worker gone")
    w = rt.observe(d)["srv"]
    assert (w.exit_code, w.leftover) == (5, False)


def test_observe_sees_only_this_instance_and_gpu(env: Env) -> None:
    rt = env.runtime()
    d0 = deployment(0, llm=standin(free_port(), load=0.05, stop=0.05))
    rt.start(d0, "llm")
    # Its record files share rt's name prefix: "<instance>-gpu0-x-gpu0-llm.json".
    other = env.runtime(instance=env.instance + "-gpu0-x")
    assert other.observe(d0) == {}
    other.start(d0, "llm")
    assert set(rt.observe(d0)) == set(other.observe(d0)) == {"llm"}
    assert rt.observe(d0)["llm"].ref != other.observe(d0)["llm"].ref
    assert rt.observe(deployment(1, llm=standin(free_port()))) == {}
    # A model removed from the spec is still observed, with its recorded class.
    w = rt.observe(deployment(0, other=standin(free_port())))["llm"]
    assert (w.state, w.heavy, w.drifted) == (WorkloadState.RUNNING, True, False)
    # ... and can still be stopped, with the stop settings from its record.
    assert rt.stop(deployment(0, other=standin(free_port())), "llm").was_running


def test_remove_stops_and_forgets(env: Env) -> None:
    rt = env.runtime()
    d = deployment(llm=standin(free_port(), load=0.05, stop=0.05))
    pid = int(rt.start(d, "llm"))
    rt.remove(d, "llm")
    assert not running(pid)
    assert rt.observe(d) == {}
    rt.remove(d, "llm")  # idempotent
    assert rt.log_path(0, "llm").exists()  # the log is kept


def test_check_health_without_a_health_path_means_running(env: Env) -> None:
    rt = env.runtime()
    d = deployment(llm=standin(free_port(), load=10, stop=0.05, health=False))
    assert not rt.check_health(d, "llm")
    rt.start(d, "llm")
    assert rt.check_health(d, "llm")


def test_invalid_instance_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="instance"):
        ProcessRuntime(tmp_path, instance="../x")


def test_watch_starts_returns_at_once(env: Env) -> None:
    rt = env.runtime()
    t0 = time.monotonic()
    rt.watch_starts(lambda ev: None, lambda: False)
    assert time.monotonic() - t0 < 0.1


def _processes_of(instance: str) -> list[int]:
    """Pids whose environment carries this instance's ownership mark."""
    out = []
    mark = f"VRAMCTL_INSTANCE={instance}".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark in (d / "environ").read_bytes().split(b"\0"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_a_supervisor_killed_between_spawn_and_record_leaves_no_orphan(tmp_path: Path) -> None:
    """The supervisor dies right after the child exists and before its pid
    record is written (SIGKILL within milliseconds of "starting"): the child
    must not go on to run the model unrecorded."""
    instance = "orph" + uuid.uuid4().hex[:8]
    script = textwrap.dedent(
        f"""
        import os, sys
        from vramctl.runtimes.process import ProcessRuntime
        from vramctl.spec.models import DeploymentSpec
        rt = ProcessRuntime({str(tmp_path)!r}, instance={instance!r})
        rt._write = lambda rec: os._exit(9)  # killed before the record reaches the disk
        d = DeploymentSpec.model_validate({{"gpu": 0, "models": {{"llm": {{"command": [sys.executable, "-c", "import time; time.sleep(60)"]}}}}}})
        rt.start(d, "llm")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 9, r.stderr
    try:
        wait_for(lambda: not _processes_of(instance), timeout=3.0, what="no unrecorded child left running")
    finally:
        for pid in _processes_of(instance):
            os.kill(pid, signal.SIGKILL)
    assert not list((tmp_path / "proc").glob("*.json"))
