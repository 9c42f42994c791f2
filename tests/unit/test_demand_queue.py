"""The queue policy (vramctl.demand.policy): table tests, then a simulation
driven by hypothesis that checks the promises on random traffic:

- no switch starts while a hold is live, unless the drain timed out or the
  switch was forced;
- with two models no demand waits longer than
  max(maxServe, 2 drains + switch) + switch (maxServe + one switch when
  maxServe is the larger);
- nothing starves: with several models and priorities every demand is served
  within a bound, and a withdrawn demand never causes a switch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from vramctl.demand.policy import (
    Decision,
    Demand,
    IdlePolicy,
    QueuePolicy,
    QueueState,
    Target,
    add_demand,
    apply,
    companions_done,
    companions_failed,
    decide,
    light_models,
    policies_of,
    release,
    renew,
    serve_cutoff,
    step,
    switch_done,
    switch_failed,
    withdraw,
)
from vramctl.spec.models import DeploymentSpec

POL = QueuePolicy(max_queue=8, queue_timeout_seconds=300, max_serve_seconds=60, drain_timeout_seconds=30)


def st_(active: str | None = "llm", **kw: object) -> QueueState:
    kw.setdefault("policy", POL)
    return QueueState(active=active, active_since=0.0, **kw)  # type: ignore[arg-type]


def dem(id: str, model: str, at: float, **kw: object) -> Demand:
    return Demand(id=id, model=model, arrived=at, **kw)  # type: ignore[arg-type]


def with_demands(s: QueueState, *ds: Demand) -> QueueState:
    for d in ds:
        s = add_demand(s, d)
    return s


# -- table tests ---------------------------------------------------------------


def test_demand_for_the_active_model_is_granted_at_once_and_becomes_a_hold() -> None:
    s = with_demands(st_(), dem("h1", "llm", 5.0, ttl_seconds=120))
    s, d = step(s, 5.0)
    assert d.grant == ("h1",) and d.switch_to is None
    assert [(h.id, h.expires) for h in s.holds] == [("h1", 125.0)]
    assert s.demands == ()


def test_switch_demand_for_the_active_model_is_granted_without_a_hold() -> None:
    s, d = step(with_demands(st_(), dem("s1", "llm", 1.0, kind="switch")), 1.0)
    assert d.grant == ("s1",) and s.holds == ()


def test_demands_for_one_model_share_one_switch_and_are_granted_together() -> None:
    s = with_demands(st_(), dem("a", "sdxl", 1.0), dem("b", "sdxl", 2.0, companions=("tts",)), dem("c", "sdxl", 3.0))
    s, d = step(s, 3.0)
    assert d.switch_to == Target("sdxl", ("tts",)) and d.grant == ()
    assert s.switching_to == Target("sdxl", ("tts",)) and s.active is None
    # More demands for the same model during the switch start nothing new.
    s = add_demand(s, dem("d", "sdxl", 4.0))
    s, d = step(s, 4.0)
    assert d.empty
    s = switch_done(s, Target("sdxl", ("tts",)), 20.0)
    s, d = step(s, 20.0)
    assert sorted(d.grant) == ["a", "b", "c", "d"] and d.switch_to is None


def test_active_model_keeps_serving_up_to_max_serve_then_the_other_model_gets_its_turn() -> None:
    s = with_demands(st_(), dem("img", "sdxl", 10.0))
    t = 10.0
    granted = []
    # A burst of LLM requests (each 1 s) is not broken by the one image request...
    window = POL.max_serve_seconds - POL.drain_timeout_seconds  # room for a drain to its timeout
    while t < 10.0 + window:
        s = add_demand(s, dem(f"q{t:g}", "llm", t))
        s, d = step(s, t)
        assert d.switch_to is None and d.grant, (t, d)
        granted += d.grant
        for g in d.grant:
            s = release(s, g, t + 0.5)
        t += 1.0
    assert len(granted) == 30
    # ...until the window ends: new LLM demands wait, and the switch comes.
    s = add_demand(s, dem("late", "llm", 40.0))
    s, d = step(s, 40.0)
    assert d.grant == () and d.switch_to == Target("sdxl")
    assert decide(s, 40.0).grant == ()  # switching: nothing granted


def test_wake_at_is_the_end_of_the_serving_window() -> None:
    s = with_demands(st_(), dem("img", "sdxl", 10.0), dem("q", "llm", 11.0))
    s = apply(s, decide(s, 11.0), 11.0)
    s = add_demand(s, dem("h", "llm", 12.0))
    d = decide(s, 12.0)
    assert d.grant == ("h",) and d.wake_at == 40.0  # arrival + maxServe - drainTimeout


def test_a_switch_waits_for_holds_until_the_drain_timeout_then_revokes_them() -> None:
    s = with_demands(st_(), dem("h1", "llm", 0.0, ttl_seconds=1000))
    s, _ = step(s, 0.0)
    s = add_demand(s, dem("img", "sdxl", 1.0))
    s, d = step(s, 31.0)  # window over: drain begins
    assert d.switch_to is None and d.drain is not None
    assert d.drain.holds == ("h1",) and d.drain.deadline == 61.0 and d.wake_at == 61.0
    s, d = step(s, 60.9)
    assert d.switch_to is None
    s, outcome = renew(s, "h1", 1000, 60.9)
    assert outcome == "renewed"  # a renew does not extend the drain
    s, d = step(s, 61.0)  # = the image request's arrival + maxServeSeconds
    assert d.revoke == ("h1",) and d.switch_to == Target("sdxl")
    _, outcome = renew(s, "h1", 1000, 62.0)
    assert outcome == "revoked"
    _, outcome = renew(s, "never", 1000, 62.0)
    assert outcome == "unknown"


def test_waiters_granted_at_a_switch_are_drained_not_cut() -> None:
    # The switch to llm took so long that the image request's window is over:
    # llm's waiters are still served, and the switch away waits for them.
    s = with_demands(st_(None), dem("q", "llm", 0.0), dem("img", "sdxl", 1.0))
    s, d = step(s, 1.0)
    assert d.switch_to == Target("llm")
    s = switch_done(s, Target("llm"), 100.0)
    s, d = step(s, 100.0)
    assert d.grant == ("q",) and d.switch_to is None
    assert d.drain is not None and d.drain.holds == ("q",) and d.drain.target == Target("sdxl")
    s, d = step(s, 105.0)
    assert d.switch_to is None
    s, d = step(release(s, "q", 106.0), 106.0)
    assert d.switch_to == Target("sdxl")


def test_released_holds_end_the_drain_early() -> None:
    s = with_demands(st_(), dem("h1", "llm", 0.0))
    s, _ = step(s, 0.0)
    s = add_demand(s, dem("img", "sdxl", 1.0))
    s, d = step(s, 61.0)
    assert d.drain is not None
    s = release(s, "h1", 65.0)
    s, d = step(s, 65.0)
    assert d.switch_to == Target("sdxl") and d.revoke == ()


def test_force_switch_skips_the_drain() -> None:
    s = with_demands(st_(), dem("h1", "llm", 0.0))
    s, _ = step(s, 0.0)
    s = add_demand(s, dem("sw", "sdxl", 1.0, kind="switch", force=True))
    s, d = step(s, 1.0)
    assert d.revoke == ("h1",) and d.switch_to == Target("sdxl")


def test_force_switch_grants_no_new_hold_on_the_model_it_stops() -> None:
    s = with_demands(st_(), dem("late", "llm", 1.0), dem("sw", "sdxl", 1.0, kind="switch", force=True))
    s, d = step(s, 1.0)
    assert d.grant == () and d.switch_to == Target("sdxl") and [x.id for x in s.demands] == ["late", "sw"]


LIGHT = frozenset({"tts"})


def test_light_model_is_added_beside_the_active_one_without_a_drain() -> None:
    s = with_demands(st_(light=LIGHT), dem("h", "llm", 0.0))
    s, _ = step(s, 0.0)
    s = add_demand(s, dem("t", "tts", 1.0))
    s, d = step(s, 1.0)
    assert d.companions == ("tts",) and d.switch_to is None and d.drain is None and d.grant == ()
    assert s.companions_pending == ("tts",) and [h.id for h in s.holds] == ["h"]  # the LLM's hold is untouched
    s = add_demand(s, dem("t2", "tts", 1.5))
    s, d = step(s, 1.5)
    assert d.companions is None  # one change at a time
    s = companions_done(s, ("tts",), 3.0)
    s, d = step(s, 3.0)
    assert sorted(d.grant) == ["t", "t2"]


def test_light_demand_does_not_open_the_anti_thrash_window() -> None:
    s = with_demands(st_(light=LIGHT, active_companions=("tts",)), dem("h", "llm", 0.0), dem("t", "tts", 0.0))
    s, d = step(s, 0.0)
    assert sorted(d.grant) == ["h", "t"]
    assert serve_cutoff(add_demand(s, dem("t3", "tts", 1.0))) is None


def test_a_heavy_switch_keeps_the_held_light_model_and_its_hold() -> None:
    s = with_demands(st_(light=LIGHT, active_companions=("tts",)), dem("t", "tts", 0.0))
    s, _ = step(s, 0.0)
    s = add_demand(s, dem("img", "sdxl", 1.0))
    s, d = step(s, 1.0)  # llm is not in use: switch at once, tts stays (held)
    assert d.switch_to == Target("sdxl", ("tts",)) and d.revoke == ()
    assert [h.id for h in s.holds] == ["t"]


def test_failed_companion_start_returns_its_demands() -> None:
    s = with_demands(st_(light=LIGHT), dem("t", "tts", 1.0))
    s, d = step(s, 1.0)
    assert d.companions == ("tts",)
    s, failed = companions_failed(s, 2.0)
    assert failed == ("t",) and s.companions_pending is None and s.demands == ()


def test_light_models_come_from_the_spec() -> None:
    spec = DeploymentSpec.model_validate({"models": {"llm": {"image": "x"}, "tts": {"class": "light", "image": "y"}}})
    assert light_models(spec) == frozenset({"tts"})


def test_expired_hold_is_released_and_renew_then_is_unknown() -> None:
    s = with_demands(st_(), dem("h1", "llm", 0.0, ttl_seconds=10))
    s, d = step(s, 0.0)
    assert d.wake_at == 10.0
    s, d = step(s, 10.0)
    assert d.expire == ("h1",) and s.holds == ()
    assert renew(s, "h1", 10, 11.0)[1] == "unknown"


def test_queue_timeout_rejects_with_retry_after() -> None:
    s = with_demands(st_(), dem("h1", "llm", 0.0))
    s, _ = step(s, 0.0)
    s = add_demand(s, dem("img", "sdxl", 1.0))
    s = replace(s, policy=replace(POL, queue_timeout_seconds=20))
    s, d = step(s, 21.0)
    assert [(r.demand_id, r.reason) for r in d.reject] == [("img", "QueueTimeout")]
    assert d.reject[0].retry_after_seconds >= 1 and "queueTimeoutSeconds 20" in d.reject[0].message
    assert s.demands == ()


def test_full_queue_rejects_the_newest() -> None:
    s = st_(policy=replace(POL, max_queue=2))
    s, _ = step(with_demands(s, dem("h", "llm", 0.0)), 0.0)
    s = with_demands(s, dem("a", "sdxl", 1.0), dem("b", "sdxl", 2.0), dem("c", "flux", 3.0), dem("d", "llm", 3.5))
    d = decide(s, 4.0)
    assert d.grant == ("d",)  # the active model's demand is not queued
    assert [(r.demand_id, r.reason) for r in d.reject] == [("c", "QueueFull")]
    assert d.reject[0].retry_after_seconds == 27 + 30  # the rest of the window + one switch estimate


def test_withdrawn_demand_causes_no_switch() -> None:
    s = with_demands(st_(), dem("h", "llm", 0.0))
    s, _ = step(s, 0.0)
    s = add_demand(s, dem("img", "sdxl", 1.0))
    s = withdraw(s, "img", 30.0)
    s, d = step(s, 61.0)
    assert d.switch_to is None and d.drain is None
    # Releasing a demand that was never granted withdraws it too.
    s = add_demand(s, dem("img2", "sdxl", 62.0))
    s = release(s, "img2", 63.0)
    assert s.demands == ()


def test_priority_moves_a_model_ahead_but_not_past_the_overdue() -> None:
    s = with_demands(st_(None), dem("a", "sdxl", 0.0), dem("b", "flux", 1.0, priority=5))
    assert decide(s, 1.0).switch_to == Target("flux")
    # Once "a" has waited maxServeSeconds, arrival order wins again.
    assert decide(s, 60.0).switch_to == Target("sdxl")


def test_switch_failed_returns_the_demands_of_that_model() -> None:
    s = with_demands(st_(None), dem("a", "sdxl", 0.0), dem("b", "sdxl", 0.5), dem("c", "flux", 1.0))
    s, d = step(s, 1.0)
    assert d.switch_to == Target("sdxl")
    s, failed = switch_failed(s, 5.0)
    assert failed == ("a", "b") and [x.id for x in s.demands] == ["c"]
    assert decide(s, 5.0).switch_to == Target("flux")


@pytest.mark.parametrize(
    ("action", "active", "expect_idle", "expect_switch", "active_after"),
    [
        ("default", "sdxl", "default", Target("llm"), None),
        ("default", "llm", None, None, "llm"),
        ("sleep", "sdxl", "sleep", None, None),
        ("free", "sdxl", "free", None, None),
        ("free", None, None, None, None),
    ],
)
def test_idle_actions_happen_once_after_the_quiet_period(
    action: str, active: str | None, expect_idle: str | None, expect_switch: Target | None, active_after: str | None
) -> None:
    idle = IdlePolicy(after_seconds=100, action=action, default_model="llm")  # type: ignore[arg-type]
    s = with_demands(st_(active, idle=idle), dem("h", active or "llm", 10.0, kind="switch"))
    if active is None:
        s = replace(s, demands=())
    s, d = step(s, 10.0)
    s, d = step(s, 50.0)
    assert d.idle is None and (d.wake_at == 110.0 or expect_idle is None)
    s, d = step(s, 110.0)
    assert d.idle == expect_idle and d.switch_to == expect_switch
    if expect_switch is None:
        assert s.active == active_after
    s, d = step(s, 500.0)
    assert d.empty  # once per idle period
    s = add_demand(s, dem("again", "sdxl", 600.0))
    assert not s.idled


def test_held_gpu_is_not_idle() -> None:
    idle = IdlePolicy(after_seconds=100, action="free")
    s, _ = step(with_demands(st_(idle=idle), dem("h", "llm", 0.0)), 0.0)
    s, d = step(s, 1000.0)
    assert d.idle is None and s.active == "llm"


def test_policies_come_from_the_spec() -> None:
    spec = DeploymentSpec.model_validate(
        {
            "models": {"llm": {"image": "x"}, "sdxl": {"image": "y"}},
            "switching": {"mode": "onDemand", "defaultModel": "llm"},
            "queue": {"maxQueue": 7, "queueTimeoutSeconds": 100, "maxServeSeconds": 20, "drainTimeoutSeconds": 5},
            "idle": {"afterSeconds": 600, "action": "default"},
        }
    )
    assert policies_of(spec) == (QueuePolicy(7, 100, 20, 5), IdlePolicy(600, "default", "llm"))


# -- simulation ----------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    id: str
    model: str
    arrived: float
    duration: float  # how long it holds once granted
    priority: int = 0
    withdraw_after: float | None = None  # the client goes away after waiting this long


@dataclass
class Outcome:
    waits: dict[str, float] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)
    withdrawn: set[str] = field(default_factory=set)
    switches: list[tuple[float, Target, tuple[str, ...]]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


def simulate(
    reqs: list[Req], policy: QueuePolicy, switch_seconds: float, horizon: float = 1e6, light: frozenset[str] = frozenset()
) -> Outcome:
    """Discrete events: arrivals, withdrawals, hold ends, switch completions and
    the policy's own wake-ups. Checks the drain promise at every switch."""
    out = Outcome()
    state = QueueState(policy=policy, switch_estimate_seconds=switch_seconds, light=light)
    pending_companions: tuple[float, tuple[str, ...]] | None = None
    events: list[tuple[float, int, str, str]] = []  # (time, order, kind, id)
    by_id = {r.id: r for r in reqs}
    for r in reqs:
        heapq.heappush(events, (r.arrived, 0, "arrive", r.id))
        if r.withdraw_after is not None:
            heapq.heappush(events, (r.arrived + r.withdraw_after, 1, "withdraw", r.id))
    wake: float | None = None
    pending_switch: tuple[float, Target] | None = None
    for _ in range(200_000):
        times = [e[0] for e in events[:1]]
        if wake is not None:
            times.append(wake)
        if pending_switch is not None:
            times.append(pending_switch[0])
        if pending_companions is not None:
            times.append(pending_companions[0])
        if not times:
            break
        now = min(times)
        if now > horizon:
            break
        if pending_switch is not None and pending_switch[0] <= now:
            state = switch_done(state, pending_switch[1], now)
            pending_switch = None
        if pending_companions is not None and pending_companions[0] <= now:
            state = companions_done(state, pending_companions[1], now)
            pending_companions = None
        while events and events[0][0] <= now:
            _, _, kind, rid = heapq.heappop(events)
            r = by_id[rid]
            if kind == "arrive":
                state = add_demand(state, Demand(r.id, r.model, r.arrived, priority=r.priority))
            elif kind == "withdraw":
                if any(d.id == rid for d in state.demands):
                    out.withdrawn.add(rid)
                state = withdraw(state, rid, now)
            else:
                state = release(state, rid, now)
        decision = decide(state, now)
        _check_drain(state, decision, now, out)
        state = apply(state, decision, now)
        for g in decision.grant:
            out.waits[g] = now - by_id[g].arrived
            heapq.heappush(events, (now + by_id[g].duration, 2, "end", g))
        out.rejected |= {r.demand_id for r in decision.reject}
        if decision.switch_to is not None:
            out.switches.append((now, decision.switch_to, decision.revoke))
            pending_switch = (now + switch_seconds, decision.switch_to)
        if decision.companions is not None:
            pending_companions = (now + switch_seconds / 4, decision.companions)
        wake = decision.wake_at
    return out


def _check_drain(state: QueueState, decision: Decision, now: float, out: Outcome) -> None:
    if decision.switch_to is None:
        return
    kept = set(decision.switch_to.companions)  # light models the switch keeps running
    live = {h.id for h in state.holds if h.live(now) and h.model not in kept} - set(decision.expire)
    live |= {d.id for d in state.demands if d.id in decision.grant and d.kind == "hold" and d.model not in kept}  # granted in this decision
    if live - set(decision.revoke):
        out.violations.append(f"{now}: switch to {decision.switch_to} with live holds {live} neither revoked nor expired")
    if decision.revoke:
        since = state.drain_since if state.drain_since is not None else now  # a drain that begins now
        if now < since + state.policy.drain_timeout_seconds:
            out.violations.append(f"{now}: holds {decision.revoke} revoked before the drain timeout (drain since {since})")


@st.composite
def traffic(draw: st.DrawFn, models: list[str], priorities: bool) -> list[Req]:
    n = draw(st.integers(1, 60))
    t = 0.0
    reqs = []
    for i in range(n):
        t += draw(st.floats(0, 20, allow_nan=False))
        model = draw(st.sampled_from(models))
        reqs.append(
            Req(
                f"r{i}",
                model,
                round(t, 3),
                duration=draw(st.floats(0.01, 50, allow_nan=False)),
                priority=draw(st.integers(0, 3)) if priorities else 0,
                withdraw_after=draw(st.none() | st.floats(0, 100, allow_nan=False)),
            )
        )
    return reqs


policies = st.builds(
    QueuePolicy,
    max_queue=st.just(10_000),
    queue_timeout_seconds=st.just(1e9),
    max_serve_seconds=st.floats(1, 120),
    drain_timeout_seconds=st.floats(0, 60),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=traffic(["llm", "sdxl"], priorities=False), policy=policies, switch_seconds=st.floats(0.1, 40))
def test_two_models_no_wait_beyond_the_bound_and_no_switch_over_a_live_hold(
    reqs: list[Req], policy: QueuePolicy, switch_seconds: float
) -> None:
    out = simulate(reqs, policy, switch_seconds)
    note(f"switches: {out.switches}")
    assert out.violations == []
    drain, serve, s = policy.drain_timeout_seconds, policy.max_serve_seconds, switch_seconds
    bound = max(serve, 2 * drain + s) + s + 1e-6
    for rid, w in out.waits.items():
        assert w <= bound, f"{rid} waited {w:.3f} s > {bound:.3f} s"
    # Nothing starves, and a withdrawn demand is never served.
    assert set(out.waits) | out.withdrawn == {r.id for r in reqs}
    assert not set(out.waits) & out.withdrawn


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=traffic(["llm", "sdxl", "flux", "coder"], priorities=True), policy=policies, switch_seconds=st.floats(0.1, 40))
def test_many_models_with_priorities_nothing_starves(reqs: list[Req], policy: QueuePolicy, switch_seconds: float) -> None:
    out = simulate(reqs, policy, switch_seconds)
    assert out.violations == []
    assert set(out.waits) | out.withdrawn == {r.id for r in reqs}
    drain, serve, s = policy.drain_timeout_seconds, policy.max_serve_seconds, switch_seconds
    bound = serve + 4 * (max(serve, drain + s) + drain + s) + 1e-6
    assert max(out.waits.values(), default=0.0) <= bound


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=traffic(["llm", "sdxl", "tts"], priorities=True), policy=policies, switch_seconds=st.floats(0.1, 40))
def test_with_a_light_model_nothing_starves_and_no_heavy_hold_is_cut(reqs: list[Req], policy: QueuePolicy, switch_seconds: float) -> None:
    out = simulate(reqs, policy, switch_seconds, light=frozenset({"tts"}))
    assert out.violations == []
    assert set(out.waits) | out.withdrawn == {r.id for r in reqs}
    assert all(t.model != "tts" for _, t, _ in out.switches)  # a light model is never the heavy target


@settings(max_examples=100, deadline=None)
@given(reqs=traffic(["llm", "sdxl"], priorities=False), switch_seconds=st.floats(0.1, 40))
def test_a_demand_withdrawn_at_once_never_causes_a_switch(reqs: list[Req], switch_seconds: float) -> None:
    gone = [replace(r, withdraw_after=0.0) if r.model == "sdxl" else replace(r, withdraw_after=None) for r in reqs]
    out = simulate(gone, POL, switch_seconds)
    assert all(t.model == "llm" for _, t, _ in out.switches)
    assert len(out.switches) <= 1


def test_bursts_coalesce_into_few_switches() -> None:
    # 200 requests alternating between two models, one every 0.5 s, 2 s each:
    # switching per request would be 200 switches.
    reqs = [Req(f"r{i}", "llm" if i % 2 else "sdxl", i * 0.5, 2.0) for i in range(200)]
    out = simulate(reqs, QueuePolicy(max_serve_seconds=20, drain_timeout_seconds=10), switch_seconds=5)
    assert out.violations == []
    assert len(out.waits) == 200
    assert len(out.switches) <= 200 // 5
    assert max(out.waits.values()) <= 20 + 10 + 5
