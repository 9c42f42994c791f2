"""DockerRuntime.owners and the NVML probe's container attribution, on the
real engine: the host pid of a container's process is traced back to its
model through /proc/<pid>/cgroup, whatever this host's cgroup layout is."""

from __future__ import annotations

import os
from collections.abc import Callable

from tests.support.docker_engine import STANDIN_TAG
from vramctl.gpu.cgroups import owner_model, read_cgroup, short_id, with_container_processes
from vramctl.host.procfs import read_stat
from vramctl.runtimes.docker import DockerRuntime
from vramctl.spec.models import DeploymentSpec


def test_owners_and_cgroup_attribution_of_a_container(runtime: DockerRuntime, free_port: Callable[[], int]) -> None:
    port = free_port()
    d = DeploymentSpec.model_validate(
        {
            "gpu": 0,
            "models": {
                "llm": {
                    "image": STANDIN_TAG,
                    "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0", "STANDIN_STOP_SECONDS": "0"},
                    "stop": {"gracePeriodSeconds": 2},
                }
            },
        }
    )
    assert runtime.owners(d) == {}
    cid = runtime.start(d, "llm")
    owners = runtime.owners(d)
    assert owners == {cid: "llm"}
    pid = int(runtime.client.containers.get(cid).attrs["State"]["Pid"])
    assert pid > 0
    cgroup = read_cgroup(pid)
    assert cgroup is not None, "the container's host pid has no readable /proc/<pid>/cgroup"
    assert cgroup.container_id == cid, f"cgroup does not name the container: {cgroup}"
    assert cgroup.engine in ("docker", None)
    assert owner_model(pid, owners, cgroup, read_stat(pid)) == "llm"
    assert short_id(cid) == cid[:12]
    # The host pids of the container's processes (what the checkpoint API acts on), found through /proc alone.
    found = with_container_processes(owners)
    assert found.get(str(pid)) == "llm", found
    assert str(os.getpid()) not in found
    runtime.stop(d, "llm")
    assert runtime.owners(d) == {}
