"""vramctl.demand.desk: the worker-side desk (answers the futures per decision)
and InboxHolder (the loop side), wired through a small fake worker thread
that owns the desk, performs switches in ``switch_seconds`` and records them.
The last test runs the real gateway on that wiring, with a stand-in backend."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from prometheus_client import CollectorRegistry

from tests.support.fake_worker import FakeWorker
from vramctl.demand import policy as dq
from vramctl.demand.desk import AddDemand, Grant, HoldDesk, InboxHolder, QueueMetrics, Refused, Release, Renew, Withdraw

POL = dq.QueuePolicy(max_queue=4, queue_timeout_seconds=100, max_serve_seconds=40, drain_timeout_seconds=10)


def demand(id: str, model: str, at: float, **kw: object) -> dq.Demand:
    return dq.Demand(id=id, model=model, arrived=at, **kw)  # type: ignore[arg-type]


# -- the desk, by hand -------------------------------------------------------------


def test_grant_answers_the_future_and_release_ends_the_hold() -> None:
    desk = HoldDesk(POL, dq.IdlePolicy(), active="llm", now=0.0)
    f: Future[Grant] = Future()
    desk.handle(AddDemand(demand("a", "llm", 1.0, ttl_seconds=30), f), 1.0)
    assert not f.done()  # answers come with tick
    d = desk.tick(1.0)
    assert d.grant == ("a",) and f.result(0) == Grant("a", "llm", 31.0)
    assert desk.snapshot()["holds"] == {"llm": 1}
    desk.handle(Release("a", error="backend died"), 2.0)
    assert desk.state.holds == () and desk.backend_errors == [("a", "backend died")]


def test_metrics_depth_wait_and_holds() -> None:
    registry = CollectorRegistry()
    desk = HoldDesk(POL, dq.IdlePolicy(), active="llm", now=0.0, gpu="1", metrics=QueueMetrics(registry))
    desk.handle(AddDemand(demand("a", "llm", 0.0), Future()), 0.0)
    desk.handle(AddDemand(demand("b", "sdxl", 1.0), Future()), 1.0)
    desk.tick(2.0)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("vramctl_queue_depth", gpu="1") == 1
    assert value("vramctl_holds", gpu="1", model="llm") == 1
    assert value("vramctl_queue_wait_seconds_sum", gpu="1", model="llm") == 2.0
    desk.handle(Release("a"), 3.0)
    desk.tick(3.0)  # switch to sdxl
    desk.switch_done(dq.Target("sdxl"), 4.0)
    desk.tick(4.0)
    assert value("vramctl_holds", gpu="1", model="llm") == 0 and value("vramctl_holds", gpu="1", model="sdxl") == 1
    assert value("vramctl_queue_depth", gpu="1") == 0
    assert value("vramctl_queue_wait_seconds_count", gpu="1", model="sdxl") == 1
    assert value("vramctl_queue_wait_seconds_sum", gpu="1", model="sdxl") == 3.0


def test_light_model_demands_start_companions_and_failures_refuse() -> None:
    desk = HoldDesk(POL, dq.IdlePolicy(), active="llm", now=0.0, light=frozenset({"tts", "asr"}))
    tts: Future[Grant] = Future()
    desk.handle(AddDemand(demand("t", "tts", 1.0), tts), 1.0)
    assert desk.tick(1.0).companions == ("tts",)
    desk.companions_done(("tts",), 2.0)
    desk.tick(2.0)
    assert tts.result(0).model == "tts"
    asr: Future[Grant] = Future()
    desk.handle(AddDemand(demand("a", "asr", 3.0), asr), 3.0)
    assert desk.tick(3.0).companions == ("tts", "asr")
    desk.companions_failed("asr and tts do not fit: 3500 + 4000 > 2048 MiB", 4.0)
    with pytest.raises(Refused, match="do not fit"):
        asr.result(0)


def test_switch_then_grant_and_failed_switch_refuses() -> None:
    desk = HoldDesk(POL, dq.IdlePolicy(), active="llm", now=0.0)
    f1: Future[Grant] = Future()
    f2: Future[Grant] = Future()
    desk.handle(AddDemand(demand("a", "sdxl", 1.0), f1), 1.0)
    desk.handle(AddDemand(demand("b", "flux", 1.5), f2), 1.5)
    d = desk.tick(1.5)
    assert d.switch_to == dq.Target("sdxl") and desk.snapshot()["switchingTo"] == "sdxl"
    desk.switch_done(dq.Target("sdxl"), 5.0)
    assert desk.tick(5.0).grant == ("a",) and f1.result(0).model == "sdxl"
    desk.handle(Release("a"), 6.0)
    assert desk.tick(6.0).switch_to == dq.Target("flux")
    desk.switch_failed("flux failed to start: exit code 1", 9.0)
    with pytest.raises(Refused) as info:
        f2.result(0)
    assert info.value.status == 503 and "exit code 1" in info.value.message and info.value.retry_after


def test_queue_timeout_and_full_queue_refuse_with_retry_after() -> None:
    desk = HoldDesk(POL, dq.IdlePolicy(), active="llm", now=0.0)
    hold: Future[Grant] = Future()
    desk.handle(AddDemand(demand("h", "llm", 0.0), hold), 0.0)
    desk.tick(0.0)
    futures = []
    for i in range(6):
        f: Future[Grant] = Future()
        desk.handle(AddDemand(demand(f"s{i}", "sdxl", 1.0 + i), f), 1.0 + i)
        futures.append(f)
    desk.tick(7.0)
    refused = [f for f in futures if f.done()]
    assert len(refused) == 2  # maxQueue 4
    err = refused[0].exception()
    assert isinstance(err, Refused) and err.status == 503 and err.retry_after is not None and "maxQueue 4" in err.message
    desk.tick(104.0)  # the four queued ones waited queueTimeoutSeconds (llm is still held)
    assert all(f.done() for f in futures)
    timed_out = futures[0].exception()
    assert isinstance(timed_out, Refused) and "queueTimeoutSeconds 100" in timed_out.message


def test_a_demand_cancelled_before_the_worker_saw_it_is_ignored() -> None:
    desk = HoldDesk(POL, dq.IdlePolicy(), active="llm", now=0.0)
    f: Future[Grant] = Future()
    f.cancel()
    desk.handle(AddDemand(demand("a", "sdxl", 1.0), f), 1.0)
    assert desk.state.demands == () and desk.tick(1.0).switch_to is None


def test_withdraw_and_renew_answers() -> None:
    desk = HoldDesk(POL, dq.IdlePolicy(), active="llm", now=0.0)
    f: Future[Grant] = Future()
    desk.handle(AddDemand(demand("h", "llm", 0.0, ttl_seconds=100), f), 0.0)
    desk.tick(0.0)
    g: Future[Grant] = Future()
    desk.handle(AddDemand(demand("w", "sdxl", 1.0), g), 1.0)
    desk.handle(Withdraw("w"), 2.0)
    assert desk.tick(50.0).switch_to is None
    desk.handle(AddDemand(demand("s", "sdxl", 51.0), Future()), 51.0)
    desk.tick(81.0)  # window (40 - 10) over: drain
    desk.tick(91.0)  # drain timeout: revoked, switch
    answers: list[str] = []
    for hid in ("h", "nope"):
        r: Future[str] = Future()
        desk.handle(Renew(hid, 100, r), 92.0)  # type: ignore[arg-type]
        answers.append(r.result(0))
    assert answers == ["revoked", "unknown"]


# -- InboxHolder through a fake worker thread ------------------------------------------------


@pytest.fixture
def worker() -> Iterator[FakeWorker]:
    w = FakeWorker(HoldDesk(POL, dq.IdlePolicy(), active="llm"))
    stop = threading.Event()
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    yield w
    stop.set()
    t.join(5)


def holder_for(w: FakeWorker) -> InboxHolder:
    return InboxHolder(w.post, gpu_of=lambda _m: "0", clock=w.now)


def test_inbox_holder_acquires_switches_and_releases(worker: FakeWorker) -> None:
    holder = holder_for(worker)

    async def main() -> None:
        a = await holder.acquire("llm")
        assert a.grant.model == "llm" and worker.switches == []
        b_task = asyncio.create_task(holder.acquire("sdxl"))
        await asyncio.sleep(0.1)
        assert not b_task.done()  # llm is held: the switch waits (drain)
        a.release()
        b = await asyncio.wait_for(b_task, 5)
        assert b.grant.model == "sdxl" and worker.switches == ["sdxl"]
        b.release()
        b.release()  # idempotent

    asyncio.run(main())


def test_inbox_holder_cancelled_while_queued_withdraws_and_causes_no_switch(worker: FakeWorker) -> None:
    holder = holder_for(worker)

    async def main() -> None:
        a = await holder.acquire("llm")
        waiting = asyncio.create_task(holder.acquire("sdxl"))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.1)
        a.release()
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert worker.switches == [] and worker.desk.state.demands == () and worker.desk.state.holds == ()


def test_inbox_holder_hold_renew_and_release_by_id(worker: FakeWorker) -> None:
    holder = holder_for(worker)

    async def main() -> tuple[str, str, bool, bool]:
        grant = await holder.demand("llm", ttl_seconds=30)
        renewed = await holder.renew(grant.id, 30)
        released = holder.release(grant.id)
        again = holder.release(grant.id)
        unknown = await holder.renew(grant.id, 30)
        return renewed, unknown, released, again

    assert asyncio.run(main()) == ("renewed", "unknown", True, False)
