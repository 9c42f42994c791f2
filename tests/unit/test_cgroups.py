"""PID -> owner: /proc/<pid>/cgroup and /proc/<pid>/stat as real machines write them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.cgroup_samples import (
    CID,
    CID2,
    CRIO,
    DOCKER_IN_DOCKER,
    DOCKER_V1,
    DOCKER_V2_CGROUPFS,
    DOCKER_V2_FROM_NAMESPACE,
    DOCKER_V2_SYSTEMD,
    HOST_SERVICE_V1,
    HOST_SESSION,
    K3S_V2_CGROUPFS,
    K8S_V1_CGROUPFS,
    K8S_V2_GUARANTEED,
    K8S_V2_SYSTEMD_CONTAINERD,
    POD,
    POD_SANDBOX_ONLY,
    PODMAN_ROOTLESS,
    WSL2_HOST,
)
from vramctl.gpu.cgroups import CgroupOwner, owner_model, parse_cgroup, read_cgroup, short_id
from vramctl.host.procfs import ProcStat as StatIds
from vramctl.host.procfs import parse_stat, read_stat


@pytest.mark.parametrize(
    ("text", "ids", "engine", "pod"),
    [
        (DOCKER_V1, (CID,), "docker", None),
        (DOCKER_V2_SYSTEMD, (CID,), "docker", None),
        (DOCKER_V2_CGROUPFS, (CID,), "docker", None),
        (DOCKER_V2_FROM_NAMESPACE, (CID,), "docker", None),
        (K8S_V1_CGROUPFS, (CID2,), None, POD),
        (K8S_V2_SYSTEMD_CONTAINERD, (CID2,), "containerd", POD),
        (K8S_V2_GUARANTEED, (CID2,), "containerd", POD),
        (K3S_V2_CGROUPFS, (CID2,), None, POD),
        (CRIO, (CID2,), "cri-o", POD),
        (PODMAN_ROOTLESS, (CID,), "podman", None),
        (DOCKER_IN_DOCKER, (CID, CID2), "docker", None),
        (HOST_SESSION, (), None, None),
        (HOST_SERVICE_V1, (), None, None),
        (WSL2_HOST, (), None, None),
        (POD_SANDBOX_ONLY, (), None, POD),
        ("", (), None, None),
        ("garbage without colons\n", (), None, None),
    ],
    ids=[
        "docker-v1",
        "docker-v2-systemd",
        "docker-v2-cgroupfs",
        "docker-v2-cgroupns",
        "k8s-v1-cgroupfs",
        "k8s-v2-containerd",
        "k8s-v2-guaranteed",
        "k3s-v2-cgroupfs",
        "cri-o",
        "podman-rootless",
        "docker-in-docker",
        "host-session",
        "host-service-v1",
        "wsl2-host",
        "pod-without-container",
        "empty",
        "garbage",
    ],
)
def test_parse_cgroup(text: str, ids: tuple[str, ...], engine: str | None, pod: str | None) -> None:
    owner = parse_cgroup(text)
    assert owner.container_ids == ids
    assert owner.engine == engine
    assert owner.pod_uid == pod
    assert owner.container_id == (ids[-1] if ids else None)


def test_a_hex_looking_service_name_is_not_a_container() -> None:
    assert parse_cgroup("0::/system.slice/deadbeef.service\n").container_ids == ()
    assert parse_cgroup(f"0::/system.slice/{CID[:63]}.scope\n").container_ids == ()  # 63 digits


# /proc/<pid>/stat of a python worker whose comm has a space and a ')'.
STAT = b"4242 (pt_main_thread) x) S 4200 4200 4200 0 -1 4194560 1 0 0 0 5 3 0 0 20 0 7 0 987654 1 2 3\n"


def test_parse_stat_counts_fields_after_the_last_paren() -> None:
    assert parse_stat(STAT) == StatIds(pid=4242, ppid=4200, pgid=4200, sid=4200, start_ticks=987654)
    assert parse_stat(STAT.decode()) == parse_stat(STAT)
    assert parse_stat(b"4242 (x) S 1") is None
    assert parse_stat(b"nonsense") is None


def test_parse_stat_of_this_process_matches_os() -> None:
    st = read_stat(os.getpid())
    assert st is not None
    assert (st.pid, st.ppid, st.pgid, st.sid) == (os.getpid(), os.getppid(), os.getpgid(0), os.getsid(0))


def test_readers_return_none_for_a_missing_pid(tmp_path: Path) -> None:
    assert read_stat(999999, tmp_path) is None
    assert read_cgroup(999999, tmp_path) is None
    own = read_cgroup(os.getpid())
    assert isinstance(own, CgroupOwner)


OWNERS = {"4200": "llm", CID: "sdxl", "777": "tts"}


@pytest.mark.parametrize(
    ("pid", "stat", "cgroup", "model"),
    [
        (777, None, None, "tts"),  # the pid itself, no /proc needed
        (4242, StatIds(4242, 4200, 4200, 4200, 1), None, "llm"),  # a worker in the server's process group
        (4243, StatIds(4243, 1, 9999, 4200, 1), None, "llm"),  # its own group, but the server's session
        (5000, StatIds(5000, 1, 5000, 5000, 1), parse_cgroup(DOCKER_V2_SYSTEMD), "sdxl"),  # our container
        (5001, StatIds(5001, 1, 5001, 5001, 1), parse_cgroup(K8S_V2_SYSTEMD_CONTAINERD), None),  # someone else's container
        (5002, StatIds(5002, 1, 1, 1, 1), parse_cgroup(HOST_SESSION), None),  # a stranger on the host
        (5003, None, None, None),  # gone / other pid namespace
    ],
)
def test_owner_model(pid: int, stat: StatIds | None, cgroup: CgroupOwner | None, model: str | None) -> None:
    assert owner_model(pid, OWNERS, cgroup, stat) == model


def test_owner_model_accepts_short_container_ids_and_the_outer_container() -> None:
    assert owner_model(1, {short_id(CID2): "llm"}, parse_cgroup(DOCKER_IN_DOCKER), None) == "llm"
    assert owner_model(1, {CID: "outer"}, parse_cgroup(DOCKER_IN_DOCKER), None) == "outer"
    assert short_id(CID) == CID[:12]
