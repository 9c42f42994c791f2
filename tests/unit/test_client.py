"""vramctl.client against a small aiohttp fake of vramctl's hold API that
records every request it is asked (loopback, its own loop thread)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from vramctl import client


@dataclass
class Asked:
    method: str
    path: str
    body: Any
    auth: str | None
    at: float


@dataclass
class FakeApi:
    refusals: list[tuple[int, str | None]] = field(default_factory=list)  # answers before the grant: (status, Retry-After)
    renew_status: list[int] = field(default_factory=list)  # answers to renews, then 200
    block: bool = False  # POST /holds never answers
    asked: list[Asked] = field(default_factory=list)
    gone: threading.Event = field(default_factory=threading.Event)

    def paths(self, method: str | None = None) -> list[str]:
        return [a.path for a in self.asked if method is None or a.method == method]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.asked.append(Asked(request.method, request.path, body, request.headers.get("Authorization"), time.monotonic()))
        if request.method == "POST" and request.path == "/holds":
            if self.block:
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    self.gone.set()
                    raise
            if self.refusals:
                status, retry = self.refusals.pop(0)
                headers = {"Retry-After": retry} if retry else {}
                return web.json_response({"error": {"message": f"refused with {status}"}}, status=status, headers=headers)
            return web.json_response({"id": "h1", "model": body["model"]})
        if request.method == "POST" and request.path.endswith("/renew"):
            status = self.renew_status.pop(0) if self.renew_status else 200
            return web.json_response({"error": "hold h1 was revoked by a drain"} if status != 200 else {"id": "h1"}, status=status)
        if request.method == "DELETE":
            return web.Response(status=204)
        return web.json_response({"error": "no such path"}, status=404)


class Served:
    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.url = ""

    def __enter__(self) -> Served:
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.api.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    def __exit__(self, *_: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def served(api: FakeApi) -> Iterator[Served]:
    with Served(api) as s:
        yield s


# -- sync --------------------------------------------------------------------------


def test_hold_retries_503_then_renews_and_releases(api: FakeApi, served: Served) -> None:
    api.refusals = [(503, "0.05"), (503, "0.05")]
    with client.hold("sdxl", url=served.url, ttl=0.3, companions=["tts"], token="t0k") as h:
        assert h.id == "h1" and not h.lost.is_set()
        time.sleep(0.45)
        renewals = h.renewals
    assert api.paths("POST")[:3] == ["/holds"] * 3
    assert api.asked[0].body == {"model": "sdxl", "ttlSeconds": 0.3, "companions": ["tts"]}
    assert all(a.auth == "Bearer t0k" for a in api.asked)
    assert api.asked[2].at - api.asked[0].at >= 0.1  # Retry-After honoured
    assert 3 <= renewals <= 5 and api.paths("POST").count("/holds/h1/renew") == renewals
    assert api.asked[-1].method == "DELETE" and api.asked[-1].path == "/holds/h1"
    time.sleep(0.15)
    assert api.asked[-1].method == "DELETE"  # no renew after the release


def test_hold_gives_up_at_the_deadline(api: FakeApi, served: Served) -> None:
    api.refusals = [(503, "0.1")] * 100
    t0 = time.monotonic()
    with pytest.raises(client.HoldRefused) as info, client.hold("sdxl", url=served.url, wait=0.35):
        pytest.fail("granted")
    assert info.value.status == 503 and info.value.retry_after == 0.1 and "refused with 503" in info.value.message
    assert 0.35 <= time.monotonic() - t0 < 2
    assert 3 <= len(api.paths("POST")) <= 6 and not api.paths("DELETE")


def test_hold_refused_other_than_503_is_not_retried(api: FakeApi, served: Served) -> None:
    api.refusals = [(409, None)]
    with pytest.raises(client.HoldRefused) as info, client.hold("sdxl", url=served.url):
        pytest.fail("granted")
    assert info.value.status == 409 and api.paths() == ["/holds"]


def test_revoked_hold_is_marked_lost_and_still_released(api: FakeApi, served: Served) -> None:
    api.renew_status = [200, 409]
    with client.hold("sdxl", url=served.url, ttl=0.15) as h:
        assert h.lost.wait(2)
        with pytest.raises(client.HoldLost, match="revoked"):
            h.check()
        n = len(api.asked)
        time.sleep(0.2)
        assert len(api.asked) == n  # renewing stopped
    assert api.asked[-1].method == "DELETE"


def test_hold_is_released_when_the_block_raises(api: FakeApi, served: Served) -> None:
    with pytest.raises(RuntimeError), client.hold("sdxl", url=served.url):
        raise RuntimeError("the image failed")
    assert api.paths("DELETE") == ["/holds/h1"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ttl"), client.hold("sdxl", ttl=0):
        pass
    with pytest.raises(ValueError, match="url"), client.hold("sdxl", url="ftp://x"):
        pass


# -- async -------------------------------------------------------------------------


def test_ahold_retries_renews_and_releases(api: FakeApi, served: Served) -> None:
    api.refusals = [(503, "0.05")]

    async def main() -> int:
        async with client.ahold("llm", url=served.url, ttl=0.3, token="t0k") as h:
            assert h.id == "h1"
            await asyncio.sleep(0.45)
            return h.renewals

    renewals = asyncio.run(main())
    assert api.paths("POST")[:2] == ["/holds", "/holds"]
    assert api.asked[0].body == {"model": "llm", "ttlSeconds": 0.3, "companions": []}
    assert 3 <= renewals <= 5 and api.asked[-1].method == "DELETE" and api.asked[-1].auth == "Bearer t0k"


def test_ahold_lost_and_refused(api: FakeApi, served: Served) -> None:
    api.renew_status = [404]

    async def lost() -> str | None:
        async with client.ahold("llm", url=served.url, ttl=0.15) as h:
            for _ in range(100):
                if h.lost.is_set():
                    break
                await asyncio.sleep(0.02)
            return h.lost_reason

    reason = asyncio.run(lost())
    assert reason is not None and reason.startswith("expired (404)")
    api.refusals = [(409, None)]

    async def refused() -> None:
        async with client.ahold("llm", url=served.url):
            pytest.fail("granted")

    with pytest.raises(client.HoldRefused) as info:
        asyncio.run(refused())
    assert info.value.status == 409


def test_ahold_cancelled_while_waiting_closes_the_request(api: FakeApi, served: Served) -> None:
    api.block = True

    async def main() -> None:
        async def wants() -> None:
            async with client.ahold("sdxl", url=served.url):
                pytest.fail("granted")

        task = asyncio.create_task(wants())
        for _ in range(200):
            if api.asked:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert api.gone.wait(5)  # the server saw the client go: vramctl withdraws the demand
    assert api.paths("DELETE") == []
