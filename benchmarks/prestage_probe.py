#!/usr/bin/env python3
"""What pre-staging a cold start's weights saves, on this machine's disk.

Writes a weights file (``--mib``, random bytes), then per round: drops it
from the page cache (``posix_fadvise(DONTNEED)`` after an fsync: clean pages
go at once, no root needed) and times a loader's read of it from disk; drops
it again, pre-stages it the way vramctl does while another model serves
(``vramctl.host.pagecache.prestage``), and times the same read from the page
cache. Prints the medians (and ``resident_fraction`` before and after the
pre-stage), or writes them as JSON.

    python benchmarks/prestage_probe.py --mib 1024 --rounds 3
    python benchmarks/prestage_probe.py --dir /models --json out.json   # on the disk the weights live on

A real cold start also pays the process start, CUDA context and the copy to
the GPU; this measures only the part pre-staging takes away.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

from vramctl.host.memory import read_host_memory  # noqa: E402
from vramctl.host.pagecache import MIB, evict, prestage, resident_fraction  # noqa: E402


def load(path: Path) -> float:
    """A loader's sequential read of the whole file, in seconds."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MIB)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the file is written (default: the system's temp dir)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out: dict[str, object] = {"mib": a.mib, "rounds": a.rounds}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "weights.safetensors"
        with open(path, "wb") as f:
            for _ in range(a.mib):
                f.write(os.urandom(MIB))
        cold, staged, warm, stage_s, before, after = [], [], [], [], [], []
        for _ in range(a.rounds):
            evict(path)
            cold.append(load(path))
            evict(path)
            before.append(resident_fraction(str(path)))
            reading = read_host_memory()
            t0 = time.perf_counter()
            prestage([str(path)], reading.available_mib if reading else None)
            stage_s.append(time.perf_counter() - t0)
            after.append(resident_fraction(str(path)))
            staged.append(load(path))
            warm.append(load(path))
        out.update(
            cold_load_s=statistics.median(cold),
            prestage_s=statistics.median(stage_s),
            prestaged_load_s=statistics.median(staged),
            cached_load_s=statistics.median(warm),
            resident_before=statistics.median(before),
            resident_after=statistics.median(after),
        )
    out["speedup"] = round(float(out["cold_load_s"]) / max(1e-9, float(out["prestaged_load_s"])), 2)  # type: ignore[arg-type]
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    for k, v in out.items():
        print(f"{k:18} {v:.3f}" if isinstance(v, float) else f"{k:18} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
