"""The gateway (vramctl.web.gateway) with the official ``openai`` client, real
stand-in backend processes on loopback and a recording fake holder.

The fake holder behaves like a worker with one GPU: a model is leased only
while no lease of another model is live (a "switch" waits for them), and
every acquire, grant, release and withdrawal is recorded, so the tests can
check that a lease spans the request's whole life and ends when the client
goes away.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from prometheus_client import CollectorRegistry

from tests.support.ports import free_port
from vramctl.demand.desk import Lease, Refused
from vramctl.web.gateway import GATEWAY_MAX_BODY, Gateway, ModelInfo, Route
from vramctl.web.server import HttpServer

# -- stand-in backends -----------------------------------------------------------


@dataclass
class Backend:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def spawn_standin(token_seconds: float = 0.0, keepalive: bool = False) -> Backend:
    port = free_port()
    env = {**os.environ, "STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0", "STANDIN_STOP_SECONDS": "0"}
    env["STANDIN_TOKEN_SECONDS"] = str(token_seconds)
    env["STANDIN_KEEPALIVE"] = "1" if keepalive else "0"
    proc = subprocess.Popen([sys.executable, "-m", "vramctl.demo.standin"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return Backend(proc, port)
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the stand-in on :{port} did not get ready")


def stop(backend: Backend) -> None:
    if backend.proc.poll() is None:
        backend.proc.send_signal(signal.SIGKILL)
    backend.proc.wait(5)


# -- the recording fake holder -----------------------------------------------------


@dataclass
class FakeLease:
    holder: FakeHolder
    model: str
    id: int
    released: bool = False

    def release(self, error: str | None = None) -> None:
        if not self.released:
            self.released = True
            self.holder._end(self, error)


@dataclass
class FakeHolder:
    routes: dict[str, Route]
    engines: dict[str, str] = field(default_factory=dict)
    switch_seconds: float = 0.0
    refuse: Refused | None = None
    blocked: set[str] = field(default_factory=set)  # acquires for these wait until cancelled
    events: list[tuple[str, str, int, str | None]] = field(default_factory=list)  # (what, model, lease id, error)
    active: str | None = None
    live: dict[int, str] = field(default_factory=dict)
    switches: int = 0
    overlaps: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next: int = 0
    _cond: asyncio.Condition | None = None

    def resolve(self, name: str) -> Route | None:
        for r in self.routes.values():
            if name in (r.model, r.served_name):
                return r
        return None

    def models(self) -> Sequence[ModelInfo]:
        return [
            ModelInfo(r.model, r.served_name, r.gpu, "Running" if r.model == self.active else "Stopped", r.engine, r.model == self.active)
            for r in self.routes.values()
        ]

    def record(self, what: str, model: str, lease_id: int, error: str | None = None) -> None:
        with self._lock:
            self.events.append((what, model, lease_id, error))

    def admit(self, model: str) -> Lease | None:
        return None  # every request waits in acquire (it records what was asked)

    def taken_away(self, model: str) -> Refused | None:
        return None

    def not_ready(self, model: str) -> Refused | None:
        return None

    def backend_failed(self, model: str) -> None:
        self.record("backend_failed", model, 0)

    async def acquire(self, model: str) -> Lease:
        if self._cond is None:
            self._cond = asyncio.Condition()
        with self._lock:
            self._next += 1
            lid = self._next
        self.record("acquire", model, lid)
        if self.refuse is not None:
            raise self.refuse
        try:
            if model in self.blocked:
                await asyncio.Event().wait()
            async with self._cond:
                await self._cond.wait_for(lambda: self.active == model or not self.live)
                if self.active != model:
                    self.switches += 1
                    await asyncio.sleep(self.switch_seconds)
                    self.active = model
                if any(m != model for m in self.live.values()):
                    self.overlaps += 1
                self.live[lid] = model
        except asyncio.CancelledError:
            self.record("withdraw", model, lid)
            raise
        self.record("grant", model, lid)
        return FakeLease(self, model, lid)

    def _end(self, lease: FakeLease, error: str | None) -> None:
        self.record("release", lease.model, lease.id, error)
        self.live.pop(lease.id, None)
        cond = self._cond
        if cond is not None:

            async def wake() -> None:
                async with cond:
                    cond.notify_all()

            asyncio.get_running_loop().create_task(wake())

    def count(self, what: str, model: str | None = None) -> int:
        with self._lock:
            return sum(1 for e in self.events if e[0] == what and (model is None or e[1] == model))

    def wait_for(self, what: str, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(what) < n:
            assert time.monotonic() < deadline, f"expected {n} {what} events, got {self.events}"
            time.sleep(0.01)


# -- the gateway on its own loop thread ----------------------------------------------


class GatewayThread:
    """The gateway on a listener of its own (the one guards middleware in front), on loopback."""

    def __init__(self, holder: FakeHolder, token: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.gateway = Gateway(holder, self.registry, poll_seconds=0.05, strip_authorization=token is not None)
        self.token = token
        self.server: HttpServer | None = None
        self.port = 0

    def __enter__(self) -> GatewayThread:
        self.server = HttpServer()
        listener = self.server.listen("gateway", "127.0.0.1", 0, [self.gateway.add_routes], token=self.token, max_body=GATEWAY_MAX_BODY)
        self.port = listener.port
        self.server.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str = "unused", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=token, max_retries=0, timeout=30, **kw)

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def raw(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, Backend]]:
    # llm keeps connections (HTTP/1.1, as vLLM), the others close after each answer (HTTP/1.0).
    b = {"llm": spawn_standin(keepalive=True), "coder": spawn_standin(), "sdxl": spawn_standin(), "slow": spawn_standin(token_seconds=0.02)}
    yield b
    for x in b.values():
        stop(x)


def routes_for(backends: dict[str, Backend]) -> dict[str, Route]:
    return {
        "llm": Route("llm", backends["llm"].url, "0", "qwen-14b", "vllm"),
        "coder": Route("coder", backends["coder"].url, "0", "qwen-coder", "vllm"),
        "sdxl": Route("sdxl", backends["sdxl"].url, "0", "sdxl", "sdxl"),
        "slow": Route("slow", backends["slow"].url, "0", "slow-llm", "vllm"),
    }


@pytest.fixture
def holder(backends: dict[str, Backend]) -> FakeHolder:
    return FakeHolder(routes_for(backends))


@pytest.fixture
def gw(holder: FakeHolder) -> Iterator[GatewayThread]:
    with GatewayThread(holder) as g:
        yield g


def balanced(holder: FakeHolder) -> None:
    """Every grant was released, and nothing is held."""
    holder.wait_for("release", holder.count("grant"))
    assert holder.live == {}


# -- the OpenAI routes -------------------------------------------------------------------


def test_chat_non_streaming_holds_the_model_for_the_request(gw: GatewayThread, holder: FakeHolder) -> None:
    reply = gw.client().chat.completions.create(model="qwen-14b", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].message.content == "tok0 tok1 tok2 "
    assert reply.model == "qwen-14b"
    assert [(w, m) for w, m, _, _ in holder.events] == [("acquire", "llm"), ("grant", "llm"), ("release", "llm")]
    assert gw.sample("vramctl_gateway_requests_total", gpu="0", model="llm", code="200") == 1
    assert gw.sample("vramctl_gateway_request_duration_seconds_count", gpu="0", model="llm") == 1
    assert gw.sample("vramctl_model_in_flight", gpu="0", model="llm") == 0


def test_vramctl_name_is_rewritten_to_the_served_name(gw: GatewayThread, holder: FakeHolder) -> None:
    reply = gw.client().chat.completions.create(model="coder", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == "qwen-coder"  # the stand-in echoes the model it was sent
    assert holder.count("grant", "coder") == 1


def test_chat_streaming_passes_events_through_and_releases_at_the_end(gw: GatewayThread, holder: FakeHolder) -> None:
    stream = gw.client().chat.completions.create(model="slow-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=10, stream=True)
    parts = []
    for i, chunk in enumerate(stream):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if i == 3:
            # Mid-stream: the model is still held.
            assert holder.count("release") == 0 and gw.sample("vramctl_model_in_flight", gpu="0", model="slow") == 1
    assert "".join(parts) == "".join(f"tok{i} " for i in range(10))
    holder.wait_for("release", 1)
    assert gw.sample("vramctl_gateway_requests_total", gpu="0", model="slow", code="200") == 1


def test_streamed_events_arrive_as_they_are_made(gw: GatewayThread) -> None:
    # 20 tokens at 20 ms: the first must arrive long before the last is made.
    t0 = time.monotonic()
    stream = gw.client().chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}], max_tokens=20, stream=True)
    first = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.monotonic() - t0
    total = time.monotonic() - t0
    assert first is not None and total >= 0.38 and first < total / 2


def test_completions_embeddings_and_images(gw: GatewayThread, holder: FakeHolder) -> None:
    c = gw.client()
    assert c.completions.create(model="qwen-14b", prompt="x", max_tokens=2).choices[0].text == "tok0 tok1 "
    emb = c.embeddings.create(model="qwen-coder", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8 and emb.data[0].embedding != emb.data[1].embedding
    img = c.images.generate(model="sdxl", prompt="a cat", n=2)
    assert img.data is not None and len(img.data) == 2
    assert base64.b64decode(img.data[0].b64_json or "").startswith(b"\x89PNG\r\n\x1a\n")
    # Without a model, images go to the one sdxl model.
    status, _, body = gw.raw(
        "POST", "/v1/images/generations", json.dumps({"prompt": "a dog"}).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200 and json.loads(body)["data"][0]["b64_json"]
    assert [holder.count("grant", m) for m in ("llm", "coder", "sdxl")] == [1, 1, 2]
    balanced(holder)


def test_models_lists_every_model_with_its_state(gw: GatewayThread, holder: FakeHolder) -> None:
    holder.active = "coder"
    models = {m.id: m for m in gw.client().models.list()}
    assert set(models) == {"qwen-14b", "qwen-coder", "sdxl", "slow-llm"}
    extra = models["qwen-coder"].model_extra or {}
    assert extra["vramctl"] == {"name": "coder", "gpu": "0", "state": "Running", "engine": "vllm", "active": True}
    assert holder.count("acquire") == 0  # listing holds nothing


def test_unknown_model_is_an_openai_404_listing_the_known_ones(gw: GatewayThread, holder: FakeHolder) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        gw.client().chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    err = info.value.body
    assert isinstance(err, dict) and err["code"] == "model_not_found" and err["param"] == "model"
    assert "gpt-4" in err["message"] and "qwen-14b" in err["message"] and "llm" in err["message"]
    assert holder.count("acquire") == 0


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"messages": []}', "model", "model is required"),
        (b'{"model": 7, "messages": []}', "model", "non-empty string"),
    ],
)
def test_bad_body_is_a_400_naming_the_field(gw: GatewayThread, holder: FakeHolder, body: bytes, param: str | None, needle: str) -> None:
    status, _, raw = gw.raw("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    err = json.loads(raw)["error"]
    assert status == 400 and err["param"] == param and needle in err["message"]
    assert holder.count("acquire") == 0


def test_models_path_passes_through_unchanged(gw: GatewayThread, holder: FakeHolder) -> None:
    status, _, body = gw.raw("GET", "/models/llm/health?x=1")
    assert (status, body) == (200, b"ok\n")
    status, _, body = gw.raw("GET", "/models/llm/nope")
    assert status == 404  # the backend's own 404
    status, _, body = gw.raw("GET", "/models/ghost/health")
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    assert holder.count("grant", "llm") == 2
    balanced(holder)


def test_refused_hold_is_503_with_retry_after(gw: GatewayThread, holder: FakeHolder) -> None:
    holder.refuse = Refused(503, "the queue of gpu 0 is full (maxQueue 512)", retry_after=42)
    with pytest.raises(openai.APIStatusError) as info:
        gw.client().chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503 and info.value.response.headers["Retry-After"] == "42"
    assert "maxQueue 512" in str(info.value.body)
    assert gw.sample("vramctl_gateway_requests_total", gpu="0", model="llm", code="503") == 1


def test_token_is_required_when_set_and_not_forwarded(holder: FakeHolder) -> None:
    with GatewayThread(holder, token="s3cret") as g:
        with pytest.raises(openai.AuthenticationError):
            g.client("wrong").models.list()
        assert holder.count("acquire") == 0
        reply = g.client("s3cret").chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert reply.choices[0].message.content == "tok0 "


def test_cross_site_page_is_refused(gw: GatewayThread, holder: FakeHolder) -> None:
    status, _, _ = gw.raw("POST", "/v1/completions", b'{"model": "llm", "prompt": "x"}', {"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and holder.count("acquire") == 0


# -- concurrency, disconnects, failures ------------------------------------------------------


def test_twenty_clients_two_models_interleaved(holder: FakeHolder, gw: GatewayThread) -> None:
    holder.switch_seconds = 0.02
    client = gw.client()

    def one(i: int) -> tuple[str, str]:
        model = "qwen-14b" if i % 2 else "qwen-coder"
        if i % 3 == 0:
            stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": str(i)}], max_tokens=4, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            text = (
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": str(i)}], max_tokens=4)
                .choices[0]
                .message.content
                or ""
            )
        return model, text

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(200)))
    assert all(text == "tok0 tok1 tok2 tok3 " for _, text in results)
    assert holder.count("grant") == 200 and holder.overlaps == 0
    assert holder.switches >= 2
    balanced(holder)
    assert gw.sample("vramctl_gateway_requests_total", gpu="0", model="llm", code="200") == 100


def _open_stream(port: int, body: dict[str, Any]) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = json.dumps(body).encode()
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


def test_client_disconnect_mid_stream_releases_the_lease(gw: GatewayThread, holder: FakeHolder) -> None:
    s = _open_stream(gw.port, {"model": "slow", "messages": [], "max_tokens": 2000, "stream": True})  # 40 s of tokens
    got = b""
    while got.count(b"data: ") < 3:
        got += s.recv(4096)
    assert holder.count("release") == 0
    t0 = time.monotonic()
    s.close()
    holder.wait_for("release", 1, timeout=5)
    assert time.monotonic() - t0 < 2
    assert gw.sample("vramctl_gateway_requests_total", gpu="0", model="slow", code="499") == 1
    assert gw.sample("vramctl_model_in_flight", gpu="0", model="slow") == 0


def test_client_disconnect_while_queued_withdraws_the_demand(gw: GatewayThread, holder: FakeHolder) -> None:
    holder.blocked.add("coder")
    s = _open_stream(gw.port, {"model": "coder", "messages": []})
    holder.wait_for("acquire", 1)
    time.sleep(0.1)
    s.close()
    holder.wait_for("withdraw", 1, timeout=5)
    assert holder.count("grant") == 0 and holder.switches == 0
    assert gw.sample("vramctl_gateway_requests_total", gpu="0", model="coder", code="499") == 1


def test_backend_killed_mid_stream_ends_in_an_error_and_a_502(backends: dict[str, Backend]) -> None:
    victim = spawn_standin(token_seconds=0.02)
    try:
        routes = routes_for(backends)
        routes["slow"] = Route("slow", victim.url, "0", "slow-llm", "vllm")
        holder = FakeHolder(routes)
        with GatewayThread(holder) as g:
            stream = g.client().chat.completions.create(
                model="slow", messages=[{"role": "user", "content": "x"}], max_tokens=2000, stream=True
            )
            with pytest.raises(openai.APIError) as info:
                for i, _ in enumerate(stream):
                    if i == 3:
                        victim.proc.kill()
            assert "died mid-stream" in str(info.value)
            holder.wait_for("release", 1)
            error = next(e for e in holder.events if e[0] == "release")[3]
            assert error is not None and "died mid-stream" in error
            assert holder.count("backend_failed", "slow") == 1  # the worker is asked to look now
            assert g.sample("vramctl_gateway_requests_total", gpu="0", model="slow", code="502") == 1
            # The backend is gone: the next request is a 502 before any answer.
            with pytest.raises(openai.InternalServerError) as bad:
                g.client().chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}])
            assert bad.value.status_code == 502 and "slow" in str(bad.value.body)
    finally:
        stop(victim)


def test_backend_killed_mid_request_is_a_502(backends: dict[str, Backend]) -> None:
    victim = spawn_standin(token_seconds=0.05)
    try:
        routes = routes_for(backends)
        routes["slow"] = Route("slow", victim.url, "0", "slow-llm", "vllm")
        holder = FakeHolder(routes)
        with GatewayThread(holder) as g:
            threading.Timer(0.3, victim.proc.kill).start()
            with pytest.raises(openai.InternalServerError) as info:
                g.client().chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}], max_tokens=100)
            assert info.value.status_code == 502
            holder.wait_for("release", 1)
    finally:
        stop(victim)


def test_500_idle_connections_do_not_stop_other_requests(gw: GatewayThread, holder: FakeHolder) -> None:
    idle: list[socket.socket] = []
    try:
        for i in range(500):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            if i % 2:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # half a request, then silence
            idle.append(s)
        t0 = time.monotonic()
        client = gw.client()
        for _ in range(10):
            reply = client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
            assert reply.choices[0].message.content == "tok0 "
        assert time.monotonic() - t0 < 5
    finally:
        for s in idle:
            s.close()
    balanced(holder)


# -- the gateway on the real desk (vramctl.demand.desk) and a fake worker thread ------------------


def test_gateway_on_the_inbox_holder_twenty_clients_two_models(backends: dict[str, Backend]) -> None:
    from tests.support.fake_worker import FakeWorker
    from vramctl.demand import policy as dq
    from vramctl.demand.desk import HoldDesk, InboxHolder

    routes = routes_for(backends)

    class Holder(InboxHolder):
        def resolve(self, name: str) -> Route | None:
            return next((r for r in routes.values() if name in (r.model, r.served_name)), None)

        def models(self) -> Sequence[ModelInfo]:
            return [ModelInfo(r.model, r.served_name, r.gpu, "Running", r.engine) for r in routes.values()]

        def taken_away(self, model: str) -> Refused | None:
            return None

        def not_ready(self, model: str) -> Refused | None:
            return None

        def backend_failed(self, model: str) -> None:
            pass

    policy = dq.QueuePolicy(max_queue=100, queue_timeout_seconds=60, max_serve_seconds=0.5, drain_timeout_seconds=0.2)
    worker = FakeWorker(HoldDesk(policy, dq.IdlePolicy(), active="llm"), switch_seconds=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    registry = CollectorRegistry()
    gateway = Gateway(Holder(worker.post, gpu_of=lambda _m: "0", clock=worker.now), registry, poll_seconds=0.05)
    g = GatewayThread(FakeHolder({}))
    g.gateway, g.registry = gateway, registry
    try:
        with g:
            client = g.client()

            def one(i: int) -> str:
                model = "qwen-14b" if i % 2 else "qwen-coder"
                reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": str(i)}], max_tokens=2)
                return reply.choices[0].message.content or ""

            with ThreadPoolExecutor(20) as pool:
                texts = list(pool.map(one, range(200)))
            assert texts == ["tok0 tok1 "] * 200
            assert worker.violations == []
            assert 1 <= len(worker.switches) < 100  # coalesced: far fewer than one per request
            assert g.sample("vramctl_gateway_requests_total", gpu="0", model="coder", code="200") == 100
            deadline = time.monotonic() + 5
            while worker.desk.state.holds or not worker.inbox.empty():
                assert time.monotonic() < deadline, worker.desk.state.holds
                time.sleep(0.01)
            assert worker.desk.state.demands == ()
    finally:
        stop.set()
        thread.join(5)
