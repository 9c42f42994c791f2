"""The planner's promise, checked on generated worlds.

Within one GPU: no plan starts a heavy workload while another heavy workload
is live (running, paused, restarting, or stopped earlier in the same plan and
not yet confirmed gone by a WaitForMemory); every Start is preceded by a
WaitForMemory; all stops come before all starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.support.builders import is_heavy, simulate
from vramctl.observed import Desired, Observed, Workload, WorkloadState
from vramctl.planner import Plan, Start, Stop, WaitForMemory, WaitHealthy, plan
from vramctl.spec.models import DeploymentSpec, check_desired

NAMES = ["llm", "sdxl", "tts", "whisper", "embed", "flux", "coder"]
UNKNOWN = ["old-llm", "retired", "ghost"]  # workloads whose model left the spec


@dataclass(frozen=True)
class World:
    spec: DeploymentSpec
    desired: Desired
    observed: Observed
    now: float
    backoff: dict[str, float]
    baseline: int
    margin: int


@st.composite
def model_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"class": draw(st.sampled_from(["heavy", "light"])), "image": "example/standin:dev"}
    vram = draw(st.none() | st.integers(0, 24000))
    if vram is not None:
        doc["vramMiB"] = vram
    if draw(st.booleans()):
        doc["startTimeoutSeconds"] = draw(st.integers(1, 600))
    return doc


@st.composite
def worlds(draw: st.DrawFn) -> World:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True))
    models = {n: draw(model_docs()) for n in names}
    # No vramBudgetMiB: any light subset is a valid companion set.
    spec = DeploymentSpec.model_validate({"models": models})
    heavies = [n for n in names if spec.models[n].heavy]
    lights = [n for n in names if not spec.models[n].heavy]
    active = draw(st.none() | st.sampled_from(heavies)) if heavies else None
    companions = tuple(draw(st.permutations(lights).flatmap(lambda p: st.integers(0, len(p)).map(lambda k: p[:k])))) if lights else ()
    check_desired(spec, active, companions)  # the generated request is one a user could make

    workloads: dict[str, Workload] = {}
    extra = draw(st.lists(st.sampled_from(UNKNOWN), max_size=2, unique=True))
    for n in names + extra:
        if n in spec.models and not draw(st.booleans()):
            continue  # never observed: absent
        workloads[n] = Workload(
            model=n,
            state=draw(st.sampled_from(list(WorkloadState))),
            ref=f"ref-{n}",
            drifted=draw(st.booleans()),
            ready=draw(st.booleans()),
            # The label; for models in the spec the spec's class must win, so it is random too.
            heavy=draw(st.booleans()),
        )
    # Small integers make "deadline == now" likely.
    now = float(draw(st.integers(0, 20)))
    backoff = {n: float(draw(st.integers(0, 20))) for n in names if draw(st.booleans())}
    baseline, margin = draw(st.integers(0, 2000)), draw(st.integers(0, 1024))
    return World(spec, Desired(active, companions), Observed(workloads), now, backoff, baseline, margin)


def _plan(w: World, observed: Observed | None = None) -> Plan:
    return plan(w.spec, w.desired, w.observed if observed is None else observed, w.now, w.backoff, w.baseline, w.margin)


def check_promise(w: World, p: Plan) -> None:
    spec, observed = w.spec, w.observed

    def heavy(m: str) -> bool:
        return is_heavy(spec, observed.workloads[m]) if m in observed.workloads else spec.models[m].heavy

    actions = list(p.actions)
    stop_idx = [i for i, a in enumerate(actions) if isinstance(a, Stop)]
    start_idx = [i for i, a in enumerate(actions) if isinstance(a, Start)]
    all_stopped = {a.model for a in actions if isinstance(a, Stop)}

    # (c) every Stop comes before every Start
    if stop_idx and start_idx:
        assert max(stop_idx) < min(start_idx), "a Stop after a Start"

    live = {m for m, wl in observed.workloads.items() if wl.state.live}
    unconfirmed: set[str] = set()  # stopped in this plan, not yet released by a WaitForMemory
    started: list[str] = []
    stopped: list[str] = []
    last_wait: WaitForMemory | None = None
    for i, a in enumerate(actions):
        match a:
            case Stop(model=m):
                assert m not in stopped, f"{m} stopped twice"
                stopped.append(m)
                live.discard(m)
                unconfirmed.add(m)
            case WaitForMemory(released=released):
                last_wait = a
                unconfirmed -= set(released)
            case Start(model=m):
                # (f) only desired members, never one in back-off
                assert m in w.desired.members, f"started {m}, which is not desired"
                assert not w.backoff.get(m, float("-inf")) > w.now, f"started {m} in back-off until {w.backoff[m]} (now {w.now})"
                # (d) no model started twice
                assert m not in started, f"{m} started twice"
                # (b) preceded by a WaitForMemory; the first one releases everything stopped
                assert last_wait is not None, f"Start {m} at {i} without an earlier WaitForMemory"
                if not started:
                    assert all_stopped <= set(last_wait.released), f"first wait releases {last_wait.released}, stopped {all_stopped}"
                if heavy(m):
                    # (a) as asked: no other heavy live (stopped ones are no longer live)
                    others = {x for x in live if x != m and heavy(x)}
                    assert not others, f"heavy {m} started while {others} live"
                    # (a, the docstring's stronger form) nor stopped but not yet confirmed gone
                    pending = {x for x in unconfirmed if x != m and heavy(x)}
                    assert not pending, f"heavy {m} started while {pending} not confirmed gone"
                started.append(m)
                live.add(m)
            case WaitHealthy(model=m):
                assert m in live, f"waiting for {m} to be healthy, but it is not live"
    # (e) after the plan, at most one heavy is live
    live_heavy = sorted(m for m in live if heavy(m))
    assert len(live_heavy) <= 1, f"heavies live after the plan: {live_heavy}"
    # Every stopped model was live, and deferred models are desired ones in back-off.
    for m, until in p.deferred.items():
        assert m in w.desired.members and until == w.backoff[m] and until > w.now


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_plan_keeps_the_promise(w: World) -> None:
    p = _plan(w)
    note(f"observed: {w.observed}")
    note(f"plan: {p.describe()} deferred={p.deferred}")
    check_promise(w, p)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_plan_converges_in_one_pass(w: World) -> None:
    """Apply the plan's effects, plan again: nothing left to do, and every
    desired member is running (with the current spec) or deferred for back-off."""
    p = _plan(w)
    after = simulate(w.spec, w.observed, p)
    again = _plan(w, after)
    note(f"plan: {p.describe()}; second plan: {again.describe()}")
    assert again.actions == ()
    for m in w.desired.members:
        state = after.state(m)
        assert state in (WorkloadState.RUNNING, WorkloadState.RESTARTING) or m in p.deferred, f"{m} is {state} after the plan"
        if after.workloads[m].state.live if m in after.workloads else False:
            assert not after.workloads[m].drifted, f"{m} still runs with an outdated spec"
    live_heavy = [m for m, wl in after.workloads.items() if wl.state.live and is_heavy(w.spec, wl)]
    assert len(live_heavy) <= 1
