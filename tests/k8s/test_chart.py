"""charts/vramctl rendered and linted by Helm's Go SDK (helm-python-sdk), every
rendered object validated, and the chart kept in step with manifests/."""

from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Any

import helm_python as helm
import pytest

from tests.support.k8s.chart import CHART_DIR, NAMESPACE, RELEASE, chart, manifest_objects, render
from tests.support.k8s.rbac import EXPECTED_RULES, POD_RULES, grants_of, rules_of
from tests.support.k8s.validation import ROOT, load_yaml_docs, validate
from vramctl.spec.crd import COMMITTED_PATHS, REGENERATE


def _example_spec(name: str) -> dict[str, Any]:
    (doc,) = load_yaml_docs((ROOT / "manifests" / "examples" / name).read_text())
    spec: dict[str, Any] = doc["spec"]
    return spec


FULL: dict[str, Any] = {
    "namespace": {"create": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "30s"},
    "dashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "GPU"}},
    "priorityClassName": "system-node-critical",
    "podAnnotations": {"example.com/team": "ml"},
    "imagePullSecrets": [{"name": "regcred"}],
    "modelDeployments": [
        {"name": "rtx5080-gpu0", "namespace": "ai", "spec": _example_spec("rtx5080-16gb.yaml")},
        {"name": "rtx3050-gpu0", "labels": {"example.com/card": "rtx3050"}, "spec": _example_spec("rtx3050-8gb.yaml")},
    ],
}


def _checked(objects: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((o["kind"], validate(o)) for o in objects)


K8S = "kubernetes-1.30.0"


def test_default_values_render_valid_objects() -> None:
    rendered = render()
    assert _checked(rendered.objects) == Counter(
        {
            ("ServiceAccount", K8S): 1,
            ("ClusterRole", K8S): 1,
            ("ClusterRoleBinding", K8S): 1,
            ("Role", K8S): 1,
            ("RoleBinding", K8S): 1,
            ("Secret", K8S): 1,
            ("DaemonSet", K8S): 1,
            ("Service", K8S): 1,
        }
    )
    assert "kubectl get md -A" in rendered.notes
    assert f"Model Pods may run in namespaces: {NAMESPACE}" in rendered.notes
    assert "rbac.podNamespaces" in rendered.notes and "vramctl doctor --kubernetes" in rendered.notes


def test_full_values_render_valid_objects() -> None:
    rendered = render(FULL)
    assert _checked(rendered.objects) == Counter(
        {
            ("Namespace", K8S): 1,
            ("ServiceAccount", K8S): 1,
            ("ClusterRole", K8S): 1,
            ("ClusterRoleBinding", K8S): 1,
            ("Role", K8S): 2,  # the namespaces of the two ModelDeployments
            ("RoleBinding", K8S): 2,
            ("Secret", K8S): 1,
            ("DaemonSet", K8S): 1,
            ("Service", K8S): 1,
            ("ConfigMap", K8S): 1,
            ("ServiceMonitor", "servicemonitor-subset"): 1,
            ("ModelDeployment", "crd+pydantic"): 2,
        }
    )
    assert rendered.one("Namespace")["metadata"]["name"] == NAMESPACE
    mds = {o["metadata"]["name"]: o for o in rendered.of("ModelDeployment")}
    assert mds["rtx5080-gpu0"]["metadata"]["namespace"] == "ai"
    assert mds["rtx3050-gpu0"]["metadata"]["namespace"] == NAMESPACE
    assert mds["rtx3050-gpu0"]["metadata"]["labels"]["example.com/card"] == "rtx3050"
    assert mds["rtx5080-gpu0"]["spec"] == _example_spec("rtx5080-16gb.yaml"), "the spec goes through the chart unchanged"
    assert "ServiceMonitor" in rendered.notes and "Grafana dashboard" in rendered.notes


@pytest.mark.parametrize("values", [None, FULL], ids=["default", "full"])
def test_lint(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_dashboard_configmap_carries_the_dashboard_file() -> None:
    cm = render(FULL).one("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "GPU"}
    text = (CHART_DIR / "dashboards" / "vramctl.json").read_text()
    assert cm["data"]["vramctl.json"] == text.rstrip("\n")
    json.loads(cm["data"]["vramctl.json"])


def test_servicemonitor_scrapes_the_metrics_service() -> None:
    rendered = render(FULL)
    sm, svc = rendered.one("ServiceMonitor"), rendered.one("Service")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = sm["spec"]["endpoints"]
    assert (ep["port"], ep["path"], ep["interval"]) == ("metrics", "/metrics", "30s")
    assert [p["name"] for p in svc["spec"]["ports"]] == ["metrics"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": "9400"}, "/port"),
        ({"serviceMonitor": {"enabled": True, "intervall": "30s"}}, "intervall"),
        ({"serviceMonitor": {"interval": "half a minute"}}, "/serviceMonitor/interval"),
        ({"image": {"repository": "vramctl/vramctl", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"modelDeployments": [{"name": "gpu0"}]}, "spec"),
        ({"modelDeployments": [{"name": "GPU_0", "spec": {"models": {"llm": {"image": "x"}}}}]}, "/modelDeployments/0/name"),
        ({"modelDeployment": []}, "modelDeployment"),
        ({"runtime": "containerd"}, "/runtime"),
        ({"podGpu": "all"}, "/podGpu"),
        ({"rbac": {"podNamespaces": ["AI_models"]}}, "/rbac/podNamespaces/0"),
        ({"rbac": {"podNamespaces": ["ai", "ai"]}}, "/rbac/podNamespaces"),
        ({"rbac": {"podNamespaces": "ai"}}, "/rbac/podNamespaces"),
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        chart().validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_values_schema_accepts_the_defaults_and_the_full_set() -> None:
    chart().validate_schema(None)
    chart().validate_schema(FULL)


def test_existing_token_secret_is_used_and_none_is_created() -> None:
    rendered = render({"apiToken": {"existingSecret": "my-token", "secretKey": "bearer"}})
    assert rendered.of("Secret") == []
    (c,) = rendered.one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    (token,) = [e for e in c["env"] if e["name"] == "VRAMCTL_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "my-token", "key": "bearer"}


def test_chart_crd_is_the_generated_one() -> None:
    crds = chart().crds
    assert [c["filename"] for c in crds] == ["vramctl/crds/modeldeployments.vramctl.io.yaml"]
    (manifest_crd, chart_crd) = (ROOT / p for p in COMMITTED_PATHS)
    assert chart_crd.read_text() == manifest_crd.read_text(), f"the chart's CRD differs from manifests/: run {REGENERATE}"
    assert load_yaml_docs(crds[0]["data"]) == load_yaml_docs(manifest_crd.read_text())


# ------------------------------------------------------- chart == manifests


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for o in objects:
        assert o["kind"] not in out, f"two {o['kind']} objects"
        out[o["kind"]] = o
    return out


def _without_labels(obj: dict[str, Any]) -> dict[str, Any]:
    """The object less what only Helm adds (chart/version/managed-by labels)."""
    obj = copy.deepcopy(obj)
    obj["metadata"].pop("labels", None)
    if obj["kind"] == "DaemonSet":
        obj["spec"]["template"]["metadata"].pop("labels")
    return obj


def test_chart_defaults_match_the_manifests() -> None:
    chart_objs = _by_kind(render({"namespace": {"create": True}}).objects)
    plain = _by_kind(manifest_objects())
    plain.pop("CustomResourceDefinition")  # the chart ships it under crds/ (test above)
    chart_objs.pop("Secret")  # the manifests ask the user to create it (daemonset.yaml)
    assert set(chart_objs) == set(plain)
    for kind, obj in plain.items():
        assert _without_labels(chart_objs[kind]) == _without_labels(obj), f"{kind}: charts/vramctl and manifests/ differ"
    assert chart_objs["ClusterRole"]["rules"] == EXPECTED_RULES
    assert chart_objs["Role"]["rules"] == POD_RULES
    # Selector labels are the same, so either can take over the other's pods.
    assert chart_objs["DaemonSet"]["spec"]["selector"] == plain["DaemonSet"]["spec"]["selector"]
    assert chart_objs["Service"]["spec"]["selector"] == plain["Service"]["spec"]["selector"]


def test_runtime_docker_mounts_the_socket_runs_as_root_and_needs_no_pod_rights() -> None:
    rendered = render({"runtime": "docker"})
    pod = rendered.one("DaemonSet")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "--runtime=docker" in c["args"] and not [a for a in c["args"] if a.startswith("--pod-gpu")]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["docker-sock"]["hostPath"] == {"path": "/var/run/docker.sock", "type": "Socket"}
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/var/run/docker.sock"] == "docker-sock"
    sc = c["securityContext"]
    assert (sc["runAsUser"], sc["runAsNonRoot"]) == (0, False)
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}  # the rest stays locked down
    assert rendered.one("ClusterRole")["rules"] == EXPECTED_RULES
    assert rendered.of("Role") == rendered.of("RoleBinding") == []
    assert grants_of(rendered.objects, NAMESPACE, RELEASE).namespaced == {}
    assert "Model Pods may run" not in rendered.notes
    assert _checked(rendered.objects)["DaemonSet", K8S] == 1


@pytest.mark.parametrize("mode", ["runtimeClass", "resource", "none"])
def test_pod_gpu_mode_reaches_the_operator(mode: str) -> None:
    (c,) = render({"podGpu": mode, "modelRuntimeClass": "nvidia-cdi"}).one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert f"--pod-gpu={mode}" in c["args"] and "--runtime-class=nvidia-cdi" in c["args"]


_MD = {"nodeName": "n", "activeModel": "llm", "models": {"llm": {"image": "vllm/vllm-openai"}}}


@pytest.mark.parametrize(
    ("values", "namespaces"),
    [
        (None, [NAMESPACE]),  # empty: the release namespace
        ({"rbac": {"podNamespaces": ["ml", "ai"]}}, ["ai", "ml"]),
        (FULL, ["ai", NAMESPACE]),  # the release's own ModelDeployments: ai, and the release namespace
        (
            {"rbac": {"podNamespaces": ["ml"]}, "modelDeployments": [{"name": "gpu0", "namespace": "ai", "spec": _MD}]},
            ["ai", "ml"],
        ),
        ({"rbac": {"podNamespaces": ["ml"]}, "modelDeployments": [{"name": "gpu0", "spec": _MD}]}, ["ml", NAMESPACE]),
        ({"rbac": {"create": False}}, []),
        ({"runtime": "docker", "rbac": {"podNamespaces": ["ai"]}}, []),
    ],
    ids=["default", "listed", "full", "listed+md", "listed+md-in-release-ns", "no-rbac", "docker"],
)
def test_pod_rights_are_a_role_in_each_pod_namespace_and_nowhere_else(values: dict[str, Any] | None, namespaces: list[str]) -> None:
    rendered = render(values)
    roles, bindings = rendered.of("Role"), rendered.of("RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
    assert sorted(b["metadata"]["namespace"] for b in bindings) == namespaces
    for role in roles:
        assert role["rules"] == POD_RULES
        assert _checked([role]) == Counter({("Role", K8S): 1})
    for b in bindings:
        (role,) = [r for r in roles if r["metadata"]["namespace"] == b["metadata"]["namespace"]]
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    grants = grants_of(rendered.objects, NAMESPACE, RELEASE)
    assert sorted(grants.namespaced) == namespaces
    assert not [r for r in grants.cluster if r[1].startswith("pods")], "no Pod rights cluster-wide"
    if (values or {}).get("rbac", {}).get("create", True):
        assert grants.cluster == rules_of(rendered.one("ClusterRole"))
    if namespaces:
        assert f"Model Pods may run in namespaces: {', '.join(namespaces)}" in rendered.notes
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def _container(values: dict[str, Any] | None) -> dict[str, Any]:
    (c,) = render(values).one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


def _env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in c["env"]}


def test_checkpoint_rights_are_off_by_default() -> None:
    c = _container(None)
    assert _env(c)["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]} and c["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("runtime", ["kubernetes", "docker"])
def test_checkpoint_enabled_adds_ptrace_root_and_the_cuda_library_and_nothing_else(runtime: str) -> None:
    rendered = render({"runtime": runtime, "checkpoint": {"enabled": True}})
    pod = rendered.one("DaemonSet")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["hostPID"] is True
    assert _env(c)["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    sc = c["securityContext"]
    assert (sc["runAsUser"], sc["runAsNonRoot"], sc["privileged"], sc["allowPrivilegeEscalation"]) == (0, False, False, False)
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]} and sc["readOnlyRootFilesystem"] is True
    # The rest of the pod is what the runtime needs without checkpoints.
    plain = render({"runtime": runtime}).one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["volumes"] == plain["volumes"] and c["args"] == plain["containers"][0]["args"]
    assert _checked(rendered.objects)["DaemonSet", K8S] == 1


def test_checkpoint_without_host_pid_is_refused_naming_the_fix() -> None:
    with pytest.raises(Exception, match=r"checkpoint.enabled needs hostPID: true"):
        render({"checkpoint": {"enabled": True}, "hostPID": False})


def test_values_schema_rejects_a_misspelt_checkpoint_key() -> None:
    with pytest.raises(helm.HelmValuesError, match="enable"):
        chart().validate_schema({"checkpoint": {"enable": True}})
