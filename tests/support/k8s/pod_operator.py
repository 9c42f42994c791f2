"""The Pod runtime end to end: ``vramctl operator --runtime kubernetes`` (kopf
inside) as the DaemonSet runs it, as a subprocess against the API emulator,
and a ``Cluster``: one namespace, node and test kubelet of its own.

``Operator.start()`` refuses to start a second operator while the first
still runs (a lost one would outlive the test and keep acting on the
emulator's objects); ``stop()`` ends every one it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.k8s.emulator import EmulatorThread, KubeClient
from tests.support.k8s.kubelet import TestKubelet
from tests.support.ports import free_port

STANDIN = "vramctl-standin:test"
TIMER_S = 1.0


def model(port: int, vram: int, cls: str = "heavy", load: float = 0.2, stop: float = 0.1, grace: float = 5, **env: str) -> dict[str, Any]:
    return {
        "class": cls,
        "image": STANDIN,
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": str(load), "STANDIN_STOP_SECONDS": str(stop), **env},
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
        "stop": {"gracePeriodSeconds": grace},
        "startTimeoutSeconds": 20,
        "vramMiB": vram,
    }


class Operator:
    """``vramctl operator`` as the DaemonSet runs it (plus a kubeconfig):
    ``runtime="kubernetes"`` runs models as Pods, ``None`` leaves the
    operator's default (a Docker engine)."""

    def __init__(
        self,
        tmp: Path,
        kubeconfig: Path,
        namespace: str,
        node: str,
        clusterwide: bool = False,
        *,
        instance: str = "k8s",
        runtime: str | None = "kubernetes",
        port: int | None = None,
    ) -> None:
        self.tmp, self.kubeconfig, self.namespace, self.node = tmp, kubeconfig, namespace, node
        self.clusterwide, self.instance, self.runtime = clusterwide, instance, runtime
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> Operator:
        if self.proc is not None and self.proc.poll() is None:
            raise AssertionError(f"vramctl operator (pid {self.proc.pid}) still runs: stop it before starting another")
        log = self.tmp / f"operator-{self.node}-{len(self.logs)}.log"
        self.logs.append(log)
        cmd = [
            *(sys.executable, "-m", "vramctl", "operator"),
            *(("--runtime", self.runtime) if self.runtime else ()),
            *("--node-name", self.node, "--instance", self.instance),
            *(() if self.clusterwide else ("--namespace", self.namespace)),
            *("--listen", f"127.0.0.1:{self.port}", "--gpu-probe", "simulated", "--kubeconfig", str(self.kubeconfig)),
            *("--timer-seconds", str(TIMER_S)),
        ]
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vramctl operator exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=0.5).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"vramctl operator did not answer /healthz within 30 s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def gpu(self, gpu: int = 0) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/status", timeout=5) as r:
            return json.loads(r.read())["gpus"][str(gpu)]  # type: ignore[no-any-return]


class Cluster:
    def __init__(self, emulator: EmulatorThread, tmp: Path, clusterwide: bool = False) -> None:
        self.ns = f"p{uuid.uuid4().hex[:8]}"
        self.node = f"node-{self.ns}"
        self.kube = KubeClient(emulator.url)
        self.kubelet = TestKubelet(emulator, self.node, tmp)
        self.op = Operator(tmp, emulator.kubeconfig(tmp / "kubeconfig"), self.ns, self.node, clusterwide)
        self.ports = {m: free_port() for m in ("llm", "sdxl", "tts")}

    def spec(self, **fields: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "nodeName": self.node,
            "gpu": 0,
            "activeModel": "llm",
            "vramBudgetMiB": 15000,
            "models": {
                "llm": model(self.ports["llm"], 9000),
                "sdxl": model(self.ports["sdxl"], 10000),
                "tts": model(self.ports["tts"], 3000, cls="light"),
            },
        }
        spec.update(fields)
        return spec

    def pods(self) -> dict[str, dict[str, Any]]:
        items = self.kube.request("GET", f"/api/v1/namespaces/{self.ns}/pods")["items"]
        return {p["metadata"]["name"]: p for p in items}

    def wait_md(self, name: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        obj: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            obj = self.kube.get_md(self.ns, name)
            if obj is not None and pred(obj):
                return obj
            time.sleep(0.05)
        raise AssertionError(
            f"{self.ns}/{name} not as expected within {timeout}s; last: {json.dumps(obj, indent=1)[-3000:]}\n"
            f"operator log:\n{self.op.log_text()[-4000:]}\nkubelet: {self.kubelet.errors}"
        )

    def events(self, name: str) -> list[tuple[str, str, str]]:
        return [
            (e["type"], e["reason"], e["message"])
            for e in self.kube.events(self.ns, name)
            if e.get("reportingComponent") == "vramctl.io/operator"
        ]

    def wait_events(
        self, name: str, pred: Callable[[list[tuple[str, str, str]]], bool], timeout: float = 10.0
    ) -> list[tuple[str, str, str]]:
        deadline = time.monotonic() + timeout
        ev = self.events(name)
        while time.monotonic() < deadline and not pred(ev):
            time.sleep(0.05)
            ev = self.events(name)
        assert pred(ev), f"events of {name}: {ev}\n{self.op.log_text()[-3000:]}"
        return ev


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status(obj).get("conditions") or [] if c["type"] == ctype)


def settled(generation: int, running: list[str]) -> Callable[[dict[str, Any]], bool]:
    def pred(obj: dict[str, Any]) -> bool:
        st = status(obj)
        return (
            st.get("observedGeneration") == generation and st.get("phase") == "Ready" and sorted(st.get("runningModels") or []) == running
        )

    return pred
