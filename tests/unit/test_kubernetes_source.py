"""The ModelDeployment bridge (vramctl.sources.kubernetes) on recording fakes:
what reaches the worker, what the status says, which Events are posted.
kopf and a real API server are in tests/k8s/test_operator.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.fakes import FakeGpu, FakeRuntime
from vramctl.observed import WorkloadState
from vramctl.runtimes.base import StartEvent
from vramctl.sources.kubernetes.controller import ModelDeployments
from vramctl.sources.kubernetes.handlers import finalizer_for
from vramctl.sources.kubernetes.specs import InvalidSpec
from vramctl.spec.models import DeploymentSpec
from vramctl.worker.actor import Admission, DesiredSink, GpuWorker, Metrics, StatusSink, WorkerSettings
from vramctl.worker.supervisor import Supervisor

NODE = "node-a"


def raw_spec(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "nodeName": NODE,
        "gpu": 0,
        "activeModel": "llm",
        "vramBudgetMiB": 15500,
        "models": {
            "llm": {"image": "i", "vramMiB": 12000},
            "sdxl": {"image": "i", "vramMiB": 11000},
            "tts": {"class": "light", "image": "i", "vramMiB": 3000},
        },
    }
    doc.update(kw)
    return doc


class FakeApi:
    def __init__(self) -> None:
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.patches.append((namespace, name, status))

    def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        self.events.append(event)

    def reasons(self) -> list[str]:
        return [e["reason"] for e in self.events]


class Wall:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


class Rig:
    def __init__(self) -> None:
        self.rt = FakeRuntime()
        self.metrics = Metrics()
        self.supervisor = Supervisor([], self.rt, self.metrics)  # not started: workers run only on reconcile()
        self.api = FakeApi()
        self.wall = Wall()
        self.workers: list[GpuWorker] = []

        def make_worker(d: DeploymentSpec, status: StatusSink, desired: DesiredSink, admission: Admission) -> GpuWorker:
            settings = WorkerSettings(poll_interval_s=0.001, memory_timeout_s=0.05, baseline_mib=0)
            w = GpuWorker(
                d,
                self.rt,
                FakeGpu(self.rt, d),
                settings,
                status_sink=status,
                desired_sink=desired,
                admission=admission,
                metrics=self.metrics,
            )
            self.workers.append(w)
            return w

        self.md = ModelDeployments(NODE, self.supervisor, self.rt, make_worker, api=self.api, wall=self.wall)

    def apply(self, generation: int, **kw: Any) -> None:
        self.md.apply("ns", "gpu0", "uid-1", generation, raw_spec(**kw))

    @property
    def worker(self) -> GpuWorker:
        return self.supervisor.workers[0]

    def reconcile(self) -> None:
        self.worker.reconcile_once()

    def status(self) -> dict[str, Any]:
        self.md.flush()
        return self.api.patches[-1][2]


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_spec_reaches_the_worker_and_status_carries_generations() -> None:
    r = Rig()
    r.apply(1)
    r.reconcile()
    assert r.rt.calls == [("start", "llm")]
    st = r.status()
    assert st["phase"] == "Ready" and st["activeModel"] == "llm" and st["runningModels"] == ["llm"]
    assert st["observedGeneration"] == 1
    assert st["gpu"] == {"uuid": "GPU-fake-0", "name": "Fake", "totalMiB": 16000, "usedMiB": 12000}

    r.apply(2, activeModel="sdxl")
    assert r.worker.desired.active == "sdxl"
    assert r.status()["observedGeneration"] == 1  # not settled yet
    r.reconcile()
    st = r.status()
    assert st["observedGeneration"] == 2 and st["runningModels"] == ["sdxl"]
    assert st["lastSwitch"]["from"] == "llm" and st["lastSwitch"]["to"] == "sdxl" and st["lastSwitch"]["generation"] == 2
    assert all(c["observedGeneration"] == 2 for c in st["conditions"])
    assert r.api.reasons() == ["SwitchStarted", "SwitchFinished", "SwitchStarted", "SwitchFinished"]
    assert "llm -> sdxl" in r.api.events[-1]["message"]
    assert r.api.events[-1]["involvedObject"] == {
        "apiVersion": "vramctl.io/v1alpha1",
        "kind": "ModelDeployment",
        "name": "gpu0",
        "namespace": "ns",
        "uid": "uid-1",
    }


def test_the_same_spec_twice_bumps_nothing() -> None:
    r = Rig()
    r.apply(1)
    r.reconcile()
    before = (r.worker.desired, len(r.worker.progress()))
    r.status()
    patches = len(r.api.patches)
    r.apply(1)  # kopf re-delivered it (resume, timer, re-listing)
    r.apply(1)
    r.reconcile()
    assert (r.worker.desired, len(r.worker.progress())) == before
    assert r.rt.calls == [("start", "llm")]
    r.md.flush()
    assert len(r.api.patches) == patches  # the status did not change: not written


def test_a_switch_back_before_the_worker_acted_requests_again() -> None:
    r = Rig()
    r.apply(1)
    r.reconcile()
    r.apply(2, activeModel="sdxl")
    r.apply(3, activeModel="llm")  # back before the worker ran: a new request, nothing to do
    r.reconcile()
    assert r.rt.calls == [("start", "llm")]
    assert r.status()["observedGeneration"] == 3


def test_a_model_edit_updates_the_spec_without_a_request() -> None:
    r = Rig()
    r.apply(1)
    r.reconcile()
    gen = r.worker.desired.generation
    models = raw_spec()["models"]
    models["llm"]["env"] = {"X": "1"}
    r.apply(2, models=models)
    assert r.worker.desired.generation == gen
    assert r.worker.spec.models["llm"].env == {"X": "1"}
    assert r.status()["observedGeneration"] == 2


def test_invalid_spec_is_degraded_once_and_stops_nothing() -> None:
    r = Rig()
    r.apply(1)
    r.reconcile()
    models = raw_spec()["models"]
    models["sdxl"]["vramMiB"] = -5
    for _ in range(3):  # the update, then timer rounds: one Event only
        with pytest.raises(InvalidSpec) as err:
            r.apply(2, activeModel="sdxl", models=models)
    assert err.value.problems[0][0] == "spec.models.sdxl.vramMiB"
    r.reconcile()
    assert r.rt.calls == [("start", "llm")] and r.worker.desired.active == "llm"
    st = r.status()
    degraded = condition(st, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec" and degraded["observedGeneration"] == 2
    assert "spec.models.sdxl.vramMiB" in degraded["message"]
    assert st["observedGeneration"] == 1 and st["phase"] == "Ready"
    (invalid,) = [e for e in r.api.events if e["reason"] == "InvalidSpec"]
    assert "spec.models.sdxl.vramMiB" in invalid["message"] and invalid["type"] == "Warning"

    r.apply(3, activeModel="sdxl")  # fixed
    r.reconcile()
    st = r.status()
    assert condition(st, "Degraded")["status"] == "False" and st["observedGeneration"] == 3


def test_invalid_from_the_start_runs_nothing() -> None:
    r = Rig()
    with pytest.raises(InvalidSpec):
        r.apply(1, activeModel="nope")
    assert r.supervisor.workers == {} and r.rt.calls == []
    st = r.status()
    assert st["phase"] == "Failed" and "spec.activeModel" in st["message"]
    assert condition(st, "Degraded")["reason"] == "InvalidSpec"
    assert st["observedGeneration"] is None


def test_other_nodes_are_not_ours() -> None:
    r = Rig()
    assert not r.md.concerns("ns", "gpu0", {"nodeName": "node-b"})
    r.md.apply("ns", "gpu0", "uid-1", 1, raw_spec(nodeName="node-b"))
    assert r.supervisor.workers == {} and r.md.snapshot() == {}
    r.md.flush()
    assert r.api.patches == [] and r.api.events == []


def test_moving_to_another_node_removes_our_containers() -> None:
    r = Rig()
    r.apply(1)
    r.reconcile()
    assert r.md.concerns("ns", "gpu0", {"nodeName": "node-b"})  # still ours until released
    r.md.apply("ns", "gpu0", "uid-1", 2, raw_spec(nodeName="node-b"))
    assert ("remove", "llm") in r.rt.calls
    assert r.supervisor.workers == {} and not r.md.concerns("ns", "gpu0", {"nodeName": "node-b"})


def test_delete_removes_the_gpus_containers_only() -> None:
    r = Rig()
    r.apply(1)
    r.reconcile()
    r.md.delete("ns", "gpu0", raw_spec())
    assert r.rt.calls == [("start", "llm"), ("remove", "llm")]
    assert r.supervisor.workers == {}


def test_transition_times_move_only_on_flips() -> None:
    r = Rig()
    r.apply(1)
    r.reconcile()
    first = r.status()
    r.wall.t += 100
    # The writer runs beside the worker: let it publish once mid-switch.
    r.rt.on_call = lambda verb, model: r.md.flush() if verb == "stop" else None
    r.apply(2, activeModel="sdxl")
    r.reconcile()
    mid = next(p for _, _, p in r.api.patches if p["phase"] == "Switching")
    assert condition(mid, "Progressing")["status"] == "True"
    second = r.status()
    assert condition(second, "Degraded")["lastTransitionTime"] == condition(first, "Degraded")["lastTransitionTime"]
    assert condition(second, "Progressing")["status"] == "False"
    assert condition(second, "Progressing")["lastTransitionTime"] != condition(first, "Progressing")["lastTransitionTime"]


def test_a_second_deployment_for_the_same_gpu_is_a_conflict_on_the_newer() -> None:
    r = Rig()
    r.md.apply("ns", "gpu0", "uid-1", 1, raw_spec(), created="2026-01-01T00:00:00Z")
    r.reconcile()
    r.md.apply("ns", "other", "uid-2", 1, raw_spec(activeModel="sdxl"), created="2026-01-02T00:00:00Z")
    r.md.apply("ns", "other", "uid-2", 1, raw_spec(activeModel="sdxl"), created="2026-01-02T00:00:00Z")  # the timer: one Event only
    assert list(r.supervisor.workers) == [0] and r.worker.desired.active == "llm"
    assert r.md.snapshot()["ns/other"]["gpu"] is None
    r.md.flush()
    other = next(st for ns, name, st in r.api.patches if name == "other")
    degraded = condition(other, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "Conflict" and "ns/gpu0" in degraded["message"]
    assert condition(other, "Ready")["status"] == "False" and other["phase"] == "Failed"
    conflicts = [e for e in r.api.events if e["reason"] == "Conflict"]
    assert len(conflicts) == 1 and conflicts[0]["involvedObject"]["name"] == "other" and "ns/gpu0" in conflicts[0]["message"]
    assert r.rt.calls == [("start", "llm")]  # nothing ran for the newer one

    # The older one goes: the newer takes the GPU at once, with its own spec.
    r.md.delete("ns", "gpu0", raw_spec())
    assert r.md.snapshot()["ns/other"]["gpu"] == 0 and r.worker.desired.active == "sdxl"
    r.reconcile()
    assert r.rt.states["sdxl"] is WorkloadState.RUNNING and "llm" not in r.rt.states
    r.md.flush()
    st = next(st for ns, name, st in reversed(r.api.patches) if name == "other")
    assert condition(st, "Degraded")["status"] == "False" and st["runningModels"] == ["sdxl"]


def test_an_older_deployment_seen_second_takes_the_gpu() -> None:
    r = Rig()  # after a restart, kopf may deliver the newer one first
    r.md.apply("ns", "newer", "uid-2", 1, raw_spec(), created="2026-01-02T00:00:00Z")
    r.reconcile()
    r.md.apply("ns", "older", "uid-1", 1, raw_spec(activeModel="sdxl"), created="2026-01-01T00:00:00Z")
    snap = r.md.snapshot()
    assert snap["ns/older"]["gpu"] == 0 and snap["ns/newer"]["gpu"] is None
    assert snap["ns/newer"]["conflict"].name == "older"
    assert ("remove", "llm") in r.rt.calls and r.worker.desired.active == "sdxl"


def test_a_start_behind_our_back_is_overruled_by_the_spec() -> None:
    r = Rig()
    r.apply(1)
    r.reconcile()
    r.rt.states["sdxl"] = WorkloadState.RUNNING  # `docker start` on the node
    r.worker.gate_start(StartEvent(model="sdxl", gpu=0, ref="sdxl", heavy=True))
    assert r.worker.desired.active == "llm"  # the spec says llm
    r.reconcile()
    assert r.rt.states["sdxl"] is WorkloadState.EXITED and r.rt.states["llm"] is WorkloadState.RUNNING
    r.md.flush()
    assert "Overruled" in r.api.reasons()


def test_finalizer_names_the_node() -> None:
    assert finalizer_for("rtx5080") == "vramctl.io/node.rtx5080"
    long = finalizer_for("n" * 100)
    assert long.startswith("vramctl.io/node.") and len(long.split("/")[1]) <= 63


def test_a_restarted_operator_keeps_the_published_last_switch_whichever_handler_comes_first() -> None:
    """After a restart kopf's timer may deliver an object before any other
    handler does. The status it carries is what the last operator published:
    its lastSwitch must survive (a status written without it would delete
    the key from the object by merge patch)."""
    last = {"from": "llm", "to": "sdxl", "durationSeconds": 1.5, "outcome": "success", "finishedAt": "2027-01-15T08:00:00Z", "generation": 2}
    r = Rig()
    r.md.refresh("ns", "gpu0", "uid-1", 2, raw_spec(activeModel="sdxl"), status={"lastSwitch": last, "phase": "Ready"})
    assert r.status()["lastSwitch"] == last  # before the new worker made a switch of its own
