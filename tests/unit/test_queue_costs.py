"""The cost-aware serving window of the queue policy (vramctl.demand.policy):
table tests of the window, then hypothesis: the queue's documented bounds
still hold whatever the estimated costs (right or wrong), and the window is
never longer than the fixed one."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramctl.demand.policy import (
    SERVE_COST_FACTOR,
    Demand,
    QueuePolicy,
    QueueState,
    Target,
    add_demand,
    apply,
    decide,
    policies_of,
    release,
    serve_cutoff,
    serve_window,
    step,
    switch_cost,
    switch_done,
)
from vramctl.spec.models import DeploymentSpec


def state(
    factor: float | None = SERVE_COST_FACTOR,
    costs: tuple[tuple[str, float], ...] = (),
    serve: float = 60.0,
    drain: float = 30.0,
    estimate: float = 30.0,
) -> QueueState:
    pol = QueuePolicy(
        max_queue=100, queue_timeout_seconds=1e6, max_serve_seconds=serve, drain_timeout_seconds=drain, serve_cost_factor=factor
    )
    return QueueState(policy=pol, active="llm", switch_costs=costs, switch_estimate_seconds=estimate)


def dem(id: str, model: str, at: float) -> Demand:
    return Demand(id=id, model=model, arrived=at)


# -- the window ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factor", "costs", "serve", "drain", "window"),
    [
        (5.0, (("sdxl", 1.0),), 60, 30, 5.0),  # warm there and back (2 x 0.5 s): a few seconds
        (5.0, (("sdxl", 25.5),), 60, 30, 30.0),  # cold one way: capped by maxServeSeconds - drainTimeoutSeconds
        (5.0, (("sdxl", 50.0),), 300, 10, 250.0),  # cold, under a high cap: k x the switches
        (5.0, (("sdxl", 1.0),), 20, 30, 0.0),  # a drain longer than maxServe: no window at all
        (None, (("sdxl", 1.0),), 60, 30, 30.0),  # serveCostFactor unset: the fixed window
        (0.0, (("sdxl", 50.0),), 60, 30, 0.0),  # k 0: give way as soon as someone waits
        (5.0, (("flux", 1.0),), 60, 30, 30.0),  # no estimate for sdxl: switch_estimate_seconds (30) x 5, capped
    ],
)
def test_serve_window(factor: float | None, costs: tuple[tuple[str, float], ...], serve: float, drain: float, window: float) -> None:
    assert serve_window(state(factor, costs, serve, drain), "sdxl") == pytest.approx(window)


def test_switch_cost_falls_back_to_the_estimate() -> None:
    s = state(costs=(("sdxl", 1.0),), estimate=12.0)
    assert (switch_cost(s, "sdxl"), switch_cost(s, "flux")) == (1.0, 12.0)


def test_the_cutoff_follows_the_cost_of_the_first_waiters_model() -> None:
    s = state(costs=(("sdxl", 1.0), ("flux", 4.0)))
    s = add_demand(add_demand(s, dem("f", "flux", 10.0)), dem("s", "sdxl", 11.0))
    assert serve_cutoff(s) == 10.0 + 5 * 4.0


@pytest.mark.parametrize(
    ("costs", "granted_at_13"),
    [
        ((("sdxl", 0.5),), False),  # warm: window 2.5 s from 10.0 has passed at 13.0
        ((("sdxl", 25.5),), True),  # cold: window 30 s, the burst goes on
    ],
)
def test_warm_switches_let_the_waiting_model_in_sooner(costs: tuple[tuple[str, float], ...], granted_at_13: bool) -> None:
    s = add_demand(state(costs=costs), dem("h1", "llm", 1.0))
    s, _ = step(s, 1.0)  # h1 holds llm
    s = add_demand(s, dem("w", "sdxl", 10.0))
    s, _ = step(s, 10.0)
    s = add_demand(s, dem("late", "llm", 13.0))
    d = decide(s, 13.0)
    assert ("late" in d.grant) is granted_at_13
    # Once h1 ends, the warm queue switches at once; the cold one keeps serving llm.
    s = release(apply(s, d, 13.0), "h1", 14.0)
    d = decide(s, 14.0)
    assert (d.switch_to is None) is granted_at_13
    if not granted_at_13:
        assert d.switch_to == Target("sdxl")


# -- hypothesis: the bounds still hold ----------------------------------------------------------


@dataclass(frozen=True)
class Req:
    id: str
    model: str
    arrived: float
    duration: float


@dataclass
class Outcome:
    waits: dict[str, float] = field(default_factory=dict)
    switches: int = 0
    cut: list[str] = field(default_factory=list)  # switches made over a live hold that was neither revoked nor expired


def simulate(reqs: list[Req], policy: QueuePolicy, real: dict[str, float], estimates: tuple[tuple[str, float], ...]) -> Outcome:
    """Two models; a switch to ``m`` really takes ``real[m]`` while the queue
    is told ``estimates`` (which may be wrong)."""
    out = Outcome()
    s = QueueState(policy=policy, switch_costs=estimates, switch_estimate_seconds=max(real.values()))
    events: list[tuple[float, int, str, str]] = [(r.arrived, 0, "arrive", r.id) for r in reqs]
    heapq.heapify(events)
    by_id = {r.id: r for r in reqs}
    wake: float | None = None
    pending: tuple[float, Target] | None = None
    for _ in range(100_000):
        times = [e[0] for e in events[:1]] + [t for t in (wake, pending[0] if pending else None) if t is not None]
        if not times:
            break
        now = min(times)
        if pending is not None and pending[0] <= now:
            s, pending = switch_done(s, pending[1], now), None
        while events and events[0][0] <= now:
            _, _, kind, rid = heapq.heappop(events)
            s = add_demand(s, Demand(rid, by_id[rid].model, by_id[rid].arrived)) if kind == "arrive" else release(s, rid, now)
        d = decide(s, now)
        if d.switch_to is not None:
            live = {h.id for h in s.holds if h.live(now)} | {g for g in d.grant if by_id[g].model != d.switch_to.model}
            out.cut += sorted(live - set(d.revoke) - set(d.expire))
            out.switches += 1
            pending = (now + real[d.switch_to.model], d.switch_to)
        s = apply(s, d, now)
        for g in d.grant:
            out.waits[g] = now - by_id[g].arrived
            heapq.heappush(events, (now + by_id[g].duration, 1, "end", g))
        wake = d.wake_at
    return out


@st.composite
def traffic(draw: st.DrawFn) -> list[Req]:
    t, reqs = 0.0, []
    for i in range(draw(st.integers(1, 50))):
        t += draw(st.floats(0, 15, allow_nan=False))
        reqs.append(Req(f"r{i}", draw(st.sampled_from(["llm", "sdxl"])), round(t, 3), draw(st.floats(0.01, 40, allow_nan=False))))
    return reqs


costs = st.floats(0.1, 40)
policies = st.builds(
    QueuePolicy,
    max_queue=st.just(10_000),
    queue_timeout_seconds=st.just(1e9),
    max_serve_seconds=st.floats(1, 120),
    drain_timeout_seconds=st.floats(0, 60),
    serve_cost_factor=st.none() | st.floats(0, 50),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=traffic(), policy=policies, real=st.tuples(costs, costs), guess=st.tuples(costs, costs))
def test_two_models_bound_holds_whatever_the_estimates(
    reqs: list[Req], policy: QueuePolicy, real: tuple[float, float], guess: tuple[float, float]
) -> None:
    out = simulate(reqs, policy, {"llm": real[0], "sdxl": real[1]}, (("llm", guess[0]), ("sdxl", guess[1])))
    assert out.cut == []
    s = max(real)
    bound = max(policy.max_serve_seconds, 2 * policy.drain_timeout_seconds + s) + s + 1e-6
    assert set(out.waits) == {r.id for r in reqs}  # nothing starves
    assert max(out.waits.values()) <= bound


@settings(max_examples=200, deadline=None)
@given(
    policy=policies,
    guess=costs,
    arrivals=st.lists(st.tuples(st.sampled_from(["llm", "sdxl", "flux"]), st.floats(0, 100)), min_size=1, max_size=10),
)
def test_the_cost_aware_cutoff_is_never_later_than_the_fixed_one(
    policy: QueuePolicy, guess: float, arrivals: list[tuple[str, float]]
) -> None:
    aware = QueueState(policy=policy, active="llm", switch_costs=(("sdxl", guess),), switch_estimate_seconds=guess * 2)
    for i, (m, at) in enumerate(arrivals):
        aware = add_demand(aware, dem(f"d{i}", m, at))
    fixed = QueueState(policy=QueuePolicy(**{**policy.__dict__, "serve_cost_factor": None}), active="llm", demands=aware.demands)
    a, f = serve_cutoff(aware), serve_cutoff(fixed)
    assert (a is None) == (f is None)
    if a is not None and f is not None:
        assert a <= f


# -- the setting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue", "factor"),
    [
        ({}, SERVE_COST_FACTOR),  # the spec's default is the policy's
        ({"serveCostFactor": 2}, 2.0),
        ({"serveCostFactor": None}, None),  # the fixed window
    ],
)
def test_serve_cost_factor_from_the_spec(queue: dict[str, object], factor: float | None) -> None:
    spec = DeploymentSpec.model_validate({"models": {"llm": {"image": "x"}}, "queue": queue})
    assert policies_of(spec)[0].serve_cost_factor == factor


def test_a_negative_serve_cost_factor_is_refused() -> None:
    with pytest.raises(ValueError, match="serveCostFactor"):
        DeploymentSpec.model_validate({"models": {"llm": {"image": "x"}}, "queue": {"serveCostFactor": -1}})
