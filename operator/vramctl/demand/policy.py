"""The pure queue policy of one GPU: who gets the GPU next, and when.

Clients ask for a model (a *demand*: a hold, a proxied request, a
``POST /switch``); the worker owns one ``QueueState`` per GPU and, after every
inbox command and at ``Decision.wake_at``, calls ``decide(state, now)`` and
then ``apply(state, decision, now)``, performing the decision's effects (answer
the granted and rejected clients, revoke holds, start a switch).

Like the planner this module performs no I/O, reads no clock (``now`` is
passed in) and does not log. Its promises, checked by table tests and a
hypothesis simulation (tests/unit/test_demand_queue.py):

- **Anti-thrash, bounded, as long as the switches it avoids are worth.**
  Demands for the active model are granted at once, but once a demand for
  another model waits, new ones only for its *serving window* more:
  ``serveCostFactor`` (k) times the estimated cost of the switches the
  window avoids, to the waiting model and back (``QueueState.switch_costs``,
  from the worker's cost book), never more than ``maxServeSeconds -
  drainTimeoutSeconds``: even a drain that runs to its timeout then ends
  within ``maxServeSeconds`` of that demand's arrival. With 0.5 s warm
  switches the waiting model gets its turn within seconds; with 25 s cold
  ones bursts are kept together (so are they when either way is cold: the
  way back is paid too). While both models have demand a turn serves about
  k times what its switches cost, so at most about 1/(k+1) of the GPU's time
  goes to switching. ``serveCostFactor`` unset: the fixed window
  (``maxServeSeconds - drainTimeoutSeconds``) whatever the cost.
  A model with no hold and nothing granted gives way at once. Demands that
  were waiting for the switch to the active model are always granted when it
  completes, so every switch serves someone. With two models no demand waits
  longer than ``max(maxServeSeconds, 2 x drainTimeoutSeconds + S) + S`` (S:
  one switch): ``maxServeSeconds`` plus one switch when that is the larger.
- **Coalescing.** All waiting demands for one model share one switch.
- **Drain.** No switch starts while a hold on the active model is live,
  until ``drainTimeoutSeconds`` after the drain began; then the remaining
  holds are revoked (their renew answers 409). ``force`` skips the drain.
- **Order.** First come, first served; a model's ``priority`` moves its
  demands ahead, but only while the others have waited less than
  ``maxServeSeconds``: past that, plain arrival order (no starvation).
- **Bounds.** A demand that waited ``queueTimeoutSeconds`` is rejected; so is
  the newest beyond ``maxQueue`` waiting demands; both with a Retry-After.
- **Idle.** With nothing held, queued or switching for ``idle.afterSeconds``,
  go to the default model, sleep, or free the GPU (once per idle period).
  Two stages (``idle.sleepAfterSeconds``: afterSeconds with action sleep;
  ``idle.stopAfterSeconds``): the first puts the active model to sleep (it
  keeps its CUDA context and host memory, so the next use is a wake), the
  second, counted from the same last use, frees the GPU, sleepers too.

A sleeping model counts as not active: waking it is the worker's way of
"switching" to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from vramctl.spec.models import DeploymentSpec

DemandKind = Literal["hold", "switch"]
IdleAction = Literal["default", "sleep", "free"]
RejectReason = Literal["QueueTimeout", "QueueFull"]
RenewOutcome = Literal["renewed", "revoked", "unknown"]

# How many revoked hold ids are remembered for renew's 409.
REVOKED_MEMORY = 1024
# The default k of the serving window: a turn serves about 5 switches' worth
# before paying one (at most ~1/6 of the GPU's time spent switching while two
# models have demand); see the module docstring and benchmarks/queue_sim.py.
SERVE_COST_FACTOR = 5.0


@dataclass(frozen=True)
class QueuePolicy:
    """The ``queue`` settings of a GPU (spec ``queue:``), in seconds."""

    max_queue: int = 512
    queue_timeout_seconds: float = 300.0
    max_serve_seconds: float = 60.0
    drain_timeout_seconds: float = 30.0
    # k of the serving window (k x the switches' cost); None: the fixed window.
    serve_cost_factor: float | None = SERVE_COST_FACTOR


@dataclass(frozen=True)
class IdlePolicy:
    """The ``idle`` settings of a GPU; ``after_seconds`` None: never idle.
    ``stop_after_seconds``: the second stage (free the GPU); None: none."""

    after_seconds: float | None = None
    action: IdleAction = "default"
    default_model: str | None = None
    stop_after_seconds: float | None = None


def light_models(spec: DeploymentSpec) -> frozenset[str]:
    """The models that run beside the active one (``QueueState.light``)."""
    return frozenset(name for name, m in spec.models.items() if not m.heavy)


def policies_of(spec: DeploymentSpec) -> tuple[QueuePolicy, IdlePolicy]:
    """The GPU's ``queue`` and ``idle`` settings as the policy takes them."""
    q, i = spec.queue, spec.idle
    queue = QueuePolicy(q.max_queue, q.queue_timeout_seconds, q.max_serve_seconds, q.drain_timeout_seconds, q.serve_cost_factor)
    after, action = (i.sleep_after_seconds, "sleep") if i.sleep_after_seconds is not None else (i.after_seconds, i.action)
    return queue, IdlePolicy(after, action, spec.idle_default_model, i.stop_after_seconds)


@dataclass(frozen=True)
class Demand:
    """A client waiting for ``model`` (+ ``companions``) to be served.

    ``kind`` hold: granted means a ``Hold`` (``ttl_seconds`` None: held until
    released, as the gateway's leases are). ``kind`` switch: granted means the
    model is active; nothing is held. ``force`` (switch only): skip the drain.
    """

    id: str
    model: str
    arrived: float
    companions: tuple[str, ...] = ()
    priority: int = 0
    kind: DemandKind = "hold"
    force: bool = False
    ttl_seconds: float | None = None


@dataclass(frozen=True)
class Hold:
    id: str
    model: str
    granted: float
    expires: float | None  # None: until released

    def live(self, now: float) -> bool:
        return self.expires is None or now < self.expires


@dataclass(frozen=True)
class Target:
    """What a switch brings up: one heavy model and its companions."""

    model: str
    companions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejection:
    demand_id: str
    reason: RejectReason
    retry_after_seconds: int
    message: str


@dataclass(frozen=True)
class Drain:
    """A switch to ``target`` waits for ``holds`` to end, at most until ``deadline``."""

    target: Target
    holds: tuple[str, ...]
    since: float
    deadline: float


@dataclass(frozen=True)
class Forecast:
    """When each heavy model of one GPU is expected to serve, by the cost
    book (the worker makes one at each look; ``ready_in`` reads it).

    ``serving``: the heavy model that runs, or that the switch or restart in
    flight brings up (None: none); ``began`` and ``seconds``: when that
    switch began and what it is expected to take in all (``began`` None:
    nothing in flight); ``ways``: (model, seconds) one switch from
    ``serving`` to each other heavy model (its stop or sleep, their start
    or wake)."""

    serving: str | None = None
    began: float | None = None
    seconds: float = 0.0
    ways: tuple[tuple[str, float], ...] = ()


def ready_in(f: Forecast, model: str, now: float) -> float:
    """Predicted seconds until ``model`` serves: what is left of the switch
    in flight, then (another model's turn) the switch from there to it."""
    rest = max(0.0, f.began + f.seconds - now) if f.began is not None else 0.0
    if model == f.serving:
        return rest
    return rest + next((s for m, s in f.ways if m == model), 0.0)


def retry_after(f: Forecast, model: str, now: float) -> int:
    """``ready_in`` as a Retry-After: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(ready_in(f, model, now)))


@dataclass(frozen=True)
class QueueState:
    """Everything the policy knows about one GPU (owned by its worker).

    ``active``: the model being served (None: none, or a switch is under
    way); ``active_since``: when it became active; ``switching_to``: the
    target of a switch the worker is performing. ``last_activity``: when a
    demand, grant or release last happened (the idle clock).
    ``switch_estimate_seconds``: what the worker expects a switch to take
    (for Retry-After, and the serving window of a model not in
    ``switch_costs``); ``switch_costs``: (model, seconds) what giving the
    GPU to that model is expected to cost in switches, there and back to
    the active one (the worker's cost book); ``forecast``: when each model
    is expected to serve (the same book; Retry-After). ``light``: the light models; a demand for one is
    served by running it beside the active model (``Decision.companions``,
    no drain, no window: it disturbs nobody); ``companions_pending``: such a
    change the worker is making.
    """

    policy: QueuePolicy = field(default_factory=QueuePolicy)
    idle: IdlePolicy = field(default_factory=IdlePolicy)
    active: str | None = None
    active_companions: tuple[str, ...] = ()
    active_since: float = 0.0
    switching_to: Target | None = None
    demands: tuple[Demand, ...] = ()
    holds: tuple[Hold, ...] = ()
    drain_since: float | None = None
    last_activity: float = 0.0
    idled: bool = False
    idle_stopped: bool = False  # the second idle stage ran (or a first stage that freed the GPU)
    revoked: tuple[str, ...] = ()
    switch_estimate_seconds: float = 30.0
    switch_costs: tuple[tuple[str, float], ...] = ()
    forecast: Forecast | None = None
    light: frozenset[str] = frozenset()
    companions_pending: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Decision:
    """What the worker does now; ``apply`` folds the same into the state.

    ``grant``: demand ids answered "yes" (holds become ``Hold``s).
    ``reject``: answered 503 with Retry-After. ``expire``: holds whose ttl
    ran out (released). ``revoke``: holds ended by a drain timeout or a
    forced switch (renew answers 409). ``switch_to``: start this switch now.
    ``drain``: a switch waits for holds. ``idle``: the idle action to take
    (``switch_to`` carries the default model for action default).
    ``wake_at``: call ``decide`` again at this time even if nothing happens.
    ``companions``: run exactly these light models beside the active one
    (report back with ``companions_done`` or ``companions_failed``).
    """

    grant: tuple[str, ...] = ()
    reject: tuple[Rejection, ...] = ()
    expire: tuple[str, ...] = ()
    revoke: tuple[str, ...] = ()
    switch_to: Target | None = None
    drain: Drain | None = None
    idle: IdleAction | None = None
    wake_at: float | None = None
    companions: tuple[str, ...] | None = None

    @property
    def empty(self) -> bool:
        return not (self.grant or self.reject or self.expire or self.revoke or self.switch_to or self.idle or self.companions is not None)


# -- events: the worker's inbox commands fold into the state ---------------


def add_demand(state: QueueState, demand: Demand) -> QueueState:
    """A new demand (admission control happens in ``decide``)."""
    return replace(
        state, demands=(*state.demands, demand), last_activity=max(state.last_activity, demand.arrived), idled=False, idle_stopped=False
    )


def withdraw(state: QueueState, demand_id: str, now: float) -> QueueState:
    """The client went away before its demand was granted: forget it, so it causes no switch."""
    kept = tuple(d for d in state.demands if d.id != demand_id)
    if len(kept) == len(state.demands):
        return state
    return replace(state, demands=kept, last_activity=max(state.last_activity, now))


def release(state: QueueState, hold_id: str, now: float) -> QueueState:
    """``DELETE /holds/{id}`` or a lease's end; unknown ids are a no-op (idempotent)."""
    kept = tuple(h for h in state.holds if h.id != hold_id)
    if len(kept) == len(state.holds):
        return withdraw(state, hold_id, now)  # released before it was granted
    return replace(state, holds=kept, last_activity=max(state.last_activity, now))


def renew(state: QueueState, hold_id: str, ttl_seconds: float, now: float) -> tuple[QueueState, RenewOutcome]:
    """``POST /holds/{id}/renew``: revoked -> 409, unknown (or expired) -> 404."""
    for i, h in enumerate(state.holds):
        if h.id == hold_id and h.live(now):
            holds = list(state.holds)
            holds[i] = replace(h, expires=None if h.expires is None else now + ttl_seconds)
            return replace(state, holds=tuple(holds), last_activity=max(state.last_activity, now)), "renewed"
    if hold_id in state.revoked:
        return state, "revoked"
    return state, "unknown"


def switch_done(state: QueueState, target: Target, now: float) -> QueueState:
    """The switch finished: ``target`` is active and healthy."""
    return replace(
        state,
        active=target.model,
        active_companions=target.companions,
        active_since=now,
        switching_to=None,
        last_activity=max(state.last_activity, now),
    )


def switch_superseded(state: QueueState, running: Target | None, now: float) -> QueueState:
    """Another source moved the GPU before the switch finished: ``running``
    is served now (None: nothing). Not a failure: the demands for the
    switch's target stay queued and get their turn as usual."""
    out = replace(state, switching_to=None, active=None, active_companions=(), last_activity=max(state.last_activity, now))
    return switch_done(out, running, now) if running is not None else out


def switch_failed(state: QueueState, now: float) -> tuple[QueueState, tuple[str, ...]]:
    """The switch failed: nothing is active; the demands for its model are
    returned so the worker can answer them (they would only retry into the
    same failure)."""
    target = state.switching_to
    failed = tuple(d.id for d in state.demands if target is not None and d.model == target.model)
    kept = tuple(d for d in state.demands if d.id not in failed)
    return replace(state, active=None, active_companions=(), switching_to=None, demands=kept, last_activity=now), failed


def companions_done(state: QueueState, companions: tuple[str, ...], now: float) -> QueueState:
    """The light models beside the active one are now ``companions``."""
    return replace(state, active_companions=companions, companions_pending=None, last_activity=max(state.last_activity, now))


def companions_failed(state: QueueState, now: float) -> tuple[QueueState, tuple[str, ...]]:
    """Starting the companions failed: the demands for the ones that are not
    running are returned for the worker to answer."""
    missing = set(state.companions_pending or ()) - set(state.active_companions)
    failed = tuple(d.id for d in state.demands if d.model in missing)
    kept = tuple(d for d in state.demands if d.id not in failed)
    return replace(state, demands=kept, companions_pending=None, last_activity=now), failed


def went_away(state: QueueState, now: float) -> QueueState:
    """The active model stopped by itself (crash, an outside stop): its holds end."""
    return replace(
        state,
        active=None,
        active_companions=(),
        holds=(),
        revoked=_remember(state.revoked, (h.id for h in state.holds)),
        drain_since=None,
        last_activity=now,
    )


# -- the fast lane: requests admitted without a round trip through the worker --

LANE = "lane:"  # the id prefix of the holds that stand for the fast lane's requests in flight


def lane_models(state: QueueState) -> frozenset[str]:
    """The models a request may hold without queueing (the fast lane): the
    served ones, while nothing waits, switches, drains or changes companions.
    There ``decide`` would grant at once, so the answer is the same without
    asking it; anything else goes through the queue."""
    if state.active is None or state.switching_to is not None or state.drain_since is not None:
        return frozenset()
    if state.demands or state.companions_pending is not None:
        return frozenset()
    return frozenset((state.active, *state.active_companions))


def lane_activity(state: QueueState, in_flight: dict[str, int], last_used: float | None, now: float) -> QueueState:
    """Fold the fast lane into the state (after closing it): each served
    model with requests in flight gets one hold ``lane:<model>`` (no ttl: it
    ends when they do), so a switch drains them like any hold; the lane's
    last use is activity (the idle clock restarts, a new idle period begins)."""
    served: set[str] = set()
    if state.switching_to is None and state.active is not None:
        served = {state.active, *state.active_companions}
    kept = tuple(h for h in state.holds if not h.id.startswith(LANE))
    earlier = {h.model: h.granted for h in state.holds if h.id.startswith(LANE)}
    lane = tuple(Hold(LANE + m, m, earlier.get(m, now), None) for m in sorted(served) if in_flight.get(m, 0) > 0)
    out = replace(state, holds=(*kept, *lane))
    busy_at = now if lane else last_used
    if busy_at is not None and busy_at > state.last_activity:
        out = replace(out, last_activity=busy_at, idled=False, idle_stopped=False)
    return out


# -- the decision ------------------------------------------------------------


def satisfied(state: QueueState, d: Demand) -> bool:
    if state.switching_to is not None:
        return False
    if d.model in state.light:
        return d.model in state.active_companions
    return d.model == state.active and set(d.companions) <= set(state.active_companions)


def serve_cutoff(state: QueueState) -> float | None:
    """Until when demands for the active model are granted; None: no limit
    (no demand for another model waits)."""
    others = [d for d in state.demands if d.model not in state.light and not satisfied(state, d)]
    if state.active is None or not others:
        return None
    first = min(others, key=lambda d: (d.arrived, d.id))
    return first.arrived + serve_window(state, first.model)


def switch_cost(state: QueueState, model: str) -> float:
    """The expected seconds of the switches that serving ``model`` takes
    (there and back); ``switch_estimate_seconds`` when the worker gave none."""
    for m, seconds in state.switch_costs:
        if m == model:
            return seconds
    return state.switch_estimate_seconds


def serve_window(state: QueueState, model: str) -> float:
    """How long after a demand for ``model`` began to wait the active model's
    new demands are still granted: k x the switches' cost, at most
    ``maxServeSeconds - drainTimeoutSeconds``."""
    pol = state.policy
    # New grants end a drain's length early, so that even a drain that runs
    # to its timeout ends within maxServeSeconds of the first waiter's arrival.
    fixed = max(0.0, pol.max_serve_seconds - pol.drain_timeout_seconds)
    if pol.serve_cost_factor is None:
        return fixed
    return min(fixed, max(0.0, pol.serve_cost_factor * switch_cost(state, model)))


def queue_order(state: QueueState, now: float) -> list[Demand]:
    """Waiting demands in the order their models get the GPU: the overdue
    (waited ``maxServeSeconds`` or more) first, by arrival; then by priority,
    then arrival."""
    limit = state.policy.max_serve_seconds

    def key(d: Demand) -> tuple[int, int, float, str]:
        overdue = now - d.arrived >= limit
        return (0, 0, d.arrived, d.id) if overdue else (1, -d.priority, d.arrived, d.id)

    return sorted(state.demands, key=key)


def decide(state: QueueState, now: float) -> Decision:
    """The decision for ``state`` at ``now``; pure. See the module docstring."""
    pol = state.policy
    wakes: list[float] = []
    expire = tuple(h.id for h in state.holds if not h.live(now))
    holds = [h for h in state.holds if h.live(now)]
    wakes += [h.expires for h in holds if h.expires is not None]

    grant: list[str] = []
    reject: list[Rejection] = []
    waiting: list[Demand] = []
    cutoff = serve_cutoff(state)
    for d in sorted(state.demands, key=lambda d: (d.arrived, d.id)):
        if now - d.arrived >= pol.queue_timeout_seconds:
            reject.append(
                Rejection(
                    d.id,
                    "QueueTimeout",
                    _retry_after(state, now, d.model),
                    f"{d.model} was not served within queueTimeoutSeconds {pol.queue_timeout_seconds:g}",
                )
            )
            continue
        free_pass = d.kind == "switch" or d.model in state.light  # neither holds the GPU's heavy model
        if satisfied(state, d) and (free_pass or cutoff is None or now < cutoff or d.arrived <= state.active_since):
            grant.append(d.id)
            if d.kind == "hold" and d.ttl_seconds is not None:
                wakes.append(now + d.ttl_seconds)
        else:
            waiting.append(d)
            wakes.append(d.arrived + pol.queue_timeout_seconds)
    if cutoff is not None:
        wakes.append(cutoff)
    for d in waiting[pol.max_queue :]:
        reject.append(Rejection(d.id, "QueueFull", _retry_after(state, now, d.model), f"the queue holds maxQueue {pol.max_queue} demands"))
    waiting = waiting[: pol.max_queue]
    # Priority can change at the overdue mark.
    wakes += [d.arrived + pol.max_serve_seconds for d in waiting if d.arrived + pol.max_serve_seconds > now]

    decision = Decision(grant=tuple(grant), reject=tuple(reject), expire=expire)
    if state.switching_to is not None:
        return replace(decision, wake_at=_first_after(wakes, now))

    by_id = {d.id: d for d in state.demands}
    light_wanted = [d.model for d in waiting if d.model in state.light and not satisfied(state, d)]
    # Holds granted in this same decision count: they start now.
    new_holds = [(g, by_id[g].model) for g in grant if by_id[g].kind == "hold"]
    all_holds = [(h.id, h.model) for h in holds] + new_holds
    # A switch keeps the light models that are held or wanted (they fit, or the switch fails).
    keep = tuple(
        m
        for m in (*state.active_companions, *light_wanted)
        if m in state.light and (m in light_wanted or any(m == hm for _, hm in all_holds))
    )
    candidates = [
        d for d in queue_order(replace(state, demands=tuple(waiting)), now) if d.model not in state.light and not satisfied(state, d)
    ]
    forced = [d for d in candidates if d.force]
    if forced:
        target = _target(state, candidates, forced[0].model, keep)
        # No new hold on the model being forced off: those demands wait for its return.
        still = tuple(g for g in grant if by_id[g].kind == "switch" or by_id[g].model in target.companions)
        revoke = tuple(h.id for h in holds if h.model not in target.companions)
        return replace(decision, grant=still, revoke=revoke, switch_to=target, wake_at=_first_after(wakes, now))
    # The window protects a model in use; an unused one gives way at once.
    in_use = any(m not in state.light for _, m in all_holds)
    if candidates and (state.active is None or not in_use or cutoff is None or now >= cutoff):
        target = _target(state, candidates, candidates[0].model, keep)
        mine = [hid for hid, m in all_holds if m not in target.companions]
        if not mine:
            return replace(decision, switch_to=target, wake_at=_first_after(wakes, now))
        since = state.drain_since if state.drain_since is not None else now
        deadline = since + pol.drain_timeout_seconds
        if now >= deadline:
            return replace(decision, revoke=tuple(mine), switch_to=target, wake_at=_first_after(wakes, now))
        drain = Drain(target, tuple(mine), since, deadline)
        return replace(decision, drain=drain, wake_at=_first_after([*wakes, deadline], now))

    if light_wanted and state.companions_pending is None:
        wanted = _union(state.active_companions, light_wanted)
        return replace(decision, companions=wanted, wake_at=_first_after(wakes, now))

    # Idle: nothing held, waiting or switching.
    idle = state.idle
    quiet = not holds and not waiting and not grant
    since = max(state.last_activity, state.active_since)
    if idle.after_seconds is not None and not state.idled and quiet:
        at = since + idle.after_seconds
        if now >= at:
            if idle.action == "default":
                if idle.default_model is not None and idle.default_model != state.active:
                    return replace(decision, idle="default", switch_to=Target(idle.default_model), wake_at=_first_after(wakes, now))
            elif state.active is not None:
                return replace(decision, idle=idle.action, wake_at=_first_after(wakes, now))
        else:
            wakes.append(at)
    # The second stage: something runs or sleeps (a model active, or put to sleep by the first stage).
    if idle.stop_after_seconds is not None and not state.idle_stopped and quiet and (state.active is not None or state.idled):
        at = since + idle.stop_after_seconds
        if now >= at:
            return replace(decision, idle="free", wake_at=_first_after(wakes, now))
        wakes.append(at)
    return replace(decision, wake_at=_first_after(wakes, now))


def apply(state: QueueState, decision: Decision, now: float) -> QueueState:
    """The state after the worker carried out ``decision`` (switch started,
    holds granted, answers sent)."""
    by_id = {d.id: d for d in state.demands}
    answered = set(decision.grant) | {r.demand_id for r in decision.reject}
    ended = set(decision.expire) | set(decision.revoke)
    holds = [h for h in state.holds if h.id not in ended]
    for did in decision.grant:
        d = by_id[did]
        if d.kind == "hold":
            holds.append(Hold(d.id, d.model, now, None if d.ttl_seconds is None else now + d.ttl_seconds))
    demands = tuple(d for d in state.demands if d.id not in answered)
    out = replace(
        state,
        demands=demands,
        holds=tuple(holds),
        revoked=_remember(state.revoked, decision.revoke),
        last_activity=now if (decision.grant or ended) else state.last_activity,
    )
    if decision.switch_to is not None:
        kept = tuple(h for h in out.holds if h.model in decision.switch_to.companions)
        out = replace(out, active=None, active_companions=(), switching_to=decision.switch_to, holds=kept, drain_since=None)
    elif decision.drain is not None:
        out = replace(out, drain_since=decision.drain.since)
    else:
        out = replace(out, drain_since=None)
    if decision.companions is not None:
        out = replace(out, companions_pending=decision.companions)
    if decision.idle is not None:
        out = replace(out, idled=True, idle_stopped=out.idle_stopped or decision.idle == "free")
        if decision.idle in ("sleep", "free"):
            out = replace(out, active=None, active_companions=())
    return out


def step(state: QueueState, now: float) -> tuple[QueueState, Decision]:
    """``decide`` then ``apply``: the worker's one call per wake-up."""
    decision = decide(state, now)
    return apply(state, decision, now), decision


# -- helpers -------------------------------------------------------------------


def _target(state: QueueState, candidates: list[Demand], model: str, keep: tuple[str, ...] = ()) -> Target:
    """Coalesce: one switch for every waiting demand of ``model``, their
    companions united, plus the light models to keep."""
    companions: list[str] = []
    for d in candidates:
        if d.model == model:
            companions += [c for c in d.companions if c not in companions]
    return Target(model, _union(tuple(companions), keep))


def _union(first: tuple[str, ...], more: Iterable[str]) -> tuple[str, ...]:
    out = list(first)
    out += [m for m in more if m not in out]
    return tuple(out)


def _ahead(state: QueueState, model: str | None, now: float) -> float:
    """The forecast's wait for ``model`` (the rest of the switch in flight,
    then the way to it); without a forecast one switch estimate."""
    return ready_in(state.forecast, model, now) if state.forecast is not None and model is not None else state.switch_estimate_seconds


def switch_retry_after(state: QueueState, now: float, model: str | None = None) -> int:
    """Retry-After once the GPU no longer serves a window (a switch failed):
    ``_ahead`` in whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(_ahead(state, model, now)))


def _retry_after(state: QueueState, now: float, model: str | None = None) -> int:
    """Seconds until the GPU is likely to serve ``model``: the rest of the
    serving window plus ``_ahead``. At least 1."""
    cutoff = serve_cutoff(state)
    window = max(0.0, cutoff - now) if cutoff is not None else 0.0
    return max(1, math.ceil(window + _ahead(state, model, now)))


def _first_after(times: Iterable[float], now: float) -> float | None:
    later = [t for t in times if t > now]
    return min(later) if later else None


def _remember(revoked: tuple[str, ...], more: Iterable[str]) -> tuple[str, ...]:
    return (*revoked, *more)[-REVOKED_MEMORY:]
