"""The event journal (``status.events``): ids, replay after an id, bounded
subscribers, and the events a worker's status book publishes into it."""

from __future__ import annotations

import threading
import time
from types import MappingProxyType
from typing import Any

from vramctl.status.book import StatusBook
from vramctl.status.events import EventJournal


def _status(**kw: Any) -> MappingProxyType[str, Any]:
    base: dict[str, Any] = {"phase": "Ready", "modelStates": {"llm": "running"}, "queue": {}, "lastSwitch": None, "progressSeq": 0}
    return MappingProxyType({**base, **kw})


def test_ids_increase_by_one_and_replay_gives_exactly_what_followed() -> None:
    j = EventJournal(capacity=10)
    ids = [j.append("progress", 0, {"n": i}).id for i in range(7)]
    assert ids == list(range(1, 8))
    assert [e.id for e in j.replay(3) or []] == [4, 5, 6, 7]
    assert j.replay(7) == []


def test_replay_after_an_id_no_longer_kept_says_start_over() -> None:
    j = EventJournal(capacity=5)
    for i in range(12):
        j.append("progress", 0, {"n": i})
    assert j.replay(6) is None  # 7 is gone: a gap
    assert [e.id for e in j.replay(7) or []] == [8, 9, 10, 11, 12]
    assert j.replay(99) is None  # an id of another run


def test_subscribe_replays_and_follows_without_gap_or_duplicate_under_concurrent_writes() -> None:
    j = EventJournal(capacity=100_000)
    stop = threading.Event()

    def write() -> None:
        for i in range(20_000):
            if stop.is_set():
                return
            j.append("progress", 0, {"n": i})

    t = threading.Thread(target=write)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while j.last_id < 100 and time.monotonic() < deadline:
            time.sleep(0.001)
        r = j.subscribe(since=50, limit=100_000)
        t.join(30)
        seen = [e.id for e in (r.replay or [])] + [e.id for e in r.subscription.take()]
        assert seen == list(range(51, j.last_id + 1))
    finally:
        stop.set()
        t.join(5)


def test_a_slow_subscriber_is_dropped_and_holds_nothing() -> None:
    j = EventJournal()
    woken: list[int] = []
    slow = j.subscribe(limit=3, wake=lambda: woken.append(1)).subscription
    fast = j.subscribe(limit=1000).subscription
    for i in range(10):
        j.append("progress", 0, {"n": i})
        fast.take()
    assert slow.dropped and slow.pending() == 0 and slow.take() == []
    assert j.subscribers() == 1 and j.dropped_total == 1
    assert woken  # told, so its reader can end the stream
    fast.close()
    assert j.subscribers() == 0


def test_subscribers_are_bounded() -> None:
    j = EventJournal(max_subscribers=2)
    j.subscribe()
    j.subscribe()
    try:
        j.subscribe()
    except OverflowError as err:
        assert "at most 2" in str(err)
    else:
        raise AssertionError("a third subscriber was taken")


def test_status_changes_become_status_model_queue_and_switch_events() -> None:
    j = EventJournal(wall=lambda: 1000.0)
    j.publish_status(0, _status())
    j.publish_status(0, _status(progressSeq=5, backoff={"x": 1}))  # only timers changed: nothing
    assert [e.kind for e in j.replay(0) or []] == ["status", "model", "queue"]
    j.publish_note(0, {"seq": 1, "step": "switch-started", "model": "sdxl"})
    j.publish_note(0, {"seq": 2, "step": "waking", "model": "sdxl"})
    last = {"from": "llm", "to": "sdxl", "durationSeconds": 0.4, "outcome": "success"}
    j.publish_status(
        0,
        _status(
            modelStates={"llm": "asleep", "sdxl": "running"}, lastSwitch=last, queue={"holds": {"sdxl": 1}, "holdIds": {"sdxl": ["h1"]}}
        ),
    )
    kinds = [(e.kind, dict(e.data)) for e in j.replay(5) or []]
    assert [k for k, _ in kinds] == ["status", "model", "model", "queue", "switch"]
    assert kinds[1][1] == {"model": "llm", "from": "running", "to": "asleep"}
    assert kinds[3][1]["holds"] == {"sdxl": {"count": 1, "since": 1000.0, "ids": ["h1"]}}
    assert kinds[4][1]["strategy"] == "warm"
    view = j.view()["gpus"]["0"]
    assert view["switches"] == [{**last, "strategy": "warm"}]
    assert view["notes"]["sdxl"]["step"] == "waking"


def test_the_status_book_publishes_notes_and_renders() -> None:
    j = EventJournal()
    book = StatusBook(0, 1000.0, journal=j)
    book.note("stopping", "llm", "stopping 'llm'", 1001.0)
    book.render(modelStates={"llm": "stopping"})
    events = j.replay(0) or []
    assert [e.kind for e in events][:2] == ["progress", "status"]
    assert events[0].data["step"] == "stopping" and events[1].data["modelStates"] == {"llm": "stopping"}


def test_a_failure_stays_the_models_reason_until_it_is_healthy_again() -> None:
    j = EventJournal()
    j.publish_note(0, {"seq": 1, "step": "failed", "model": "x", "message": "exited\nlast log lines:\nboom"})
    j.publish_note(0, {"seq": 2, "step": "cleaned-up", "model": "x", "message": "gone"})
    view = j.view()["gpus"]["0"]
    assert view["notes"]["x"]["step"] == "cleaned-up" and view["failures"]["x"]["message"].endswith("boom")
    j.publish_note(0, {"seq": 3, "step": "healthy", "model": "x", "message": "ok"})
    assert j.view()["gpus"]["0"]["failures"] == {}


def test_a_gpu_whose_worker_went_leaves_the_view() -> None:
    j = EventJournal()
    j.publish_status(0, _status())
    j.publish_status(1, _status())
    j.forget(1)
    assert list(j.view()["gpus"]) == ["0"] and j.last_id > 0
