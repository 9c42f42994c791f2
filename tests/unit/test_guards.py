"""Every guard of vramctl.web.guards once, table-driven, against every
listener: the API (POST /switch, POST /holds) and the gateway (POST
/v1/chat/completions, POST /holds), served as ``vramctl up`` serves them
(``vramctl.web.server.serve``) on loopback, raw sockets for what no HTTP
client would send.

Each route's well-formed request names a model that does not exist, so its
handler answers 404 or 422: a guard's refusal (403, 411, 413, 415, 400, 408)
is told apart from the handler's answer, and nothing is ever switched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.http_face import Served, running, serve_face
from vramctl.web.gateway import GATEWAY_MAX_BODY
from vramctl.web.guards import API_MAX_BODY
from vramctl.worker.actor import GpuWorker


@dataclass(frozen=True)
class Route:
    listener: str  # "api" | "gateway"
    path: str
    body: bytes  # well-formed, for a model that does not exist
    answer: int  # what the handler says to it
    max_body: int

    def __str__(self) -> str:
        return f"{self.listener}{self.path}"


ROUTES = [
    Route("api", "/switch", b'{"model": "ghost"}', 422, API_MAX_BODY),
    Route("api", "/holds", b'{"model": "ghost"}', 404, API_MAX_BODY),
    Route("gateway", "/v1/chat/completions", b'{"model": "ghost", "messages": []}', 404, GATEWAY_MAX_BODY),
    Route("gateway", "/holds", b'{"model": "ghost"}', 404, GATEWAY_MAX_BODY),  # the listener's limit
]


@dataclass
class Stack:
    served: Served
    worker: GpuWorker

    def port(self, listener: str) -> int:
        return self.served.port if listener == "api" else self.served.gateway_port


def make_stack(**kw: Any) -> Stack:
    sup, w, _ = running()
    return Stack(serve_face(sup, gateway=True, **kw), w)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = make_stack(body_timeout=0.5)
    yield s
    s.served.stop()


def exchange(port: int, data: bytes, *, shut_write: bool = False, pause: float = 0.0, rest: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send ``data`` (then, after ``pause`` seconds, ``rest``); read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if pause:
            time.sleep(pause)
            with contextlib.suppress(OSError):
                s.sendall(rest)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def request(route: Route, port: int, body: bytes | None = None, **headers: str) -> bytes:
    """The request head and body; ``headers`` override (an empty value drops the header)."""
    body = route.body if body is None else body
    hdrs = {
        "Host": f"127.0.0.1:{port}",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    head = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items() if v != "")
    return f"POST {route.path} HTTP/1.1\r\n{head}\r\n".encode() + body


def answer(reply: bytes) -> tuple[int, dict[str, Any]]:
    """(status, the JSON error flattened to {"message", "field"}) of a reply."""
    assert reply, "no answer at all"
    status = int(reply.split(b" ", 2)[1])
    doc = json.loads(reply.split(b"\r\n\r\n", 1)[1] or b"{}")
    err = doc.get("error")
    if isinstance(err, dict):  # OpenAI's shape
        return status, {"message": err["message"], "field": err["param"]}
    return status, {"message": err, "field": doc.get("field")}


# What each guard is sent, and what it must answer: (status, field, words in the message).
Case = Callable[[Route, int], tuple[bytes, dict[str, Any]]]
GUARDS: dict[str, tuple[Case, int, str | None, str]] = {
    "foreign-origin-with-sec-fetch-site": (
        lambda r, p: (request(r, p, Origin="https://evil.example", Sec_Fetch_Site="cross-site"), {}),
        403, "Sec-Fetch-Site", "cross-site",
    ),
    "foreign-origin-without-sec-fetch-site": (lambda r, p: (request(r, p, Origin="https://evil.example"), {}), 403, "Origin", "evil.example"),
    "null-origin": (lambda r, p: (request(r, p, Origin="null"), {}), 403, "Origin", "another site"),
    "same-site-page": (lambda r, p: (request(r, p, Sec_Fetch_Site="same-site"), {}), 403, "Sec-Fetch-Site", "same-site"),
    "text-plain": (lambda r, p: (request(r, p, Content_Type="text/plain;charset=UTF-8"), {}), 415, "Content-Type", "text/plain"),
    "form": (lambda r, p: (request(r, p, Content_Type="application/x-www-form-urlencoded"), {}), 415, "Content-Type", "form"),
    "multipart": (lambda r, p: (request(r, p, Content_Type="multipart/form-data; boundary=x"), {}), 415, "Content-Type", "multipart"),
    "no-content-type": (lambda r, p: (request(r, p, Content_Type=""), {}), 415, "Content-Type", "missing"),
    "foreign-host": (lambda r, p: (request(r, p, Host="evil.example"), {}), 403, "Host", "--allow-host"),
    "rebinding-host-with-port": (lambda r, p: (request(r, p, Host=f"attacker.test:{p}"), {}), 403, "Host", "DNS rebinding"),
    "missing-content-length": (lambda r, p: (request(r, p, b"", Content_Length=""), {}), 411, "Content-Length", "Content-Length is required"),
    "oversized-content-length": (
        lambda r, p: (request(r, p, b"", Content_Length=str(r.max_body + 1)), {}),
        413, "Content-Length", "at most",
    ),
    "short-content-length": (
        lambda r, p: (request(r, p, Content_Length=str(len(r.body) + 50)), {}),
        408, None, "did not arrive within",
    ),
    "bad-content-length": (lambda r, p: (request(r, p, Content_Length="abc"), {}), 400, None, "Content-Length"),
    "chunked": (
        lambda r, p: (
            request(r, p, b"%x\r\n%s\r\n0\r\n\r\n" % (len(r.body), r.body), Content_Length="", Transfer_Encoding="chunked"),
            {},
        ),
        411, "Transfer-Encoding", "chunked",
    ),
    "duplicate-keys": (lambda r, p: (request(r, p, b'{"model": "ghost", "model": "llm"}'), {}), 400, "model", "appears twice"),
    "depth-100000": (lambda r, p: (request(r, p, b"[" * 100_000 + b"]" * 100_000), {}), 400, None, "nested too deeply"),
    "nan": (lambda r, p: (request(r, p, b'{"model": NaN}'), {}), 400, None, "not valid JSON"),
    "not-utf8": (lambda r, p: (request(r, p, b'{"model": "gh\xffost"}'), {}), 400, None, "not UTF-8"),
    "slow-body": (
        lambda r, p: (request(r, p)[: -len(r.body) + 3], {"pause": 1.0, "rest": r.body[3:]}),
        408, None, "did not arrive within",
    ),
}  # fmt: skip


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize("guard", list(GUARDS))
def test_every_guard_on_every_listener(stack: Stack, route: Route, guard: str) -> None:
    make, status, field, words = GUARDS[guard]
    gen = stack.worker.desired.generation
    port = stack.port(route.listener)
    data, how = make(route, port)
    code, err = answer(exchange(port, data, **how))
    assert code == status and code != route.answer, (code, err)
    assert words in err["message"], err
    if field is not None:
        assert err["field"] == field, err
    assert stack.worker.desired.generation == gen


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_a_well_formed_request_passes_every_guard(stack: Stack, route: Route) -> None:
    port = stack.port(route.listener)
    same = request(route, port, Origin=f"http://127.0.0.1:{port}", Sec_Fetch_Site="same-origin")
    for data in (request(route, port), request(route, port, Host=f"localhost:{port}"), same):
        assert answer(exchange(port, data))[0] == route.answer


def test_the_token_guards_every_route_of_every_listener_but_the_public_reads() -> None:
    s = make_stack(token="s3cret")
    try:
        for route in ROUTES:
            port = s.port(route.listener)
            for sent in ("", "Bearer wrong", "s3cret"):
                code, err = answer(exchange(port, request(route, port, Authorization=sent)))
                assert (code, err["field"]) == (401, "Authorization"), (route, sent)
            assert answer(exchange(port, request(route, port, Authorization="Bearer s3cret")))[0] == route.answer
        for path in ("/status", "/healthz", "/metrics"):
            reply = exchange(s.served.port, f"GET {path} HTTP/1.1\r\nHost: anything.example\r\nConnection: close\r\n\r\n".encode())
            assert int(reply.split(b" ", 2)[1]) == 200, path
        reply = exchange(s.served.gateway_port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert answer(reply)[0] == 401  # the gateway has no public reads
    finally:
        s.served.stop()


@pytest.mark.parametrize("listener", ["api", "gateway"])
def test_idle_and_slow_header_connections_are_closed(listener: str) -> None:
    s = make_stack(idle_timeout=0.5)
    try:
        port = s.port(listener)
        idle = socket.create_connection(("127.0.0.1", port), timeout=3)
        slow = socket.create_connection(("127.0.0.1", port), timeout=3)
        t0 = time.monotonic()
        for part in (b"POST /holds HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"X-Slow: 1\r\n"):
            slow.sendall(part)  # a header sent a line at a time, never finished
            time.sleep(0.2)
        for c in (idle, slow):
            with contextlib.suppress(ConnectionResetError):
                assert c.recv(100) == b""
            c.close()
        assert time.monotonic() - t0 < 2.5
    finally:
        s.served.stop()


@pytest.mark.parametrize("listener", ["api", "gateway"])
def test_connection_cap_evicts_the_idlest_and_serves_the_newcomer(listener: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = make_stack(max_connections=8)
    idle: list[socket.socket] = []
    try:
        port = s.port(listener)
        route = next(r for r in ROUTES if r.listener == listener)
        for _ in range(40):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=3))
        time.sleep(0.2)
        assert answer(exchange(port, request(route, port)))[0] == route.answer
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    finally:
        for c in idle:
            c.close()
        s.served.stop()


# -- any body to any route: 2xx/4xx with a JSON error naming the problem, never 5xx, never a traceback --

MODELS = {"llm", "sdxl", "tts"}
names = st.text(max_size=12).filter(lambda t: t not in MODELS)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | names
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(names, kids, max_size=4), max_leaves=12)
documents = st.dictionaries(
    st.sampled_from(["model", "companions", "gpu", "force", "ttlSeconds", "messages", "prompt"]) | names, values, max_size=5
)
bodies = documents.map(lambda d: json.dumps(d).encode()) | values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)
FUZZED = [
    ("api", "/switch"),
    ("api", "/holds"),
    ("api", "/holds/h1-0/renew"),
    ("gateway", "/v1/chat/completions"),
    ("gateway", "/v1/completions"),
    ("gateway", "/v1/embeddings"),
    ("gateway", "/v1/images/generations"),
    ("gateway", "/models/ghost/v1/chat/completions"),
    ("gateway", "/holds"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(FUZZED), body=bodies)
def test_any_body_to_any_route_is_answered_2xx_or_4xx_naming_the_problem(
    stack: Stack, caplog: pytest.LogCaptureFixture, where: tuple[str, str], body: bytes
) -> None:
    caplog.set_level(logging.WARNING)
    listener, path = where
    port = stack.port(listener)
    route = Route(listener, path, body, 0, 0)
    code, err = answer(exchange(port, request(route, port)))
    assert 200 <= code < 500, (code, err, body)
    if code >= 400:
        assert isinstance(err["message"], str) and err["message"], err
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("listener", ["api", "gateway"])
@pytest.mark.parametrize("method", ["POST", "OPTIONS"])
def test_a_client_gone_before_its_100_continue_is_a_debug_line_not_a_traceback(
    stack: Stack, caplog: pytest.LogCaptureFixture, listener: str, method: str
) -> None:
    """`Expect: 100-continue`, and the client resets the connection at once:
    aiohttp's expect handler, which runs before any middleware, wrote the
    interim answer to a closed transport and the error reached the log as an
    ERROR with a traceback (found by the fuzzed `vramctl up` test)."""
    caplog.set_level(logging.DEBUG)
    port = stack.port(listener)
    head = (
        f"{method} /switch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nExpect: 100-continue\r\n"
        "Content-Type: application/json\r\nContent-Length: 16\r\n\r\n"
    ).encode()
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
        s.sendall(head)
        s.close()
    time.sleep(0.3)  # the server handles the last ones
    path = "/healthz" if listener == "api" else "/v1/models"
    assert exchange(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()).startswith(b"HTTP/1.1 200")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records][-5:]


def _expecting(port: int, method: str, path: str, body: bytes, content_type: str = "application/json", expect: str = "100-continue") -> bytes:
    """Send the head with ``Expect``; wait for a first answer; send the body only
    after a 100 Continue (as curl and the requests library do); the whole reply."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nExpect: {expect}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        first = s.recv(65536)
        out = first
        if first.startswith(b"HTTP/1.1 100"):
            s.sendall(body)
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    ("listener", "method", "path", "content_type", "expect", "status"),
    [
        ("api", "PUT", "/switch", "application/json", "100-continue", 405),
        ("api", "POST", "/nowhere", "application/json", "100-continue", 404),
        ("api", "POST", "/switch", "text/plain", "100-continue", 415),
        ("api", "POST", "/switch", "application/json", "something-else", 417),
        ("gateway", "PUT", "/v1/chat/completions", "application/json", "100-continue", 405),
        ("gateway", "POST", "/v1/chat/completions", "text/plain", "100-continue", 415),
    ],
)
def test_a_request_refused_on_its_head_gets_its_refusal_not_a_100_continue(
    stack: Stack, listener: str, method: str, path: str, content_type: str, expect: str, status: int
) -> None:
    """`Expect: 100-continue` asks whether to send the body: a request the
    guards refuse on its head alone (method, route, Content-Type, the
    expectation itself) gets the refusal as its only answer, never a 100
    Continue first (aiohttp's own expect handler said 100 to everything
    routed, then refused the body it had invited; found by the fuzzed test)."""
    port = stack.port(listener)
    reply = _expecting(port, method, path, b'{"model": "llm"}', content_type, expect)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    assert b"100 Continue" not in reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]


def test_a_good_request_with_expect_gets_100_continue_then_its_answer(stack: Stack) -> None:
    port = stack.port("api")
    reply = _expecting(port, "POST", "/switch", b'{"model": "llm"}')
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 20"), reply[:200]
