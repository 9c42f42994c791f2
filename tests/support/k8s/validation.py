"""Validate Kubernetes objects offline, each against the schema the cluster would use.

- Built-in kinds: ``kubernetes-validate`` (the API's published JSON schemas),
  strict (unknown fields are errors), for ``KUBE_VERSION``.
- ModelDeployment: the committed CRD's ``openAPIV3Schema``, translated to
  JSON Schema here (``openapi_to_jsonschema``) with the API server's strict
  field validation (unknown fields are errors), then ``.spec`` through the
  pydantic ``DeploymentSpec``, as the operator reads it.
- ServiceMonitor: no schema of it ships in a package, so ``SERVICE_MONITOR``
  is a hand-written, strict subset of monitoring.coreos.com/v1 covering the
  fields the chart sets.

``validate()`` never skips: a kind it has no schema for is an error, and it
returns what the object was checked against so tests can assert on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from vramctl.spec.crd import CRD_NAME, GROUP, KIND, VERSION
from vramctl.spec.models import DeploymentSpec

ROOT = Path(__file__).resolve().parents[3]
KUBE_VERSION = "1.30.0"
CRD_FILE = ROOT / "manifests" / "crds" / f"{CRD_NAME}.yaml"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def openapi_to_jsonschema(node: Mapping[str, Any]) -> dict[str, Any]:
    """A structural OpenAPI v3.0 schema as JSON Schema (draft 2020-12).

    ``nullable`` becomes a ``null`` type, boolean ``exclusiveMinimum`` the
    numeric form, int-or-string an ``anyOf``; an object with properties and no
    ``x-kubernetes-preserve-unknown-fields`` rejects unknown fields (what
    ``kubectl apply`` does with its default ``--validate=strict``).
    ``x-kubernetes-list-type`` (uniqueness of set/map keys) is not checked.
    """
    out: dict[str, Any] = {}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    typ = node.get("type")
    if typ is not None:
        out["type"] = [typ, "null"] if node.get("nullable") else typ
    if "enum" in node:
        out["enum"] = [*node["enum"], *([None] if node.get("nullable") else [])]
    for key in ("pattern", "format", "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        if key in node:
            out[key] = node[key]
    for key, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if key in node:
            out[flag if node.get(flag) else key] = node[key]
    if "properties" in node:
        out["properties"] = {k: openapi_to_jsonschema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "additionalProperties" in node:
        out["additionalProperties"] = openapi_to_jsonschema(node["additionalProperties"])
    if "required" in node:
        out["required"] = list(node["required"])
    if "items" in node:
        out["items"] = openapi_to_jsonschema(node["items"])
    return out


def crd_object() -> dict[str, Any]:
    docs = load_yaml_docs(CRD_FILE.read_text())
    assert len(docs) == 1, f"{CRD_FILE} should hold one object"
    return docs[0]


def crd_validator(crd: Mapping[str, Any] | None = None) -> jsonschema.protocols.Validator:
    crd = crd or crd_object()
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def crd_errors(obj: Mapping[str, Any], crd: Mapping[str, Any] | None = None) -> list[str]:
    """Every schema violation of a ModelDeployment, as 'path: message'."""
    errors = sorted(crd_validator(crd).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]


_NAME = {"type": "string", "pattern": DNS_SUBDOMAIN.pattern}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 0},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                *(a for b in ("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep") for a in (b, b.capitalize())),
                "lowercase",
                "Lowercase",
                "uppercase",
                "Uppercase",
                "keepequal",
                "KeepEqual",
                "dropequal",
                "DropEqual",
            ]
        },
    },
}
SERVICE_MONITOR: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": _NAME, "namespace": _NAME, "labels": _STRING_MAP, "annotations": _STRING_MAP},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRING_MAP, "matchExpressions": {"type": "array"}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        },
                    },
                },
            },
        },
    },
}


def validate(obj: Mapping[str, Any]) -> str:
    """Raise AssertionError unless ``obj`` is valid; return what it was checked against."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    name = (obj.get("metadata") or {}).get("name", "?")
    what = f"{kind} {name}"
    if api_version == f"{GROUP}/{VERSION}" and kind == KIND:
        assert DNS_SUBDOMAIN.match(name), f"{what}: metadata.name is not a DNS subdomain"
        errors = crd_errors(obj)
        assert not errors, f"{what} does not match the CRD schema:\n  " + "\n  ".join(errors)
        DeploymentSpec.model_validate(obj["spec"])
        return "crd+pydantic"
    if api_version == "monitoring.coreos.com/v1" and kind == "ServiceMonitor":
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft202012Validator(SERVICE_MONITOR).iter_errors(obj)
        ]
        assert not errors, f"{what} does not match the ServiceMonitor schema:\n  " + "\n  ".join(errors)
        return "servicemonitor-subset"
    try:
        kubernetes_validate.validate(dict(obj), KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(map(str, err.path))
        raise AssertionError(f"{what} is not valid for Kubernetes {KUBE_VERSION}: {path}: {err.message}") from None
    except kubernetes_validate.SchemaNotFoundError as err:
        raise AssertionError(f"{what}: no schema to validate it against ({err.message})") from None
    return f"kubernetes-{KUBE_VERSION}"
