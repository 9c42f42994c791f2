"""The Python stand-in model server: health timing, stop timing, crash code."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.ports import free_port
from vramctl.demo.standin import Settings

STANDIN = [sys.executable, "-m", "vramctl.demo.standin"]


def status(port: int, path: str = "/health") -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll until true; return the seconds it took. Fails the test on timeout."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(**env: str) -> subprocess.Popen[str]:
        full = {**os.environ, **{f"STANDIN_{k.upper()}": v for k, v in env.items()}}
        p = subprocess.Popen(STANDIN, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=5)


def test_health_is_503_while_loading_then_200(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    port = free_port()
    t_spawn = time.monotonic()
    p = spawn(port=str(port), load_seconds="0.4", stop_seconds="0")
    wait_for(lambda: status(port) is not None)
    assert status(port) == 503
    assert status(port, "/other") == 404
    wait_for(lambda: status(port) == 200)
    # The load time runs from process start: never 200 before it is over.
    # (No upper bound: a loaded machine may start the interpreter late.)
    assert time.monotonic() - t_spawn >= 0.4
    p.terminate()
    out, _ = p.communicate(timeout=5)
    assert "standin: loading (0.4 s)" in out
    assert f"standin: ready on :{port}" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_stop_seconds_with_exit_0(spawn: Callable[..., subprocess.Popen[str]], sig: signal.Signals) -> None:
    port = free_port()
    p = spawn(port=str(port), load_seconds="0.05", stop_seconds="1")
    wait_for(lambda: status(port) == 200)
    t0 = time.monotonic()
    p.send_signal(sig)
    # The port closes at once, while the process still runs out its stop
    # time, like the image's httpd.
    wait_for(lambda: status(port) is None, timeout=3)
    assert p.poll() is None or time.monotonic() - t0 >= 1.0
    out, _ = p.communicate(timeout=10)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0
    assert 1.0 <= elapsed < 5
    assert f"standin: got {sig.name}, stopping in 1 s" in out
    assert out.index(f"got {sig.name}") < out.index("standin: stopped")
    assert out.rstrip().endswith("standin: stopped")


def test_ignore_sigterm_only_sigkill_ends_it(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    port = free_port()
    p = spawn(port=str(port), load_seconds="0", stop_seconds="0", ignore_sigterm="1")
    wait_for(lambda: status(port) == 200)
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.3)
    assert status(port) == 200
    p.kill()
    out, _ = p.communicate(timeout=5)
    assert p.returncode == -signal.SIGKILL
    assert "got SIGTERM" not in out


def test_crash_exits_with_the_configured_code(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    t0 = time.monotonic()
    p = spawn(port="0", load_seconds="5", crash_after_seconds="0.2", exit_code="7")
    out, _ = p.communicate(timeout=5)
    assert p.returncode == 7
    assert time.monotonic() - t0 >= 0.2
    assert "standin: crashing with exit code 7" in out


def test_crash_wins_over_a_slow_stop(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    port = free_port()
    p = spawn(port=str(port), load_seconds="0", stop_seconds="5", crash_after_seconds="0.4", exit_code="3")
    wait_for(lambda: status(port) == 200)
    p.terminate()
    out, _ = p.communicate(timeout=5)
    assert p.returncode == 3
    assert "got SIGTERM" in out


def test_bad_setting_exits_2_naming_it(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    p = spawn(load_seconds="soon")
    out, _ = p.communicate(timeout=5)
    assert p.returncode == 2
    assert "STANDIN_LOAD_SECONDS" in out


def test_busy_port_exits_70(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = spawn(port=str(s.getsockname()[1]))
        out, _ = p.communicate(timeout=5)
    assert p.returncode == 70
    assert "cannot listen" in out


def test_settings_defaults_match_the_image() -> None:
    s = Settings.from_env({})
    assert (s.host, s.port, s.load_seconds, s.stop_seconds, s.ignore_sigterm, s.crash_after_seconds, s.exit_code) == (
        "127.0.0.1",
        8000,
        2.0,
        1.0,
        False,
        None,
        1,
    )


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STANDIN_PORT": "99999"}, "STANDIN_PORT"),
        ({"STANDIN_STOP_SECONDS": "-1"}, "STANDIN_STOP_SECONDS"),
        ({"STANDIN_EXIT_CODE": "x"}, "STANDIN_EXIT_CODE"),
        ({"STANDIN_CRASH_AFTER_SECONDS": "later"}, "STANDIN_CRASH_AFTER_SECONDS"),
    ],
)
def test_settings_name_the_bad_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Settings.from_env(env)


def test_sleep_settings_are_read_and_checked() -> None:
    s = Settings.from_env({"STANDIN_SLEEP_SECONDS": "0.5", "STANDIN_RESIDUE_MIB": "900", "STANDIN_WAKE_BROKEN": "1"})
    assert (s.sleep_seconds, s.wake_seconds, s.residue_mib, s.residue_growth_mib, s.sleep_status, s.wake_broken) == (
        0.5,
        0.2,
        900,
        0,
        200,
        True,
    )
    with pytest.raises(ValueError, match="STANDIN_SLEEP_STATUS"):
        Settings.from_env({"STANDIN_SLEEP_STATUS": "42"})
    with pytest.raises(ValueError, match="STANDIN_WAKE_SECONDS"):
        Settings.from_env({"STANDIN_WAKE_SECONDS": "-1"})


def test_sleep_while_loading_is_503_with_retry_after_and_the_cycle_is_logged(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    port = free_port()
    p = spawn(port=str(port), load_seconds="0.5", stop_seconds="0", sleep_seconds="0", wake_seconds="0", residue_mib="300")
    wait_for(lambda: status(port) is not None)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    conn.request("POST", "/sleep?level=1")
    r = conn.getresponse()
    assert (r.status, r.getheader("Retry-After")) == (503, "1")
    conn.close()
    wait_for(lambda: status(port) == 200)
    for path in ("/sleep?level=2", "/wake_up"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("POST", path)
        assert conn.getresponse().status == 200
        conn.close()
    p.terminate()
    out, _ = p.communicate(timeout=5)
    assert "standin: sleeping (level 2, 0 s)" in out
    assert "standin: asleep (residue 300 MiB)" in out
    assert "standin: awake" in out


def test_a_stop_taken_after_the_load_time_still_logs_ready_first(spawn: Callable[..., subprocess.Popen[str]]) -> None:
    """A loaded machine: the main thread wakes late and finds the stop signal
    already waiting though /health has said 200 since the load time ended.
    Frozen (SIGSTOP) across the load time with a SIGTERM queued, it must still
    log the ready line before the stop."""
    port = free_port()
    p = spawn(port=str(port), load_seconds="0.3", stop_seconds="0")
    wait_for(lambda: status(port) == 503)
    p.send_signal(signal.SIGSTOP)
    time.sleep(0.5)  # past the load time while frozen
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGCONT)
    out, _ = p.communicate(timeout=5)
    assert p.returncode == 0, out
    lines = out.splitlines()
    assert f"standin: ready on :{port}" in lines, out
    assert lines.index(f"standin: ready on :{port}") < lines.index("standin: got SIGTERM, stopping in 0 s"), out
