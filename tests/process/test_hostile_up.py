"""A live ``vramctl up`` against hostile and broken input: damaged and
unwritable state files, a flood of connections, a low descriptor limit, a
browser page, and a fuzzed HTTP API. Every answer is 2xx/4xx/507, nothing
ends in a traceback, and the GPU changes hands only on a well-formed,
authorized request.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.live_up import LiveUp


@pytest.fixture
def up(tmp_path: Path) -> Iterator[LiveUp]:
    v = LiveUp(tmp_path)
    v.extra_args = ["--keep-models"]  # a restart adopts what runs (a graceful stop now stops the process runtime's models)
    try:
        yield v
    finally:
        v.stop()
        v.kill_models()


def no_traceback(v: LiveUp) -> None:
    text = v.log_text()
    assert "Traceback" not in text, text[-4000:]


# ------------------------------------------------------------------ the state file


@pytest.mark.parametrize(
    "damage",
    [b"", b"{\"version\": 1, \"gpus\": {", b"\x00\xff garbage", b"[1, 2]", b'{"gpus": {"0": "x"}}',
     b'{"gpus": {"0": {"desired": {"activeModel": "llm", "generation": "7"}}}}',
     b'{"gpus": {"0": {"desired": {"activeModel": ["llm"], "generation": 3}}}}',
     b'{"gpus": {"0": {"desired": {"activeModel": "llm", "generation": 1e400}}}}'],
    ids=["empty", "truncated", "garbage", "list", "gpu-string", "gen-string", "model-list", "gen-1e400"],
)  # fmt: skip
def test_damaged_state_file_keeps_the_running_model(up: LiveUp, damage: bytes) -> None:
    up.start()
    assert up.post({"model": "sdxl"})[0] == 202
    up.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["sdxl"])
    up.stop()
    up.state_path.write_bytes(damage)
    up.start(wait_ready=False)
    g = up.wait(lambda g: g["observedGeneration"] >= g["desiredGeneration"] and g["phase"] == "Ready")
    assert g["activeModel"] == "sdxl" and g["runningModels"] == ["sdxl"]
    notes = " ".join(up.status()["notes"])
    assert str(up.state_path) in notes and "keeping what runs ('sdxl')" in notes
    no_traceback(up)


def test_state_file_that_cannot_be_written_at_start_exits_2(up: LiveUp) -> None:
    blocker = up.tmp / "not-a-dir"
    blocker.write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "vramctl", "up", "--config", str(up.config_path), "--state", str(blocker / "state.json"), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"cannot write the state file {blocker / 'state.json'}" in r.stderr and "Traceback" not in r.stderr


def test_state_write_failure_later_refuses_the_switch(up: LiveUp) -> None:
    up.start()
    gen = up.gpu()["desiredGeneration"]
    up.state_path.unlink()
    up.state_path.mkdir()  # a directory where the file was: every write fails
    (up.state_path / "keep").write_text("x")
    code, reply = up.post({"model": "sdxl"})
    assert code == 507 and "not applied" in reply["error"] and str(up.state_path) in reply["error"]
    time.sleep(0.5)
    g = up.gpu()
    assert g["desiredGeneration"] == gen and g["activeModel"] == "llm" and g["runningModels"] == ["llm"]
    no_traceback(up)


# ------------------------------------------------------------------ descriptors and connections


def test_descriptor_limit_raised_and_a_flood_of_connections_harms_no_model(up: LiveUp) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    up.start(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)))
    assert up.proc is not None
    limits = Path(f"/proc/{up.proc.pid}/limits").read_text()
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
    assert line.split()[3] == str(hard), line  # soft == hard
    flood: list[socket.socket] = []
    try:
        for _ in range(min(1200, hard // 2)):
            flood.append(socket.create_connection(("127.0.0.1", up.port), timeout=5))
        t0 = time.monotonic()
        assert up.gpu()["phase"] == "Ready"
        assert time.monotonic() - t0 < 2.0
        code, _ = up.post({"model": "sdxl"})
        assert code == 202
        up.wait(lambda g: g["phase"] == "Ready" and g["runningModels"] == ["sdxl"])
    finally:
        for s in flood:
            s.close()
    assert "not healthy" not in up.log_text()
    no_traceback(up)


def test_browser_page_cannot_switch_the_live_gpu(up: LiveUp) -> None:
    up.start()
    gen = up.gpu()["desiredGeneration"]
    page = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Content-Type": "text/plain;charset=UTF-8"}
    req = urllib.request.Request(up.url + "/switch", data=b'{"model": "sdxl"}', method="POST", headers=page)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code in (403, 415)
    assert up.gpu()["desiredGeneration"] == gen


# ------------------------------------------------------------------ fuzz

METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "POST", "POST"])
PATHS = st.sampled_from(["/switch", "/status", "/metrics", "/healthz", "/", "/switch/", "//switch", "/status?since=-5", "/status?since=1e9", "/%00", "/switch?x=1"])
HEADER_NAMES = st.sampled_from(["Content-Type", "Origin", "Host", "Content-Length", "Transfer-Encoding", "Sec-Fetch-Site", "Authorization", "X-Junk", "Expect", "Connection"])
HEADER_VALUES = st.one_of(
    st.sampled_from(["application/json", "text/plain", "https://evil.example", "null", "chunked", "-1", "abc", "999999", "0", "cross-site", "close", "100-continue", "localhost"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)
BODIES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b'{"model": "sdxl"}', b'{"model": "llm"}', b'{"model": null}', b'{"model": "tts"}', b'{"model": "sdxl", "gpu": false}', b"[" * 5000, b'{"model": "x\\n2026 INFO forged"}']),
    st.builds(lambda v: json.dumps({"model": v}).encode(), st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))),
)


def _exchange(port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(head.encode() + body)
        s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out


def test_fuzzed_http_never_crashes_and_switches_only_on_well_formed_requests(up: LiveUp) -> None:
    up.start()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(method=METHODS, path=PATHS, headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5), body=BODIES, with_length=st.booleans())
    def one(method: str, path: str, headers: list[tuple[str, str]], body: bytes, with_length: bool) -> None:
        hdrs = [("Host", f"127.0.0.1:{up.port}"), *headers] if not any(k == "Host" for k, _ in headers) else headers
        if with_length and not any(k == "Content-Length" for k, _ in hdrs):
            hdrs = [*hdrs, ("Content-Length", str(len(body)))]
        before = up.gpu()["desiredGeneration"]
        reply = _exchange(up.port, method, path, hdrs, body)
        after = up.gpu()["desiredGeneration"]
        if reply:
            code = int(reply.split(b" ", 2)[1])
            assert 200 <= code < 300 or 400 <= code < 500, reply[:300]
        else:
            code = 0  # the server closed a request it could not read whole: nothing may have happened
        if after != before:
            assert code == 202, (method, path, hdrs, body, reply[:300])
            names = {k.lower(): v for k, v in hdrs}
            assert method == "POST" and path.split("?")[0] == "/switch"
            assert names.get("content-type", "").lower().startswith("application/json")
            assert "origin" not in names and names.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
            assert json.loads(body)["model"] in ("sdxl", "llm", None, "")

    one()
    assert up.proc is not None and up.proc.poll() is None
    no_traceback(up)
    assert "forged" not in "".join(line for line in up.log_text().splitlines() if line.startswith("2026") and "INFO forged" in line[:30])
