"""The Helm chart rendered offline by Helm's own Go SDK (helm-python-sdk), and
the plain manifests, as lists of objects. Plain cached functions, not
fixtures: tests/k8s is shared with the operator's tests."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import helm_python as helm

from tests.support.k8s.validation import ROOT, load_yaml_docs

CHART_DIR = ROOT / "charts" / "vramctl"
MANIFESTS = ROOT / "manifests"
RELEASE, NAMESPACE = "vramctl", "vramctl-system"  # as the plain manifests name things


@dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]
    notes: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


@functools.cache
def _render(values_json: str) -> Rendered:
    values = json.loads(values_json)
    out = chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    notes = "".join(text for path, text in out.items() if path.endswith("NOTES.txt"))
    objects = [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt") for d in load_yaml_docs(text)]
    return Rendered(objects, notes)


def render(values: dict[str, Any] | None = None) -> Rendered:
    """``helm template vramctl charts/vramctl -n vramctl-system`` with ``values``."""
    return _render(json.dumps(values, sort_keys=True))


def manifest_objects() -> list[dict[str, Any]]:
    """Every object of the plain manifests that the kustomization applies."""
    kustomization = load_yaml_docs((MANIFESTS / "kustomization.yaml").read_text())[0]
    return [d for res in kustomization["resources"] for d in load_yaml_docs((MANIFESTS / res).read_text())]
