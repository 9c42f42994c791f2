"""Processes the tests started, found again at the end of the session.

Every process a test starts inherits the session's environment, so each one
carries ``MARK`` (set once per session, before any test or xdist worker
starts) and pytest's own ``PYTEST_CURRENT_TEST`` (the test that was running
when it was started). A process that outlives its parent is re-parented to
init and is no descendant of pytest any more; its environment still says who
started it. ``leftovers`` finds both kinds: the session's descendants and
every process whose environment carries this session's mark.

What tests start on purpose and must outlive the session (a Docker daemon
restarted by the chaos test) is started with ``unmarked_env()``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

MARK = "PYTEST_VRAMCTL_RUN"  # not VRAMCTL_*: some tests strip those from a child's environment


@dataclass(frozen=True)
class Leftover:
    pid: int
    cmdline: str
    started_by: str  # the test running when it was started, or "" when unknown

    def __str__(self) -> str:
        by = f" (started during {self.started_by})" if self.started_by else ""
        return f"pid {self.pid}: {self.cmdline[:300]}{by}"


def mark_session() -> str:
    """This session's mark in ``os.environ`` (kept when already set: an xdist
    worker inherits its controller's)."""
    return os.environ.setdefault(MARK, uuid.uuid4().hex)


def unmarked_env() -> dict[str, str]:
    """This process's environment without the session's mark and test name."""
    return {k: v for k, v in os.environ.items() if k not in (MARK, "PYTEST_CURRENT_TEST")}


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of ``pid``; None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return int(fields[1]), fields[0].decode()


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(e.decode(errors="replace").split("=", 1) for e in raw.split(b"\0") if b"=" in e)


def _cmdline(pid: int) -> str:
    try:
        return " ".join(a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a)
    except OSError:
        return "?"


def _ancestors(pid: int) -> set[int]:
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        st = _stat(pid)
        if st is None:
            break
        pid = st[0]
    return seen


def leftovers(mark: str, root: int | None = None) -> list[Leftover]:
    """Live processes (not zombies) that descend from ``root`` (this process
    by default) or carry ``MARK=mark``, except ``root`` and its ancestors."""
    root = os.getpid() if root is None else root
    mine = _ancestors(root)
    parents: dict[int, int] = {}
    live: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        st = _stat(pid)
        if st is None or st[1] in ("Z", "X"):
            continue
        parents[pid] = st[0]
        live.add(pid)

    def descends(pid: int) -> bool:
        seen: set[int] = set()
        while pid > 1 and pid not in seen:
            if pid == root:
                return True
            seen.add(pid)
            pid = parents.get(pid, 0)
        return False

    found: list[Leftover] = []
    for pid in sorted(live - mine):
        env = _environ(pid)
        if env.get(MARK) == mark or descends(pid):
            found.append(Leftover(pid, _cmdline(pid), env.get("PYTEST_CURRENT_TEST", "")))
    return found


def wait_for_none(mark: str, grace: float = 10.0) -> list[Leftover]:
    """``leftovers`` after waiting up to ``grace`` seconds for them to end
    (an xdist worker or a process stopped a moment ago may still be exiting)."""
    deadline = time.monotonic() + grace
    found = leftovers(mark)
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        found = leftovers(mark)
    return found


def kill(found: list[Leftover]) -> None:
    """SIGKILL each leftover (after it has been reported: the machine is left clean)."""
    for p in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, signal.SIGKILL)
