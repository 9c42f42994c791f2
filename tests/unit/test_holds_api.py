"""vramctl.client against the real holds API (vramctl.web.holds) on the real
desk (vramctl.demand.desk), driven by the fake worker thread of test_hold_desk:
the whole hold path except the worker's switching itself."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.fake_worker import FakeWorker
from vramctl import client
from vramctl.demand import policy as dq
from vramctl.demand.desk import HoldDesk, InboxHolder, Refused
from vramctl.web.holds import HoldsApi
from vramctl.web.server import HttpServer

MODELS = ["llm", "sdxl", "tts"]


class Stack:
    def __init__(self, policy: dq.QueuePolicy, refusal: Callable[[str], Refused | None] = lambda _: None) -> None:
        self.worker = FakeWorker(HoldDesk(policy, dq.IdlePolicy(), active="llm"), switch_seconds=0.05)
        self.api = HoldsApi(
            InboxHolder(self.worker.post, gpu_of=lambda _m: "0", clock=self.worker.now), lambda: MODELS, refusal=refusal, poll_seconds=0.05
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,), daemon=True)
        self.server = HttpServer()
        self.listener = self.server.listen("api", "127.0.0.1", 0, [self.api.add_routes])
        self.url = f"http://127.0.0.1:{self.listener.port}"

    def __enter__(self) -> Stack:
        self.thread.start()
        self.server.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.stop()
        self.stop.set()
        self.thread.join(5)

    def settle(self) -> None:
        deadline = time.monotonic() + 5
        while not self.worker.inbox.empty():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)

    def raw(self, method: str, path: str, body: object = None) -> tuple[int, dict[str, str], dict[str, object]]:
        conn = http.client.HTTPConnection("127.0.0.1", int(self.url.rsplit(":", 1)[1]), timeout=10)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else {}


POLICY = dq.QueuePolicy(max_queue=2, queue_timeout_seconds=30, max_serve_seconds=0.6, drain_timeout_seconds=0.3)


@pytest.fixture
def stack() -> Iterator[Stack]:
    with Stack(POLICY) as s:
        yield s


def test_hold_granted_renewed_released(stack: Stack) -> None:
    with client.hold("llm", url=stack.url, ttl=0.3) as h:
        time.sleep(0.45)
        assert h.renewals >= 2 and not h.lost.is_set()
        assert [x.id for x in stack.worker.desk.state.holds] == [h.id]
    stack.settle()
    assert stack.worker.desk.state.holds == () and stack.worker.switches == []


def test_second_model_waits_for_the_hold_then_gets_the_gpu(stack: Stack) -> None:
    got: list[tuple[str, float]] = []

    def wants_sdxl() -> None:
        with client.hold("sdxl", url=stack.url, ttl=5):
            got.append(("sdxl", time.monotonic()))

    with client.hold("llm", url=stack.url, ttl=5):
        t = threading.Thread(target=wants_sdxl)
        t.start()
        time.sleep(0.15)
        assert got == [] and stack.worker.switches == []  # waits: llm is held
        released = time.monotonic()
    t.join(10)
    assert got and got[0][1] >= released and stack.worker.switches == ["sdxl"]


def test_drain_timeout_revokes_and_the_renew_sees_409(stack: Stack) -> None:
    granted = threading.Event()

    def wants_sdxl() -> None:
        with client.hold("sdxl", url=stack.url, ttl=5):
            granted.set()

    with client.hold("llm", url=stack.url, ttl=0.3) as h:
        t = threading.Thread(target=wants_sdxl)
        t.start()
        # window (0.6 - 0.3) + drain 0.3: the llm hold is revoked, sdxl comes
        assert granted.wait(5)
        assert h.lost.wait(2) and h.lost_reason is not None and "revoked (409)" in h.lost_reason
        with pytest.raises(client.HoldLost):
            h.check()
    t.join(5)
    assert stack.worker.switches == ["sdxl"] and stack.worker.violations == []


def test_full_queue_is_503_with_retry_after_and_the_client_gives_up_at_its_deadline(stack: Stack) -> None:
    with client.hold("llm", url=stack.url, ttl=5):
        waiting = [threading.Thread(target=_try_hold, args=(stack.url, "sdxl", 10.0), daemon=True) for _ in range(2)]
        for t in waiting:
            t.start()
        time.sleep(0.1)  # two demands fill maxQueue 2 (and the drain is bounded: they come through)
        t0 = time.monotonic()
        with pytest.raises(client.HoldRefused) as info, client.hold("tts", url=stack.url, wait=0.2):
            pytest.fail("granted")
        assert info.value.status == 503 and info.value.retry_after is not None and "maxQueue 2" in info.value.message
        assert time.monotonic() - t0 < 3
    for t in waiting:  # the queued two get sdxl (one switch) once llm is released
        t.join(10)
        assert not t.is_alive()
    assert stack.worker.switches == ["sdxl"]


def _try_hold(url: str, model: str, wait: float) -> None:
    with client.hold(model, url=url, ttl=5, wait=wait):
        pass


def test_bad_requests_name_the_field(stack: Stack) -> None:
    assert stack.raw("POST", "/holds", {"model": "ghost"})[0] == 404
    status, _, doc = stack.raw("POST", "/holds", {"model": "llm", "ttlSeconds": -1})
    assert status == 400 and doc["field"] == "ttlSeconds"
    status, _, doc = stack.raw("POST", "/holds", {"model": "llm", "ttl": 5})
    assert status == 400 and doc["field"] == "ttl"
    status, _, doc = stack.raw("POST", "/holds", {"model": "llm", "companions": "tts"})
    assert status == 400 and doc["field"] == "companions"
    assert stack.raw("POST", "/holds/nope/renew")[0] == 404
    assert stack.raw("DELETE", "/holds/nope")[0] == 404
    assert stack.worker.desk.state.demands == ()


def test_declared_mode_refuses_with_409() -> None:
    def declared(model: str) -> Refused | None:
        return Refused(409, f"gpu 0 is in switching mode declared: activeModel decides, not holds for {model}")

    with Stack(POLICY, refusal=declared) as s:
        with pytest.raises(client.HoldRefused) as info, client.hold("sdxl", url=s.url):
            pytest.fail("granted")
        assert info.value.status == 409 and "declared" in info.value.message


def test_async_client_going_away_while_queued_causes_no_switch(stack: Stack) -> None:
    async def main() -> None:
        async with client.ahold("llm", url=stack.url, ttl=5):
            task = asyncio.create_task(_ahold(stack.url, "sdxl"))
            await asyncio.sleep(0.15)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.2)  # the server notices within its poll

    asyncio.run(main())
    stack.settle()
    assert stack.worker.switches == [] and stack.worker.desk.state.demands == () and stack.worker.desk.state.holds == ()


async def _ahold(url: str, model: str) -> None:
    async with client.ahold(model, url=url, ttl=5):
        pytest.fail("granted")


# -- `vramctl hold MODEL -- COMMAND` (vramctl.client.main) ------------------------------------


def _hold_cli(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vramctl.client", *args[:1], "--url", url, *args[1:]], stderr=subprocess.PIPE, text=True)


def test_hold_command_holds_for_the_commands_life_and_passes_its_status(stack: Stack) -> None:
    proc = _hold_cli(stack.url, "llm", "--ttl", "0.3", "--", sys.executable, "-c", "import sys, time; time.sleep(0.8); sys.exit(3)")
    deadline = time.monotonic() + 10
    while not stack.worker.desk.state.holds:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    assert [h.model for h in stack.worker.desk.state.holds] == ["llm"]
    assert proc.wait(10) == 3
    stack.settle()
    assert stack.worker.desk.state.holds == ()


def test_hold_command_refused_exits_75() -> None:
    with Stack(POLICY, refusal=lambda m: Refused(409, f"declared mode: no holds for {m}")) as s:
        proc = _hold_cli(s.url, "sdxl", "--", sys.executable, "-c", "raise SystemExit(0)")
        assert proc.wait(10) == 75
        assert proc.stderr is not None and "declared mode" in proc.stderr.read()
