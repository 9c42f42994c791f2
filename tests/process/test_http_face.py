"""The HTTP face of a live ``vramctl up --gateway`` under a flood of idle
connections and out of descriptors: what the door promises
(vramctl.web.server), seen from outside.

The flood comes from a helper process of its own (its descriptor limit raised
so it can hold 20,000 sockets) that keeps its connections open and opens a
new one for each the server closes, for as long as the test runs (bounded).
``vramctl up`` runs with an open-file limit of 1024: without a cap at the
door the flood would take every descriptor of the process.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_up import LiveUp, config
from tests.support.ports import free_port

SERVER_NOFILE = 1024
FLOOD = 20_000

# The flood: FLOOD connections spread over the ports given, each reopened when
# the server closes it (at most 5,000 times), until stdin closes or 120 s pass.
# Every socket closes with a reset, so no TIME_WAIT is left holding loopback
# ports (20,000 of them would starve every other test for a minute). Prints
# "held N", then "reopened N".
FLOODER = r"""
import resource, selectors, socket, struct, sys, time
want, ports = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want + 200, max(hard, want + 200)))
except (ValueError, OSError):
    want = min(want, hard - 200)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
sel.register(sys.stdin, selectors.EVENT_READ, None)
LINGER0 = struct.pack("ii", 1, 0)  # close with a reset: no TIME_WAIT left to hold the loopback's ports
def connect(i):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", ports[i % len(ports)]))
    sel.register(s, selectors.EVENT_READ, i)
held = 0
for i in range(want):
    try:
        connect(i)
        held += 1
    except OSError:
        break
print("held", held, flush=True)
deadline = time.monotonic() + 120
reopened = 0
while time.monotonic() < deadline:
    for key, _ in sel.select(0.5):
        if key.data is None:
            if not sys.stdin.readline():
                print("reopened", reopened, flush=True)
                for k in list(sel.get_map().values()):
                    if k.data is not None:
                        k.fileobj.close()
                sys.exit(0)
            continue
        try:
            gone = key.fileobj.recv(4096) == b""
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            gone = True
        if gone:
            sel.unregister(key.fileobj)
            key.fileobj.close()
            if reopened < 5_000:  # bounded: each one is a loopback port
                connect(key.data)
                reopened += 1
"""


def on_demand_config() -> dict[str, Any]:
    cfg = config()
    gpu = cfg["gpus"][0]
    gpu["switching"] = {"mode": "onDemand"}
    gpu["models"]["llm"]["servedModelName"] = "qwen-7b"
    return cfg


@pytest.fixture
def up(tmp_path: Path) -> Iterator[LiveUp]:
    v = LiveUp(tmp_path, on_demand_config())
    v.gateway_port = free_port()  # type: ignore[attr-defined]
    v.extra_args = ["--gateway", f"127.0.0.1:{v.gateway_port}"]  # type: ignore[attr-defined]
    try:
        yield v
    finally:
        v.stop()
        v.kill_models()


def low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_NOFILE, SERVER_NOFILE))


def call(url: str, body: Any | None = None, method: str | None = None, timeout: float = 15) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None


def persistent(url: str, body: Any) -> tuple[int, Any]:
    """``call``, sent again (at most twice more) when the connection is reset:
    under a flood the door may turn a newcomer away, as it may any client."""
    for attempt in range(3):
        try:
            return call(url, body, timeout=30)
        except (ConnectionResetError, urllib.error.URLError) as err:
            if attempt == 2:
                raise AssertionError(f"{url}: three connections reset under the flood: {err}") from err
            time.sleep(0.2)
    raise AssertionError("unreachable")


def test_twenty_thousand_idle_connections_leave_requests_switches_and_the_state_file_working(up: LiveUp) -> None:
    up.start(preexec_fn=low_nofile)
    gw = f"http://127.0.0.1:{up.gateway_port}"  # type: ignore[attr-defined]
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOODER, str(FLOOD), str(up.port), str(up.gateway_port)],  # type: ignore[attr-defined]
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert flood.stdout is not None and flood.stdin is not None
        held = int(flood.stdout.readline().split()[1])
        assert held >= FLOOD - 1000, held  # the flood holds its connections (the kernel's side of them)
        time.sleep(1.0)  # the server works through its backlog, at the cap
        assert up.proc is not None
        open_fds = len(os.listdir(f"/proc/{up.proc.pid}/fd"))
        assert open_fds < SERVER_NOFILE - 64, open_fds  # descriptors left for the worker and the state file
        chat = {"model": "qwen-7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        code, reply = persistent(gw + "/v1/chat/completions", chat)
        assert code == 200 and reply["choices"][0]["message"]["content"] == "tok0 tok1 ", reply
        code, reply = persistent(up.url + "/switch", {"model": "sdxl"})
        assert code == 202, reply
        deadline = time.monotonic() + 30
        g: dict[str, Any] = {}
        while not (g.get("phase") == "Ready" and g.get("runningModels") == ["sdxl"]):
            assert time.monotonic() < deadline, g
            with contextlib.suppress(ConnectionResetError, urllib.error.URLError):  # the door may turn a newcomer away
                g = up.gpu()
            time.sleep(0.1)
        recorded = json.loads(up.state_path.read_text())
        assert recorded["gpus"]["0"]["desired"]["activeModel"] == "sdxl"  # the state file was written
        flood.stdin.close()
        reopened = int(flood.stdout.readline().split()[1])
        assert reopened > 0  # the server refused at the door, and the flood kept pressing
    finally:
        if flood.poll() is None:
            flood.kill()
        flood.wait(10)
    text = up.log_text()
    assert "Traceback" not in text and "Too many open files" not in text, text[-3000:]
    assert len(text.encode()) < 200_000, f"{len(text)} bytes of log"
    assert "not healthy" not in text


def test_a_hold_made_on_either_port_is_renewed_and_released_on_either(up: LiveUp) -> None:
    up.start()
    gw = f"http://127.0.0.1:{up.gateway_port}"  # type: ignore[attr-defined]
    for made, other in ((gw, up.url), (up.url, gw)):
        code, grant = call(made + "/holds", {"model": "llm", "ttlSeconds": 30})
        assert code == 200, grant
        up.wait(lambda g: g["queue"]["holds"] == {"llm": 1})
        assert call(f"{other}/holds/{grant['id']}/renew", {"ttlSeconds": 30}) == (200, {"id": grant["id"]})
        assert call(f"{made}/holds/{grant['id']}/renew", method="POST", body={}) == (200, {"id": grant["id"]})
        assert call(f"{other}/holds/{grant['id']}", method="DELETE")[0] == 204
        up.wait(lambda g: g["queue"]["holds"] == {})
        assert call(f"{made}/holds/{grant['id']}", method="DELETE")[0] == 404


def test_a_client_gone_while_queued_is_a_499_and_one_debug_line(up: LiveUp) -> None:
    up.extra_args.append("-v")
    up.start()
    gw_port: int = up.gateway_port  # type: ignore[attr-defined]
    # A hold on llm keeps sdxl queued; the sdxl client goes away while it waits.
    code, grant = call(up.url + "/holds", {"model": "llm", "ttlSeconds": 30})
    assert code == 200
    body = b'{"model": "sdxl"}'
    with socket.create_connection(("127.0.0.1", gw_port), timeout=5) as s:
        s.sendall(
            f"POST /holds HTTP/1.1\r\nHost: 127.0.0.1:{gw_port}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        up.wait(lambda g: g["queue"]["queueDepth"] == 1)
    up.wait(lambda g: g["queue"]["queueDepth"] == 0)
    assert call(f"{up.url}/holds/{grant['id']}", method="DELETE")[0] == 204
    with urllib.request.urlopen(up.url + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert 'vramctl_http_requests_total{code="499",listener="gateway",route="/holds"} 1.0' in metrics, [
        ln for ln in metrics.splitlines() if "http_requests" in ln
    ]
    text = up.log_text()
    assert "Traceback" not in text and " ERROR " not in text
    assert len([ln for ln in text.splitlines() if "client went away" in ln]) == 1, text[-2000:]
    assert up.gpu()["runningModels"] == ["llm"]  # the demand was withdrawn: no switch


# A listener whose cap is above the process's descriptor limit (something else
# took the descriptors): accept fails with EMFILE. Prints its port, serves until
# stdin closes, then prints how many connections it refused.
OUT_OF_FDS = r"""
import logging, resource, sys
from vramctl.web.server import HttpServer, Limits
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
server = HttpServer(Limits(max_connections=5000, idle_timeout=60))
listener = server.listen("api", "127.0.0.1", 0, [])
server.start()
print(listener.port, flush=True)
sys.stdin.readline()
print(server.refused, flush=True)
server.stop()
"""


def test_out_of_descriptors_is_refused_at_the_door_and_logged_once_per_interval() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", OUT_OF_FDS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        for _ in range(600):  # far more than the 128 descriptors of the server
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)  # the backlog is worked through: the cap comes down, the idlest are closed
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # a real request still gets its answer
            c.sendall(b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 404 "), "no answer"
        closed = 0
        for s in held:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        assert closed >= 400, closed  # the server did not keep what it could not afford
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert int(proc.stdout.readline()) > 0
    finally:
        for s in held:
            s.close()
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    lines = [ln for ln in err.splitlines() if "out of file descriptors" in ln]
    assert 1 <= len(lines) <= 2, err[-3000:]  # one line per 10 s interval, not one per attempt
    assert "Traceback" not in err and "socket.accept() out of system resource" not in err, err[-3000:]


def test_a_hold_with_an_impossible_companion_is_a_422_naming_the_field_on_either_port(up: LiveUp) -> None:
    """Not a 503: vramctl.client retries a 503 for its whole wait (600 s by default)."""
    up.start()
    gw = f"http://127.0.0.1:{up.gateway_port}"  # type: ignore[attr-defined]
    cases = [(["sdxl"], "class heavy"), (["ghost"], "not one of the models"), (["tts", "tts"], "lists a model twice")]
    for base in (up.url, gw):
        for companions, words in cases:
            code, reply = call(base + "/holds", {"model": "llm", "companions": companions})
            assert (code, reply["field"]) == (422, "companions") and words in reply["error"], (base, companions, code, reply)
    g = up.gpu()
    assert g["runningModels"] == ["llm"] and g["queue"]["holds"] == {} and g["queue"]["queueDepth"] == 0


def test_a_stream_cut_by_a_forced_switch_says_vramctl_stopped_the_model(tmp_path: Path) -> None:
    """Not "the backend died mid-stream": vramctl stopped it, and says why."""
    cfg = on_demand_config()
    cfg["gpus"][0]["models"]["llm"]["env"]["STANDIN_TOKEN_SECONDS"] = "0.02"
    v = LiveUp(tmp_path, cfg)
    gw_port = free_port()
    v.extra_args = ["--gateway", f"127.0.0.1:{gw_port}"]
    try:
        v.start()
        body = json.dumps({"model": "qwen-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2000, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", gw_port), timeout=20) as s:
            s.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{gw_port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            got = b""
            while got.count(b"data: ") < 5:
                got += s.recv(4096)
            assert call(v.url + "/switch", {"model": "sdxl", "force": True})[0] == 202
            deadline = time.monotonic() + 20
            while b"event: error" not in got and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        text = got.decode(errors="replace")
        assert "event: error" in text, text[-1000:]
        event = text[text.index("event: error") :]
        assert "vramctl stopped llm" in event and "switched to 'sdxl'" in event and "died" not in event, event
        v.wait(lambda g: g["runningModels"] == ["sdxl"])
    finally:
        v.stop()
        v.kill_models()


def test_requests_for_a_model_being_switched_away_are_not_sent_to_its_server(tmp_path: Path) -> None:
    """From the moment a switch away is decided, a request for the old model is
    a 503 with a Retry-After from the GPU's measured switches, never proxied
    to its stopping server (which answers until it is gone: 1 s here)."""
    cfg = on_demand_config()
    cfg["gpus"][0]["models"]["llm"]["env"]["STANDIN_STOP_SECONDS"] = "1.0"
    v = LiveUp(tmp_path, cfg)
    gw_port = free_port()
    v.extra_args = ["--gateway", f"127.0.0.1:{gw_port}"]
    body = json.dumps({"model": "qwen-7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    try:
        v.start()
        took = v.gpu()["lastSwitch"]["durationSeconds"]
        wanted_before = v.gpu()["desiredGeneration"]
        assert call(v.url + "/switch", {"model": "sdxl"})[0] == 202
        # A switch through the queue is decided on the worker's next pass; a
        # request that comes before may still be granted to llm (the switch
        # then waits for it). From the decision on, none may reach llm.
        wait_until = time.monotonic() + 10
        while v.gpu()["desiredGeneration"] == wanted_before and time.monotonic() < wait_until:
            time.sleep(0.01)
        assert v.gpu()["desiredGeneration"] > wanted_before, "the switch was never decided"
        answers: list[tuple[int, str | None, str]] = []
        deadline = time.monotonic() + 30
        while ((g := v.gpu())["phase"] != "Ready" or g["runningModels"] != ["sdxl"]) and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=15)
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answers.append((resp.status, resp.getheader("Retry-After"), resp.read().decode()))
            conn.close()
            time.sleep(0.05)
        assert answers, "the switch ended before a request was sent"
        for status, retry, text in answers:
            assert status == 503 and "was not sent to its server" in text and "switched to 'sdxl'" in text, (status, text)
            assert retry is not None and 1 <= int(retry) <= max(1, 2 * took + 1), (retry, took)
    finally:
        v.stop()
        v.kill_models()


def test_a_backend_that_dies_is_seen_at_once_and_gets_no_more_requests_until_ready(tmp_path: Path) -> None:
    """The first request that finds the server gone is a 502 and makes the
    worker look now (not at its next re-check, 5 s away); the next ones are
    503s with a Retry-After, not sent, until the model is ready again."""
    cfg = on_demand_config()
    v = LiveUp(tmp_path, cfg)
    gw_port = free_port()
    v.extra_args = ["--gateway", f"127.0.0.1:{gw_port}"]
    body = json.dumps({"model": "qwen-7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    try:
        v.start()
        rec = next((v.state_path.parent / "proc").glob(f"{v.instance}-*-llm.json"))
        os.killpg(json.loads(rec.read_text())["pgid"], signal.SIGKILL)
        t0 = time.monotonic()
        answers: list[tuple[float, int, str]] = []
        while time.monotonic() - t0 < 4 and not (answers and answers[-1][1] == 200):
            conn = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=15)
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answers.append((time.monotonic() - t0, resp.status, resp.read().decode()))
            conn.close()
            time.sleep(0.1)
        bad = [a for a in answers if a[1] == 502]
        assert len(bad) <= 1, answers  # only the request that found it gone
        for _, status, text in answers:
            assert status in (200, 502) or (status == 503 and "not sent" in text), (status, text)
        assert any(a[1] == 503 for a in answers), answers  # the worker knew within a request or two
    finally:
        v.stop()
        v.kill_models()
