#!/usr/bin/env python3
"""HTTP API latency under concurrency: a live ``vramctl up`` on loopback.

Starts ``vramctl up`` (process runtime, simulated GPU, three stand-in model
servers, llm running) and measures, with a minimal keep-alive HTTP client on
asyncio (so the client costs little CPU beside the server):

- ``/metrics`` and ``/status`` latency p50/p99/max at 1, 50 and 500
  concurrent clients (each client sends its requests one after another on
  one connection), and the CPU of the server's busiest thread (its event
  loop) per request, from /proc;
- ``/status`` answer time (fresh connection per request) while 2,000 idle
  connections are held open.

Target: p99 under 50 ms at 50 concurrent scrapes. Not a test: figures are
printed (``--json`` writes them too), not asserted. ``PYTHONPATH`` is passed
to the server, so another checkout's vramctl can be measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from free_ports import free_port

STANDIN = [sys.executable, "-m", "vramctl.demo.standin"]


def config() -> dict[str, Any]:
    def model(cls: str, vram: int) -> dict[str, Any]:
        port = free_port()
        return {
            "class": cls,
            "command": STANDIN,
            "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0.2", "STANDIN_STOP_SECONDS": "0.05"},
            "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
            "vramMiB": vram,
        }

    return {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16303, "releaseDelaySeconds": 0.05},
        "gpus": [
            {"gpu": 0, "activeModel": "llm", "companions": ["tts"], "models": {"llm": model("heavy", 12000), "sdxl": model("heavy", 11000), "tts": model("light", 3500)}}
        ],
    }


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def _client(port: int, path: str, n: int, out: list[float], errors: list[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as err:
        errors.append(f"connect: {err}")
        return
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(req)
            status = await asyncio.wait_for(_read_response(reader), 30)
            out.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(f"status {status}")
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as err:
        errors.append(f"{type(err).__name__}: {err}")
    finally:
        writer.close()


def _summary(samples: list[float], errors: list[str]) -> dict[str, Any]:
    if len(samples) < 2:
        return {"n": len(samples), "errors": len(errors)}
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "n": len(samples),
        "p50_ms": round(q[49] * 1e3, 2),
        "p99_ms": round(q[98] * 1e3, 2),
        "max_ms": round(max(samples) * 1e3, 2),
        "errors": len(errors),
        **({"first_error": errors[0]} if errors else {}),
    }


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid`` (Linux /proc)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def busiest_thread_us(before: dict[str, float], after: dict[str, float], requests: int) -> float:
    """The CPU of the busiest thread between two ``thread_cpu`` readings, per
    request, in µs: under a load of HTTP requests, the server's event-loop
    thread (the other threads' CPU is not the answer's cost)."""
    spent = max((after[t] - before.get(t, 0.0) for t in after), default=0.0)
    return round(spent / max(requests, 1) * 1e6, 1)


async def concurrent(port: int, path: str, clients: int, per_client: int) -> dict[str, Any]:
    samples: list[float] = []
    errors: list[str] = []
    await asyncio.gather(*(_client(port, path, per_client, samples, errors) for _ in range(clients)))
    return _summary(samples, errors)


async def while_idle(port: int, idle: int, n: int) -> dict[str, Any]:
    held: list[asyncio.StreamWriter] = []
    failed = 0
    for _ in range(idle):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            held.append(w)
        except OSError:
            failed += 1
    await asyncio.sleep(0.5)
    samples: list[float] = []
    errors: list[str] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await _client(port, "/status", 1, [], errors)
        samples.append(time.perf_counter() - t0)
    for w in held:
        w.close()
    return {"idle_held": len(held), "idle_failed": failed, **_summary(samples, errors)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per (path, concurrency) cell, spread over the clients (default 2000)")
    ap.add_argument("--idle", type=int, default=2000, help="idle connections held for the last measurement (default 2000)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client holds --idle connections
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        cfg = Path(tmp) / "vramctl.yaml"
        cfg.write_text(yaml.safe_dump(config()))
        port = free_port()
        log = open(Path(tmp) / "vramctl.log", "wb")  # noqa: SIM115 - closed below
        server = subprocess.Popen(
            [sys.executable, "-m", "vramctl", "up", "--config", str(cfg), "--state", str(Path(tmp) / "state.json"), "--listen", f"127.0.0.1:{port}", "--instance", "bench"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as r:
                        g = json.loads(r.read())["gpus"]["0"]
                    if g["phase"] == "Ready":
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    print(Path(tmp, "vramctl.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.1)
            for path in ("/metrics", "/status"):
                for clients in (1, 50, 500):
                    per = max(2, args.requests // clients)
                    asyncio.run(concurrent(port, path, clients, 5))  # warm up the connections' code paths
                    cpu0 = thread_cpu(server.pid)
                    cell = asyncio.run(concurrent(port, path, clients, per))
                    cell["http_thread_cpu_us_per_request"] = busiest_thread_us(cpu0, thread_cpu(server.pid), cell["n"])
                    results[f"{path} x{clients}"] = cell
                    print(f"{path:9} {clients:4} concurrent: {json.dumps(cell)}", flush=True)
            cell = asyncio.run(while_idle(port, args.idle, 50))
            results[f"/status with {args.idle} idle connections"] = cell
            print(f"/status while {args.idle} idle connections are held: {json.dumps(cell)}", flush=True)
        finally:
            # Free the GPU (stops the stand-ins), then end vramctl.
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/switch", data=b'{"model": null}', method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                urllib.request.urlopen(req, timeout=5).read()
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
                        if json.loads(r.read())["gpus"]["0"]["phase"] == "Idle":
                            break
                    time.sleep(0.1)
            except OSError:
                pass
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
            if "Traceback" in Path(tmp, "vramctl.log").read_text(errors="replace"):
                print("note: the server logged a traceback", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
