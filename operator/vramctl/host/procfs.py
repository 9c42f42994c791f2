"""``/proc/<pid>/stat``, read once, for everything that needs it.

The process runtime checks its pids against their recorded start time and
state; the NVML probe ties a GPU process to the process group or session of a
model it started. Both read the same file, so it is parsed here only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` vramctl uses.

    Equality is by the ids (pid, parent, group, session, start time): state
    and thread count change from one read to the next of the same process.
    """

    pid: int
    ppid: int
    pgid: int
    sid: int
    start_ticks: int  # field 22: start time in clock ticks since boot
    state: str = field(default="?", compare=False)  # R S D T t Z X ...
    num_threads: int = field(default=1, compare=False)  # field 20

    @property
    def exited(self) -> bool:
        """Exited, waiting to be reaped. The kernel shows a thread-group
        leader as Z as soon as its *main thread* is gone; the process is only
        over once its other threads are too (a SIGKILLed multi-threaded server
        spends a moment like that, a server whose main thread called
        pthread_exit stays like that)."""
        return self.state == "X" or (self.state == "Z" and self.num_threads <= 1)


def parse_stat(raw: bytes | str) -> ProcStat | None:
    """Parse ``/proc/<pid>/stat``; None when it is malformed.

    The command name (field 2) may contain spaces and ')', so the fields are
    counted from after its last ')'.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    head, sep, tail = data.rpartition(b")")
    if not sep:
        return None
    try:
        pid = int(head.split(b"(", 1)[0])
        f = tail.split()
        # tail: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
        # cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime
        return ProcStat(
            pid=pid,
            ppid=int(f[1]),
            pgid=int(f[2]),
            sid=int(f[3]),
            start_ticks=int(f[19]),
            state=f[0].decode(),
            num_threads=int(f[17]),
        )
    except (IndexError, ValueError):
        return None


def read_stat(pid: int, proc: Path = Path("/proc")) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed; None when the process is gone or unreadable."""
    try:
        return parse_stat((proc / str(pid) / "stat").read_bytes())
    except OSError:
        return None


def boot_time(proc: Path = Path("/proc")) -> float | None:
    """When this machine booted (``btime`` of ``/proc/stat``), in seconds since the epoch."""
    try:
        for line in (proc / "stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def started_at(stat: ProcStat, proc: Path = Path("/proc")) -> float | None:
    """When the process of ``stat`` started, in seconds since the epoch (to a clock tick)."""
    booted = boot_time(proc)
    return None if booted is None else booted + stat.start_ticks / os.sysconf("SC_CLK_TCK")


def read_cmdline(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The process's arguments; [] when it is gone or unreadable."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
