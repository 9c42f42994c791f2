"""The HTTP API against hostile and broken clients: a web page in the same
browser, half-sent or oversized bodies, deep JSON, a full disk, a flood of
connections. In-process server on 127.0.0.1, raw sockets for what no HTTP
client library would send.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.http_face import Served, running, serve_face
from vramctl.sources.statefile import StateWriteError
from vramctl.telemetry import register as register_collector
from vramctl.worker.actor import GpuWorker
from vramctl.worker.supervisor import Supervisor

GOOD = b'{"model": "sdxl"}'


class Stack:
    def __init__(self, api: Served, worker: GpuWorker, sup: Supervisor) -> None:
        self.api, self.worker, self.sup = api, worker, sup
        self.gen0 = worker.desired.generation

    @property
    def switched(self) -> bool:
        return self.worker.desired.generation != self.gen0


def make_stack(**kw: Any) -> Stack:
    sup, w, _ = running(**kw.pop("spec", {}))
    register_collector(sup)
    api = serve_face(sup, **kw)
    return Stack(api, w, sup)


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = make_stack()
    yield s
    s.api.stop()


def raw(api: Served, data: bytes, *, shut_write: bool = False, timeout: float = 3.0) -> bytes:
    """Send bytes, read until the server closes or ``timeout``; b"" when nothing came."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=timeout) as s:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


def post(api: Served, body: bytes, headers: dict[str, str] | None = None, host: str | None = None) -> bytes:
    hdrs = {"Host": host or f"127.0.0.1:{api.port}", "Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close"}
    hdrs.update(headers or {})
    head = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items() if v != "")
    return raw(api, f"POST /switch HTTP/1.1\r\n{head}\r\n".encode() + body)


def status_of(reply: bytes) -> int:
    assert reply, "no answer at all"
    return int(reply.split(b" ", 2)[1])


def error_of(reply: bytes) -> dict[str, Any]:
    body = reply.split(b"\r\n\r\n", 1)[1]
    return json.loads(body)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ cross-site


def test_plain_json_post_from_a_client_is_applied(stack: Stack) -> None:
    assert status_of(post(stack.api, GOOD)) == 202 and stack.switched


@pytest.mark.parametrize(
    ("headers", "code", "field"),
    [
        ({"Content-Type": "text/plain"}, 415, "Content-Type"),
        ({"Content-Type": ""}, 415, "Content-Type"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
        ({"Origin": "https://evil.example"}, 403, "Origin"),
        ({"Origin": "null"}, 403, "Origin"),
        ({"Sec-Fetch-Site": "cross-site"}, 403, "Sec-Fetch-Site"),
    ],
    ids=["text-plain", "no-type", "form", "foreign-origin", "null-origin", "cross-site"],
)
def test_cross_site_shapes_are_refused(stack: Stack, headers: dict[str, str], code: int, field: str) -> None:
    reply = post(stack.api, GOOD, headers)
    assert status_of(reply) == code and error_of(reply)["field"] == field
    assert not stack.switched


def test_browser_no_cors_fetch_is_refused_and_same_origin_fetch_works(stack: Stack) -> None:
    # What `fetch("http://127.0.0.1:9400/switch", {method: "POST", mode: "no-cors", body})` sends from a page.
    page = {
        "Content-Type": "text/plain;charset=UTF-8",
        "Origin": "https://evil.example",
        "Referer": "https://evil.example/",
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "no-cors",
        "Sec-Fetch-Dest": "empty",
        "User-Agent": "Mozilla/5.0",
        "Accept": "*/*",
    }
    assert status_of(post(stack.api, GOOD, page)) in (403, 415)
    assert not stack.switched
    same = {**page, "Content-Type": "application/json", "Origin": f"http://127.0.0.1:{stack.api.port}", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    same.pop("Referer")
    assert status_of(post(stack.api, GOOD, same)) == 202 and stack.switched


@pytest.mark.parametrize("host", ["evil.example", "evil.example:9400", "attacker.test:1234", "203.0.113.9"])
def test_foreign_host_is_refused_even_on_loopback(stack: Stack, host: str) -> None:
    reply = post(stack.api, GOOD, host=host)
    assert status_of(reply) == 403 and error_of(reply)["field"] == "Host" and "--allow-host" in error_of(reply)["error"]
    assert not stack.switched


def test_localhost_and_allowed_hosts_pass() -> None:
    s = make_stack(allowed_hosts=["gpu-box.lan"])
    try:
        assert status_of(post(s.api, GOOD, host=f"localhost:{s.api.port}")) == 202
        assert status_of(post(s.api, b'{"model": "llm"}', host="gpu-box.lan:9400", headers={"Origin": f"http://gpu-box.lan:{s.api.port}"})) == 202
    finally:
        s.api.stop()


# ------------------------------------------------------------------ broken bodies


def test_short_body_is_never_applied(stack: Stack) -> None:
    head = f"POST /switch HTTP/1.1\r\nHost: 127.0.0.1:{stack.api.port}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    raw(stack.api, head.encode() + GOOD, shut_write=True)  # the client gives up: the connection closes, unanswered
    time.sleep(0.3)
    assert not stack.switched


def test_short_body_times_out_with_408() -> None:
    s = make_stack(body_timeout=0.5)
    try:
        head = f"POST /switch HTTP/1.1\r\nHost: 127.0.0.1:{s.api.port}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        reply = raw(s.api, head.encode() + GOOD)
        assert status_of(reply) == 408 and "Content-Length 100" in error_of(reply)["error"]
        assert not s.switched
    finally:
        s.api.stop()


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "18446744073709551616"])
def test_bad_content_length_gets_400(stack: Stack, value: str) -> None:
    reply = post(stack.api, GOOD, {"Content-Length": value})
    assert status_of(reply) == 400 and b"ontent-" in reply.split(b"\r\n\r\n", 1)[1]
    assert not stack.switched


def test_oversized_body_is_refused_and_nothing_hidden_in_it_runs(stack: Stack) -> None:
    hidden = (
        f"POST /switch HTTP/1.1\r\nHost: 127.0.0.1:{stack.api.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(GOOD)}\r\n\r\n"
    ).encode() + GOOD
    body = b" " * (300 * 1024) + hidden  # over API_MAX_BODY (256 KiB)
    reply = post(stack.api, body, {"Connection": ""})
    assert status_of(reply) == 413 and reply.count(b"HTTP/1.1") == 1
    time.sleep(0.3)
    assert not stack.switched


def test_chunked_body_gets_411(stack: Stack) -> None:
    head = f"POST /switch HTTP/1.1\r\nHost: 127.0.0.1:{stack.api.port}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = raw(stack.api, head.encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(GOOD), GOOD))
    assert status_of(reply) == 411 and "chunked" in error_of(reply)["error"]
    assert not stack.switched


def test_no_body_gets_411(stack: Stack) -> None:
    reply = post(stack.api, b"", {"Content-Length": ""})
    assert status_of(reply) == 411 and "Content-Length" in error_of(reply)["error"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
        (b"[1, 2]", "not a JSON array"),
        (b'"sdxl"', "not a JSON string"),
        (b"null", "not a JSON null"),
        (b"   ", "empty"),
        (b'{"model": "sdxl", "model": "llm"}', "appears twice"),
        (b'{"model": NaN}', "not valid JSON"),
        (b'{"model": "sd\xffxl"}', "not UTF-8"),
        (b'{"model": "sdxl", "gpu": false}', "`gpu` must be a whole number"),
        (b'{"model": "sdxl", "gpu": 0.0}', "`gpu` must be a whole number"),
        (b'{"model": "sdxl", "gpu": "0"}', "`gpu` must be a whole number"),
        (b'{"model": true}', "`model` must be a string or null"),
        (b'{"model": "sdxl", "companions": [1]}', "list of model names"),
        (b'{"model": "gpt5"}', "unknown model 'gpt5'"),
        (b'{"model": "sdxl", "companions": ["nope"]}', "unknown model 'nope'"),
    ],
)
def test_every_bad_body_gets_a_4xx_naming_the_problem(stack: Stack, body: bytes, words: str) -> None:
    reply = post(stack.api, body)
    assert 400 <= status_of(reply) < 500
    assert words in error_of(reply)["error"]
    assert not stack.switched


def test_unknown_model_lists_the_known_ones(stack: Stack) -> None:
    err = error_of(post(stack.api, b'{"model": "gpt5"}'))
    assert err == {"error": "unknown model 'gpt5' on gpu 0: the known models are big, llm, sdxl, tts", "field": "model"}


@pytest.mark.parametrize(("method", "path", "code"), [("GET", "/switch", 405), ("DELETE", "/status", 405), ("GET", "/nope", 404), ("GET", "/status?since=x", 400)])
def test_wrong_method_path_or_query(stack: Stack, method: str, path: str, code: int) -> None:
    reply = raw(stack.api, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    assert status_of(reply) == code and error_of(reply)["error"]


# ------------------------------------------------------------------ state and secrets


class BrokenState:
    def check_writable(self) -> None:
        raise StateWriteError("cannot write the state file /x/state.json: No space left on device")


def test_state_that_cannot_be_written_refuses_the_switch() -> None:
    s = make_stack(state=BrokenState())
    try:
        reply = post(s.api, GOOD)
        assert status_of(reply) == 507
        assert "not applied" in error_of(reply)["error"] and "No space left" in error_of(reply)["error"]
        assert not s.switched
    finally:
        s.api.stop()


def test_secrets_never_reach_status() -> None:
    s = make_stack(spec={"models": {"llm": {"image": "i", "vramMiB": 100, "args": ["--api-key", "Zq9-live-secret"]}, "sdxl": {"image": "i"}}})
    try:
        s.sup.notes.append("llm failed: last log lines:\nvllm serve --api-key sk-abcdefghijklmnopqrstu\nargs: key=Zq9-live-secret")
        with urllib.request.urlopen(f"http://127.0.0.1:{s.api.port}/status?since=0", timeout=5) as r:
            text = r.read().decode()
        assert "sk-abcdefghijklmnopqrstu" not in text and "Zq9-live-secret" not in text and "***" in text
    finally:
        s.api.stop()


# ------------------------------------------------------------------ connections


def test_idle_connections_are_bounded_and_closed(caplog: pytest.LogCaptureFixture) -> None:
    s = make_stack(max_connections=8, idle_timeout=0.5)
    idle: list[socket.socket] = []
    try:
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", s.api.port), timeout=2))
        with urllib.request.urlopen(f"http://127.0.0.1:{s.api.port}/status", timeout=5) as r:
            assert r.status == 200
        time.sleep(1.2)
        closed = 0
        for c in idle:
            c.settimeout(0.5)
            try:
                closed += c.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(idle)
    finally:
        for c in idle:
            c.close()
        s.api.stop()


def test_broken_pipes_are_quiet(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", stack.api.port)) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    time.sleep(0.5)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
