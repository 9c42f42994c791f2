"""The checks before a start (``reconcile.start_checks``): what they remember
of a free health port is one desired generation's, not every generation's."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vramctl.observed import Desired, Observed
from vramctl.planner import Plan, Start
from vramctl.reconcile import start_checks
from vramctl.reconcile.start_checks import StartChecks
from vramctl.spec.models import DeploymentSpec


class _Runtime:
    def preflight(self, spec: DeploymentSpec, model: str) -> str | None:
        return None


def test_the_free_ports_remembered_are_the_current_generations_only(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = DeploymentSpec.model_validate(
        {"gpu": 0, "activeModel": "a", "models": {"a": {"image": "i", "vramMiB": 1000, "health": {"port": 1, "path": "/health"}}}}
    )
    ctx: Any = SimpleNamespace(settings=SimpleNamespace(resync_s=5.0))
    checks = StartChecks(ctx, _Runtime(), None)  # type: ignore[arg-type]
    squats: list[str] = []

    def counted(s: DeploymentSpec, m: str, live: Any) -> str | None:
        squats.append(m)
        return None

    monkeypatch.setattr(start_checks, "squatted", counted)
    plan = Plan((Start("a", "wanted"),))
    for generation in range(1, 101):
        for _ in range(3):  # a free port is checked once per generation
            assert checks.unrunnable(spec, Desired("a", generation=generation), Observed({}), plan, 0.0) is None
    assert squats == ["a"] * 100
    assert len(checks.port_free) <= 1
