"""RBAC, enforced: the emulator refuses what the chart's rendered RBAC objects
do not grant vramctl's service account (tests/k8s/rbac.py), and records the
access each request of vramctl and kopf needed, with its namespace.

- The operator, cluster-wide as the DaemonSet runs it, needs nothing the
  chart does not grant, and the chart grants nothing it does not use: the
  ClusterRole for ModelDeployments, their status, Events and CRDs; Pods and
  their logs only through the Role of the ModelDeployment's namespace.
- A ModelDeployment in a namespace without that Role is Failed with a
  message that names the namespace and the chart value; once granted, it runs.
- ``vramctl doctor --kubernetes`` finds such a namespace before anything fails.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import kopf
import pytest

from tests.support.k8s.chart import NAMESPACE, RELEASE, render
from tests.support.k8s.emulator import EmulatorThread, KubeClient
from tests.support.k8s.kubelet import GarbageCollector
from tests.support.k8s.pod_operator import Cluster, condition, settled, status
from tests.support.k8s.rbac import Access, Grants, grants_of
from tests.support.kube_facts import facts
from vramctl.doctor import exit_code, kubernetes_checks, pod_rights
from vramctl.reconcile.errors import ErrorClass, classify
from vramctl.runtimes.kubernetes import POD_ACCESS, Forbidden, KubeApiError, PodOwner, PodRuntime, _explained
from vramctl.sources.kubernetes.client import KubeApi
from vramctl.spec.models import DeploymentSpec


def chart_grants(values: dict[str, Any] | None = None) -> Grants:
    """What the chart rendered with ``values`` grants the release's service account."""
    return grants_of(render(values).objects, NAMESPACE, RELEASE)


# Granted by the ClusterRole and never seen in the scenario below, each with its reason.
GRANTED_UNUSED = {
    # kopf writes status with PATCH; `update` is for clients that replace it.
    ("vramctl.io", "modeldeployments/status", "update"),
    # kopf posts core/v1 Events; events.k8s.io is the same resource under its newer group.
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
    # Events are only created here; a repeated one may be patched (count) by kopf.
    ("", "events", "patch"),
}
# Granted by the Role and never seen: the API server asks for it when a Pod's
# ownerReference sets blockOwnerDeletion (OwnerReferencesPermissionEnforcement);
# the emulator does not.
ROLE_GRANTED_UNUSED = {("vramctl.io", "modeldeployments/finalizers", "update")}


def test_rbac_grants_what_the_operator_calls_and_no_more(tmp_path: Path) -> None:
    """The chart's RBAC (rbac.podNamespaces: the test's namespace), enforced,
    while a cluster-wide operator (as the DaemonSet runs it) created,
    switched, failed and deleted a ModelDeployment."""
    with EmulatorThread() as emulator:
        assert emulator.emu is not None
        c = Cluster(emulator, tmp_path, clusterwide=True)
        grants = chart_grants({"rbac": {"podNamespaces": [c.ns]}})
        emulator.emu.rbac = grants
        with c.kubelet, GarbageCollector(emulator):
            try:
                spec = c.spec(companions=["tts"])
                spec["models"]["sdxl"]["image"] = "registry.invalid/sdxl:nope"
                c.kube.create_md(c.ns, "gpu0", spec)
                c.op.start()
                c.wait_md("gpu0", settled(1, ["llm", "tts"]))
                c.kube.patch_md(c.ns, "gpu0", {"spec": {"activeModel": "sdxl"}})
                c.wait_md("gpu0", lambda o: status(o).get("observedGeneration") == 2 and status(o).get("phase") == "Failed")
                c.kube.patch_md(c.ns, "gpu0", {"spec": {"activeModel": "llm"}})
                c.wait_md("gpu0", settled(3, ["llm", "tts"]))
                c.kube.delete_md(c.ns, "gpu0")
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and (c.kube.get_md(c.ns, "gpu0") is not None or c.pods()):
                    time.sleep(0.05)
                assert c.pods() == {}
            finally:
                c.op.stop()
            c.kubelet.assert_exclusive()
        recorded, denied = set(emulator.emu.recorded), list(emulator.emu.denied)

    assert denied == [], f"refused by the chart's RBAC: {sorted(set(denied))}"
    assert [a for a in recorded if not grants.allows(a)] == []
    # Pods: only in the ModelDeployment's namespace, and there by its Role, never by the ClusterRole.
    pod_calls = {a for a in recorded if a.resource.startswith("pods")}
    assert {a.namespace for a in pod_calls} == {c.ns}, sorted(pod_calls)
    assert all(a.rule in grants.namespaced[c.ns] for a in pod_calls)
    assert not [r for r in grants.cluster if r[1].startswith("pods")], "no Pod rights cluster-wide"
    assert list(grants.namespaced) == [c.ns]
    # Nothing more: each grant was used, where it was granted, or is listed with its reason.
    cluster_used = {a.rule for a in recorded if a.rule in grants.cluster}
    role_used = {a.rule for a in recorded if a.namespace == c.ns and a.rule in grants.namespaced[c.ns]}
    assert grants.cluster - cluster_used == GRANTED_UNUSED, f"granted but never called: {sorted(grants.cluster - cluster_used)}"
    assert grants.namespaced[c.ns] - role_used == ROLE_GRANTED_UNUSED, sorted(grants.namespaced[c.ns] - role_used)
    for access in [
        Access(c.ns, "", "pods", "create"),
        Access(c.ns, "", "pods", "delete"),
        Access(c.ns, "", "pods", "watch"),
        Access(c.ns, "", "pods/log", "get"),
        Access(None, "vramctl.io", "modeldeployments", "watch"),
        Access(c.ns, "vramctl.io", "modeldeployments/status", "patch"),
    ]:
        assert access in recorded


def test_a_namespace_without_the_role_is_failed_with_what_to_grant(tmp_path: Path) -> None:
    """The chart's defaults grant Pods in the release namespace only: a
    ModelDeployment elsewhere is Failed, says which namespace to add where,
    starts nothing, and can still be deleted; with the chart value set, it runs."""
    with EmulatorThread() as emulator:
        assert emulator.emu is not None
        c = Cluster(emulator, tmp_path, clusterwide=True)
        emulator.emu.rbac = chart_grants()
        with c.kubelet, GarbageCollector(emulator):
            try:
                c.kube.create_md(c.ns, "gpu0", c.spec())
                c.kube.create_md(c.ns, "gpu1", c.spec(gpu=1))
                c.op.start()
                for name in ("gpu0", "gpu1"):
                    obj = c.wait_md(name, lambda o: status(o).get("phase") == "Failed")
                    message = status(obj)["message"]
                    assert f"forbidden to list pods in namespace {c.ns}: add {c.ns} to rbac.podNamespaces" in message, message
                    assert "manifests/rbac.yaml" in message
                    assert condition(obj, "Degraded")["status"] == "True"
                assert {(a.namespace, a.resource) for a in emulator.emu.denied} == {(c.ns, "pods")}
                assert not [a for a in emulator.emu.denied if a.verb == "create"], "nothing was tried beyond the first refusal"

                # Deleting one is not held up by the missing Role (its finalizer goes; owner references would collect Pods).
                c.kube.delete_md(c.ns, "gpu1")
                deadline = time.monotonic() + 20
                t0 = time.monotonic()
                while time.monotonic() < deadline and c.kube.get_md(c.ns, "gpu1") is not None:
                    time.sleep(0.05)
                assert c.kube.get_md(c.ns, "gpu1") is None, c.op.log_text()[-3000:]
                assert time.monotonic() - t0 < 3, "deleted at once, not after a handler retry"
                assert c.pods() == {} and c.kubelet.started == []

                emulator.emu.rbac = chart_grants({"rbac": {"podNamespaces": [NAMESPACE, c.ns]}})
                obj = c.wait_md("gpu0", settled(1, ["llm"]))
                assert condition(obj, "Degraded")["status"] == "False"
                assert sorted(c.pods()) == ["gpu0-llm"]
            finally:
                c.op.stop()
            c.kubelet.assert_exclusive()


# ---------------------------------------------------------------- the runtime


def _spec(node: str) -> DeploymentSpec:
    return DeploymentSpec.model_validate(
        {"name": "gpu0", "nodeName": node, "gpu": 0, "activeModel": "llm", "models": {"llm": {"image": "vllm/vllm-openai"}}}
    )


def test_a_forbidden_namespace_is_a_permanent_error_that_names_it() -> None:
    with EmulatorThread() as emulator:
        assert emulator.emu is not None
        emulator.emu.rbac = chart_grants()  # Pods in vramctl-system only
        api = KubeApi(lambda: kopf.ConnectionInfo(server=emulator.url))
        ns = f"f{uuid.uuid4().hex[:8]}"
        rt = PodRuntime(api, f"node-{ns}", "test", poll_s=0.02)
        try:
            rt.own(0, PodOwner(ns, "gpu0", "uid-1"))
            spec = _spec(f"node-{ns}")
            with pytest.raises(Forbidden) as observed:
                rt.observe(spec)
            assert str(observed.value).startswith(f"forbidden to list pods in namespace {ns}: add {ns} to rbac.podNamespaces")
            assert observed.value.namespace == ns and observed.value.status == 403
            c = classify(observed.value)
            assert c.kind is ErrorClass.PERMANENT and ns in c.message
            with pytest.raises(Forbidden, match=f"forbidden to get pods in namespace {ns}"):
                rt.start(spec, "llm")  # it reads the Pod before creating one
            assert rt.logs_tail(spec, "llm") == []  # a refused log read is no log, not a failure
            assert rt.pod_of_uid("some-uid") is None  # a refused namespace is skipped
            assert not rt.caches[ns].synced.is_set()  # the watch is refused too
            assert Access(None, "", "pods", "list") not in emulator.emu.recorded, "nothing is listed cluster-wide"

            emulator.emu.rbac = chart_grants({"rbac": {"podNamespaces": [ns]}})
            assert rt.observe(spec) == {}
        finally:
            rt.close()


def test_only_an_rbac_refusal_is_explained_as_a_missing_role() -> None:
    path = "/api/v1/namespaces/ai/pods"
    message = 'pods is forbidden: User "system:serviceaccount:vramctl-system:vramctl" cannot create resource "pods" in API group ""'
    for text in (message, json.dumps({"kind": "Status", "message": message})):  # a call's message; a watch's whole Status
        explained = _explained(KubeApiError(403, text), path)
        assert isinstance(explained, Forbidden) and str(explained).startswith("forbidden to create pods in namespace ai:"), text
    logs = _explained(KubeApiError(403, message.replace('resource "pods"', 'resource "pods/log"')), f"{path}/gpu0-llm/log")
    assert str(logs).startswith("forbidden to create pods/log in namespace ai:")
    # Pod Security admission and quotas answer 403 too: not a missing Role.
    admission = KubeApiError(
        403, '{"message":"pods \\"gpu0-llm\\" is forbidden: violates PodSecurity \\"baseline:latest\\": host namespaces"}'
    )
    assert _explained(admission, path) is admission
    assert _explained(KubeApiError(404, "not found"), path).status == 404


# ------------------------------------------------------------------ doctor


def test_doctor_finds_the_namespaces_where_pods_are_forbidden() -> None:
    with EmulatorThread() as emulator:
        assert emulator.emu is not None
        emulator.emu.rbac = chart_grants({"rbac": {"podNamespaces": ["ai"]}})
        kube = KubeClient(emulator.url)
        api = KubeApi(lambda: kopf.ConnectionInfo(server=emulator.url))
        md = {"activeModel": "llm", "models": {"llm": {"image": "vllm/vllm-openai"}}}
        kube.create_md("ai", "gpu0", {**md, "nodeName": "rtx5080"})
        kube.create_md("ml", "gpu1", {**md, "nodeName": "rtx5080", "gpu": 1})
        kube.create_md("other", "gpu0", {**md, "nodeName": "elsewhere"})  # another node's business

        rights = pod_rights(api, "rtx5080")
        assert rights == {"ai": (), "ml": tuple(f"{verb} {resource}" for verb, resource in POD_ACCESS)}
        assert pod_rights(api, "idle-node") == {}

    found = {c.name: c for c in kubernetes_checks(facts(pod_rights=rights))}
    check = found["pod rights"]
    assert (
        check.level == "FAIL" and "namespace ml" in check.message and "create pods" in check.message and "namespace ai" not in check.message
    )
    assert "add ml to rbac.podNamespaces" in check.fix and "manifests/rbac.yaml" in check.fix
    assert exit_code(list(found.values())) == 1
    granted = {c.name: c for c in kubernetes_checks(facts(pod_rights={"ai": ()}))}["pod rights"]
    assert granted.level == "OK" and "ai" in granted.message
    assert exit_code(kubernetes_checks(facts(pod_rights={"ai": ()}))) == 0
    idle = {c.name: c for c in kubernetes_checks(facts(pod_rights={}))}["pod rights"]
    assert idle.level == "OK" and "no ModelDeployment" in idle.message
    unknown = {c.name: c for c in kubernetes_checks(facts(pod_rights="HTTP 403: cannot list modeldeployments"))}["pod rights"]
    assert unknown.level == "WARN" and "HTTP 403" in unknown.message
