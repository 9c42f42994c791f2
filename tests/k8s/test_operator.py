"""End to end in Kubernetes mode: the real ``vramctl operator`` CLI (kopf
inside) as a subprocess, kmock's stateful API emulator on 127.0.0.1
(tests/support/k8s/emulator.py), the real Docker engine and the stand-in image.

Each test gets its own namespace (= its vramctl instance name) and its own
operator watching only that namespace, so tests never see each other's
objects. The session-wide exclusivity recorder checks every test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.support.docker_engine import STANDIN_TAG
from tests.support.exclusivity import ExclusivityRecorder
from tests.support.k8s.emulator import ROOT, EmulatorThread, KubeClient
from tests.support.k8s.pod_operator import Operator
from tests.support.k8s.validation import crd_object
from tests.support.live_up import standin_model

pytestmark = pytest.mark.docker

NODE = "node-a"
TIMER_S = 1.0  # the operator's resync timer in these tests (10 s by default)
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorThread]:
    with EmulatorThread() as emu:
        yield emu


@pytest.fixture
def kube(emulator: EmulatorThread) -> KubeClient:
    return KubeClient(emulator.url)


@pytest.fixture
def kubeconfig(emulator: EmulatorThread, tmp_path: Path) -> Path:
    return emulator.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture(autouse=True)
def _exclusive(exclusivity: ExclusivityRecorder, instance: str) -> Iterator[None]:
    start = exclusivity.seq
    yield
    exclusivity.assert_no_violations(instance, since_seq=start)


@pytest.fixture
def operator(
    tmp_path: Path, kubeconfig: Path, instance: str, free_port: Callable[[], int], standin_image: str
) -> Iterator[Callable[..., Operator]]:
    made: list[Operator] = []

    def make(node: str = NODE, namespace: str | None = None) -> Operator:
        op = Operator(tmp_path, kubeconfig, namespace or instance, node, instance=instance, runtime=None, port=free_port())
        made.append(op)
        return op.start()

    yield make
    for op in made:
        op.stop()


# ------------------------------------------------------------------- helpers


def md_spec(ports: dict[str, int], **fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeName": NODE,
        "gpu": 0,
        "activeModel": "llm",
        "vramBudgetMiB": 15000,
        "models": {
            "llm": standin_model(ports["llm"], 9000, load=0.3, stop=0.1),
            "sdxl": standin_model(ports["sdxl"], 10000, load=0.3, stop=0.1),
            "tts": standin_model(ports["tts"], 3000, cls="light", load=0.2, stop=0.1),
        },
    }
    spec.update(fields)
    return spec


@pytest.fixture
def ports(free_port: Callable[[], int]) -> dict[str, int]:
    return {m: free_port() for m in ("llm", "sdxl", "tts")}


def containers(client: docker.DockerClient, instance: str, running_only: bool = True) -> dict[str, Any]:
    cs = client.containers.list(all=not running_only, filters={"label": [f"vramctl.io/instance={instance}"]})
    return {c.labels["vramctl.io/model"]: c for c in cs}


def wait_md(
    kube: KubeClient, ns: str, name: str, pred: Callable[[dict[str, Any]], bool], op: Operator, timeout: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        obj = kube.get_md(ns, name)
        if obj is not None and pred(obj):
            return obj
        time.sleep(0.05)
    raise AssertionError(
        f"{ns}/{name} not as expected within {timeout}s; last: {json.dumps(obj, indent=1)[-3000:]}\noperator log:\n{op.log_text()[-4000:]}"
    )


def status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status(obj).get("conditions") or [] if c["type"] == ctype)


def settled(generation: int, running: list[str]) -> Callable[[dict[str, Any]], bool]:
    def pred(obj: dict[str, Any]) -> bool:
        st = status(obj)
        return st.get("observedGeneration") == generation and st.get("phase") == "Ready" and st.get("runningModels") == running

    return pred


def reasons(kube: KubeClient, ns: str, name: str) -> list[tuple[str, str, str]]:
    return [(e["type"], e["reason"], e["message"]) for e in kube.events(ns, name) if e.get("reportingComponent") == "vramctl.io/operator"]


def wait_events(
    kube: KubeClient, ns: str, name: str, pred: Callable[[list[tuple[str, str, str]]], bool], op: Operator, timeout: float = 10.0
) -> list[tuple[str, str, str]]:
    """The operator's Events on ``ns/name`` once ``pred`` holds (they are
    posted by its writer thread, a moment after the status)."""
    deadline = time.monotonic() + timeout
    ev = reasons(kube, ns, name)
    while time.monotonic() < deadline and not pred(ev):
        time.sleep(0.05)
        ev = reasons(kube, ns, name)
    assert pred(ev), f"events of {ns}/{name} not as expected within {timeout}s: {ev}\noperator log:\n{op.log_text()[-3000:]}"
    return ev


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("kubectl is not installed: `bash .ci/setup-infra.sh` installs it (Debian trixie's kubectl package)", pytrace=False)
    return subprocess.run([exe, "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True, timeout=60, check=False)


# --------------------------------------------------------------------- tests


def test_create_switch_and_status(
    operator: Callable[..., Operator],
    kube: KubeClient,
    kubeconfig: Path,
    ports: dict[str, int],
    docker_client: docker.DockerClient,
    instance: str,
) -> None:
    ns = instance
    kube.create_md(ns, "gpu0", md_spec(ports))
    op = operator()
    obj = wait_md(kube, ns, "gpu0", settled(1, ["llm"]), op)

    running = containers(docker_client, instance)
    assert sorted(running) == ["llm"]
    labels = running["llm"].labels
    assert labels["app.kubernetes.io/managed-by"] == "vramctl" and labels["vramctl.io/gpu"] == "0"
    assert labels["vramctl.io/deployment"] == "gpu0"
    st = status(obj)
    assert st["activeModel"] == "llm" and st["nodeName"] == NODE
    assert st["gpu"]["totalMiB"] > 0 and st["gpu"]["usedMiB"] == 9000 and st["gpu"]["uuid"]
    for c in st["conditions"]:
        assert set(c) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}, c
    assert condition(obj, "Ready")["status"] == "True" and condition(obj, "Degraded")["status"] == "False"
    degraded_since = condition(obj, "Degraded")["lastTransitionTime"]
    assert obj["metadata"]["finalizers"] == [f"vramctl.io/node.{NODE}"]

    # The switch, as a user does it.
    r = kubectl(kubeconfig, "-n", ns, "patch", "md", "gpu0", "--type", "merge", "-p", '{"spec":{"activeModel":"sdxl"}}')
    assert r.returncode == 0, r.stderr
    obj = wait_md(kube, ns, "gpu0", settled(2, ["sdxl"]), op)
    assert sorted(containers(docker_client, instance)) == ["sdxl"]
    assert "sdxl:running" in status(obj)["models"].split() and "llm:running" not in status(obj)["models"].split()
    # `kubectl get md`'s columns, from the CRD's printer columns (the emulator
    # does no server-side printing: kubectl evaluates the same jsonPaths here).
    cols = ",".join(f"{c['name'].upper()}:{c['jsonPath']}" for c in crd_object()["spec"]["versions"][0]["additionalPrinterColumns"])
    r = kubectl(kubeconfig, "-n", ns, "get", "md", "gpu0", "-o", f"custom-columns={cols}")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:4] == ["ACTIVE", "PHASE", "VRAM", "MODELS"] and row.split()[:2] == ["sdxl", "Ready"], r.stdout
    assert "sdxl:running" in row.split(), r.stdout
    last = status(obj)["lastSwitch"]
    assert (last["from"], last["to"], last["outcome"], last["generation"]) == ("llm", "sdxl", "success", 2)
    assert last["durationSeconds"] > 0
    assert condition(obj, "Degraded")["lastTransitionTime"] == degraded_since  # never flipped
    ev = wait_events(kube, ns, "gpu0", lambda ev: any(r == "SwitchFinished" and "llm -> sdxl: success" in m for _, r, m in ev), op)
    assert ("Normal", "SwitchStarted", "switch llm -> sdxl started") in ev

    # The same spec again (an annotation edit makes kopf deliver it; the timer
    # re-delivers it every second): nothing is bumped, nothing restarts.
    sdxl = containers(docker_client, instance)["sdxl"]
    desired_gen = op.gpu()["desiredGeneration"]
    kube.patch_md(ns, "gpu0", {"metadata": {"annotations": {"example.com/touched": "yes"}}})
    time.sleep(3 * TIMER_S)
    assert op.gpu()["desiredGeneration"] == desired_gen
    after = containers(docker_client, instance)
    assert sorted(after) == ["sdxl"] and after["sdxl"].id == sdxl.id
    assert after["sdxl"].attrs["State"]["StartedAt"] == sdxl.attrs["State"]["StartedAt"]
    assert reasons(kube, ns, "gpu0") == ev

    # An operator restart resumes: the same spec, nothing restarts either.
    op.stop()
    op.start()
    time.sleep(3 * TIMER_S)
    obj = wait_md(kube, ns, "gpu0", settled(2, ["sdxl"]), op)
    after = containers(docker_client, instance)
    assert sorted(after) == ["sdxl"] and after["sdxl"].attrs["State"]["StartedAt"] == sdxl.attrs["State"]["StartedAt"]
    assert status(obj)["lastSwitch"] == last  # kept across the restart
    assert condition(obj, "Degraded")["lastTransitionTime"] == degraded_since
    assert [e for e in reasons(kube, ns, "gpu0") if e[1] == "SwitchStarted"] == [e for e in ev if e[1] == "SwitchStarted"]


def test_invalid_spec_is_degraded_with_an_event_and_stops_nothing(
    operator: Callable[..., Operator],
    kube: KubeClient,
    ports: dict[str, int],
    docker_client: docker.DockerClient,
    instance: str,
) -> None:
    ns = instance
    kube.create_md(ns, "gpu0", md_spec(ports))
    # A second one, invalid from the start (a heavy model as a companion:
    # the CRD's schema cannot say that, the operator can).
    kube.create_md(ns, "gpu1", md_spec(ports, gpu=1, activeModel="llm", companions=["sdxl"]))
    op = operator()
    wait_md(kube, ns, "gpu0", settled(1, ["llm"]), op)
    llm = containers(docker_client, instance)["llm"]

    kube.patch_md(ns, "gpu0", {"spec": {"activeModel": "nope"}})
    obj = wait_md(kube, ns, "gpu0", lambda o: condition(o, "Degraded")["status"] == "True", op)
    degraded = condition(obj, "Degraded")
    assert degraded["reason"] == "InvalidSpec" and degraded["observedGeneration"] == 2
    assert "spec.activeModel" in degraded["message"] and "'nope' is not one of the models" in degraded["message"]
    assert status(obj)["observedGeneration"] == 1 and status(obj)["activeModel"] == "llm"

    wait_events(kube, ns, "gpu0", lambda ev: any(r == "InvalidSpec" for _, r, _ in ev), op)
    time.sleep(3 * TIMER_S)  # timer rounds: no retry storm, no second Event
    invalid = [e for e in reasons(kube, ns, "gpu0") if e[1] == "InvalidSpec"]
    assert len(invalid) == 1 and invalid[0][0] == "Warning" and "spec.activeModel" in invalid[0][2]
    now = containers(docker_client, instance)
    assert sorted(now) == ["llm"] and now["llm"].attrs["State"]["StartedAt"] == llm.attrs["State"]["StartedAt"]

    bad = wait_md(kube, ns, "gpu1", lambda o: status(o).get("phase") == "Failed", op)
    assert condition(bad, "Degraded")["reason"] == "InvalidSpec" and "spec.companions[0]" in status(bad)["message"]
    wait_events(kube, ns, "gpu1", lambda ev: any(r == "InvalidSpec" and "spec.companions[0]" in m for _, r, m in ev), op)
    assert {c.labels["vramctl.io/gpu"] for c in containers(docker_client, instance, running_only=False).values()} == {"0"}

    # Fixed: applied, and the Degraded condition clears.
    kube.patch_md(ns, "gpu0", {"spec": {"activeModel": "sdxl"}})
    obj = wait_md(kube, ns, "gpu0", settled(3, ["sdxl"]), op)
    assert condition(obj, "Degraded")["status"] == "False"


def test_delete_removes_its_containers_and_nothing_else(
    operator: Callable[..., Operator],
    kube: KubeClient,
    ports: dict[str, int],
    docker_client: docker.DockerClient,
    instance: str,
    make_instance: Callable[[], str],
    free_port: Callable[[], int],
) -> None:
    ns = instance
    other = make_instance()
    stranger = docker_client.containers.run(
        STANDIN_TAG,
        detach=True,
        network_mode="host",
        environment={"STANDIN_PORT": str(free_port()), "STANDIN_LOAD_SECONDS": "0"},
        labels={
            "app.kubernetes.io/managed-by": "vramctl",
            "vramctl.io/instance": other,
            "vramctl.io/model": "llm",
            "vramctl.io/gpu": "0",
            "vramctl.io/class": "light",
        },
    )
    kube.create_md(ns, "gpu0", md_spec(ports, companions=["tts"]))
    op = operator()
    wait_md(kube, ns, "gpu0", settled(1, ["llm", "tts"]), op)

    kube.delete_md(ns, "gpu0")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and kube.get_md(ns, "gpu0") is not None:
        time.sleep(0.05)
    assert kube.get_md(ns, "gpu0") is None, op.log_text()[-3000:]  # the finalizer was released
    assert containers(docker_client, instance, running_only=False) == {}  # stopped and removed
    stranger.reload()
    assert stranger.status == "running"  # another instance's container: untouched


def test_a_deployment_for_another_node_is_not_touched(
    operator: Callable[..., Operator],
    kube: KubeClient,
    ports: dict[str, int],
    docker_client: docker.DockerClient,
    instance: str,
) -> None:
    ns = instance
    elsewhere = kube.create_md(ns, "elsewhere", md_spec(ports, nodeName="node-b"))
    kube.create_md(ns, "gpu0", md_spec(ports))
    op = operator()
    wait_md(kube, ns, "gpu0", settled(1, ["llm"]), op)  # the operator is live
    time.sleep(3 * TIMER_S)
    obj = kube.get_md(ns, "elsewhere")
    assert obj is not None
    assert obj["metadata"]["resourceVersion"] == elsewhere["metadata"]["resourceVersion"]  # not a single write
    assert "status" not in obj and not obj["metadata"].get("finalizers") and not obj["metadata"].get("annotations")
    assert kube.events(ns, "elsewhere") == []
    assert {c.labels["vramctl.io/deployment"] for c in containers(docker_client, instance, running_only=False).values()} == {"gpu0"}


def test_kubectl_apply_of_the_examples(
    operator: Callable[..., Operator],
    kube: KubeClient,
    kubeconfig: Path,
    docker_client: docker.DockerClient,
    instance: str,
) -> None:
    assert EXAMPLES, "manifests/examples/*.yaml"
    docs = {p: yaml.safe_load(p.read_text()) for p in EXAMPLES}
    for path, doc in docs.items():
        r = kubectl(kubeconfig, "apply", "--validate=false", "-f", str(path))
        assert r.returncode == 0 and "created" in r.stdout, r.stdout + r.stderr
        got = kube.get_md(doc["metadata"]["namespace"], doc["metadata"]["name"])
        assert got is not None and got["spec"] == doc["spec"]
        r = kubectl(kubeconfig, "apply", "--validate=false", "-f", str(path))
        assert r.returncode == 0, r.stdout + r.stderr

    # The operator of the first example's node takes it: the spec is valid
    # (no InvalidSpec); its images are not on this engine, which it reports.
    path, doc = next(iter(docs.items()))
    ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
    op = operator(node=doc["spec"]["nodeName"], namespace=ns)
    obj = wait_md(kube, ns, name, lambda o: status(o).get("observedGeneration") == 1 and status(o).get("phase") == "Failed", op)
    assert condition(obj, "Degraded")["reason"] != "InvalidSpec", status(obj)
    ev = wait_events(kube, ns, name, lambda ev: any(r == "ModelFailed" for _, r, _ in ev), op)
    failed = [m for _, r, m in ev if r == "ModelFailed"]
    assert "not found locally" in failed[0], ev
    assert containers(docker_client, instance, running_only=False) == {}

    for p in docs:
        r = kubectl(kubeconfig, "delete", "--wait=false", "-f", str(p))
        assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and kube.get_md(ns, name) is not None:
        time.sleep(0.05)
    assert kube.get_md(ns, name) is None, op.log_text()[-3000:]
