"""The ModelDeployment CRD: generated from vramctl.spec.models, committed twice,
structural, and as strict as the pydantic models where Kubernetes can say it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.support.k8s.validation import ROOT, crd_errors, crd_object, load_yaml_docs, validate
from vramctl.spec import crd as crdgen
from vramctl.spec.models import DeploymentSpec


@pytest.fixture(scope="module")
def generated() -> str:
    return crdgen.render()


@pytest.mark.parametrize("path", crdgen.COMMITTED_PATHS)
def test_committed_crd_matches_the_generated_one(generated: str, path: str) -> None:
    committed = ROOT / path
    assert committed.is_file(), f"{path} is missing: run {crdgen.REGENERATE}"
    assert committed.read_text() == generated, f"{path} differs from the CRD generated from vramctl.spec.models: run {crdgen.REGENERATE}"


def test_check_mode_names_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], generated: str) -> None:
    good, stale = tmp_path / "good.yaml", tmp_path / "stale.yaml"
    assert crdgen.main(["-o", str(good)]) == 0
    assert good.read_text() == generated
    stale.write_text(generated.replace("md", "mdx", 1))
    assert crdgen.main(["--check", "-o", str(good)]) == 0
    assert crdgen.main(["--check", "-o", str(good), "-o", str(stale)]) == 1
    err = capsys.readouterr().err
    assert str(stale) in err and "make crd" in err and str(good) not in err


def test_crd_shape() -> None:
    crd = crd_object()
    assert validate(crd) == "kubernetes-1.30.0"
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "modeldeployments.vramctl.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["md"] and spec["names"]["kind"] == "ModelDeployment"
    (v,) = spec["versions"]
    assert (v["name"], v["served"], v["storage"], v["subresources"]) == ("v1alpha1", True, True, {"status": {}})
    columns = {c["name"].upper(): (c["jsonPath"], c.get("priority", 0)) for c in v["additionalPrinterColumns"]}
    assert columns["ACTIVE"] == (".status.activeModel", 0)
    assert columns["PHASE"] == (".status.phase", 0)
    assert columns["VRAM"] == (".status.gpu.usedMiB", 0)
    assert columns["MODELS"] == (".status.models", 0)  # each model's state: 'llm:running sdxl:asleep'
    assert columns["AGE"] == (".metadata.creationTimestamp", 0)
    assert [c["name"].upper() for c in v["additionalPrinterColumns"]][:5] == ["ACTIVE", "PHASE", "VRAM", "MODELS", "AGE"]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for k, sub in node.get("properties", {}).items():
            out += _walk(sub, f"{path}.{k}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                out += _walk(node[key], f"{path}.{key}")
    return out


def test_schema_is_structural() -> None:
    (v,) = crd_object()["spec"]["versions"]
    for path, node in _walk(v["schema"]["openAPIV3Schema"]):
        forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "const", "title", "uniqueItems", "discriminator"} & set(node)
        assert not forbidden, f"{path or '(root)'} has {forbidden}: not structural"
        assert "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields"), (
            f"{path or '(root)'} has no type"
        )
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: properties and additionalProperties"
        if node.get("default") is not None:
            assert node.get("type") != "object" or isinstance(node["default"], dict)
    preserved = [p for p, n in _walk(v["schema"]["openAPIV3Schema"]) if n.get("x-kubernetes-preserve-unknown-fields")]
    assert preserved == [".properties.status.kopf".replace(".properties", "")], preserved


def test_spec_schema_follows_the_pydantic_model() -> None:
    (v,) = crd_object()["spec"]["versions"]
    spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]
    fields = {f.alias or name for name, f in DeploymentSpec.model_fields.items()} - set(crdgen.EXCLUDED_SPEC_FIELDS)
    assert set(spec["properties"]) == fields
    assert "name" not in spec["properties"], "a ModelDeployment is named by metadata.name"
    assert spec["required"] == ["models"]
    models = spec["properties"]["models"]
    assert models["type"] == "object" and models["minProperties"] == 1
    model = models["additionalProperties"]
    assert model["properties"]["class"]["enum"] == ["heavy", "light"]
    assert model["properties"]["class"]["default"] == "heavy"
    assert spec["properties"]["env"]["additionalProperties"] == {"type": "string"}
    assert spec["properties"]["activeModel"]["nullable"] is True
    port = model["properties"]["health"]["properties"]["port"]
    assert (port["minimum"], port["maximum"], port["nullable"]) == (1, 65535, True)
    timeout = model["properties"]["startTimeoutSeconds"]
    assert (timeout["minimum"], timeout["exclusiveMinimum"]) == (0, True)
    assert all("description" in p for p in spec["properties"].values())


def _md(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"models": {"llm": {"image": "vllm/vllm-openai:v0.11.2", "health": {"path": "/health", "port": 8000}}}}
    return {"apiVersion": "vramctl.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "gpu0"}, "spec": {**base, **spec}}


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda o: o["spec"].update(vramBudgetMib=100), "spec"),  # misspelt field
        (lambda o: o["spec"]["models"]["llm"].update({"class": "medium"}), "spec.models.llm.class"),
        (lambda o: o["spec"]["models"]["llm"]["health"].update(port=70000), "spec.models.llm.health.port"),
        (lambda o: o["spec"]["models"]["llm"].update(startTimeoutSeconds=0), "spec.models.llm.startTimeoutSeconds"),
        (lambda o: o["spec"].update(models={}), "spec.models"),
        (lambda o: o["spec"].update(gpu=64), "spec.gpu"),
        (lambda o: o["spec"].update(env={"A": 1}), "spec.env.A"),
        (lambda o: o.pop("spec"), "(root)"),
        (lambda o: o["spec"].update(name="compose-only"), "spec"),
    ],
)
def test_schema_rejects_what_pydantic_rejects(change: Any, where: str) -> None:
    obj = _md()
    assert crd_errors(obj) == []
    change(obj)
    errors = crd_errors(obj)
    assert errors and errors[0].startswith(where + ":"), errors


def test_schema_accepts_nulls_and_defaults_pydantic_accepts() -> None:
    obj = _md(activeModel=None, nodeName=None, vramBudgetMiB=None)
    obj["spec"]["models"]["llm"].update(vramMiB=None, command=None, stop={"signal": "SIGINT"})
    assert crd_errors(obj) == []
    DeploymentSpec.model_validate(obj["spec"])


def _status() -> dict[str, Any]:
    return {
        "phase": "Ready",
        "message": "llm ready",
        "nodeName": "rtx5080",
        "activeModel": "llm",
        "companions": [],
        "runningModels": ["llm"],
        "observedGeneration": 3,
        "conditions": [
            {
                "type": t,
                "status": s,
                "reason": "ModelReady",
                "message": "llm ready",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
                "observedGeneration": 3,
            }
            for t, s in (("Ready", "True"), ("Progressing", "False"), ("Degraded", "False"))
        ],
        "gpu": {"uuid": "GPU-0000", "name": "NVIDIA GeForce RTX 5080", "totalMiB": 16303, "usedMiB": 13900},
        "lastSwitch": {
            "from": None,
            "to": "llm",
            "durationSeconds": 21.4,
            "outcome": "success",
            "finishedAt": "2026-01-02T03:04:05Z",
            "generation": 3,
        },
        "kopf": {"progress": {"anything": {"goes": 1}}},
    }


def test_status_schema_takes_what_the_operator_writes() -> None:
    obj = _md()
    obj["status"] = _status()
    assert crd_errors(obj) == []
    bad = copy.deepcopy(obj)
    bad["status"]["phase"] = "Running"
    assert crd_errors(bad)[0].startswith("status.phase:")
    bad = copy.deepcopy(obj)
    bad["status"]["conditions"][0]["reason"] = "not camel case"
    assert crd_errors(bad)[0].startswith("status.conditions.0.reason:")
    # The supervisor's own status() carries `gpu` as the GPU's index: the
    # CRD's status.gpu is an object, so it cannot be copied over wholesale.
    bad = copy.deepcopy(obj)
    bad["status"]["gpu"] = 0
    assert crd_errors(bad)[0].startswith("status.gpu:")


def test_phases_are_the_supervisors() -> None:
    (v,) = crd_object()["spec"]["versions"]
    phase = v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]
    assert phase["enum"] == ["Idle", "Switching", "Ready", "Blocked", "Failed", "Unknown"]


def test_committed_crd_is_one_document() -> None:
    for path in crdgen.COMMITTED_PATHS:
        assert len(load_yaml_docs((ROOT / path).read_text())) == 1
