"""End to end with the Pod runtime: the real ``vramctl operator --runtime
kubernetes`` (kopf inside) as a subprocess, the API emulator, and the test
kubelet running each Pod as a local stand-in process (tests/support/k8s/).
No Docker engine, no socket.

Each test has its own namespace, node and kubelet. The kubelet records an
exclusivity violation whenever a heavy stand-in starts while another heavy one
of the same GPU still runs; every test asserts there was none.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.k8s.emulator import EmulatorThread, KubeClient
from tests.support.k8s.kubelet import GarbageCollector, TestKubelet
from tests.support.k8s.pod_operator import TIMER_S, Cluster, Operator, condition, model, settled, status


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorThread]:
    with EmulatorThread() as emu:
        yield emu


@pytest.fixture
def cluster(emulator: EmulatorThread, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(emulator, tmp_path)
    with c.kubelet, GarbageCollector(emulator):
        try:
            yield c
        finally:
            c.op.stop()
        c.kubelet.assert_exclusive()


# --------------------------------------------------------------------- tests


def test_switch_back_and_forth_with_a_companion(cluster: Cluster) -> None:
    c = cluster
    c.kube.create_md(c.ns, "gpu0", c.spec(companions=["tts"]))
    c.op.start()
    obj = c.wait_md("gpu0", settled(1, ["llm", "tts"]))
    pods = c.pods()
    assert sorted(pods) == ["gpu0-llm", "gpu0-tts"]
    owner = pods["gpu0-llm"]["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("ModelDeployment", "gpu0", obj["metadata"]["uid"])
    assert pods["gpu0-llm"]["spec"]["nodeName"] == c.node and pods["gpu0-llm"]["spec"]["runtimeClassName"] == "nvidia"
    tts_uid = pods["gpu0-tts"]["metadata"]["uid"]

    for gen, target in ((2, "sdxl"), (3, "llm"), (4, "sdxl")):
        c.kube.patch_md(c.ns, "gpu0", {"spec": {"activeModel": target}})
        obj = c.wait_md("gpu0", settled(gen, sorted([target, "tts"])))
        assert sorted(c.pods()) == sorted([f"gpu0-{target}", "gpu0-tts"])
        last = status(obj)["lastSwitch"]
        assert (last["to"], last["outcome"], last["generation"]) == (target, "success", gen)
    assert c.pods()["gpu0-tts"]["metadata"]["uid"] == tts_uid  # the companion stayed through every switch
    c.wait_events("gpu0", lambda ev: sum(r == "SwitchFinished" for _, r, _ in ev) >= 4)
    heavy_starts = [m for _, m in c.kubelet.started if m != "tts"]
    assert heavy_starts == ["llm", "sdxl", "llm", "sdxl"]


def test_a_crash_and_an_image_that_cannot_run_are_failures(cluster: Cluster) -> None:
    c = cluster
    spec = c.spec()
    spec["models"]["llm"] = model(c.ports["llm"], 9000, STANDIN_CRASH_AFTER_SECONDS="1", STANDIN_EXIT_CODE="3")
    spec["models"]["sdxl"]["image"] = "registry.invalid/sdxl:nope"
    c.kube.create_md(c.ns, "gpu0", spec)
    c.op.start()
    # llm comes up, then crashes: reported with its exit code and log lines.
    ev = c.wait_events("gpu0", lambda ev: any(r == "ModelFailed" and "llm" in m for _, r, m in ev), timeout=20)
    failed = next(m for _, r, m in ev if r == "ModelFailed")
    assert "crashing with exit code 3" in failed or "exit code 3" in failed, failed

    c.kube.patch_md(c.ns, "gpu0", {"spec": {"activeModel": "sdxl"}})
    obj = c.wait_md("gpu0", lambda o: status(o).get("observedGeneration") == 2 and status(o).get("phase") == "Failed")
    assert condition(obj, "Degraded")["status"] == "True"
    assert "ImagePullBackOff" in status(obj)["message"], status(obj)
    ev = c.wait_events("gpu0", lambda ev: any(r == "ModelFailed" and "ImagePullBackOff" in m for _, r, m in ev))
    # Nothing lingers pending: each try's Pod is deleted once it failed (retries
    # come with back-off, so the next try's Pod, another uid, may already be there).
    def sdxl_uid() -> str | None:
        pod = c.pods().get("gpu0-sdxl")
        return str(pod["metadata"]["uid"]) if pod is not None else None

    failed_try = sdxl_uid()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and failed_try is not None and sdxl_uid() == failed_try:
        time.sleep(0.02)
    assert failed_try is None or sdxl_uid() != failed_try, "the failed try's Pod was never deleted"
    assert not any(m == "sdxl" for _, m in c.kubelet.started)


def test_delete_removes_the_pods_and_the_owner_reference_collects_them(cluster: Cluster) -> None:
    c = cluster
    c.kube.create_md(c.ns, "gpu0", c.spec(companions=["tts"]))
    c.op.start()
    c.wait_md("gpu0", settled(1, ["llm", "tts"]))
    c.kube.delete_md(c.ns, "gpu0")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (c.kube.get_md(c.ns, "gpu0") is not None or c.pods()):
        time.sleep(0.05)
    assert c.kube.get_md(c.ns, "gpu0") is None and c.pods() == {}, c.op.log_text()[-3000:]
    assert c.kubelet.alive() == {}

    # Without the operator: only the owner reference is left to do it.
    c.kube.create_md(c.ns, "gpu1", c.spec(gpu=1))
    c.wait_md("gpu1", settled(1, ["llm"]))
    c.op.stop()
    c.kube.patch_md(c.ns, "gpu1", {"metadata": {"finalizers": None}})
    c.kube.delete_md(c.ns, "gpu1")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and c.pods():
        time.sleep(0.05)
    assert c.pods() == {} and c.kubelet.alive() == {}


def test_an_operator_killed_mid_switch_converges_after_a_restart(cluster: Cluster) -> None:
    c = cluster
    spec = c.spec()
    spec["models"]["llm"] = model(c.ports["llm"], 9000, stop=1.5)
    c.kube.create_md(c.ns, "gpu0", spec)
    c.op.start()
    c.wait_md("gpu0", settled(1, ["llm"]))
    c.kube.patch_md(c.ns, "gpu0", {"spec": {"activeModel": "sdxl"}})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (c.pods().get("gpu0-llm") or {}).get("metadata", {}).get("deletionTimestamp"):
        time.sleep(0.02)
    assert (c.pods().get("gpu0-llm") or {}).get("metadata", {}).get("deletionTimestamp"), "the stop never began"
    c.op.stop(signal.SIGKILL)  # mid-switch: llm is still stopping
    c.op.start()
    c.wait_md("gpu0", settled(2, ["sdxl"]))
    assert sorted(c.pods()) == ["gpu0-sdxl"]
    assert [m for _, m in c.kubelet.started] == ["llm", "sdxl"]


def test_two_deployments_for_one_gpu_the_newer_is_a_conflict(cluster: Cluster) -> None:
    c = cluster
    c.kube.create_md(c.ns, "first", c.spec())
    time.sleep(1.1)  # creationTimestamp has whole seconds
    c.kube.create_md(c.ns, "second", c.spec(activeModel="sdxl"))
    c.op.start()
    c.wait_md("first", settled(1, ["llm"]))
    obj = c.wait_md("second", lambda o: status(o).get("phase") == "Failed")
    degraded = condition(obj, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "Conflict" and f"{c.ns}/first" in degraded["message"]
    ev = c.wait_events("second", lambda ev: any(r == "Conflict" for _, r, _ in ev))
    assert any(f"{c.ns}/first" in m for _, r, m in ev if r == "Conflict")
    time.sleep(2 * TIMER_S)
    assert sorted(c.pods()) == ["first-llm"]  # nothing ran for the newer one
    assert len([e for e in c.events("second") if e[1] == "Conflict"]) == 1

    c.kube.delete_md(c.ns, "first")  # the older goes: the newer takes over cleanly
    obj = c.wait_md("second", settled(1, ["sdxl"]))
    assert condition(obj, "Degraded")["status"] == "False"
    assert sorted(c.pods()) == ["second-sdxl"]
    assert c.pods()["second-sdxl"]["metadata"]["ownerReferences"][0]["name"] == "second"


K3S_EXAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "k3s" / "rtx3050-k3s.yaml"
CHART_README = Path(__file__).resolve().parents[2] / "charts" / "vramctl" / "README.md"


def test_kubectl_apply_of_the_k3s_example(emulator: EmulatorThread, tmp_path: Path) -> None:
    """The k3s example, applied as charts/vramctl/README.md says (with the
    chart's RBAC for its `helm install`, enforced), runs as Pods bound to its
    node; the images cannot run on the test kubelet, which the status says
    (ImagePullBackOff), and nothing lingers."""
    import re
    import shutil

    import yaml

    from tests.support.k8s.chart import NAMESPACE, RELEASE, render
    from tests.support.k8s.rbac import grants_of

    doc = yaml.safe_load(K3S_EXAMPLE.read_text())
    ns, name, node = doc["metadata"]["namespace"], doc["metadata"]["name"], doc["spec"]["nodeName"]
    readme_set = re.search(r"--set 'rbac\.podNamespaces=\{([^}]*)\}'", CHART_README.read_text())
    assert readme_set is not None, "the README's helm install sets rbac.podNamespaces"
    pod_namespaces = readme_set[1].split(",")
    assert ns in pod_namespaces
    assert emulator.emu is not None
    emulator.emu.rbac, emulator.emu.denied = grants_of(render({"rbac": {"podNamespaces": pod_namespaces}}).objects, NAMESPACE, RELEASE), []
    kubeconfig = emulator.kubeconfig(tmp_path / "kubeconfig")
    exe = shutil.which("kubectl")
    assert exe is not None, "kubectl is not installed"
    r = subprocess.run(
        [exe, "--kubeconfig", str(kubeconfig), "apply", "--validate=false", "-f", str(K3S_EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "created" in r.stdout, r.stdout + r.stderr
    kube = KubeClient(emulator.url)
    op = Operator(tmp_path, kubeconfig, ns, node)
    with TestKubelet(emulator, node, tmp_path) as kubelet:
        try:
            op.start()
            deadline = time.monotonic() + 30
            obj: dict[str, Any] = {}
            while time.monotonic() < deadline:
                obj = kube.get_md(ns, name) or {}
                if status(obj).get("observedGeneration") == 1 and status(obj).get("phase") == "Failed":
                    break
                time.sleep(0.05)
            assert status(obj).get("phase") == "Failed", (obj, op.log_text()[-3000:])
            message = status(obj)["message"]
            assert "ImagePullBackOff" in message and any(m["image"] in message for m in doc["spec"]["models"].values()), message
            assert condition(obj, "Degraded")["reason"] != "InvalidSpec"
            r = subprocess.run(
                [exe, "--kubeconfig", str(kubeconfig), "delete", "--wait=false", "-f", str(K3S_EXAMPLE)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stdout + r.stderr
            while time.monotonic() < deadline + 20 and (
                kube.get_md(ns, name) is not None or kube.request("GET", f"/api/v1/namespaces/{ns}/pods")["items"]
            ):
                time.sleep(0.05)
            assert kube.get_md(ns, name) is None and kube.request("GET", f"/api/v1/namespaces/{ns}/pods")["items"] == []
        finally:
            op.stop()
            emulator.emu.rbac = None
        kubelet.assert_exclusive()
        assert kubelet.started == []
    # Run with --namespace, kopf tries to list namespaces first (no one grants it; it falls back to the given one).
    assert {a.resource for a in emulator.emu.denied} <= {"namespaces"}, emulator.emu.denied


def test_on_demand_holds_decide_and_the_status_tells_what_runs(cluster: Cluster) -> None:
    """switching.mode onDemand: a hold through the operator's API switches the
    GPU; .status.activeModel shows what runs while spec.activeModel stays the
    default; a later spec change does not force the GPU back."""
    c = cluster
    c.kube.create_md(c.ns, "gpu0", c.spec(switching={"mode": "onDemand"}))
    c.op.start()
    c.wait_md("gpu0", settled(1, ["llm"]))
    hold = [sys.executable, "-m", "vramctl", "hold", "--url", c.op.url, "--wait", "30", "sdxl", "--", sys.executable, "-c", "print('drew')"]
    r = subprocess.run(hold, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and "drew" in r.stdout, r.stdout + r.stderr + c.op.log_text()[-3000:]
    obj = c.wait_md("gpu0", lambda o: status(o).get("activeModel") == "sdxl" and status(o).get("runningModels") == ["sdxl"])
    assert obj["spec"]["activeModel"] == "llm"
    c.kube.patch_md(c.ns, "gpu0", {"spec": {"vramBudgetMiB": 14900}})
    time.sleep(1.0)
    obj = c.wait_md("gpu0", lambda o: (o.get("status") or {}).get("observedGeneration") is not None)
    assert status(obj).get("activeModel") == "sdxl" and "gpu0-sdxl" in c.pods()


def test_declared_mode_refuses_a_hold_on_another_model(cluster: Cluster) -> None:
    c = cluster
    c.kube.create_md(c.ns, "gpu0", c.spec())
    c.op.start()
    c.wait_md("gpu0", settled(1, ["llm"]))
    hold = [sys.executable, "-m", "vramctl", "hold", "--url", c.op.url, "--wait", "5", "sdxl", "--", "true"]
    r = subprocess.run(hold, capture_output=True, text=True, timeout=60)
    assert r.returncode == 75 and "switching.mode declared" in r.stdout + r.stderr, r.stdout + r.stderr
    assert sorted(c.pods()) == ["gpu0-llm"]
