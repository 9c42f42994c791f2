#!/usr/bin/env python3
"""A two-GPU model stand-in for benchmarks/gpu_proof.py: one process per GPU,
the way tensor-parallel vLLM runs its workers.

The process runtime starts a model on several GPUs with
``CUDA_VISIBLE_DEVICES=0,1``. This launcher starts one ``cuda_workload.py``
per visible device; each worker keeps the launcher's environment (so it sees
every GPU, as vLLM's workers do) and picks its device by its rank
(``torch.cuda.set_device(rank)`` before the workload allocates). Every
worker holds ``VRAM_MIB`` MiB on its own GPU.

The launcher answers on 127.0.0.1:``PORT``:

  GET /health  200 once every worker answers 200 on its own /health
  GET /vram    {"pid", "ranks": [each worker's /vram], "requested_mib",
               "reserved_bytes"} (the sums over the workers)

On SIGTERM or SIGINT (the runtime signals the whole process group, so the
workers get it too) it sends each worker still there SIGTERM as well, waits
for them to free their memory and exit, prints
``EXIT_AT <unix time>`` and exits 0. If a worker dies on its own, the
launcher stops the others and exits 1 (as a tensor-parallel server does when
one rank fails).

Environment: ``VRAM_MIB`` and ``PORT`` (required), ``CUDA_VISIBLE_DEVICES``
(the ranks: one per entry; ``TP_SIZE`` overrides the count),
``CUDA_WORKLOAD_FAKE=1`` for the dry run (no torch, nothing allocated).
Standard library only (torch is imported by the workers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cuda_workload  # this folder: the launcher runs as a script
from cuda_workload import JsonHandler, serve, stop_signals
from free_ports import free_port


def log(message: str) -> None:
    sys.stdout.write(f"tp_launcher[{os.getpid()}]: {message}\n")
    sys.stdout.flush()


def get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, None
    except (OSError, ValueError):
        return 0, None


def worker(rank: int) -> int:
    """One rank: pick the device, then run the workload in this process."""
    if os.environ.get("CUDA_WORKLOAD_FAKE") != "1":
        import torch

        torch.cuda.set_device(rank)
    return cuda_workload.main()


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--rank":
        return worker(int(sys.argv[2]))
    try:
        mib, port = int(os.environ["VRAM_MIB"]), int(os.environ["PORT"])
    except (KeyError, ValueError) as err:
        log(f"VRAM_MIB and PORT must be set to numbers ({err})")
        return 2
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    size = int(os.environ.get("TP_SIZE") or len(visible) or 1)
    ports = [free_port() for _ in range(size)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--rank", str(rank)], env={**os.environ, "PORT": str(p), "TP_RANK": str(rank)}
        )
        for rank, p in enumerate(ports)
    ]
    log(f"{size} workers (pids {', '.join(str(w.pid) for w in workers)}) on devices {','.join(visible) or '?'}, {mib} MiB each")

    def healthy() -> bool:
        return all(get_json(f"http://127.0.0.1:{p}/health", 1.0)[0] == 200 for p in ports)

    class Handler(JsonHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                ok = not stopped() and healthy()
                self._send(200 if ok else 503, {"ready": ok, "ranks": size})
            elif self.path == "/vram":
                ranks = [get_json(f"http://127.0.0.1:{p}/vram")[1] or {} for p in ports]
                self._send(
                    200,
                    {
                        "pid": os.getpid(),
                        "ranks": ranks,
                        "requested_mib": mib * size,
                        "reserved_bytes": sum(int(r.get("reserved_bytes") or 0) for r in ranks),
                    },
                )
            else:
                self._send(404, {"error": "not found"})

    stopped = stop_signals()
    server = serve(port, Handler)
    code = 0
    while not stopped():
        dead = [w for w in workers if w.poll() is not None]
        if dead:
            log(f"worker pid {dead[0].pid} exited {dead[0].returncode}: stopping the others")
            code = 1
            break
        time.sleep(0.05)
    # Every worker still there is signalled: a worker died, or the launcher
    # alone was signalled; when the runtime signalled the whole group, this
    # second SIGTERM only sets the flag the first one set.
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        w.wait()
    server.shutdown()
    log(f"EXIT_AT {time.time():.6f}")
    return code


if __name__ == "__main__":
    sys.exit(main())
