#!/usr/bin/env python3
"""The gateway's cost, and what the queue policy saves.

1. Added latency: POST /v1/chat/completions to a stand-in server directly and
   through the gateway, p50
   and p99 at 1, 10 and 100 concurrent requests, interleaved rounds; and the
   time to the first streamed byte (SSE) both ways. First the product's own
   path: ``vramctl up --gateway`` runs the stand-in as its model and every
   request takes a hold from the GPU's worker. Then the proxy alone (its own
   process, a holder that grants at once). Clients keep their
   connections where the server lets them, as the openai client does. Twice:
   the stand-in speaking HTTP/1.1 with keep-alive (as vLLM's server does),
   and HTTP/1.0 (a connection per request, on both paths).
2. Simulation: 1,000 requests for two models from 20 closed-loop clients,
   driven through vramctl's pure queue policy (vramctl.demand.policy) on a
   simulated clock, against the naive policy (first come, first served;
   switch whenever the next request wants the other model, after the
   in-flight ones finish). Switches, total time, p50/p95/max wait.

    python benchmarks/gateway_bench.py            # everything (~1-2 min on 2 cores)
    python benchmarks/gateway_bench.py --quick    # fewer requests
    python benchmarks/gateway_bench.py --json out.json

Targets (issue 12): added p50 < 1 ms and p99 < 5 ms at 10 concurrent;
>= 5x fewer switches than naive, no wait > maxServeSeconds + one switch
(+ the drain of requests already running, reported separately).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

from free_ports import free_port  # noqa: E402
from vramctl.demand.policy import Demand, QueuePolicy, QueueState, Target, add_demand, release, step, switch_done  # noqa: E402

# -- processes ---------------------------------------------------------------------


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on :{port}")


def start_standin(port: int, keepalive: bool) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STANDIN_PORT": str(port),
        "STANDIN_LOAD_SECONDS": "0",
        "STANDIN_STOP_SECONDS": "0",
        "STANDIN_KEEPALIVE": "1" if keepalive else "0",
        "PYTHONPATH": str(ROOT / "operator"),
    }
    proc = subprocess.Popen([sys.executable, "-m", "vramctl.demo.standin"], env=env, stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc


def run_gateway(port: int, backend: str) -> None:
    """The gateway process: one model, a holder that grants at once."""
    from prometheus_client import CollectorRegistry

    from vramctl.web.gateway import GATEWAY_MAX_BODY, Gateway, ModelInfo, Route
    from vramctl.web.server import HttpServer

    route = Route("llm", backend, "0", "qwen-14b", "vllm")

    class Granted:
        def release(self, error: str | None = None) -> None:
            pass

    class Holder:
        def resolve(self, name: str) -> Route | None:
            return route if name in ("llm", "qwen-14b") else None

        def models(self) -> Sequence[ModelInfo]:
            return [ModelInfo("llm", "qwen-14b", "0", "Running", "vllm", True)]

        def admit(self, model: str) -> Granted:
            return Granted()

        async def acquire(self, model: str) -> Granted:
            return Granted()

        def taken_away(self, model: str) -> None:
            return None

        def not_ready(self, model: str) -> None:
            return None

        def backend_failed(self, model: str) -> None:
            pass

    server = HttpServer()  # the listener `vramctl up --gateway` serves: the same guards, cap and timeouts
    server.listen("gateway", "127.0.0.1", port, [Gateway(Holder(), CollectorRegistry()).add_routes], max_body=GATEWAY_MAX_BODY)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


def start_supervisor(tmp: Path, model_port: int, gateway_port: int, keepalive: bool) -> subprocess.Popen[bytes]:
    """The product's own path: ``vramctl up --gateway`` (process runtime, a
    simulated GPU probe) running the stand-in as its one model, switching
    mode onDemand: every request takes a real hold from the GPU's worker."""
    import yaml

    api_port = free_port()
    cfg = {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "releaseDelaySeconds": 0.05},
        "gpus": [
            {
                "gpu": 0,
                "activeModel": "llm",
                "vramBudgetMiB": 15000,
                "switching": {"mode": "onDemand"},
                "models": {
                    "llm": {
                        "command": [sys.executable, "-m", "vramctl.demo.standin"],
                        "vramMiB": 11000,
                        "servedModelName": "qwen-14b",
                        "env": {
                            "STANDIN_PORT": str(model_port),
                            "STANDIN_LOAD_SECONDS": "0",
                            "STANDIN_STOP_SECONDS": "0",
                            "STANDIN_KEEPALIVE": "1" if keepalive else "0",
                        },
                        "health": {"path": "/health", "port": model_port},
                    }
                },
            }
        ],
    }
    (tmp / "vramctl.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vramctl", "up", "--config", str(tmp / "vramctl.yaml"), "--state", str(tmp / "state.json"),
         "--listen", f"127.0.0.1:{api_port}", "--gateway", f"127.0.0.1:{gateway_port}", "--instance", f"bench-{os.getpid()}"],
        stdout=(tmp / "up.log").open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "operator")},
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/status", timeout=2) as r:
                if json.loads(r.read())["gpus"]["0"]["phase"] == "Ready":
                    wait_port(gateway_port)
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"vramctl up did not get ready:\n{(tmp / 'up.log').read_text()[-2000:]}")


# -- load ----------------------------------------------------------------------------

BODY = json.dumps({"model": "qwen-14b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
STREAM_BODY = json.dumps({"model": "qwen-14b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}).encode()


async def load(port: int, concurrency: int, total: int, body: bytes) -> list[tuple[float, float]]:
    """(seconds to the first body byte, seconds to the end) per request, from
    ``concurrency`` clients that keep their connection where the server lets
    them (as the openai client does: the gateway does, the HTTP/1.0 stand-in
    closes after each answer)."""
    import aiohttp

    out: list[tuple[float, float]] = []
    left = total
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{resp.status}: {await resp.text()}")
                    await resp.content.readany()
                    t_first = time.perf_counter() - t0
                    await resp.read()
                out.append((t_first, time.perf_counter() - t0))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(backend_port: int, gateway_port: int, gateway_pid: int, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rounds = 3
    gateway_cpu = 0.0
    gateway_requests = 0
    for conc, total in ((1, 200), (10, 1000), (100, 2000)):
        total = total // 4 if quick else total
        direct: list[float] = []
        via: list[float] = []
        for _ in range(rounds):  # interleaved: drift hits both alike
            asyncio.run(load(backend_port, conc, 50, BODY))  # warm-up
            direct += [t for _, t in asyncio.run(load(backend_port, conc, total // rounds, BODY))]
            c0 = cpu_seconds(gateway_pid)
            via += [t for _, t in asyncio.run(load(gateway_port, conc, total // rounds, BODY))]
            gateway_cpu += cpu_seconds(gateway_pid) - c0
            gateway_requests += total // rounds
        row = {
            "requests_each": len(direct),
            "direct_p50_ms": pct(direct, 50) * 1e3,
            "direct_p99_ms": pct(direct, 99) * 1e3,
            "gateway_p50_ms": pct(via, 50) * 1e3,
            "gateway_p99_ms": pct(via, 99) * 1e3,
        }
        row["added_p50_ms"] = row["gateway_p50_ms"] - row["direct_p50_ms"]
        row["added_p99_ms"] = row["gateway_p99_ms"] - row["direct_p99_ms"]
        results[f"c{conc}"] = row
        print(
            f"  {conc:>3} concurrent: direct p50 {row['direct_p50_ms']:.2f} p99 {row['direct_p99_ms']:.2f} ms | "
            f"gateway p50 {row['gateway_p50_ms']:.2f} p99 {row['gateway_p99_ms']:.2f} ms | "
            f"added p50 {row['added_p50_ms']:+.2f} p99 {row['added_p99_ms']:+.2f} ms",
            flush=True,
        )
    results["gateway_cpu_ms_per_request"] = gateway_cpu / gateway_requests * 1e3
    print(f"  gateway CPU per request: {results['gateway_cpu_ms_per_request']:.3f} ms", flush=True)
    n = 60 if quick else 200
    d_first = [f for f, _ in asyncio.run(load(backend_port, 1, n, STREAM_BODY))]
    g_first = [f for f, _ in asyncio.run(load(gateway_port, 1, n, STREAM_BODY))]
    results["ttfb"] = {
        "direct_p50_ms": pct(d_first, 50) * 1e3,
        "gateway_p50_ms": pct(g_first, 50) * 1e3,
        "direct_p99_ms": pct(d_first, 99) * 1e3,
        "gateway_p99_ms": pct(g_first, 99) * 1e3,
    }
    t = results["ttfb"]
    print(
        f"  first streamed byte: direct p50 {t['direct_p50_ms']:.2f} p99 {t['direct_p99_ms']:.2f} ms | "
        f"gateway p50 {t['gateway_p50_ms']:.2f} p99 {t['gateway_p99_ms']:.2f} ms",
        flush=True,
    )
    return results


# -- simulation --------------------------------------------------------------------------


@dataclass
class SimResult:
    policy: str
    switches: int
    total_seconds: float
    waits: list[float] = field(repr=False)
    p50_wait: float = 0.0
    p95_wait: float = 0.0
    max_wait: float = 0.0
    cut_requests: int = 0  # requests whose model was switched away mid-request (must be 0)

    def finish(self) -> SimResult:
        self.p50_wait = pct(self.waits, 50)
        self.p95_wait = pct(self.waits, 95)
        self.max_wait = max(self.waits)
        return self


@dataclass(frozen=True)
class Workload:
    clients: int = 20
    requests: int = 1000
    models: tuple[str, str] = ("llm", "sdxl")
    durations: tuple[float, float] = (3.0, 8.0)  # LLM answer, SDXL image (seeds/000: 12-15 s on a 5080; shorter here)
    think: tuple[float, float] = (0.0, 2.0)  # between a client's requests
    switch_seconds: float = 25.0  # seeds/000: 20-35 s
    seed: int = 12


def _plans(w: Workload) -> list[list[tuple[str, float, float]]]:
    """Each client's requests: (model, duration, think time before it)."""
    rng = random.Random(w.seed)
    per = w.requests // w.clients
    plans = []
    for _ in range(w.clients):
        plan = []
        for _ in range(per):
            i = rng.randrange(2)
            plan.append((w.models[i], w.durations[i] * rng.uniform(0.5, 1.5), rng.uniform(*w.think)))
        plans.append(plan)
    return plans


def simulate_queue(w: Workload, policy: QueuePolicy) -> SimResult:
    plans = _plans(w)
    state = QueueState(policy=policy, switch_estimate_seconds=w.switch_seconds)
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, data: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    for c in range(w.clients):
        push(plans[c][0][2], "arrive", (c, 0))
    arrived: dict[str, float] = {}
    info: dict[str, tuple[int, int, float]] = {}
    waits: list[float] = []
    switches = 0
    cut = 0
    running: dict[str, str] = {}  # request id -> model, while it runs
    wake: float | None = None
    pending: tuple[float, Target] | None = None
    now = 0.0
    for _ in range(10_000_000):
        times = [e[0] for e in events[:1]] + ([wake] if wake is not None else []) + ([pending[0]] if pending else [])
        if not times:
            break
        now = min(times)
        if pending is not None and pending[0] <= now:
            state = switch_done(state, pending[1], now)
            pending = None
        while events and events[0][0] <= now:
            _, _, kind, data = heapq.heappop(events)
            if kind == "arrive":
                c, k = data
                rid = f"c{c}r{k}"
                model, dur, _ = plans[c][k]
                arrived[rid] = now
                info[rid] = (c, k, dur)
                state = add_demand(state, Demand(rid, model, now))
            else:  # a request ends: the client thinks, then sends its next one
                rid = data
                running.pop(rid)
                state = release(state, rid, now)
                c, k, _ = info[rid]
                if k + 1 < len(plans[c]):
                    push(now + plans[c][k + 1][2], "arrive", (c, k + 1))
        state, decision = step(state, now)
        for rid in decision.grant:
            waits.append(now - arrived[rid])
            c, k, _ = info[rid]
            running[rid] = plans[c][k][0]
            push(now + info[rid][2], "end", rid)
        if decision.revoke:
            cut += sum(1 for r in decision.revoke if r in running)
        if decision.switch_to is not None:
            switches += 1
            cut += sum(1 for m in running.values() if m != decision.switch_to.model)
            pending = (now + w.switch_seconds, decision.switch_to)
        wake = decision.wake_at
    return SimResult("queue", switches, now, waits, cut_requests=cut).finish()


def simulate_naive(w: Workload) -> SimResult:
    """FIFO; a request for the other model waits for the in-flight ones, then switches."""
    plans = _plans(w)
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, data: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    for c in range(w.clients):
        push(plans[c][0][2], "arrive", (c, 0))
    fifo: list[tuple[float, int, int]] = []
    active: str | None = None
    in_flight = 0
    switching_until: float | None = None
    waits: list[float] = []
    switches = 0
    now = 0.0
    while events or fifo:
        if events:
            now = max(now, events[0][0])
            _, _, kind, data = heapq.heappop(events)
            if kind == "arrive":
                c, k = data
                fifo.append((now, c, k))
            elif kind == "end":
                in_flight -= 1
                c, k = data
                if k + 1 < len(plans[c]):
                    push(now + plans[c][k + 1][2], "arrive", (c, k + 1))
            elif kind == "switched":
                switching_until = None
                active = data
        if switching_until is not None:
            continue
        while fifo:
            t_arr, c, k = fifo[0]
            model, dur, _ = plans[c][k]
            if model == active:
                fifo.pop(0)
                waits.append(now - t_arr)
                in_flight += 1
                push(now + dur, "end", (c, k))
                continue
            if in_flight == 0:
                switches += 1
                switching_until = now + w.switch_seconds
                push(switching_until, "switched", model)
            break
    return SimResult("naive", switches, now, waits).finish()


def simulation(quick: bool) -> dict[str, Any]:
    w = Workload(requests=400 if quick else 1000)
    # drainTimeoutSeconds: a little above the longest request (12 s), so drains end by themselves.
    policy = QueuePolicy(max_queue=10_000, queue_timeout_seconds=3600, max_serve_seconds=60, drain_timeout_seconds=15)
    q = simulate_queue(w, policy)
    n = simulate_naive(w)
    bound = policy.max_serve_seconds + w.switch_seconds
    longest = max(w.durations) * 1.5
    out = {
        "workload": asdict(w),
        "policy": asdict(policy),
        "queue": {k: v for k, v in asdict(q).items() if k != "waits"},
        "naive": {k: v for k, v in asdict(n).items() if k != "waits"},
        "fewer_switches_x": n.switches / max(1, q.switches),
        "bound_maxserve_plus_switch": bound,
        "bound_with_drain_of_running_requests": bound + longest,
        "waits_over_bound": sum(1 for x in q.waits if x > bound),
    }
    for r in (q, n):
        print(
            f"  {r.policy:>5}: {len(r.waits)} requests, {r.switches} switches, total {r.total_seconds:.0f} s, "
            f"wait p50 {r.p50_wait:.1f} p95 {r.p95_wait:.1f} max {r.max_wait:.1f} s"
            + (f", cut {r.cut_requests}" if r.policy == "queue" else ""),
            flush=True,
        )
    print(
        f"  -> {out['fewer_switches_x']:.1f}x fewer switches; max wait {q.max_wait:.1f} s vs maxServeSeconds + one switch = {bound:.0f} s "
        f"({out['waits_over_bound']} waits above it; + drain of running requests <= {longest:.0f} s)",
        flush=True,
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-latency", action="store_true", help="only the simulation")
    args = ap.parse_args()
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if not args.skip_latency:
        report["latency"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            bport, gport = free_port(), free_port()
            up = start_supervisor(Path(tmp), bport, gport, keepalive=True)
            try:
                print("vramctl up --gateway, every request a hold from the worker (stand-in under vramctl, keep-alive):", flush=True)
                report["latency"]["supervisor"] = latency(bport, gport, up.pid, args.quick)
            finally:
                up.terminate()
                up.wait(15)
        for keepalive in (True, False):
            bport, gport = free_port(), free_port()
            backend = start_standin(bport, keepalive)
            ctx = multiprocessing.get_context("spawn")
            gw = ctx.Process(target=run_gateway, args=(gport, f"http://127.0.0.1:{bport}"), daemon=True)
            gw.start()
            try:
                wait_port(gport)
                kind = "HTTP/1.1 keep-alive, as vLLM" if keepalive else "HTTP/1.0, a connection per request"
                print(f"gateway added latency (chat completion; stand-in backend speaking {kind}):", flush=True)
                report["latency"]["keepalive" if keepalive else "http10"] = latency(bport, gport, gw.pid or 0, args.quick)
            finally:
                if gw.pid is not None:
                    os.kill(gw.pid, signal.SIGTERM)
                gw.join(5)
                backend.kill()
                backend.wait(5)
    print("queue policy vs naive (simulated clock):", flush=True)
    report["simulation"] = simulation(args.quick)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
