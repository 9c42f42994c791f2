"""manifests/: every object valid for Kubernetes, the DaemonSet wired the way
the operator expects, and RBAC no wider than what vramctl and kopf use."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.support.k8s.chart import MANIFESTS, manifest_objects
from tests.support.k8s.rbac import EXPECTED_RULES, POD_RULES, grants_of, rules_of
from tests.support.k8s.validation import load_yaml_docs, validate

POD_NAMESPACE_RBAC = "pod-namespace/rbac.yaml"


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml_docs((MANIFESTS / "kustomization.yaml").read_text())[0]
    listed = set(kustomization["resources"])
    on_disk = {str(p.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("*.yaml")} - {"kustomization.yaml"}
    # Applied by hand: the examples, and the Pod runtime's Role for each further namespace.
    by_hand = {p for p in on_disk if p.startswith(("examples/", "pod-namespace/"))}
    assert by_hand >= {POD_NAMESPACE_RBAC}
    assert listed == on_disk - by_hand, "manifests/kustomization.yaml and the files in manifests/ differ"


def test_every_object_validates() -> None:
    objects = manifest_objects()
    checked = Counter((o["kind"], validate(o)) for o in objects)
    assert checked == Counter(
        {
            ("Namespace", "kubernetes-1.30.0"): 1,
            ("CustomResourceDefinition", "kubernetes-1.30.0"): 1,
            ("ServiceAccount", "kubernetes-1.30.0"): 1,
            ("ClusterRole", "kubernetes-1.30.0"): 1,
            ("ClusterRoleBinding", "kubernetes-1.30.0"): 1,
            ("Role", "kubernetes-1.30.0"): 1,
            ("RoleBinding", "kubernetes-1.30.0"): 1,
            ("DaemonSet", "kubernetes-1.30.0"): 1,
            ("Service", "kubernetes-1.30.0"): 1,
        }
    )
    namespaced = [o for o in objects if o["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"vramctl-system"}


def test_the_validator_is_strict() -> None:
    ds = _one(manifest_objects(), "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/healthz"}
    try:
        validate(ds)
    except AssertionError as err:
        assert "httpGett" in str(err)
    else:
        raise AssertionError("an unknown field passed kubernetes-validate")


def test_daemonset_is_wired_for_the_operator() -> None:
    ds = _one(manifest_objects(), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "vramctl/vramctl:0.1.0"
    assert c["args"][0] == "operator" and "--listen=0.0.0.0:9400" in c["args"] and "--runtime=kubernetes" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["VRAMCTL_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "vramctl-api-token", "key": "token"}
    assert c["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["hostPID"] is True and pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    # The Pod runtime: no Docker socket, no root.
    assert not [v for v in pod["volumes"] if "hostPath" in v], "no host paths (no Docker socket)"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "/var/run/docker.sock" not in mounts and "/tmp" in mounts
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"], "vramctl observes the GPU; the model containers use it"
    sa = _one(manifest_objects(), "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


def test_service_selects_the_daemonset() -> None:
    objects = manifest_objects()
    svc, ds = _one(objects, "Service"), _one(objects, "DaemonSet")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9400, "targetPort": "metrics", "protocol": "TCP"}]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_rbac_is_least_privilege() -> None:
    objects = manifest_objects()
    cluster_role, cluster_binding = _one(objects, "ClusterRole"), _one(objects, "ClusterRoleBinding")
    role, binding, sa = _one(objects, "Role"), _one(objects, "RoleBinding"), _one(objects, "ServiceAccount")
    subject = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    assert cluster_role["rules"] == EXPECTED_RULES
    assert role["rules"] == POD_RULES
    for rules in (rules_of(cluster_role), rules_of(role)):
        assert not [x for x in rules if x[1] in ("secrets", "nodes", "namespaces", "configmaps")]
        assert not [x for x in rules if x[2] in ("deletecollection", "escalate", "bind", "impersonate")]
    assert not [x for x in rules_of(cluster_role) if x[1].startswith("pods")], "no Pod rights cluster-wide"
    assert [x for x in rules_of(role) | rules_of(cluster_role) if x[2] == "delete"] == [("", "pods", "delete")], (
        "only the Pod runtime deletes, and only Pods"
    )
    assert cluster_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": cluster_role["metadata"]["name"],
    }
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert cluster_binding["subjects"] == binding["subjects"] == [subject]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == sa["metadata"]["namespace"]
    grants = grants_of(objects, sa["metadata"]["namespace"], sa["metadata"]["name"])
    assert grants.cluster == rules_of(cluster_role)
    assert dict(grants.namespaced) == {"vramctl-system": rules_of(role)}, "Pods only in vramctl-system, through the Role"


def test_the_role_for_another_namespace_is_the_one_of_rbac_yaml_without_its_namespace() -> None:
    """manifests/pod-namespace/rbac.yaml, applied with ``kubectl -n <ns>``: the
    Role and RoleBinding of manifests/rbac.yaml, in whichever namespace."""
    extra = load_yaml_docs((MANIFESTS / POD_NAMESPACE_RBAC).read_text())
    assert [o["kind"] for o in extra] == ["Role", "RoleBinding"]
    objects = manifest_objects()
    for obj in extra:
        assert validate(obj) == "kubernetes-1.30.0"
        assert "namespace" not in obj["metadata"], "kubectl -n decides"
        same = _one(objects, obj["kind"])
        assert {**same, "metadata": {k: v for k, v in same["metadata"].items() if k != "namespace"}} == obj
    # Applied into `ai`, it grants vramctl's service account the Pods there, as the chart does with rbac.podNamespaces: [ai].
    sa = _one(objects, "ServiceAccount")["metadata"]
    in_ai = [{**o, "metadata": {**o["metadata"], "namespace": "ai"}} for o in extra]
    grants = grants_of(objects + in_ai, sa["namespace"], sa["name"])
    assert grants.namespaced["ai"] == grants.namespaced["vramctl-system"] == rules_of(_one(objects, "Role"))
