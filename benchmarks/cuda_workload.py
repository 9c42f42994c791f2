#!/usr/bin/env python3
"""A model server stand-in that really holds GPU memory (for benchmarks/gpu_proof.py).

Allocates ``VRAM_MIB`` MiB on the GPU with torch (in 512 MiB blocks, each
written once so the pages are really backed), then answers on 127.0.0.1:

  GET /health  200 once the memory is held (503 while allocating)
  GET /vram    {"pid", "requested_mib", "reserved_bytes", "allocated_bytes"}
               (torch.cuda.memory_reserved / memory_allocated)

On SIGTERM or SIGINT it frees the blocks, empties torch's cache, prints
``EXIT_AT <unix time>`` and exits 0; the CUDA context itself goes with the
process. The proof reads that line to time release detection from the exit.

Environment: ``VRAM_MIB`` (required), ``PORT`` (required), ``CUDA_WORKLOAD_FAKE=1``
to run without torch or a GPU (the proof's --dry-run: nothing is allocated,
/vram reports the requested size).

Standard library only, apart from torch; torch is imported here and never by
vramctl (an import-linter contract).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MIB = 1 << 20
BLOCK_MIB = 512


def log(message: str) -> None:
    sys.stdout.write(f"cuda_workload[{os.getpid()}]: {message}\n")
    sys.stdout.flush()


class Holder:
    def __init__(self, mib: int, fake: bool) -> None:
        self.mib = mib
        self.fake = fake
        self.ready = threading.Event()
        self.blocks: list[Any] = []
        self.torch: Any = None

    def allocate(self) -> None:
        t0 = time.monotonic()
        if not self.fake:
            import torch

            self.torch = torch
            torch.cuda.init()
            left = self.mib
            while left > 0:
                n = min(BLOCK_MIB, left)
                b = torch.empty(n * MIB, dtype=torch.uint8, device="cuda")
                b.fill_(1)  # touch every page
                self.blocks.append(b)
                left -= n
            torch.cuda.synchronize()
        log(f"holding {self.mib} MiB after {time.monotonic() - t0:.2f}s")
        self.ready.set()

    def vram(self) -> dict[str, Any]:
        if self.torch is None:
            reserved = allocated = self.mib * MIB
        else:
            reserved, allocated = self.torch.cuda.memory_reserved(), self.torch.cuda.memory_allocated()
        return {"pid": os.getpid(), "requested_mib": self.mib, "reserved_bytes": reserved, "allocated_bytes": allocated}

    def release(self) -> None:
        self.blocks.clear()
        if self.torch is not None:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()


def main() -> int:
    try:
        mib, port = int(os.environ["VRAM_MIB"]), int(os.environ["PORT"])
    except (KeyError, ValueError) as err:
        log(f"VRAM_MIB and PORT must be set to numbers ({err})")
        return 2
    holder = Holder(mib, os.environ.get("CUDA_WORKLOAD_FAKE") == "1")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200 if holder.ready.is_set() else 503, {"ready": holder.ready.is_set()})
            elif self.path == "/vram":
                self._send(200, holder.vram())
            else:
                self._send(404, {"error": "not found"})

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    log(f"allocating {mib} MiB, listening on 127.0.0.1:{port}")
    holder.allocate()
    stop.wait()
    server.shutdown()
    holder.release()
    log(f"EXIT_AT {time.time():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
