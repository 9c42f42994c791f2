"""Pre-staging a cold start's weights into the page cache.

A cold start reads the model's weights from disk; from the page cache the
same read is a memory copy. While the active model serves and the demand
queue says another model is next, and that model will start cold, its
weight files can be read ahead (``posix_fadvise(WILLNEED)``: the kernel
reads them in the background) so its start finds them cached.

Bounded: only as many bytes as ``MemAvailable`` allows less a margin (the
page cache is reclaimable, but reading more than fits only evicts what was
read first), files found by a bounded walk of the declared paths, and one
pre-stage at a time per GPU, off the worker's thread (``Prestager``).
``plan`` is pure; ``prestage`` does the I/O; ``resident_fraction`` (mincore)
tells how much of a file is cached and ``evict`` drops it from the cache,
for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vramctl.host.memory import read_available_mib

log = logging.getLogger(__name__)

# Files a walk of a declared directory looks at, at most.
MAX_FILES = 4096
# What stays free of the page cache's new pages: the host margin's own floor.
MARGIN_MIB = 2048
MIB = 1 << 20
# The read's buffer: the memory a pre-stage takes beside the page cache.
CHUNK = 8 * MIB


@dataclass(frozen=True)
class Staged:
    """What a pre-stage read ahead: files and bytes, and what it skipped (over the budget)."""

    files: tuple[str, ...]
    bytes: int
    skipped: tuple[str, ...] = ()


def files_of(paths: Iterable[str], limit: int = MAX_FILES) -> list[tuple[str, int]]:
    """(path, size) of the regular files at or under ``paths``, at most ``limit``, in a stable order."""
    out: list[tuple[str, int]] = []
    for p in paths:
        root = Path(p)
        if root.is_file():
            out.append((str(root), root.stat().st_size))
        elif root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    f = Path(dirpath) / name
                    try:
                        if f.is_file():
                            out.append((str(f), f.stat().st_size))
                    except OSError:
                        continue
                    if len(out) >= limit:
                        return out
        if len(out) >= limit:
            return out[:limit]
    return out


def plan(files: Sequence[tuple[str, int]], available_mib: int | None, margin_mib: int = MARGIN_MIB) -> tuple[list[str], list[str]]:
    """Which files to read ahead (in order) within ``available_mib`` less
    ``margin_mib``, and which are skipped; None available: none (unknown
    memory is not gambled on)."""
    if available_mib is None:
        return [], [f for f, _ in files]
    budget = max(0, available_mib - margin_mib) * MIB
    take: list[str] = []
    skip: list[str] = []
    used = 0
    for f, size in files:
        if used + size <= budget:
            take.append(f)
            used += size
        else:
            skip.append(f)
    return take, skip


def prestage(paths: Iterable[str], available_mib: int | None, margin_mib: int = MARGIN_MIB) -> Staged:
    """Read ``paths``' files into the page cache within the budget: a hint
    (``posix_fadvise(WILLNEED)``), then a sequential read through one
    ``CHUNK``-sized buffer, because the hint alone is only the kernel's
    readahead window on many filesystems (an eighth of a 64 MiB file was
    cached a second after it here). Unreadable files are skipped."""
    files = files_of(paths)
    take, skip = plan(files, available_mib, margin_mib)
    sizes = dict(files)
    done: list[str] = []
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for f in take:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            for _ in range(sizes[f] // CHUNK + 2):  # bounded: the file's size in chunks, and the end
                if os.readv(fd, [view]) <= 0:
                    break
            done.append(f)
        except OSError:
            pass
        finally:
            os.close(fd)
    return Staged(tuple(done), sum(sizes[f] for f in done), tuple(skip))


def evict(path: str | os.PathLike[str]) -> None:
    """Flush ``path`` and drop its pages from the page cache (clean pages go
    at once): its next read is a cold one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: str) -> float:
    """The share of ``path``'s pages in the page cache (``mincore`` over a
    read-only mapping; mapping reads nothing); 1.0 for an empty file."""
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


class Prestager:
    """One pre-stage at a time, on a thread of its own; a model pre-staged
    is not pre-staged again until ``forget`` (its start used the cache).
    ``memory``: MemAvailable in MiB now (None: unknown)."""

    def __init__(
        self,
        run: Callable[[Iterable[str], int | None], Staged] = prestage,
        memory: Callable[[], int | None] = read_available_mib,
    ) -> None:
        self._run, self._memory = run, memory
        self._lock = threading.Lock()
        self._busy = False
        self.staged: dict[str, Staged] = {}

    def request(self, model: str, paths: Sequence[str]) -> bool:
        """Start pre-staging ``model``'s ``paths`` unless one runs or it was done; True when started."""
        if not paths:
            return False
        with self._lock:
            if self._busy or model in self.staged:
                return False
            self._busy = True
        threading.Thread(target=self._work, args=(model, tuple(paths)), name=f"vramctl-prestage-{model}", daemon=True).start()
        return True

    def forget(self, model: str) -> None:
        with self._lock:
            self.staged.pop(model, None)

    def _work(self, model: str, paths: tuple[str, ...]) -> None:
        try:
            staged = self._run(paths, self._memory())
            log.info("pre-staged %s: %d files, %.0f MiB in the page cache", model, len(staged.files), staged.bytes / MIB)
        except Exception:
            log.exception("pre-staging %s failed", model)
            staged = Staged((), 0)
        with self._lock:
            self.staged[model] = staged
            self._busy = False
