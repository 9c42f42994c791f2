#!/usr/bin/env python3
"""What the driver's checkpoint API costs here: a torch process holding
8 and 24 GiB in 64 tensors, suspended and restored from outside.

Run on a machine with an NVIDIA GPU (driver 570+), torch, cuda-bindings and
nvidia-ml-py, from the repository root:

    python benchmarks/checkpoint_probe.py                 # 8 and 24 GiB, 2 cycles each
    python benchmarks/checkpoint_probe.py --gib 8 --cycles 1
    python benchmarks/checkpoint_probe.py --dry-run       # no GPU: a fake driver, no torch

For each size a child process allocates the tensors (random fp16, seeded),
reports a checksum of every tensor and then waits on its stdin without
touching CUDA. From this process, through vramctl's own binding
(``vramctl.runtimes.checkpoint.CudaBindingsDriver``), each cycle times
lock, checkpoint, restore and unlock, and reads:

- NVML before the lock, after the checkpoint and after the unlock: the
  device's used memory and whether the child is in the process list (and
  with how much);
- the child's RSS while checkpointed (the driver's host copy);
- the child's checksums after the restore, which must equal those at load.

Results as JSON to ``$OUT/checkpoint_probe.json`` when OUT is set (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from vramctl.runtimes.checkpoint import CheckpointDriver, ProcessState, open_driver, rss_mib, under_wsl2  # noqa: E402

GIB = 1 << 30


# ------------------------------------------------------------------ the child


def child(gib: float, tensors: int, fake: bool) -> int:
    """Hold ``gib`` GiB in ``tensors`` tensors; answer CHECK with the checksums, QUIT to exit."""
    if fake:
        sums = [float(i) for i in range(tensors)]
    else:
        import torch

        torch.manual_seed(1234)
        per = int(gib * GIB) // tensors // 2  # fp16 elements
        held = [torch.randn(per, device="cuda", dtype=torch.float16) for _ in range(tensors)]
        torch.cuda.synchronize()

        def checksums() -> list[float]:
            out = [float(t.float().sum().item()) for t in held]
            torch.cuda.synchronize()
            return out

        sums = checksums()
    print(json.dumps({"ready": True, "pid": os.getpid(), "checksums": sums}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "CHECK":
            print(json.dumps({"checksums": sums if fake else checksums()}), flush=True)
        elif cmd == "QUIT":
            break
    return 0


# ------------------------------------------------------------------ outside


class Nvml:
    def __init__(self, gpu: int, dry: bool) -> None:
        self.dry = dry
        if not dry:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.h = pynvml.nvmlDeviceGetHandleByIndex(gpu)

    def read(self, pid: int) -> dict[str, Any]:
        if self.dry:
            return {"used_mib": None, "listed": None, "process_mib": None}
        used = int(self.nv.nvmlDeviceGetMemoryInfo(self.h).used) >> 20
        procs = {p.pid: p.usedGpuMemory for p in self.nv.nvmlDeviceGetComputeRunningProcesses(self.h)}
        mem = procs.get(pid)
        return {"used_mib": used, "listed": pid in procs, "process_mib": (int(mem) >> 20) if mem is not None else None}

    def info(self) -> dict[str, Any]:
        if self.dry:
            return {}
        name = self.nv.nvmlDeviceGetName(self.h)
        drv = self.nv.nvmlSystemGetDriverVersion()
        return {
            "device": name.decode() if isinstance(name, bytes) else name,
            "driver": drv.decode() if isinstance(drv, bytes) else drv,
            "total_mib": int(self.nv.nvmlDeviceGetMemoryInfo(self.h).total) >> 20,
        }


def timed(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def one_size(driver: CheckpointDriver, nvml: Nvml, gib: float, tensors: int, cycles: int, dry: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--gib", str(gib), "--tensors", str(tensors)] + (["--dry-run"] if dry else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    out: dict[str, Any] = {"gib": gib, "tensors": tensors, "cycles": []}
    try:
        first = json.loads(proc.stdout.readline())
        pid = first["pid"]
        out["load_s"] = time.perf_counter() - t0
        out["pid"] = pid
        if dry:
            driver.cu.processes[pid] = driver.cu.CUprocessState.CU_PROCESS_STATE_RUNNING  # type: ignore[attr-defined]
        at_load = first["checksums"]
        for i in range(cycles):
            c: dict[str, Any] = {"cycle": i, "state_before": str(driver.state(pid))}
            c["nvml_before"] = nvml.read(pid)
            c["rss_before_mib"] = rss_mib(pid)
            c["lock_s"] = timed(driver.lock, pid, 10_000)
            c["checkpoint_s"] = timed(driver.checkpoint, pid)
            c["state_checkpointed"] = str(driver.state(pid))
            c["nvml_checkpointed"] = nvml.read(pid)
            c["rss_checkpointed_mib"] = rss_mib(pid)
            c["restore_s"] = timed(driver.restore, pid)
            c["unlock_s"] = timed(driver.unlock, pid)
            c["state_after"] = str(driver.state(pid))
            c["nvml_after"] = nvml.read(pid)
            proc.stdin.write("CHECK\n")
            proc.stdin.flush()
            c["checksums_identical"] = json.loads(proc.stdout.readline())["checksums"] == at_load
            c["away_s_per_gib"] = (c["lock_s"] + c["checkpoint_s"]) / gib
            c["back_s_per_gib"] = (c["restore_s"] + c["unlock_s"]) / gib
            print(
                f"  {gib:g} GiB cycle {i}: lock {c['lock_s'] * 1e3:.1f} ms, checkpoint {c['checkpoint_s']:.2f}s, "
                f"restore {c['restore_s']:.2f}s, unlock {c['unlock_s'] * 1e3:.1f} ms; NVML listed "
                f"{c['nvml_before']['listed']}->{c['nvml_checkpointed']['listed']}->{c['nvml_after']['listed']}, "
                f"used {c['nvml_before']['used_mib']}->{c['nvml_checkpointed']['used_mib']}->{c['nvml_after']['used_mib']} MiB; "
                f"RSS while checkpointed {c['rss_checkpointed_mib']} MiB; checksums identical {c['checksums_identical']}",
                flush=True,
            )
            out["cycles"].append(c)
    finally:
        try:
            proc.stdin.write("QUIT\n")
            proc.stdin.flush()
            proc.wait(60)
        except Exception:
            proc.kill()
            proc.wait(10)
    return out


def verdicts(sizes: list[dict[str, Any]], dry: bool) -> dict[str, Any]:
    cycles = [c for s in sizes for c in s["cycles"]]
    return {
        "every_cycle_checksums_identical": bool(cycles) and all(c["checksums_identical"] for c in cycles),
        "left_nvml_list_while_checkpointed": dry or (bool(cycles) and all(c["nvml_checkpointed"]["listed"] is False for c in cycles)),
        "back_in_nvml_list_after_restore": dry or (bool(cycles) and all(c["nvml_after"]["listed"] is True for c in cycles)),
        "running_after_unlock": bool(cycles) and all(c["state_after"] == str(ProcessState.RUNNING) for c in cycles),
    }


def fake_driver() -> Any:
    sys.path.insert(0, str(ROOT))
    from tests.support.fake_cuda import FakeCu

    return FakeCu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--gib", type=float, action="append", help="GiB held (repeatable; default 8 and 24)")
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="no GPU: the test suite's fake driver, no torch")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.child:
        return child(args.gib[0], args.tensors, args.dry_run)
    sizes = args.gib or [8.0, 24.0]
    cu: Any
    if args.dry_run:
        cu, binding = fake_driver(), "fake"
    else:
        from cuda.bindings import driver

        cu = driver

        binding = f"cuda-bindings {version('cuda-bindings')}"
    driver, availability = open_driver(cu, binding, under_wsl2())
    nvml = Nvml(args.gpu, args.dry_run)
    result: dict[str, Any] = {
        "environment": {
            "dry_run": args.dry_run,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "availability": availability.describe(),
            **nvml.info(),
        },
        "sizes": [],
    }
    for dist in ("torch", "nvidia-ml-py"):
        try:
            result["environment"][dist] = version(dist)
        except Exception:
            result["environment"][dist] = None
    print(f"environment: {result['environment']}", flush=True)
    if driver is None:
        print(f"checkpoint API not available: {availability.why}")
        result["error"] = availability.why
    else:
        for gib in sizes:
            result["sizes"].append(one_size(driver, nvml, gib, args.tensors, args.cycles, args.dry_run))
    result["verdicts"] = verdicts(result["sizes"], args.dry_run)
    print(f"verdicts: {result['verdicts']}")
    out = args.out or (os.path.join(os.environ["OUT"], "checkpoint_probe.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(result, indent=2, default=str))
        print(f"results: {out}")
    return 0 if result["sizes"] and all(result["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
