"""One prediction of when a model serves, for every Retry-After: the
worker's forecast from its cost book (the rest of the switch in flight, then
the way to the model) answers the gateway's 503s (switched away, not ready)
and the queue's refusals alike."""

from __future__ import annotations

from types import SimpleNamespace

from tests.unit.test_costs_reporting import rig, spec, switch
from vramctl.demand.policy import Demand, Forecast, QueuePolicy, QueueState, decide, ready_in, retry_after
from vramctl.web.serving import SupervisorHolder


def test_ready_in_is_the_rest_of_the_switch_then_the_way_back() -> None:
    f = Forecast("sdxl", began=100.0, seconds=32.0, ways=(("llm", 23.0),))
    assert ready_in(f, "sdxl", 110.0) == 22.0  # the target: what is left of its switch
    assert ready_in(f, "llm", 110.0) == 45.0  # the model switched away: that, then the way back
    assert ready_in(f, "sdxl", 200.0) == 0.0  # overdue: due now
    assert retry_after(f, "llm", 110.2) == 45  # whole seconds, rounded up
    assert retry_after(Forecast("llm"), "llm", 0.0) == 1  # at least 1


def test_the_queues_refusal_counts_the_same_forecast() -> None:
    pol = QueuePolicy(queue_timeout_seconds=20)
    waited = Demand("d1", "sdxl", arrived=0.0, kind="request")
    f = Forecast("sdxl", began=15.0, seconds=10.0, ways=(("llm", 4.0),))
    state = QueueState(policy=pol, switching_to=None, demands=(waited,), forecast=f, switch_estimate_seconds=30.0)
    (rejection,) = decide(state, 20.0).reject
    assert rejection.retry_after_seconds == 5  # sdxl's switch began at 15 and takes 10: 5 s left, not one 30 s estimate


def test_the_gateways_503s_come_from_the_forecast_of_the_cost_book() -> None:
    w, _ = rig(spec())
    w.reconcile_once()
    switch(w, "sdxl")
    switch(w, "llm")  # learned: llm starts in 20 s and stops in 2, sdxl starts in 30 and stops in 3
    holder = SupervisorHolder(SimpleNamespace(workers={0: w}, worker_for=lambda _: w))  # type: ignore[arg-type]
    holder.clock = w.clock
    w.request("sdxl", ())
    w.reconcile_once(max_ticks=1)  # llm is stopped (2 s of the clock): 30 s of the switch are left
    away, loading = holder.taken_away("llm"), holder.not_ready("sdxl")
    assert away is not None and loading is not None
    assert loading.retry_after == 30  # sdxl starts in 30 s
    assert away.retry_after == 30 + 23  # then sdxl stops (3) and llm starts (20): not twice the last switch
