"""A test kubelet (and the cluster's garbage collector) for the API emulator.

``TestKubelet`` watches the Pods bound to its node (``spec.nodeName``) on the
kmock-based emulator and runs each Pod's one container as a local stand-in
process (``python -m vramctl.demo.standin``, driven by the Pod's env), then
reports what a kubelet reports: phase, conditions, Pod IP (127.0.0.1: the
stand-ins share this machine's network, like ``hostNetwork``), the
container's state, id and exit code, and its output as ``pods/log``.

- An image it does not know (not ``vramctl-standin...``) never runs: the
  container waits with ``ImagePullBackOff``, as a kubelet that cannot pull.
- Deletion is graceful, as in a cluster: the API server keeps a deleted Pod
  (Terminating, with its ``deletionTimestamp``) until the kubelet's final
  delete; the kubelet sends SIGTERM, waits the Pod's grace period (then
  SIGKILL), reports the exit, and then deletes the Pod with grace 0 (with its
  uid as precondition). A Pod deleted at once (grace 0) is gone from the API
  before the kubelet looks: its process is killed at the next round.
- ``TEST_KUBELET_OOM=1`` in a container's env: its exit is reported as
  ``OOMKilled``.
- Exclusivity: a heavy stand-in (label ``vramctl.io/class`` not ``light``)
  started while another heavy one of the same instance and GPU still runs is
  recorded in ``violations``; tests assert there are none.

``GarbageCollector`` deletes the Pods whose controller owner (a
ModelDeployment) is gone, as Kubernetes' garbage collector does.

Polling (every 20 ms) instead of a watch: simpler, and the emulator is local.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.k8s.emulator import ApiError, EmulatorThread, KubeClient

STANDIN_PREFIX = "vramctl-standin"


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Run:
    namespace: str
    name: str
    uid: str
    domain: tuple[str, str]  # (instance, gpu)
    heavy: bool
    log: Path
    grace: float
    oom: bool = False
    proc: subprocess.Popen[bytes] | None = None
    exit_reported: bool = False
    terminating: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class TestKubelet:
    """See the module docstring. Use as a context manager."""

    __test__ = False  # not a pytest test class

    def __init__(self, emulator: EmulatorThread, node: str, workdir: Path, period: float = 0.02) -> None:
        self.emulator, self.node, self.workdir, self.period = emulator, node, workdir, period
        self.kube = KubeClient(emulator.url)
        self.runs: dict[str, _Run] = {}
        self.violations: list[str] = []
        self.started: list[tuple[str, str]] = []  # (namespace/name, model) in the order their processes started
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"test-kubelet-{node}", daemon=True)
        self.errors: list[str] = []
        self.final_deletes: list[str] = []  # namespace/name of each Pod it deleted with grace 0, in order

    def __enter__(self) -> TestKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for run in list(self.runs.values()):
            self._kill(run)

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._round()
            except Exception as err:  # keep going; tests see the errors
                self.errors.append(repr(err))
            self._stop.wait(self.period)

    def _pods(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kube.request("GET", "/api/v1/pods")["items"]
        return [p for p in items if (p.get("spec") or {}).get("nodeName") == self.node]

    def _round(self) -> None:
        seen: set[str] = set()
        for pod in self._pods():
            meta = pod["metadata"]
            uid = meta["uid"]
            seen.add(uid)
            run = self.runs.get(uid)
            if meta.get("deletionTimestamp"):
                if run is None:
                    self._release(pod)
                elif not run.terminating:
                    run.terminating = True
                    threading.Thread(target=self._terminate, args=(run, pod), daemon=True).start()
                continue
            if run is None:
                self._admit(pod)
            elif run.proc is not None and not run.alive and not run.exit_reported:
                self._report_exit(run)
        for uid in [u for u in self.runs if u not in seen]:
            run = self.runs.pop(uid)
            self._kill(run)
            assert self.emulator.emu is not None
            self.emulator.emu.pod_logs.pop((run.namespace, run.name), None)

    # ----------------------------------------------------------- admission

    def _admit(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        labels = meta.get("labels") or {}
        container = spec["containers"][0]
        env = {e["name"]: str(e.get("value", "")) for e in container.get("env") or []}
        log = self.workdir / f"{ns}-{name}-{uid[:8]}.log"
        run = _Run(
            ns,
            name,
            uid,
            (labels.get("vramctl.io/instance", ""), labels.get("vramctl.io/gpu", "")),
            labels.get("vramctl.io/class") != "light",
            log,
            float(spec.get("terminationGracePeriodSeconds", 30)),
            oom=env.get("TEST_KUBELET_OOM") == "1",
        )
        self.runs[uid] = run
        log.write_text("")
        assert self.emulator.emu is not None
        self.emulator.emu.pod_logs[(ns, name)] = log
        image = str(container.get("image") or "")
        if not image.startswith(STANDIN_PREFIX):
            self._status(
                run,
                {
                    "phase": "Pending",
                    "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                    ],
                    "containerStatuses": [
                        {
                            "name": container["name"],
                            "image": image,
                            "ready": False,
                            "restartCount": 0,
                            "state": {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}},
                        }
                    ],
                },
            )
            return
        with self._lock:
            if run.heavy:
                others = [r for r in self.runs.values() if r is not run and r.heavy and r.domain == run.domain and r.alive]
                for o in others:
                    self.violations.append(f"{ns}/{name} started while {o.namespace}/{o.name} still runs (gpu {run.domain[1]})")
            child_env = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
            child_env.update(env)
            child_env.setdefault("STANDIN_HOST", "127.0.0.1")
            child_env["PYTHONUNBUFFERED"] = "1"
            with log.open("ab") as out:
                run.proc = subprocess.Popen(
                    [sys.executable, "-m", "vramctl.demo.standin", *(container.get("args") or [])],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    start_new_session=True,
                )
            self.started.append((f"{ns}/{name}", labels.get("vramctl.io/model", "")))
        cid = "containerd://" + hashlib.sha256(uid.encode()).hexdigest()
        self._status(
            run,
            {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "hostIP": "127.0.0.1",
                "startTime": _now(),
                "conditions": [
                    {"type": t, "status": "True", "lastTransitionTime": _now()}
                    for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                ],
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": image,
                        "containerID": cid,
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": _now()}},
                    }
                ],
            },
        )

    def _status(self, run: _Run, status: dict[str, Any]) -> None:
        with contextlib.suppress(ApiError):  # gone meanwhile
            self.kube.request(
                "PATCH", f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status}, "application/merge-patch+json"
            )

    def _exit_code(self, run: _Run) -> int:
        assert run.proc is not None
        rc = run.proc.returncode
        return 128 - rc if rc is not None and rc < 0 else int(rc or 0)

    def _report_exit(self, run: _Run) -> None:
        run.exit_reported = True
        code = self._exit_code(run)
        reason = "OOMKilled" if run.oom else ("Completed" if code == 0 else "Error")
        self._status(
            run,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                "containerStatuses": [
                    {
                        "name": "model",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": _now()}},
                    }
                ],
            },
        )

    # ------------------------------------------------------------ deletion

    def _terminate(self, run: _Run, pod: dict[str, Any]) -> None:
        if run.alive:
            assert run.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGTERM)
            try:
                run.proc.wait(run.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait(10)
        if run.proc is not None and not run.exit_reported:
            self._report_exit(run)
        self._release(pod)

    def _release(self, pod: dict[str, Any]) -> None:
        """The kubelet's final delete: its containers are gone, the API server may forget the Pod."""
        meta = pod["metadata"]
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        with contextlib.suppress(ApiError):  # gone already
            self.kube.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        self.final_deletes.append(f"{meta['namespace']}/{meta['name']}")

    def _kill(self, run: _Run) -> None:
        if run.alive:
            assert run.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait(10)

    # ------------------------------------------------------------- reading

    def alive(self) -> dict[str, str]:
        """Pod name -> model of every stand-in process still running."""
        return {f"{r.namespace}/{r.name}": r.name for r in self.runs.values() if r.alive}

    def assert_exclusive(self) -> None:
        assert not self.violations, self.violations
        assert not self.errors, self.errors


class GarbageCollector:
    """Deletes Pods whose controller owner is gone (foreground GC is not emulated)."""

    def __init__(self, emulator: EmulatorThread, period: float = 0.1) -> None:
        self.kube = KubeClient(emulator.url)
        self.period = period
        self.deleted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="test-gc", daemon=True)

    def __enter__(self) -> GarbageCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(ApiError, OSError):
                self._round()
            self._stop.wait(self.period)

    def _round(self) -> None:
        for pod in self.kube.request("GET", "/api/v1/pods")["items"]:
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            for ref in meta.get("ownerReferences") or []:
                if ref.get("kind") != "ModelDeployment":
                    continue
                owner = self.kube.get_md(meta["namespace"], ref["name"])
                if owner is None or owner["metadata"].get("uid") != ref.get("uid"):
                    with contextlib.suppress(ApiError):
                        self.kube.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}")
                        self.deleted.append(f"{meta['namespace']}/{meta['name']}")
