"""Tiny builders for planner and spec tests.

``model(...)`` returns the YAML-shaped dict of one model (camelCase keys, as a
user writes it); ``deployment(...)`` turns such dicts into a validated
``DeploymentSpec``; ``obs(llm="running", ...)`` builds an ``Observed``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vramctl.observed import Desired, Observed, Workload, WorkloadState
from vramctl.planner import Plan, Sleep, Start, Stop, WaitForMemory, WaitHealthy, Wake
from vramctl.spec.models import DeploymentSpec

RUNNING = WorkloadState.RUNNING
PAUSED = WorkloadState.PAUSED
EXITED = WorkloadState.EXITED
ABSENT = WorkloadState.ABSENT
CREATED = WorkloadState.CREATED
RESTARTING = WorkloadState.RESTARTING


def model(cls: str = "heavy", vram: int | None = None, **fields: Any) -> dict[str, Any]:
    """One model entry as written in YAML; extra keyword arguments are camelCase fields."""
    out: dict[str, Any] = {"class": cls, "image": "example/standin:dev"}
    if vram is not None:
        out["vramMiB"] = vram
    out.update(fields)
    return out


def heavy(vram: int | None = None, **fields: Any) -> dict[str, Any]:
    return model("heavy", vram, **fields)


def light(vram: int | None = None, **fields: Any) -> dict[str, Any]:
    return model("light", vram, **fields)


def deployment_doc(models: dict[str, dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    """A single GPU's document (what goes under ``gpus:``)."""
    doc: dict[str, Any] = dict(fields)
    doc["models"] = models if models is not None else demo_models()
    return doc


def deployment(models: dict[str, dict[str, Any]] | None = None, **fields: Any) -> DeploymentSpec:
    """A validated DeploymentSpec; ``fields`` are camelCase top-level fields (activeModel, vramBudgetMiB, ...)."""
    return DeploymentSpec.model_validate(deployment_doc(models, **fields))


def demo_models() -> dict[str, dict[str, Any]]:
    """llm and sdxl (heavy, never together) and tts (light), like the demo stack."""
    return {
        "llm": heavy(12000, health={"path": "/health", "port": 18000}, startTimeoutSeconds=60),
        "sdxl": heavy(11000, health={"path": "/health", "port": 17860}, startTimeoutSeconds=90),
        "tts": light(3500, startTimeoutSeconds=30),
    }


def demo() -> DeploymentSpec:
    return deployment(demo_models())


def desired(active: str | None = None, *companions: str, generation: int = 0) -> Desired:
    return Desired(active, tuple(companions), generation)


def wl(
    name: str, state: WorkloadState | str = RUNNING, *, ready: bool | None = None, drifted: bool = False, heavy: bool = True
) -> Workload:
    """A workload; ``ready`` defaults to True for a running one."""
    st = WorkloadState(state)
    if ready is None:
        ready = st is RUNNING
    return Workload(model=name, state=st, ref=f"ref-{name}", drifted=drifted, ready=ready, heavy=heavy)


def obs(*workloads: Workload, **states: WorkloadState | str) -> Observed:
    """``obs(llm="running", tts="paused")``, or explicit ``wl(...)`` values, or both."""
    out = {w.model: w for w in workloads}
    for name, st in states.items():
        out[name] = wl(name, st)
    return Observed(out)


def is_heavy(spec: DeploymentSpec, w: Workload) -> bool:
    """The spec's class wins; the workload's label only for models no longer in the spec."""
    return spec.models[w.model].heavy if w.model in spec.models else w.heavy


def simulate(spec: DeploymentSpec, observed: Observed, p: Plan) -> Observed:
    """Apply a plan's effects: Stop -> exited, Start -> running and ready (not drifted), WaitHealthy -> ready,
    Sleep -> asleep (not ready), Wake -> awake."""
    ws: dict[str, Workload] = dict(observed.workloads)
    for a in p.actions:
        match a:
            case Stop(model=m):
                ws[m] = replace(ws[m], state=EXITED, ready=False)
            case Start(model=m):
                ws[m] = Workload(model=m, state=RUNNING, ref=f"new-{m}", ready=True, heavy=spec.models[m].heavy)
            case WaitHealthy(model=m):
                ws[m] = replace(ws[m], ready=True)
            case Sleep(model=m):
                ws[m] = replace(ws[m], asleep=True, ready=False)
            case Wake(model=m):
                ws[m] = replace(ws[m], asleep=False)
            case WaitForMemory():
                pass
    return Observed(ws)
