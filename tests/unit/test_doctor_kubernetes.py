"""vramctl doctor --kubernetes: the checks over made-up nodes (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.kube_facts import facts
from vramctl.doctor import exit_code, kubernetes_checks


@pytest.mark.parametrize(
    ("kw", "levels", "rc"),
    [
        ({}, {"kubernetes api": "OK", "runtime class": "OK", "device plugin": "OK", "nvml in this pod": "OK"}, 0),
        ({"runtime_class_handler": None}, {"runtime class": "FAIL"}, 1),
        ({"runtime_class_handler": None, "gpu_mode": "resource"}, {"runtime class": "WARN"}, 0),
        ({"runtime_class_handler": False}, {"runtime class": "WARN"}, 0),
        ({"gpu_allocatable": None}, {"device plugin": "WARN"}, 0),
        ({"gpu_allocatable": None, "gpu_mode": "resource"}, {"device plugin": "FAIL"}, 1),
        ({"gpu_allocatable": False}, {"device plugin": "WARN"}, 0),
        ({"nvml": "libnvidia-ml.so.1: not found"}, {"nvml in this pod": "FAIL"}, 1),
        ({"api": "HTTP 0: connection refused"}, {"kubernetes api": "FAIL"}, 1),
    ],
)
def test_kubernetes_checks(kw: dict[str, Any], levels: dict[str, str], rc: int) -> None:
    found = kubernetes_checks(facts(**kw))
    by_name = {c.name: c for c in found}
    for name, level in levels.items():
        assert by_name[name].level == level, by_name[name].render()
        if level != "OK":
            assert by_name[name].fix or level == "WARN"
    assert exit_code(found) == rc


def test_api_unreachable_stops_there() -> None:
    (only,) = kubernetes_checks(facts(api="HTTP 0: refused"))
    assert "--kubeconfig" in only.fix


def test_a_missing_runtime_class_names_every_way_out() -> None:
    (rc,) = [c for c in kubernetes_checks(facts(runtime_class_handler=None)) if c.name == "runtime class"]
    assert "does not exist" in rc.message
    for way in ("create it", "--runtime-class", "--pod-gpu resource", "gpuRequest"):
        assert way in rc.fix, rc.fix
