"""How much host RAM sleeping models may take when the spec does not say.

A level-1 sleep moves a model's weights into host memory (pinned, for a fast
wake). Pinned pages cannot be swapped or reclaimed, so over-committing them
starves the machine rather than slowing it down. The default budget is what
the kernel calls available (``MemAvailable``: free plus reclaimable cache) at
the moment vramctl starts, less a margin for everything else: 10% of the
total, at least 2 GiB. The worker's settings read it once
(``WorkerSettings.from_config``), the planner evicts sleepers by it when the
spec pins no ``hostMemoryBudgetMiB``, and the status shows the budget in use
with its arithmetic (``budget_in_use``), because a figure read once at start
is only a guess about later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MEMINFO = Path("/proc/meminfo")
MIN_MARGIN_MIB = 2048
MARGIN_FRACTION = 0.10


@dataclass(frozen=True)
class HostMemoryReading:
    """``/proc/meminfo`` at one moment and the default budget derived from it."""

    total_mib: int
    available_mib: int
    margin_mib: int

    @property
    def budget_mib(self) -> int:
        return max(0, self.available_mib - self.margin_mib)

    def describe(self) -> str:
        """``MemAvailable 60000 MiB - margin 6400 MiB (10% of MemTotal 64000 MiB, at least 2048) = 53600 MiB``."""
        return (
            f"MemAvailable {self.available_mib} MiB - margin {self.margin_mib} MiB "
            f"({MARGIN_FRACTION:.0%} of MemTotal {self.total_mib} MiB, at least {MIN_MARGIN_MIB}) = {self.budget_mib} MiB"
        )


def parse_meminfo(text: str) -> HostMemoryReading | None:
    """The reading from ``/proc/meminfo``'s text; None without MemTotal and MemAvailable (kernels before 3.14)."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            kib[key.strip()] = int(fields[0])
    if "MemTotal" not in kib or "MemAvailable" not in kib:
        return None
    total = kib["MemTotal"] // 1024
    margin = max(MIN_MARGIN_MIB, int(total * MARGIN_FRACTION))
    return HostMemoryReading(total_mib=total, available_mib=kib["MemAvailable"] // 1024, margin_mib=margin)


def read_host_memory(path: Path = MEMINFO) -> HostMemoryReading | None:
    """The reading now; None where ``path`` cannot be read or says too little."""
    try:
        return parse_meminfo(path.read_text())
    except OSError:
        return None


def read_available_mib(path: Path = MEMINFO) -> int | None:
    """``MemAvailable`` now, in MiB; None where it cannot be read."""
    reading = read_host_memory(path)
    return reading.available_mib if reading is not None else None


def budget_in_use(pinned_mib: int | None, reading: HostMemoryReading | None) -> tuple[int | None, str]:
    """The host-memory budget the sleepers are held to and where it comes from:
    ``hostMemoryBudgetMiB`` (``pinned_mib``) when set, else the default of the
    reading at start, else none (unbounded, and the source says so)."""
    if pinned_mib is not None:
        return pinned_mib, "hostMemoryBudgetMiB"
    if reading is not None:
        return reading.budget_mib, f"default: {reading.describe()}"
    return None, "unknown: /proc/meminfo unreadable; set hostMemoryBudgetMiB"


# Pinned (page-locked) host memory is capped under WSL2 and Docker Desktop:
# 0.75-1 GiB measured on a 3090 (over 500 MB failed inside Docker). Elsewhere
# the kernel pins what is free; no ceiling is assumed.
VIRTUALIZED_PINNED_CEILING_MIB = 768
PROC_VERSION = Path("/proc/version")


def probe_pinned_ceiling(proc_version: Path = PROC_VERSION) -> tuple[int | None, str]:
    """The pinned-memory ceiling of this machine and how it was found: WSL2
    (``microsoft`` in the kernel's version) or Docker Desktop (``linuxkit``):
    ``VIRTUALIZED_PINNED_CEILING_MIB``; else None (no ceiling known). A read
    at start, without allocating anything; the spec's ``pinnedMemoryCeilingMiB``
    overrides it."""
    try:
        version = proc_version.read_text().lower()
    except OSError:
        return None, f"unknown: {proc_version} unreadable"
    for mark, name in (("microsoft", "WSL2"), ("linuxkit", "Docker Desktop")):
        if mark in version:
            return VIRTUALIZED_PINNED_CEILING_MIB, f"{name} ({mark} in {proc_version}): pinned memory is capped below 1 GiB there"
    return None, "no ceiling known on this kernel"
