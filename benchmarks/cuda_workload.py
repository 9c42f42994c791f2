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
/vram reports the requested size; in llm mode /is_sleeping also reports
``residue_mib``, ``FAKE_RESIDUE_MIB`` default 300, which the simulated GPU counts).

``WORKLOAD_MODE=llm`` makes it an LLM stand-in for benchmarks/warm_proof.py
that speaks vLLM's sleep API: ``WEIGHTS_MIB`` of weights in ``TENSORS``
tensors (default 14336 MiB in 256) plus ``VRAM_MIB`` of KV cache, and

  POST /sleep?level=1|2[&mode=wait]  level 1: weights copied into host buffers
        pinned at load (``SLEEP_PIN=1``, the default; one exactly-sized buffer
        registered with cudaHostRegister, else torch's pin_memory, else
        pageable with a warning), KV freed, torch's cache emptied; level 2:
        weights and KV dropped (wake re-creates the weights: a stand-in for a
        reload from disk). Answers {"is_sleeping": true, "level", "seconds",
        "host_bytes", "host_memory"} once the memory is released.
  POST /wake_up  weights copied back, KV re-allocated; {"is_sleeping": false, "seconds"}.
  GET  /is_sleeping  {"is_sleeping": bool, "level", "host_bytes", "host_memory"}.
  POST /v1/completions  a tiny answer (a GPU op over the weights); 503 with
        Retry-After while not awake.
  GET  /vram  also "weights_checksum": a sum over every weight tensor's head,
        the same before a sleep and after the wake.

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
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MIB = 1 << 20
BLOCK_MIB = 512


def log(message: str) -> None:
    sys.stdout.write(f"cuda_workload[{os.getpid()}]: {message}\n")
    sys.stdout.flush()


def stop_signals() -> Callable[[], bool]:
    """From now on SIGTERM and SIGINT only set a flag; returns its reader.

    The handler takes no lock: it runs on the main thread between two
    bytecodes, and one that set a threading.Event could land while that
    thread holds the Event's lock inside its wait() and hang the process
    (a second SIGTERM, the process group's and a launcher's, did)."""
    stopped = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return lambda: stopped


def wait_for(stopped: Callable[[], bool], interval: float = 0.05) -> None:
    while not stopped():
        time.sleep(interval)


class JsonHandler(BaseHTTPRequestHandler):
    """JSON answers, no request log."""

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """``handler`` on 127.0.0.1:``port``, served by a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


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


_ALIGN = 256


def host_buffer(nbytes: int, pin: bool, torch: Any) -> tuple[Any, str]:
    """One host buffer of ``nbytes``: registered (pinned, exact size), pinned (torch), or pageable."""
    if pin:
        flat = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        try:
            cudart = torch.cuda.cudart()
            if cudart.cudaHostRegister(flat.data_ptr(), flat.numel(), 0) == cudart.cudaError.success:
                return flat, "registered"
        except Exception as err:
            log(f"cudaHostRegister failed ({err}); trying torch's pinned allocator")
        try:
            return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True), "pinned"
        except Exception as err:
            log(f"WARNING: cannot pin {nbytes >> 20} MiB ({err}): sleeps copy into pageable memory (slow)")
    return torch.empty(max(nbytes, 1), dtype=torch.uint8), "pageable"


class SleepyLlm:
    """Weights + KV on the GPU, with vLLM's sleep API. One lock: a sleep waits for a request in progress."""

    def __init__(self, weights_mib: int, kv_mib: int, tensors: int, pin: bool, fake: bool) -> None:
        self.weights_mib, self.kv_mib, self.n, self.pin, self.fake = weights_mib, kv_mib, max(1, tensors), pin, fake
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.state = "awake"
        self.level = 0
        self.weights: list[Any] = []
        self.kv: list[Any] = []
        self.host: list[Any] = []
        self.host_flat: Any = None
        self.host_memory = "none"
        self.host_bytes = 0
        self.torch: Any = None
        self.checksum_at_load: float | None = None

    # -- sizes
    def _sizes(self) -> list[int]:
        per = self.weights_mib * MIB // self.n // 2  # fp16 elements per tensor
        return [per] * self.n

    def allocate(self) -> None:
        t0 = time.monotonic()
        if not self.fake:
            import torch

            self.torch = torch
            torch.cuda.init()
            self._make_weights()
            self._make_kv()
            if self.pin:
                self._make_host()
            torch.cuda.synchronize()
        elif self.pin:
            self.host_memory, self.host_bytes = "fake", self.weights_mib * MIB
        self.checksum_at_load = self.checksum()
        log(f"llm: {self.weights_mib} MiB weights in {self.n} tensors + {self.kv_mib} MiB KV after {time.monotonic() - t0:.2f}s")
        self.ready.set()

    def _make_weights(self) -> None:
        torch = self.torch
        self.weights = []
        for i, numel in enumerate(self._sizes()):
            t = torch.empty(numel, dtype=torch.float16, device="cuda")
            t.fill_(float(i % 97) / 97.0)  # deterministic: a re-created weight equals the original
            self.weights.append(t)

    def _make_kv(self) -> None:
        torch = self.torch
        self.kv = []
        left = self.kv_mib
        while left > 0:
            n = min(BLOCK_MIB, left)
            b = torch.empty(n * MIB, dtype=torch.uint8, device="cuda")
            b.fill_(0)
            self.kv.append(b)
            left -= n

    def _make_host(self) -> None:
        torch = self.torch
        offsets, off = [], 0
        for numel in self._sizes():
            offsets.append(off)
            off += -(-numel * 2 // _ALIGN) * _ALIGN
        t0 = time.monotonic()
        self.host_flat, self.host_memory = host_buffer(off, True, torch)
        self.host_bytes = off
        self.host = [self.host_flat[o : o + n * 2].view(torch.float16) for o, n in zip(offsets, self._sizes(), strict=True)]
        log(f"llm: {off >> 20} MiB of {self.host_memory} host memory in {time.monotonic() - t0:.2f}s")

    def checksum(self) -> float | None:
        if self.fake:
            return float(sum(i % 97 for i in range(self.n)))
        if not self.weights:
            return None
        return float(sum(float(t[:1024].float().sum()) for t in self.weights))

    def sleep(self, level: int) -> dict[str, Any]:
        with self.lock:
            if self.state == "asleep":
                return {"is_sleeping": True, "level": self.level, "seconds": 0.0}
            t0 = time.perf_counter()
            self.state = "sleeping"
            if not self.fake:
                torch = self.torch
                if level == 1:
                    if not self.host:
                        log("WARNING: level-1 sleep without host buffers pinned at load: allocating pageable ones now (slow)")
                        self.pin = False
                        off_sizes = self._sizes()
                        self.host = [torch.empty(n, dtype=torch.float16) for n in off_sizes]
                        self.host_memory, self.host_bytes = "pageable", sum(n * 2 for n in off_sizes)
                    for w, h in zip(self.weights, self.host, strict=True):
                        h.copy_(w, non_blocking=True)
                    torch.cuda.synchronize()
                self.weights, self.kv = [], []
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            else:
                time.sleep(0.01)
            self.state, self.level = "asleep", level
            seconds = time.perf_counter() - t0
        log(f"asleep (level {level}) in {seconds:.3f}s")
        return {"is_sleeping": True, "level": level, "seconds": seconds, "host_bytes": self.host_bytes, "host_memory": self.host_memory}

    def wake(self) -> dict[str, Any]:
        with self.lock:
            if self.state == "awake":
                return {"is_sleeping": False, "seconds": 0.0}
            t0 = time.perf_counter()
            self.state = "waking"
            if not self.fake:
                torch = self.torch
                if self.level == 1:
                    self.weights = [torch.empty(h.shape, dtype=h.dtype, device="cuda").copy_(h, non_blocking=True) for h in self.host]
                else:
                    self._make_weights()
                self._make_kv()
                torch.cuda.synchronize()
            else:
                time.sleep(0.01)
            self.state, level = "awake", self.level
            self.level = 0
            seconds = time.perf_counter() - t0
        log(f"awake (from level {level}) in {seconds:.3f}s")
        return {"is_sleeping": False, "level": level, "seconds": seconds}

    def complete(self) -> dict[str, Any] | None:
        with self.lock:
            if self.state != "awake":
                return None
            if not self.fake:
                x = self.weights[0][:4096].float()
                value = float((x * x).sum())
                self.torch.cuda.synchronize()
            else:
                value = 0.0
        return {"object": "text_completion", "choices": [{"index": 0, "text": f"{value:.3f}", "finish_reason": "stop"}]}

    def vram(self) -> dict[str, Any]:
        if self.torch is None:
            awake = self.state == "awake"
            reserved = allocated = (self.weights_mib + self.kv_mib) * MIB if awake else 0
        else:
            reserved, allocated = self.torch.cuda.memory_reserved(), self.torch.cuda.memory_allocated()
        return {
            "pid": os.getpid(),
            "requested_mib": self.weights_mib + self.kv_mib,
            "reserved_bytes": reserved,
            "allocated_bytes": allocated,
            "weights_checksum": self.checksum() if self.state == "awake" else None,
            "checksum_at_load": self.checksum_at_load,
            "host_bytes": self.host_bytes,
            "host_memory": self.host_memory,
        }

    def release(self) -> None:
        self.weights, self.kv = [], []
        if self.torch is not None:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()


def serve_llm(port: int, fake: bool) -> int:
    llm = SleepyLlm(
        int(os.environ.get("WEIGHTS_MIB", "14336")),
        int(os.environ["VRAM_MIB"]),
        int(os.environ.get("TENSORS", "256")),
        os.environ.get("SLEEP_PIN", "1") == "1",
        fake,
    )

    class Handler(JsonHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self._send(200 if llm.ready.is_set() else 503, {"ready": llm.ready.is_set(), "state": llm.state})
            elif path == "/vram":
                self._send(200, llm.vram())
            elif path == "/is_sleeping":
                self._send(
                    200,
                    {
                        "is_sleeping": llm.state == "asleep",
                        "state": llm.state,
                        "level": llm.level,
                        "host_bytes": llm.host_bytes,
                        "host_memory": llm.host_memory,
                        # For vramctl's simulated GPU (the dry run): what this stand-in pretends to keep asleep.
                        **({"residue_mib": int(os.environ.get("FAKE_RESIDUE_MIB", "300"))} if fake else {}),
                    },
                )
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if 0 < length <= 1 << 20:
                self.rfile.read(length)
            path, _, query = self.path.partition("?")
            params = dict(p.partition("=")[::2] for p in query.split("&") if p)
            if not llm.ready.is_set():
                self._send(503, {"error": "loading"}, {"Retry-After": "1"})
            elif path == "/sleep":
                level = params.get("level", "1")
                if level not in ("1", "2"):
                    self._send(400, {"error": f"level must be 1 or 2, got {level!r}"})
                else:
                    self._send(200, llm.sleep(int(level)))
            elif path == "/wake_up":
                self._send(200, llm.wake())
            elif path in ("/v1/completions", "/v1/chat/completions"):
                answer = llm.complete()
                if answer is None:
                    self._send(503, {"error": {"message": f"model is {llm.state}", "type": "unavailable"}}, {"Retry-After": "1"})
                else:
                    self._send(200, answer)
            else:
                self._send(404, {"error": "not found"})

    stopped = stop_signals()
    server = serve(port, Handler)
    log(f"llm stand-in: loading, listening on 127.0.0.1:{port}")
    llm.allocate()
    wait_for(stopped)
    server.shutdown()
    llm.release()
    log(f"EXIT_AT {time.time():.6f}")
    return 0


def main() -> int:
    try:
        mib, port = int(os.environ["VRAM_MIB"]), int(os.environ["PORT"])
    except (KeyError, ValueError) as err:
        log(f"VRAM_MIB and PORT must be set to numbers ({err})")
        return 2
    if os.environ.get("WORKLOAD_MODE") == "llm":
        return serve_llm(port, os.environ.get("CUDA_WORKLOAD_FAKE") == "1")
    holder = Holder(mib, os.environ.get("CUDA_WORKLOAD_FAKE") == "1")

    class Handler(JsonHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200 if holder.ready.is_set() else 503, {"ready": holder.ready.is_set()})
            elif self.path == "/vram":
                self._send(200, holder.vram())
            else:
                self._send(404, {"error": "not found"})

    stopped = stop_signals()
    server = serve(port, Handler)
    log(f"allocating {mib} MiB, listening on 127.0.0.1:{port}")
    holder.allocate()
    wait_for(stopped)
    server.shutdown()
    holder.release()
    log(f"EXIT_AT {time.time():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
