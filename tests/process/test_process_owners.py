"""ProcessRuntime.owners and the NVML probe's pid attribution, on real processes.

A model server with a worker process: both are attributed to the model
(the worker through its process group), a stranger's process is not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vramctl.gpu.cgroups import owner_model, read_cgroup
from vramctl.host.procfs import read_stat
from vramctl.runtimes.process import ProcessRuntime
from vramctl.spec.models import DeploymentSpec

# A "server" that forks a worker (same process group) and reports its pid.
SERVER = textwrap.dedent(
    """
    import subprocess, sys, time
    w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(f"WORKER_PID {w.pid}", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[ProcessRuntime]:
    rt = ProcessRuntime(tmp_path, instance="t" + uuid.uuid4().hex[:10])
    yield rt
    for name in ("srv",):
        with contextlib.suppress(Exception):
            rt.remove(deployment(), name)
    rt.close()


def deployment() -> DeploymentSpec:
    return DeploymentSpec.model_validate(
        {"gpu": 0, "models": {"srv": {"command": [sys.executable, "-c", SERVER], "stop": {"gracePeriodSeconds": 2}}}}
    )


def worker_pid(rt: ProcessRuntime, d: DeploymentSpec) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in rt.logs_tail(d, "srv"):
            if line.startswith("WORKER_PID "):
                return int(line.split()[1])
        time.sleep(0.02)
    raise AssertionError("the server did not report its worker")


def attribute(pid: int, owners: dict[str, str]) -> str | None:
    return owner_model(pid, owners, read_cgroup(pid), read_stat(pid))


def test_owners_lists_pid_and_group_and_attribution_finds_the_worker(runtime: ProcessRuntime) -> None:
    d = deployment()
    assert runtime.owners(d) == {}
    pid = int(runtime.start(d, "srv"))
    worker = worker_pid(runtime, d)
    owners = runtime.owners(d)
    assert owners == {str(pid): "srv"}  # pgid == pid: the server leads its own group
    assert attribute(pid, owners) == "srv"
    assert attribute(worker, owners) == "srv"  # not listed itself: found through its process group
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert attribute(stranger.pid, owners) is None
    finally:
        stranger.kill()
        stranger.wait()
    runtime.stop(d, "srv")
    assert runtime.owners(d) == {}
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker, signal.SIGKILL)
