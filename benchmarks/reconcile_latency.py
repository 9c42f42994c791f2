"""Reconcile latency in Kubernetes mode: from a PATCH of spec.activeModel to
the first docker action of the switch.

What runs: kmock's API emulator on 127.0.0.1 (tests/support/k8s/emulator.py), the
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

``--runtime kubernetes`` measures the Pod runtime instead (no Docker engine):
the operator runs with ``--runtime kubernetes`` and the test kubelet
(tests/support/k8s/kubelet.py) runs the Pods as local stand-in processes. The
emulator timestamps each Pod write of the operator as it arrives; one
switch's latency is the old Pod's DELETE minus the moment the PATCH
response arrived, and, for reference, the new Pod's POST (which follows the
old Pod being gone and the memory being free).

    python benchmarks/reconcile_latency.py --runtime kubernetes

Target: p95 < 50 ms from the PATCH returning to the first action.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
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

from tests.support.k8s.emulator import EmulatorThread, KubeClient  # noqa: E402

from free_ports import free_port  # noqa: E402

STANDIN = "vramctl/standin:dev"
ACTIONS = ("kill", "stop", "start")
TARGET_P95_MS = 50.0


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
        import docker

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


def breakdown(result: dict[str, Any], log_path: Path, returned_at: list[float], acted_at: list[float], key: str) -> None:
    """Split each switch at the moment the kopf handler handed it to the
    worker (from the operator's log): ``patch_returned_to_handler`` and ``key``
    (handler -> the first action). Left out when the log lacks a line."""
    handed = handler_times(log_path.read_text(errors="replace"))
    if len(handed) == len(returned_at):
        result["patch_returned_to_handler"] = summary([(h - r) * 1000 for h, r in zip(handed, returned_at, strict=True)])
        result[key] = summary([(f - h) * 1000 for f, h in zip(acted_at, handed, strict=True)])


def print_breakdown(result: dict[str, Any], key: str, action: str) -> None:
    if key not in result:
        return
    h, w = result["patch_returned_to_handler"], result[key]
    print(
        "  breakdown (operator log, 1 ms resolution):\n"
        f"    PATCH returned -> kopf handler handed it to the worker: median {h['median_ms']} ms, p95 {h['p95_ms']} ms\n"
        f"    handed to the worker -> {action}: median {w['median_ms']} ms, p95 {w['p95_ms']} ms"
    )


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


class PodActions:
    """The operator's Pod writes as the emulator received them: (time, create | delete, pod name)."""

    def __init__(self, emu: EmulatorThread) -> None:
        assert emu.emu is not None
        self.emu = emu.emu

    def after(self, t: float, verb: str, timeout: float = 10.0) -> tuple[float, str, str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [(at, v, path.rsplit("/", 1)[-1]) for at, v, path in list(self.emu.pod_actions) if at >= t and v == verb]
            if later:
                return min(later)
            time.sleep(0.002)
        return None


def main_pods(switches: int, json_path: str | None) -> int:
    """The Pod runtime: PATCH -> the old Pod's DELETE, and -> the new Pod's POST."""
    from tests.support.k8s.kubelet import TestKubelet

    ns, name, node = f"bench{uuid.uuid4().hex[:6]}", "gpu0", "bench-node"
    tmp = Path(tempfile.mkdtemp(prefix="vramctl-reconcile-pods-"))
    ports = {"llm": free_port(), "sdxl": free_port()}
    spec = {
        "nodeName": node,
        "gpu": 0,
        "activeModel": "llm",
        "models": {
            "llm": {**model(ports["llm"], 9000), "image": "vramctl-standin:bench"},
            "sdxl": {**model(ports["sdxl"], 10000), "image": "vramctl-standin:bench"},
        },
    }
    log_path = tmp / "operator.log"
    to_delete: list[float] = []
    to_create: list[float] = []
    returned_at: list[float] = []
    deleted_at: list[float] = []
    with EmulatorThread() as emu, TestKubelet(emu, node, tmp) as kubelet:
        kube = KubeClient(emu.url)
        kubeconfig = emu.kubeconfig(tmp / "kubeconfig")
        kube.create_md(ns, name, spec)
        proc = subprocess.Popen(
            [sys.executable, "-m", "vramctl", "operator", "--runtime", "kubernetes", "--node-name", node, "--instance", "bench",
             "--namespace", ns, "--listen", f"127.0.0.1:{free_port()}", "--gpu-probe", "simulated", "--kubeconfig", str(kubeconfig)],
            stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        actions = PodActions(emu)
        try:
            wait_settled(kube, ns, name, 1, ["llm"])
            current = "llm"
            for i in range(switches):
                target = "sdxl" if current == "llm" else "llm"
                time.sleep(0.2)  # let the last switch's status writes and events drain
                patched = kube.patch_md(ns, name, {"spec": {"activeModel": target}})
                returned = time.time()
                deleted = actions.after(returned - 0.05, "delete")
                created = actions.after(returned - 0.05, "create")
                if deleted is None or created is None:
                    raise SystemExit(f"switch {i + 1}: no Pod delete/create within 10 s\n{log_path.read_text()[-3000:]}")
                to_delete.append((deleted[0] - returned) * 1000)
                returned_at.append(returned)
                deleted_at.append(deleted[0])
                to_create.append((created[0] - returned) * 1000)
                wait_settled(kube, ns, name, int(patched["metadata"]["generation"]), [target])
                print(
                    f"switch {i + 1:2d} {current:>4} -> {target:<4} DELETE {deleted[2]:<9} {to_delete[-1]:7.1f} ms, "
                    f"POST {created[2] or target} {to_create[-1]:7.1f} ms after the PATCH returned",
                    flush=True,
                )
                current = target
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        kubelet.assert_exclusive()
    result = {
        "runtime": "kubernetes",
        "switches": len(to_delete),
        "patch_returned_to_old_pod_delete": summary(to_delete),
        "patch_returned_to_new_pod_create": summary(to_create),
        "target_p95_ms": TARGET_P95_MS,
    }
    breakdown(result, log_path, returned_at, deleted_at, "handler_to_old_pod_delete")
    d, c = result["patch_returned_to_old_pod_delete"], result["patch_returned_to_new_pod_create"]
    assert isinstance(d, dict) and isinstance(c, dict)
    print(
        f"\nreconcile latency over {len(to_delete)} switches, Pod runtime (PATCH spec.activeModel returned ->):\n"
        f"  old Pod's DELETE: median {d['median_ms']} ms, p95 {d['p95_ms']} ms (min {d['min_ms']}, max {d['max_ms']})\n"
        f"  new Pod's POST:   median {c['median_ms']} ms, p95 {c['p95_ms']} ms (min {c['min_ms']}, max {c['max_ms']})"
        f" (after the old Pod is gone and its memory free)\n"
        f"  target p95 < {TARGET_P95_MS:.0f} ms for the first action: {'met' if d['p95_ms'] < TARGET_P95_MS else 'NOT met'}"
    )
    print_breakdown(result, "handler_to_old_pod_delete", "the old Pod's DELETE (observe, plan, delete)")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if d["p95_ms"] < TARGET_P95_MS else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--switches", type=int, default=20, help="number of switches measured (default 20, at least 20)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--runtime", choices=("docker", "kubernetes"), default="docker", help="docker containers (default) or Pods")
    args = ap.parse_args()
    if args.switches < 20:
        ap.error("measure at least 20 switches")
    if args.runtime == "kubernetes":
        return main_pods(args.switches, args.json)

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
            import docker

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
    breakdown(result, log_path, returned_at, first_at, "handler_to_docker_action")
    r, s = result["from_patch_returned"], result["from_patch_sent"]
    print(
        f"\nreconcile latency over {len(from_return)} switches (PATCH spec.activeModel -> first docker kill/stop/start):\n"
        f"  from the PATCH returning: median {r['median_ms']} ms, p95 {r['p95_ms']} ms (min {r['min_ms']}, max {r['max_ms']})\n"
        f"  from the PATCH being sent: median {s['median_ms']} ms, p95 {s['p95_ms']} ms (min {s['min_ms']}, max {s['max_ms']})\n"
        f"  target p95 < {TARGET_P95_MS:.0f} ms: {'met' if r['p95_ms'] < TARGET_P95_MS else 'NOT met'}"
    )
    print_breakdown(result, "handler_to_docker_action", "docker event (observe, plan, kill)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if r["p95_ms"] < TARGET_P95_MS else 1


if __name__ == "__main__":
    sys.exit(main())
