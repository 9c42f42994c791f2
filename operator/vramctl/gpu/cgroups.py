"""Who owns a host pid: its container, its process group, and so its model.

NVML names the processes on a GPU by host pid and nothing else. To tell "our
llm container is still tearing down" from "someone else's job holds 8 GB",
each pid is traced back to something vramctl started:

- a container: ``/proc/<pid>/cgroup`` carries the container id in its path,
  whatever the engine and cgroup version (see ``container_ids``);
- a local process of the process runtime: the pid itself, or its process
  group or session (``/proc/<pid>/stat``), since a model server's workers
  share its group.

The parsing is pure (text in, values out) and tested against real files; the
two readers at the bottom are the only I/O, and they return None for a pid
that is gone or unreadable (another pid namespace, a permission): such a
process simply stays unattributed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# /proc/<pid>/stat is parsed in one place; these names are part of this module's API.
from vramctl.host.procfs import ProcStat as StatIds
from vramctl.host.procfs import parse_stat, read_stat

__all__ = ["CgroupOwner", "StatIds", "owner_model", "parse_cgroup", "parse_stat", "read_cgroup", "read_stat", "short_id"]

# A container id is 64 lowercase hex digits, as the last part of a cgroup path
# component: "<id>" (cgroupfs driver: /docker/<id>, /kubepods/.../<id>) or
# "<prefix>-<id>.scope" (systemd driver: docker-, cri-containerd-, crio-, libpod-).
_ID_RE = re.compile(r"^(?:(?P<prefix>[a-z][a-z0-9-]*?)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$")
# kubepods-burstable-pod<uid with _>.slice (systemd) or pod<uid> (cgroupfs).
_POD_RE = re.compile(
    r"^(?:kubepods(?:-[a-z]+)*-)?pod(?P<uid>[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$"
)

_PREFIX_ENGINE = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman"}


@dataclass(frozen=True)
class CgroupOwner:
    """What a process's cgroup says about it.

    ``container_ids``: every container id in the path, outermost first (a
    container inside a container has two). ``engine``: docker, containerd,
    cri-o, podman, or None when only the bare id says "a container".
    ``pod_uid``: the Kubernetes pod, when the path is under kubepods.
    """

    container_ids: tuple[str, ...] = ()
    engine: str | None = None
    pod_uid: str | None = None

    @property
    def container_id(self) -> str | None:
        """The innermost container: the one the process runs in."""
        return self.container_ids[-1] if self.container_ids else None


def parse_cgroup(text: str) -> CgroupOwner:
    """Parse the content of ``/proc/<pid>/cgroup`` (v1, v2 or hybrid).

    Each line is ``hierarchy-id:controllers:path``; the first line whose path
    names a container wins (v1 repeats one path per controller, hybrid adds
    a ``0::`` line that may or may not carry the id). A host process gives
    an empty ``CgroupOwner``.
    """
    fallback: CgroupOwner | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        owner = _parse_path(parts[2])
        if owner.container_ids:
            return owner
        if fallback is None and owner.pod_uid is not None:
            fallback = owner
    return fallback or CgroupOwner()


def _parse_path(path: str) -> CgroupOwner:
    ids: list[str] = []
    engine: str | None = None
    pod: str | None = None
    parent = ""
    for part in path.split("/"):
        m = _ID_RE.match(part)
        if m:
            ids.append(m.group("id"))
            prefix = m.group("prefix")
            if prefix:
                engine = _PREFIX_ENGINE.get(prefix, prefix)
            elif parent == "docker":
                engine = "docker"
            elif pod is not None:
                engine = None  # cgroupfs kubepods: the runtime is not in the path
        else:
            p = _POD_RE.match(part)
            if p:
                pod = p.group("uid").replace("_", "-")
        parent = part
    return CgroupOwner(tuple(ids), engine if ids else None, pod)


def short_id(container_id: str) -> str:
    """The 12-character form docker prints."""
    return container_id[:12]


def owner_model(pid: int, owners: Mapping[str, str], cgroup: CgroupOwner | None, stat: StatIds | None) -> str | None:
    """The model a GPU process belongs to, or None when it is not ours.

    ``owners`` maps a pid (as decimal text) or a container id to a model
    name (``Runtime.owners``). A process is ours when its pid, its process
    group or its session is a recorded pid, or when one of the containers it
    runs in is one of ours (full ids; a 12-character short id key matches
    too). The pid is checked first: it is the only proof that needs no /proc.
    """
    model = owners.get(str(pid))
    if model is not None:
        return model
    if stat is not None:
        for key in (stat.pgid, stat.sid):
            if key > 1:
                model = owners.get(str(key))
                if model is not None:
                    return model
    if cgroup is not None:
        for cid in reversed(cgroup.container_ids):
            model = owners.get(cid) or owners.get(short_id(cid))
            if model is not None:
                return model
    return None


def read_cgroup(pid: int, proc: Path = Path("/proc")) -> CgroupOwner | None:
    """``/proc/<pid>/cgroup`` parsed; None when it cannot be read."""
    try:
        return parse_cgroup((proc / str(pid) / "cgroup").read_text())
    except (OSError, UnicodeDecodeError):
        return None


def with_container_processes(owners: Mapping[str, str], proc: Path = Path("/proc")) -> dict[str, str]:
    """``owners`` plus ``{pid: model}`` for every process on this host whose
    cgroup names one of the owned containers.

    A container runtime names its workloads by container id only; what acts
    on processes from outside (the driver's checkpoint API) needs their host
    pids, and a checkpointed process is no longer in NVML's list, so /proc is
    the only place left to find it after a restart. Owners keyed by pid only
    (the process runtime) are returned as they are, without a scan."""
    out = dict(owners)
    if all(k.isdigit() for k in owners):
        return out
    try:
        entries = list(proc.iterdir())
    except OSError:
        return out
    for entry in entries:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cgroup = read_cgroup(pid, proc)
        if cgroup is None or not cgroup.container_ids:
            continue
        model = owner_model(pid, owners, cgroup, None)
        if model is not None:
            out[str(pid)] = model
    return out
