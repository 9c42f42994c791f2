#!/usr/bin/env python3
"""Switch benchmark: vramctl against the way users switch today.

Both sides switch the same stand-in containers (one docker compose project,
load 2 s, stop 1 s) back and forth between two heavy models:

  script:  docker compose stop A && docker compose --profile B up -d B,
           then poll B's health once a second (what the users' scripts do)
  vramctl: POST /switch to a running supervisor, then poll /status (20 ms)

Prints the median of N switches for each, the ratio vramctl/script, and
vramctl's own overhead: switch time minus the stand-ins' stop + load time.
Run by hand on a machine with a Docker engine (make bench); not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose" / "demo" / "docker-compose.yml"
LOAD_S, STOP_S = 2.0, 1.0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


def compose(project: str, env: dict[str, str], *args: str) -> None:
    subprocess.run(["docker", "compose", "-p", project, "-f", str(COMPOSE_FILE), *args], check=True, env=env, capture_output=True)


def pctl(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def bench_script(project: str, env: dict[str, str], ports: dict[str, int], n: int) -> list[float]:
    services = {"llm": "vllm", "sdxl": "sdxl"}
    compose(project, env, "--profile", "vllm", "up", "-d", "llm")
    while not http_ok(f"http://127.0.0.1:{ports['llm']}/health"):
        time.sleep(0.2)
    times, cur = [], "llm"
    for _ in range(n):
        nxt = "sdxl" if cur == "llm" else "llm"
        t0 = time.perf_counter()
        compose(project, env, "stop", cur)
        compose(project, env, "--profile", services[nxt], "up", "-d", nxt)
        while not http_ok(f"http://127.0.0.1:{ports[nxt]}/health"):
            time.sleep(1.0)
        times.append(time.perf_counter() - t0)
        cur = nxt
    compose(project, env, "--profile", "vllm", "--profile", "sdxl", "--profile", "sovits", "down", "-t", "2")
    return times


def engine_floor(port: int, n: int) -> list[float]:
    """The Docker engine's own latency for what any switch must do: deliver a
    signal, notice the exit, start a container (stand-in with zero stop/load)."""
    import docker

    client = docker.from_env()
    c = client.containers.run(
        "vramctl/standin:dev",
        detach=True,
        network_mode="host",
        environment={"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0", "STANDIN_STOP_SECONDS": "0"},
        labels={"vramctl-bench": "floor"},
    )
    out = []
    try:
        for _ in range(n):
            time.sleep(0.3)
            t0 = time.perf_counter()
            c.kill(signal="SIGTERM")
            c.wait(timeout=10, condition="not-running")
            c.start()
            out.append(time.perf_counter() - t0)
    finally:
        c.remove(force=True)
        client.close()
    return out


def bench_vramctl(project: str, env: dict[str, str], ports: dict[str, int], n: int, workdir: Path) -> tuple[list[float], list[float]]:
    cfg = {
        "runtime": "docker",
        "compose": {"project": project, "files": [str(COMPOSE_FILE)]},
        "gpuProbe": {"kind": "simulated", "releaseDelaySeconds": 0.0},
        "gpus": [
            {
                "gpu": 0,
                "activeModel": "llm",
                "models": {
                    m: {
                        "composeService": m,
                        "health": {"path": "/health", "port": ports[m], "intervalSeconds": 0.02},
                        "vramMiB": 11000,
                        "startTimeoutSeconds": 60,
                    }
                    for m in ("llm", "sdxl")
                },
            }
        ],
    }
    cfg_path = workdir / "vramctl.yaml"
    cfg_path.write_text(json.dumps(cfg))
    api_port = ports["api"]
    sup = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vramctl",
            "up",
            "--config",
            str(cfg_path),
            "--state",
            str(workdir / "state.json"),
            "--listen",
            f"127.0.0.1:{api_port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "vramctl.log", "w"),  # noqa: SIM115
    )
    base = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.time() + 120
        while not _ready(base, "llm"):
            if time.time() > deadline:
                raise SystemExit(f"vramctl did not bring up llm; see {workdir / 'vramctl.log'}")
            time.sleep(0.1)
        times, internal, cur = [], [], "llm"
        phases: dict[str, list[float]] = {}
        seq = _status(base)["progressSeq"]
        for _ in range(n):
            nxt = "sdxl" if cur == "llm" else "llm"
            t0 = time.perf_counter()
            req = urllib.request.Request(base + "/switch", data=json.dumps({"model": nxt}).encode(), method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                gen = json.loads(r.read())["generation"]
            while True:
                st = _status(base)
                if st["observedGeneration"] >= gen and st["phase"] == "Ready" and nxt in st["runningModels"]:
                    break
                time.sleep(0.02)
            times.append(time.perf_counter() - t0)
            internal.append(st["lastSwitch"]["durationSeconds"])
            _phases(base, seq, phases)
            seq = st["progressSeq"]
            cur = nxt
        print("vramctl phase medians (s): " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in phases.items()))
        return times, internal
    finally:
        sup.terminate()
        sup.wait(30)
        compose(project, env, "--profile", "vllm", "--profile", "sdxl", "--profile", "sovits", "down", "-t", "2")


def _phases(base: str, since: int, into: dict[str, list[float]]) -> None:
    """Split one switch into its steps, from the supervisor's own progress log."""
    with urllib.request.urlopen(f"{base}/status?since={since}", timeout=5) as r:
        prog = json.loads(r.read())["progress"]
    at = {p["step"]: p["time"] for p in prog}
    spans = {
        "request->stopping": ("requested", "stopping"),
        "stop": ("stopping", "stopped"),
        "memory": ("stopped", "memory-free"),
        "start call": ("starting", "started"),
        "started->healthy": ("started", "healthy"),
        "healthy->done": ("healthy", "switch-success"),
    }
    for name, (a, b) in spans.items():
        if a in at and b in at:
            into.setdefault(name, []).append(at[b] - at[a])


def _status(base: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(base + "/status", timeout=5) as r:
        return json.loads(r.read())["gpus"]["0"]  # type: ignore[no-any-return]


def _ready(base: str, model: str) -> bool:
    try:
        st = _status(base)
    except OSError:
        return False
    return st["phase"] == "Ready" and model in st["runningModels"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10, help="switches per side (default 10)")
    ap.add_argument("--base-port", type=int, default=28000)
    args = ap.parse_args()
    ports = {"llm": args.base_port, "sdxl": args.base_port + 1, "api": args.base_port + 2}
    env = dict(os.environ)
    for m, key in (("llm", "LLM"), ("sdxl", "SDXL")):
        env[f"{key}_PORT"] = str(ports[m])
        env[f"{key}_LOAD_SECONDS"] = str(LOAD_S)
        env[f"{key}_STOP_SECONDS"] = str(STOP_S)
    tag = str(os.getpid())
    with tempfile.TemporaryDirectory(prefix="vramctl-bench-") as tmp:
        script = bench_script(f"bench-script-{tag}", env, ports, args.n)
        vram, internal = bench_vramctl(f"bench-vramctl-{tag}", env, ports, args.n, Path(tmp))
        engine = engine_floor(ports["sdxl"], args.n)
    floor = LOAD_S + STOP_S
    ms, mv = statistics.median(script), statistics.median(vram)
    overhead = [t - floor for t in vram]
    print(f"switches per side: {args.n}; stand-ins: load {LOAD_S:.1f} s, stop {STOP_S:.1f} s (floor {floor:.1f} s)")
    print(f"{'':24}{'median':>9}{'p90':>9}{'min':>9}{'max':>9}")
    for name, xs in (("script (compose+1s poll)", script), ("vramctl (API, e2e)", vram), ("vramctl (internal)", internal)):
        print(f"{name:24}{statistics.median(xs):9.3f}{pctl(xs, 0.9):9.3f}{min(xs):9.3f}{max(xs):9.3f}")
    print(f"ratio vramctl/script (median): {mv / ms:.3f}   target <= 0.8")
    print(
        f"vramctl overhead median: {statistics.median(overhead) * 1000:.0f} ms (p90 {pctl(overhead, 0.9) * 1000:.0f} ms)   target < 150 ms"
    )
    eng = statistics.median(engine)
    print(f"  of which the Docker engine's own signal+exit+start latency (median, same run): {eng * 1000:.0f} ms")
    print(f"  vramctl's own share: {(statistics.median(overhead) - eng) * 1000:.0f} ms")
    print(f"best ratio any supervisor that stops before it starts can reach here: floor/script = {floor / ms:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
