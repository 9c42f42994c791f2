#!/usr/bin/env python3
"""The cost-aware queue against today's fixed window and naive switching.

A pure simulation (no servers; the clock is the simulation's own): 1,000
requests for two models (an LLM answering in ~3 s, SDXL drawing in ~8 s)
from 20 closed-loop clients (each sends its next request 0-2 s after the
last one ended), driven through vramctl's queue policy
(``vramctl.demand.policy``) with the switch costs measured on an H200:
warm 0.5 s (sleep level 1 and wake) and cold 25 s (stop and cold start).

Three policies, side by side on the same requests:

- **cost-aware**: the product's default, the serving window k x the cost
  of the switches it avoids, there and back (``queue.serveCostFactor``,
  k = 5), at most ``maxServeSeconds - drainTimeoutSeconds``; the worker's
  cost book tells the queue those costs (here: the measured figures);
- **fixed**: today's window, ``maxServeSeconds - drainTimeoutSeconds``
  whatever a switch costs (``serveCostFactor`` unset);
- **naive**: switch to each request's model in arrival order, once the
  requests in flight have ended.

Printed per cost: p50/p95/max wait, switches, total time (and the share of
it spent switching), with drainTimeoutSeconds 15 (as gateway_bench.py: a
little above the longest request) and again with the default 30; then a
sweep of k with warm costs. A third cost case,
``mixed`` (the LLM sleeps, SDXL only stops: 0.5 s to the LLM, 25 s to SDXL),
shows the window following each switch's own cost.

    python benchmarks/queue_sim.py                    # ~3 s on one core
    python benchmarks/queue_sim.py --json benchmarks/results/queue_sim.json

Targets (issue 20): with warm costs, p95 wait at least 2x lower than the
fixed window; with cold, no worse; fewer switches than naive in both.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

from vramctl.demand.policy import (  # noqa: E402
    SERVE_COST_FACTOR,
    Demand,
    QueuePolicy,
    QueueState,
    Target,
    add_demand,
    release,
    step,
    switch_done,
)

MODELS = ("llm", "sdxl")


@dataclass(frozen=True)
class Workload:
    clients: int = 20
    requests: int = 1000
    durations: tuple[float, float] = (3.0, 8.0)  # LLM answer, SDXL image, each x U(0.5, 1.5)
    think: tuple[float, float] = (0.0, 2.0)  # between a client's requests
    seed: int = 20


@dataclass(frozen=True)
class Costs:
    """Seconds of a switch to each model (what runs now goes away, it comes back)."""

    name: str
    to: tuple[tuple[str, float], ...]

    def of(self, model: str) -> float:
        return dict(self.to)[model]

    def turns(self, active: str | None) -> tuple[tuple[str, float], ...]:
        """What the worker tells the queue (``costs.turn_seconds``): a switch
        to each model and back to the active one."""
        back = self.of(active) if active is not None else 0.0
        return tuple((m, s + back) for m, s in self.to if m != active)


WARM = Costs("warm", (("llm", 0.5), ("sdxl", 0.5)))
COLD = Costs("cold", (("llm", 25.0), ("sdxl", 25.0)))
MIXED = Costs("mixed", (("llm", 0.5), ("sdxl", 25.0)))


@dataclass
class Result:
    policy: str
    costs: str
    switches: int
    total_seconds: float
    switching_seconds: float
    waits: list[float] = field(repr=False)
    p50_wait: float = 0.0
    p95_wait: float = 0.0
    max_wait: float = 0.0

    def finish(self) -> Result:
        self.p50_wait = pct(self.waits, 50)
        self.p95_wait = pct(self.waits, 95)
        self.max_wait = max(self.waits)
        return self

    def row(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "waits"}


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


def plans(w: Workload) -> list[list[tuple[str, float, float]]]:
    """Each client's requests: (model, duration, think time before it)."""
    rng = random.Random(w.seed)
    out = []
    for _ in range(w.clients):
        plan = []
        for _ in range(w.requests // w.clients):
            i = rng.randrange(len(MODELS))
            plan.append((MODELS[i], w.durations[i] * rng.uniform(0.5, 1.5), rng.uniform(*w.think)))
        out.append(plan)
    return out


class Clients:
    """The closed-loop clients' events on the simulated clock: arrivals (a
    client's next request, after its think time) and request ends."""

    def __init__(self, w: Workload) -> None:
        self.plans = plans(w)
        self.events: list[tuple[float, int, str, tuple[int, int]]] = []
        self.seq = 0
        for c in range(w.clients):
            self.push(self.plans[c][0][2], "arrive", (c, 0))

    def push(self, t: float, kind: str, ck: tuple[int, int]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, ck))

    def next_time(self) -> float | None:
        return self.events[0][0] if self.events else None

    def pop_due(self, now: float) -> list[tuple[str, tuple[int, int]]]:
        out = []
        while self.events and self.events[0][0] <= now:
            _, _, kind, ck = heapq.heappop(self.events)
            out.append((kind, ck))
        return out

    def ended(self, now: float, ck: tuple[int, int]) -> None:
        c, k = ck
        if k + 1 < len(self.plans[c]):
            self.push(now + self.plans[c][k + 1][2], "arrive", (c, k + 1))

    def request(self, ck: tuple[int, int]) -> tuple[str, float]:
        model, duration, _ = self.plans[ck[0]][ck[1]]
        return model, duration


def simulate_queue(w: Workload, policy: QueuePolicy, costs: Costs, name: str) -> Result:
    """vramctl's queue policy; the worker's cost book tells it ``costs``."""
    clients = Clients(w)
    state = QueueState(policy=policy, switch_estimate_seconds=max(s for _, s in costs.to))
    arrived: dict[str, float] = {}
    waits: list[float] = []
    switches, switching = 0, 0.0
    wake: float | None = None
    pending: tuple[float, Target] | None = None
    now = 0.0
    while True:
        times = [t for t in (clients.next_time(), wake, pending[0] if pending else None) if t is not None]
        if not times:
            break
        now = min(times)
        if pending is not None and pending[0] <= now:
            state, pending = switch_done(state, pending[1], now), None
        for kind, (c, k) in clients.pop_due(now):
            rid = f"c{c}r{k}"
            if kind == "arrive":
                arrived[rid] = now
                state = add_demand(state, Demand(rid, clients.request((c, k))[0], now))
            else:
                state = release(state, rid, now)
                clients.ended(now, (c, k))
        state, decision = step(replace(state, switch_costs=costs.turns(state.active)), now)
        for rid in decision.grant:
            waits.append(now - arrived[rid])
            c, k = (int(x) for x in rid[1:].split("r"))
            clients.push(now + clients.request((c, k))[1], "end", (c, k))
        if decision.switch_to is not None:
            cost = costs.of(decision.switch_to.model)
            switches, switching = switches + 1, switching + cost
            pending = (now + cost, decision.switch_to)
        wake = decision.wake_at
    return Result(name, costs.name, switches, now, switching, waits).finish()


def simulate_naive(w: Workload, costs: Costs) -> Result:
    """First come, first served: the head's model is switched to once the
    requests in flight have ended; nothing behind the head goes first."""
    clients = Clients(w)
    fifo: list[tuple[float, tuple[int, int]]] = []
    active: str | None = None
    in_flight = 0
    switched_at: float | None = None  # a switch in progress ends then
    target: str | None = None
    waits: list[float] = []
    switches, switching = 0, 0.0
    now = 0.0
    while True:
        times = [t for t in (clients.next_time(), switched_at) if t is not None]
        if not times:
            break
        now = min(times)
        if switched_at is not None and switched_at <= now:
            active, switched_at = target, None
        for kind, ck in clients.pop_due(now):
            if kind == "arrive":
                fifo.append((now, ck))
            else:
                in_flight -= 1
                clients.ended(now, ck)
        while fifo and switched_at is None:
            t_arr, ck = fifo[0]
            model, duration = clients.request(ck)
            if model == active:
                fifo.pop(0)
                waits.append(now - t_arr)
                in_flight += 1
                clients.push(now + duration, "end", ck)
                continue
            if in_flight == 0:
                cost = costs.of(model)
                switches, switching = switches + 1, switching + cost
                switched_at, target = now + cost, model
            break
    return Result("naive", costs.name, switches, now, switching, waits).finish()


# maxServeSeconds 60 (the default), drainTimeoutSeconds 15: a little above the
# longest request (12 s), so drains end by themselves (as in gateway_bench.py):
# a fixed window of 45 s. DEFAULTS: drainTimeoutSeconds 30 (a 30 s window).
BASE = QueuePolicy(max_queue=10_000, queue_timeout_seconds=3600, max_serve_seconds=60, drain_timeout_seconds=15)
DEFAULTS = replace(BASE, drain_timeout_seconds=30)


def compare(w: Workload, costs: Costs, base: QueuePolicy) -> dict[str, Result]:
    return {
        "cost-aware": simulate_queue(w, replace(base, serve_cost_factor=SERVE_COST_FACTOR), costs, "cost-aware"),
        "fixed": simulate_queue(w, replace(base, serve_cost_factor=None), costs, "fixed"),
        "naive": simulate_naive(w, costs),
    }


def table(w: Workload, base: QueuePolicy) -> dict[str, Any]:
    """The three policies for each cost case under ``base``, printed."""
    print(
        f"maxServeSeconds {base.max_serve_seconds:g}, drainTimeoutSeconds {base.drain_timeout_seconds:g}, serveCostFactor {SERVE_COST_FACTOR:g}"
    )
    print(f"{'costs':>6} {'policy':>10} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'switches':>8} {'total s':>8} {'switching':>9}")
    cases: dict[str, Any] = {}
    for costs in (WARM, COLD, MIXED):
        r = compare(w, costs, base)
        for res in r.values():
            print(
                f"{costs.name:>6} {res.policy:>10} {res.p50_wait:7.2f} {res.p95_wait:7.2f} {res.max_wait:7.2f} "
                f"{res.switches:8d} {res.total_seconds:8.0f} {100 * res.switching_seconds / res.total_seconds:8.1f}%"
            )
        aware, fixed, naive = r["cost-aware"], r["fixed"], r["naive"]
        ratios = {
            "p95_fixed_over_aware": fixed.p95_wait / max(aware.p95_wait, 1e-9),
            "switches_naive_over_aware": naive.switches / max(1, aware.switches),
            "total_fixed_over_aware": fixed.total_seconds / aware.total_seconds,
        }
        print(
            f"{'':>6} -> p95 wait {ratios['p95_fixed_over_aware']:.2f}x lower than the fixed window; "
            f"{ratios['switches_naive_over_aware']:.2f}x fewer switches than naive; total {ratios['total_fixed_over_aware']:.2f}x shorter"
        )
        cases[costs.name] = {"costs": dict(costs.to), **{k: v.row() for k, v in r.items()}, "ratios": ratios}
    return cases


def targets(cases: dict[str, Any]) -> dict[str, bool]:
    warm, cold = cases["warm"], cases["cold"]
    return {
        "warm_p95_at_least_2x_lower_than_fixed": warm["ratios"]["p95_fixed_over_aware"] >= 2.0,
        "cold_p95_no_worse_than_fixed": cold["cost-aware"]["p95_wait"] <= cold["fixed"]["p95_wait"],
        "fewer_switches_than_naive": all(cases[c]["cost-aware"]["switches"] < cases[c]["naive"]["switches"] for c in ("warm", "cold")),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    w = Workload()
    out: dict[str, Any] = {"workload": asdict(w), "serveCostFactor": SERVE_COST_FACTOR}
    print(f"{w.requests} requests, {w.clients} clients, request seconds {w.durations} x U(0.5, 1.5), think {w.think} s")
    out["policy"], out["cases"] = asdict(BASE), table(w, BASE)
    out["targets"] = targets(out["cases"])
    print("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in out["targets"].items()))
    out["defaults"] = {"policy": asdict(DEFAULTS), "cases": table(w, DEFAULTS)}
    out["defaults"]["targets"] = targets(out["defaults"]["cases"])
    print("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in out["defaults"]["targets"].items()))
    print("sweep of k (serveCostFactor), warm costs:")
    sweep = {}
    for k in (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0):
        res = simulate_queue(w, replace(BASE, serve_cost_factor=k), WARM, f"k={k:g}")
        sweep[f"{k:g}"] = res.row()
        print(
            f"  k {k:>4g}: p50 {res.p50_wait:6.2f} p95 {res.p95_wait:6.2f} max {res.max_wait:6.2f} s, {res.switches} switches, total {res.total_seconds:.0f} s"
        )
    out["sweep_warm"] = sweep
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(out["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
