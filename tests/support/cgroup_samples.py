"""/proc/<pid>/cgroup as real machines write them (docker, Kubernetes, CRI-O,
podman, cgroup v1 and v2, host sessions), for the owner tests."""

from __future__ import annotations

CID = "3f1c0e4a4b6d4e2f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f"
CID2 = "7a0c5b1e9d8f7e6d5c4b3a29180f7e6d5c4b3a2918f7e6d5c4b3a2918f7e6d5c"
POD = "5f6c0a7b-4b1a-4f36-9d3e-6c9d0a9f3d10"

DOCKER_V1 = f"""12:pids:/docker/{CID}
11:hugetlb:/docker/{CID}
10:net_cls,net_prio:/docker/{CID}
9:cpuset:/docker/{CID}
8:memory:/docker/{CID}
7:devices:/docker/{CID}
6:freezer:/docker/{CID}
5:perf_event:/docker/{CID}
4:blkio:/docker/{CID}
3:cpu,cpuacct:/docker/{CID}
2:rdma:/
1:name=systemd:/docker/{CID}
0::/system.slice/containerd.service
"""
DOCKER_V2_SYSTEMD = f"0::/system.slice/docker-{CID}.scope\n"
DOCKER_V2_CGROUPFS = f"0::/docker/{CID}\n"
# vramctl itself in a container with a private cgroup namespace reads host pids' paths relative to its own root.
DOCKER_V2_FROM_NAMESPACE = f"0::/../../system.slice/docker-{CID}.scope\n"
K8S_V1_CGROUPFS = f"""11:memory:/kubepods/burstable/pod{POD}/{CID2}
10:devices:/kubepods/burstable/pod{POD}/{CID2}
1:name=systemd:/kubepods/burstable/pod{POD}/{CID2}
"""
K8S_V2_SYSTEMD_CONTAINERD = (
    f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID2}.scope\n"
)
K8S_V2_GUARANTEED = f"0::/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID2}.scope\n"
K3S_V2_CGROUPFS = f"0::/kubepods/besteffort/pod{POD}/{CID2}\n"
CRIO = f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD.replace('-', '_')}.slice/crio-{CID2}.scope\n"
PODMAN_ROOTLESS = f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n"
DOCKER_IN_DOCKER = f"0::/docker/{CID}/docker/{CID2}\n"
HOST_SESSION = "0::/user.slice/user-1000.slice/session-3.scope\n"
HOST_SERVICE_V1 = "12:pids:/system.slice/ollama.service\n1:name=systemd:/system.slice/ollama.service\n0::/system.slice/ollama.service\n"
WSL2_HOST = "0::/\n"
POD_SANDBOX_ONLY = f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice\n"
