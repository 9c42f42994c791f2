"""The ModelDeployment CRD, generated from ``vramctl.spec.models.DeploymentSpec``.

Why generated: the pydantic models are the one description of a GPU's spec
(the compose-mode file and the custom resource share it). Writing the CRD's
OpenAPI schema by hand would let the two drift; instead the schema is derived
here and the committed copies are checked by a test (KubeAI's ``make
manifests``). Regenerate after changing ``vramctl.spec.models``::

    make crd
    # or: python -m vramctl.spec.crd -o manifests/crds/modeldeployments.vramctl.io.yaml \\
    #                           -o charts/vramctl/crds/modeldeployments.vramctl.io.yaml
    # or: python -m vramctl.spec.crd > manifests/crds/modeldeployments.vramctl.io.yaml

Kubernetes accepts only a *structural* schema (OpenAPI v3.0 subset): every
node has a type, there are no ``$ref``/``$defs``, ``anyOf`` may not carry the
types, ``nullable: true`` replaces a ``null`` alternative, maps are
``additionalProperties``, ``exclusiveMinimum`` is a boolean beside
``minimum``, ``uniqueItems`` is not allowed. ``structural()`` performs that
conversion. It is deliberately lossy where Kubernetes cannot express a
constraint (cross-field rules, patterns on map keys): the operator validates
every ``.spec`` with the same pydantic models and reports what fails in the
status, so the CRD schema only needs to catch what it can, early.

The status schema is written here by hand: it describes what the operator
writes (the supervisor's phase, conditions shaped like ``metav1.Condition``,
the GPU's memory, the last switch), not user input.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from vramctl.spec.models import DeploymentSpec
from vramctl.status.book import PHASE_BLOCKED, PHASE_FAILED, PHASE_IDLE, PHASE_READY, PHASE_SWITCHING, PHASE_UNKNOWN

GROUP = "vramctl.io"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ("md",)
CRD_NAME = f"{PLURAL}.{GROUP}"
PHASES = (PHASE_IDLE, PHASE_SWITCHING, PHASE_READY, PHASE_BLOCKED, PHASE_FAILED, PHASE_UNKNOWN)

# Where the generated CRD is committed, relative to the repository root.
COMMITTED_PATHS = (
    f"manifests/crds/{CRD_NAME}.yaml",
    f"charts/vramctl/crds/{CRD_NAME}.yaml",
)
REGENERATE = "make crd  (or: python -m vramctl.spec.crd " + " ".join(f"-o {p}" for p in COMMITTED_PATHS) + ")"

# DeploymentSpec fields that are not part of the custom resource's spec:
# compose mode names a GPU with `name`; a ModelDeployment uses metadata.name.
EXCLUDED_SPEC_FIELDS = ("name",)

# Formats the Kubernetes API server knows; others are dropped (pydantic emits
# e.g. "path" for pathlib.Path, which Kubernetes would ignore at best).
_K8S_FORMATS = frozenset(
    {
        "bsonobjectid",
        "uri",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "cidr",
        "mac",
        "uuid",
        "uuid3",
        "uuid4",
        "uuid5",
        "isbn",
        "isbn10",
        "isbn13",
        "creditcard",
        "ssn",
        "hexcolor",
        "rgbcolor",
        "byte",
        "password",
        "date",
        "duration",
        "datetime",
        "date-time",
        "int32",
        "int64",
        "float",
        "double",
    }
)
# Keywords copied as they are when present on a node.
_COPIED = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "multipleOf")
# Regex features RE2 (the API server's pattern engine) lacks: such patterns are dropped.
_NON_RE2 = ("(?=", "(?!", "(?<=", "(?<!", "(?P=", "\\1", "\\2")


class SchemaError(ValueError):
    """The pydantic schema has a shape no structural schema can express."""


# ------------------------------------------------------------ conversion


def structural(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a pydantic JSON schema (draft 2020-12, with ``$defs``) to a
    Kubernetes structural OpenAPI v3 schema.

    Promises: no ``$ref``, ``$defs``, ``anyOf``/``oneOf``/``allOf``, ``title``,
    ``const`` or ``uniqueItems`` in the result; every node has a ``type``
    unless it carries ``x-kubernetes-int-or-string`` or
    ``x-kubernetes-preserve-unknown-fields``. Raises SchemaError for a
    recursive model (a CRD schema cannot recurse) or a ``$ref`` that does not
    resolve.
    """
    defs = dict(schema.get("$defs", {}))
    root = {k: v for k, v in schema.items() if k != "$defs"}
    return _convert(root, defs, (), "")


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any], stack: tuple[str, ...], path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Inline ``$ref`` (repeatedly); the referring node's own keys win."""
    out = dict(node)
    while "$ref" in out:
        ref = str(out.pop("$ref"))
        if not ref.startswith("#/$defs/"):
            raise SchemaError(f"{path or '(root)'}: cannot resolve $ref {ref!r}")
        name = ref.removeprefix("#/$defs/")
        if name not in defs:
            raise SchemaError(f"{path or '(root)'}: $ref {ref!r} names no definition")
        if name in stack:
            raise SchemaError(f"{path or '(root)'}: {name} contains itself; a CRD schema cannot be recursive")
        stack = (*stack, name)
        out = {**defs[name], **out}
    return out, stack


def _convert(node: Mapping[str, Any], defs: Mapping[str, Any], stack: tuple[str, ...], path: str) -> dict[str, Any]:
    node, stack = _resolve(node, defs, stack, path)

    if "allOf" in node:
        parts = [_resolve(p, defs, stack, path)[0] for p in node["allOf"]]
        merged: dict[str, Any] = {}
        for p in parts:
            for k, v in p.items():
                if k == "properties":
                    merged.setdefault("properties", {}).update(v)
                elif k == "required":
                    merged["required"] = [*merged.get("required", []), *v]
                else:
                    merged[k] = v
        rest = {k: v for k, v in node.items() if k != "allOf"}
        return _convert({**merged, **rest}, defs, stack, path)

    nullable = False
    types = node.get("type")
    if isinstance(types, list):  # ["string", "null"]
        nullable = "null" in types
        kept = [t for t in types if t != "null"]
        rest = {k: v for k, v in node.items() if k != "type"}
        node = {**rest, "type": kept[0]} if len(kept) == 1 else {**rest, "anyOf": [{"type": t} for t in kept]}

    out: dict[str, Any]
    alternatives = node.get("anyOf", node.get("oneOf"))
    if alternatives is not None:
        real = [a for a in alternatives if a.get("type") != "null"]
        nullable = nullable or len(real) != len(alternatives)
        converted = [_convert(a, defs, stack, path) for a in real]
        out = _union(converted, path)
        if len(converted) > 1:
            out.pop("description", None)  # the alternatives' own docstrings say nothing about this field
        out.pop("default", None)
    else:
        out = _convert_plain(node, defs, stack, path)

    if "description" in node:
        out = {"description": _clean(str(node["description"])), **{k: v for k, v in out.items() if k != "description"}}
    if node.get("default") is not None:
        out["default"] = node["default"]
    if nullable:
        out["nullable"] = True
    return out


def _convert_plain(node: Mapping[str, Any], defs: Mapping[str, Any], stack: tuple[str, ...], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    typ = node.get("type")
    if "const" in node:
        out["enum"] = [node["const"]]
        typ = typ or _json_type(node["const"])
    elif "enum" in node:
        out["enum"] = [e for e in node["enum"] if e is not None]
        if len(out["enum"]) != len(node["enum"]):
            out["nullable"] = True
        typ = typ or _json_type(out["enum"][0])
    if typ is None:
        return {"x-kubernetes-preserve-unknown-fields": True}  # Any: nothing to say about it
    out = {"type": typ, **out}

    fmt = node.get("format")
    if isinstance(fmt, str) and fmt in _K8S_FORMATS:
        out["format"] = fmt
    pattern = node.get("pattern")
    if isinstance(pattern, str) and not any(tok in pattern for tok in _NON_RE2):
        out["pattern"] = pattern
    for key in ("minimum", "maximum"):
        if key in node:
            out[key] = node[key]
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node and not isinstance(node[key], bool):
            out[bound] = node[key]
            out[key] = True
    for key in _COPIED:
        if key in node:
            out[key] = node[key]

    if typ == "object":
        out.update(_object(node, defs, stack, path))
    elif typ == "array":
        items = node.get("items")
        if items is None and "prefixItems" in node:  # a tuple: any of its members
            items = {"anyOf": node["prefixItems"]}
        out["items"] = _convert(items, defs, stack, path + "[]") if items is not None else {"x-kubernetes-preserve-unknown-fields": True}
        if node.get("uniqueItems") and out["items"].get("type") in ("string", "integer", "number", "boolean"):
            out["x-kubernetes-list-type"] = "set"  # Kubernetes forbids uniqueItems
    return out


def _object(node: Mapping[str, Any], defs: Mapping[str, Any], stack: tuple[str, ...], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    props = node.get("properties")
    extra = node.get("additionalProperties")
    if extra is None and "patternProperties" in node:  # dict with constrained keys: keys are not checked here
        values = list(node["patternProperties"].values())
        extra = values[0] if len(values) == 1 else {"anyOf": values}
    if props is not None:
        # additionalProperties: false needs no keyword: the API server prunes
        # (or, with field validation Strict, rejects) unknown fields.
        out["properties"] = {name: _convert(sub, defs, stack, f"{path}.{name}".lstrip(".")) for name, sub in props.items()}
        required = [r for r in node.get("required", []) if r in props]
        if required:
            out["required"] = required
        if extra not in (None, False):
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(extra, Mapping) and extra:
        out["additionalProperties"] = _convert(extra, defs, stack, path + ".*")
    elif extra is not False:
        out["x-kubernetes-preserve-unknown-fields"] = True  # dict[str, Any]
    return out


def _union(schemas: Sequence[dict[str, Any]], path: str) -> dict[str, Any]:
    """One structural schema accepting every alternative (as tight as Kubernetes allows)."""
    if not schemas:
        raise SchemaError(f"{path or '(root)'}: a field that can only be null")
    if len(schemas) == 1:
        return dict(schemas[0])
    types = {s.get("type") for s in schemas}
    if types == {"string"} or types == {"boolean"}:
        out: dict[str, Any] = {"type": types.pop()}
        if all("enum" in s for s in schemas):
            out["enum"] = list(dict.fromkeys(e for s in schemas for e in s["enum"]))
        return out
    if types <= {"integer", "number"}:
        return {"type": "number"} if "number" in types else {"type": "integer"}
    if types == {"integer", "string"}:
        return {"x-kubernetes-int-or-string": True}
    if types == {"array"}:
        return {"type": "array", "items": _union([s["items"] for s in schemas], path + "[]")}
    if types == {"object"}:
        if all("properties" in s for s in schemas):
            # A tagged union (e.g. per-engine settings): the properties of all of
            # them; what is required is what every alternative requires.
            props: dict[str, list[dict[str, Any]]] = {}
            for s in schemas:
                for name, sub in s["properties"].items():
                    props.setdefault(name, []).append(sub)
            merged_props: dict[str, dict[str, Any]] = {}
            for n, subs in props.items():
                merged_props[n] = _union(subs, f"{path}.{n}")
                merged_props[n].pop("default", None)
                defaults = [s.get("default") for s in subs]
                # The API server would apply a default whichever alternative is
                # written: keep only one that every alternative shares.
                if len(subs) == len(schemas) and defaults[0] is not None and all(d == defaults[0] for d in defaults):
                    merged_props[n]["default"] = defaults[0]
            out = {"type": "object", "properties": merged_props}
            required = [r for r in schemas[0].get("required", []) if all(r in s.get("required", []) for s in schemas)]
            if required:
                out["required"] = required
            return out
        if all("additionalProperties" in s for s in schemas):
            return {"type": "object", "additionalProperties": _union([s["additionalProperties"] for s in schemas], path + ".*")}
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {"x-kubernetes-preserve-unknown-fields": True}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _clean(text: str) -> str:
    """Docstrings as one paragraph per blank line, reST literals as plain backticks."""
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p).replace("``", "`")


# ---------------------------------------------------------------- schemas


def spec_schema() -> dict[str, Any]:
    """The structural schema of a ModelDeployment's ``.spec``."""
    schema = structural(DeploymentSpec.model_json_schema(by_alias=True, mode="validation"))
    for name in EXCLUDED_SPEC_FIELDS:
        schema["properties"].pop(name, None)
        if name in schema.get("required", []):
            raise SchemaError(f"spec field {name!r} is required but excluded from the CRD")
    return schema


def _condition_schema() -> dict[str, Any]:
    """metav1.Condition, as controller-gen writes it."""
    return {
        "type": "object",
        "description": "A condition of the ModelDeployment (Ready, Progressing, Degraded), shaped like metav1.Condition.",
        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
        "properties": {
            "type": {
                "type": "string",
                "maxLength": 316,
                "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
                "description": "Ready, Progressing or Degraded.",
            },
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "minimum": 0,
                "description": "The .metadata.generation the condition was set for.",
            },
            "lastTransitionTime": {
                "type": "string",
                "format": "date-time",
                "description": "When the status last changed (not when the reason or message did).",
            },
            "reason": {
                "type": "string",
                "maxLength": 1024,
                "minLength": 1,
                "pattern": r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                "description": "CamelCase reason, e.g. ModelReady, MemoryNotReleased, StartTimeout.",
            },
            "message": {"type": "string", "maxLength": 32768, "description": "Human-readable detail."},
        },
    }


def status_schema() -> dict[str, Any]:
    """What the operator writes to ``.status``."""
    nullable_string: dict[str, Any] = {"type": "string", "nullable": True}
    return {
        "type": "object",
        "description": "Observed state, written by the vramctl instance of spec.nodeName.",
        "properties": {
            "phase": {
                "type": "string",
                "enum": list(PHASES),
                "description": "Idle: no model desired. Switching: a switch is under way. Ready: the desired models are healthy. "
                "Blocked: memory did not come back (a foreign process holds it). Failed: a start failed; retried after a backoff. "
                "Unknown: the runtime (the Docker engine, the API server) cannot be asked; the models are shown unknown until it answers.",
            },
            "message": {"type": "string", "description": "What the phase is about, in words."},
            "nodeName": {"type": "string", "description": "Node of the vramctl instance that wrote this status."},
            "activeModel": {**nullable_string, "description": "The heavy model that holds (or is being given) the GPU."},
            "companions": {"type": "array", "items": {"type": "string"}, "description": "Light models desired beside it."},
            "runningModels": {"type": "array", "items": {"type": "string"}, "description": "Models running now."},
            "asleepModels": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Models asleep (warm switching): their server runs, only its residue is on the GPU.",
            },
            "models": {
                "type": "string",
                "description": "Every model that is not absent, with its state (running, starting, asleep, waking, "
                "sleeping, stopping, paused, failed, stopped), as `kubectl get md` shows it: 'llm:running sdxl:asleep'.",
            },
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "minimum": 0,
                "description": "The .metadata.generation this status reflects.",
            },
            "conditions": {
                "type": "array",
                "items": _condition_schema(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "gpu": {
                "type": "object",
                "nullable": True,
                "description": "The GPU this ModelDeployment manages.",
                "properties": {
                    "uuid": {**nullable_string, "description": "NVML UUID, e.g. GPU-1a2b...; empty on a simulated GPU."},
                    "name": {**nullable_string, "description": "Product name, e.g. NVIDIA GeForce RTX 5080."},
                    "totalMiB": {"type": "integer", "minimum": 0, "description": "Total memory, MiB."},
                    "usedMiB": {"type": "integer", "minimum": 0, "description": "Memory in use, MiB (NVML memory info v2)."},
                },
            },
            "lastSwitch": {
                "type": "object",
                "nullable": True,
                "description": "The last switch of the GPU from one model to another.",
                "properties": {
                    "from": {**nullable_string, "description": "The model that held the GPU before; empty when none did."},
                    "to": {**nullable_string, "description": "The model it was switched to; empty when the GPU was freed."},
                    "durationSeconds": {"type": "number", "minimum": 0, "description": "Seconds from the request until it ended."},
                    "outcome": {"type": "string", "description": "success, failed or blocked."},
                    "finishedAt": {"type": "string", "format": "date-time", "description": "When the switch ended."},
                    "generation": {"type": "integer", "format": "int64", "description": "The desired generation it served."},
                },
            },
            "kopf": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "The operator framework's (kopf) own progress records.",
            },
        },
    }


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "vramctl", "app.kubernetes.io/part-of": "vramctl"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["vramctl"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Active", "type": "string", "jsonPath": ".status.activeModel", "description": "Model that holds the GPU."},
                        {
                            "name": "Phase",
                            "type": "string",
                            "jsonPath": ".status.phase",
                            "description": "Idle, Switching, Ready, Blocked, Failed.",
                        },
                        {"name": "VRAM", "type": "integer", "jsonPath": ".status.gpu.usedMiB", "description": "GPU memory in use, MiB."},
                        {"name": "Models", "type": "string", "jsonPath": ".status.models", "description": "Each model's state."},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                        {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName", "priority": 1},
                        {"name": "GPU", "type": "integer", "jsonPath": ".spec.gpu", "priority": 1},
                        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "One GPU of one node, the model servers that may run on it, and which of them holds it.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    """The CRD as committed: a header naming the command, then YAML."""
    body = yaml.safe_dump(crd(), sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)
    header = f"# Generated from vramctl.spec.models.DeploymentSpec by vramctl.spec.crd: do not edit.\n# Regenerate: {REGENERATE}\n"
    return header + body


# ------------------------------------------------------------------- CLI


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vramctl.spec.crd", description="Print (or write) the ModelDeployment CRD generated from vramctl.spec.models."
    )
    p.add_argument("-o", "--output", action="append", default=[], metavar="FILE", help="write to FILE instead of stdout (repeatable)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when an --output FILE differs from the generated CRD")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        stale = [f for f in args.output if not Path(f).is_file() or Path(f).read_text() != text]
        for f in stale:
            print(f"{f} differs from the CRD generated from vramctl.spec.models: run {REGENERATE}", file=sys.stderr)
        return 1 if stale else 0
    if not args.output:
        sys.stdout.write(text)
    for f in args.output:
        _write(Path(f), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
