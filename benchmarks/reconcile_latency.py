"""Reconcile latency in Kubernetes mode: from a PATCH of spec.activeModel to
the first docker action of the switch.

What runs: kmock's API emulator on 127.0.0.1 (tests/k8s/emulator.py), the
real ``vramctl operator`` CLI (kopf inside) as a subprocess, the real Docker
engine with the stand-in image. The script PATCHes the ModelDeployment
(merge patch, what ``kubectl patch md ... --type merge`` sends) and follows
the docker event stream of the operator's containers; the latency of one
switch is the engine's timestamp of the first kill/stop/start event of that
switch minus the moment the PATCH response arrived (and, for reference,
minus the moment the PATCH was sent). Each switch is waited out
(``.status.observedGeneration`` and ``runningModels``) before the next.

    python benchmarks/reconcile_latency.py               # 20 switches
    python benchmarks/reconcile_latency.py -n 50 --json out.json

Target: p95 < 50 ms from the PATCH returning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402
from tests.k8s.emulator import EmulatorThread, KubeClient  # noqa: E402

STANDIN = "vramctl/standin:dev"
ACTIONS = ("kill", "stop", "start")
TARGET_P95_MS = 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model(port: int, vram: int) -> dict[str, Any]:
    return {
        "image": STANDIN,
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0.1", "STANDIN_STOP_SECONDS": "0.05"},
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.02},
        "stop": {"gracePeriodSeconds": 5},
        "startTimeoutSeconds": 20,
        "vramMiB": vram,
    }


class DockerActions:
    """Follows the docker events of one vramctl instance: (engine time, action, model)."""

    def __init__(self, instance: str) -> None:
        self.client = docker.from_env(timeout=60)
        self.events: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._stream = self.client.events(
            since=time.time(),
            filters={"type": "container", "label": [f"vramctl.io/instance={instance}"], "event": list(ACTIONS)},
            decode=True,
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self._stream:
                attrs = (ev.get("Actor") or {}).get("Attributes") or {}
                with self._lock:
                    self.events.append((int(ev["timeNano"]) / 1e9, str(ev.get("Action")), str(attrs.get("vramctl.io/model"))))
        except Exception:  # closed at the end
            return

    def first_after(self, t: float, timeout: float = 10.0) -> tuple[float, str, str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                later = [e for e in self.events if e[0] >= t]
            if later:
                return min(later)
            time.sleep(0.005)
        return None

    def close(self) -> None:
        self._stream.close()
        self.client.close()


def wait_settled(kube: KubeClient, ns: str, name: str, generation: int, running: list[str], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = kube.get_md(ns, name) or {}
        st = obj.get("status") or {}
        if st.get("observedGeneration") == generation and st.get("phase") == "Ready" and st.get("runningModels") == running:
            return st
        time.sleep(0.05)
    raise SystemExit(f"switch to {running} (generation {generation}) did not settle within {timeout}s; last status: {st}")


_DESIRED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*: gpu\d+: desired: (\S+) \(kubernetes\)")


def handler_times(log_text: str) -> list[float]:
    """When the operator handed each new activeModel to the worker (its log's
    "desired: X (kubernetes)" lines, local time, millisecond resolution)."""
    out = []
    for line in log_text.splitlines():
        m = _DESIRED.match(line)
        if m:
            out.append(time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000)
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values_ms), 1),
        "p95_ms": round(percentile(values_ms, 95), 1),
        "min_ms": round(min(values_ms), 1),
        "max_ms": round(max(values_ms), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--switches", type=int, default=20, help="number of switches measured (default 20, at least 20)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.switches < 20:
        ap.error("measure at least 20 switches")

    subprocess.run(["bash", str(ROOT / "images/standin/build.sh")], check=True, capture_output=True)
    instance = f"bench{uuid.uuid4().hex[:6]}"
    ns, name, node = instance, "gpu0", "bench-node"
    tmp = Path(tempfile.mkdtemp(prefix="vramctl-reconcile-"))
    ports = {"llm": free_port(), "sdxl": free_port()}
    spec = {
        "nodeName": node,
        "gpu": 0,
        "activeModel": "llm",
        "models": {"llm": model(ports["llm"], 9000), "sdxl": model(ports["sdxl"], 10000)},
    }
    log_path = tmp / "operator.log"
    with EmulatorThread() as emu:
        kube = KubeClient(emu.url)
        kubeconfig = emu.kubeconfig(tmp / "kubeconfig")
        kube.create_md(ns, name, spec)
        api_port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vramctl", "operator", "--node-name", node, "--instance", instance, "--namespace", ns,
             "--listen", f"127.0.0.1:{api_port}", "--gpu-probe", "simulated", "--kubeconfig", str(kubeconfig)],
            stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        actions = DockerActions(instance)
        from_return: list[float] = []
        from_send: list[float] = []
        returned_at: list[float] = []
        first_at: list[float] = []
        try:
            wait_settled(kube, ns, name, 1, ["llm"])
            current, generation = "llm", 1
            for i in range(args.switches):
                target = "sdxl" if current == "llm" else "llm"
                time.sleep(0.2)  # let the last switch's status writes and events drain
                sent = time.time()
                patched = kube.patch_md(ns, name, {"spec": {"activeModel": target}})
                returned = time.time()
                generation = int(patched["metadata"]["generation"])
                first = actions.first_after(sent)
                if first is None:
                    raise SystemExit(f"switch {i + 1}: no docker action within 10 s\n{log_path.read_text()[-3000:]}")
                from_return.append((first[0] - returned) * 1000)
                returned_at.append(returned)
                first_at.append(first[0])
                from_send.append((first[0] - sent) * 1000)
                wait_settled(kube, ns, name, generation, [target])
                print(
                    f"switch {i + 1:2d} {current:>4} -> {target:<4} first docker action: {first[1]} {first[2]:<4} "
                    f"{from_return[-1]:7.1f} ms after the PATCH returned ({from_send[-1]:6.1f} ms after it was sent)",
                    flush=True,
                )
                current = target
        finally:
            actions.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            client = docker.from_env()
            for c in client.containers.list(all=True, filters={"label": f"vramctl.io/instance={instance}"}):
                c.remove(force=True)
            client.close()
    result: dict[str, Any] = {
        "switches": len(from_return),
        "from_patch_returned": summary(from_return),
        "from_patch_sent": summary(from_send),
        "target_p95_ms": TARGET_P95_MS,
    }
    handed = handler_times(log_path.read_text(errors="replace"))
    if len(handed) == len(returned_at):
        result["patch_returned_to_handler"] = summary([(h - r) * 1000 for h, r in zip(handed, returned_at, strict=True)])
        result["handler_to_docker_action"] = summary([(f - h) * 1000 for f, h in zip(first_at, handed, strict=True)])
    r, s = result["from_patch_returned"], result["from_patch_sent"]
    print(
        f"\nreconcile latency over {len(from_return)} switches (PATCH spec.activeModel -> first docker kill/stop/start):\n"
        f"  from the PATCH returning: median {r['median_ms']} ms, p95 {r['p95_ms']} ms (min {r['min_ms']}, max {r['max_ms']})\n"
        f"  from the PATCH being sent: median {s['median_ms']} ms, p95 {s['p95_ms']} ms (min {s['min_ms']}, max {s['max_ms']})\n"
        f"  target p95 < {TARGET_P95_MS:.0f} ms: {'met' if r['p95_ms'] < TARGET_P95_MS else 'NOT met'}"
    )
    if "handler_to_docker_action" in result:
        h, w = result["patch_returned_to_handler"], result["handler_to_docker_action"]
        print(
            "  breakdown (operator log, 1 ms resolution):\n"
            f"    PATCH returned -> kopf handler handed it to the worker: median {h['median_ms']} ms, p95 {h['p95_ms']} ms\n"
            f"    handed to the worker -> docker event (observe, plan, kill): median {w['median_ms']} ms, p95 {w['p95_ms']} ms"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if r["p95_ms"] < TARGET_P95_MS else 1


if __name__ == "__main__":
    sys.exit(main())
