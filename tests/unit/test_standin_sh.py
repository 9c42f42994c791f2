"""The busybox stand-in (images/standin/standin.sh) run here with busybox's
applets, no Docker: its sleep API (STANDIN_SLEEP=1) answers like the Python
stand-in's, and sleepctl drives it."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.ports import free_port
from vramctl.runtimes import sleepctl
from vramctl.runtimes.sleepctl import SleepCallError
from vramctl.spec.engines import SleepApi

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "images" / "standin" / "standin.sh"
BUSYBOX = Path(os.environ.get("BUSYBOX", "/bin/busybox"))
API = SleepApi("/sleep", "/wake_up", "/is_sleeping")

pytestmark = pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox is not installed")


def call(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def applets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH of busybox applets, like the image's /bin."""
    d = tmp_path_factory.mktemp("bin")
    for name in ("sh", "nc", "httpd", "sleep", "cat", "head", "printf", "rm", "mkdir", "touch", "kill", "awk"):
        (d / name).symlink_to(BUSYBOX)
    return d


@pytest.fixture
def standin(applets: Path, tmp_path: Path) -> Iterator[Callable[..., tuple[int, subprocess.Popen[str]]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(wait_ready: bool = True, **env: str) -> tuple[int, subprocess.Popen[str]]:
        port = free_port()
        full = {"PATH": str(applets), "STANDIN_PORT": str(port), "STANDIN_WWW": str(tmp_path / f"www{port}"), "STANDIN_SLEEP": "1"}
        full |= {"STANDIN_LOAD_SECONDS": "0", "STANDIN_STOP_SECONDS": "0"} | {f"STANDIN_{k.upper()}": v for k, v in env.items()}
        p = subprocess.Popen(
            [str(applets / "sh"), str(SCRIPT)],
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.append(p)
        deadline = time.monotonic() + 10
        while wait_ready and time.monotonic() < deadline:
            try:
                if call(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.02)
        else:
            if wait_ready:
                pytest.fail("the busybox stand-in never became healthy")
        return port, p

    yield start
    for p in procs:
        # The whole group: nc, its per-connection shells and the load-time sleep hold stdout too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=5)


def test_sleep_cycle_through_sleepctl(standin: Callable[..., tuple[int, subprocess.Popen[str]]]) -> None:
    port, p = standin(sleep_seconds="0.6", wake_seconds="0.1", residue_mib="640", residue_growth_mib="10")
    base = f"http://127.0.0.1:{port}"
    assert sleepctl.is_sleeping(base, API, 2) is False
    reply = sleepctl.sleep(base, API, 1, 5)
    assert reply.seconds >= 0.6 and reply.residue_mib == 640 and reply.body["level"] == 1
    assert sleepctl.is_sleeping(base, API, 2) is True
    assert call(port, "GET", "/health")[0] == 200  # asleep, still healthy
    status, headers, _ = call(port, "POST", "/v1/completions")
    assert (status, headers.get("retry-after")) == (503, "1")
    assert sleepctl.sleep(base, API, 1, 5).seconds < 0.6  # asleep already: at once, not a second 0.6 s sleep
    sleepctl.wake(base, API, 5)
    assert call(port, "POST", "/v1/completions")[0] == 200
    assert sleepctl.sleep(base, API, 2, 5).residue_mib == 650  # the second cycle leaks 10 MiB
    with pytest.raises(SleepCallError) as info:
        sleepctl.sleep(base, API, 5, 5)
    assert info.value.status == 400
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=5)
    for line in ("standin: sleeping (level 1, 0.6 s)", "standin: asleep (residue 640 MiB)", "standin: waking (0.1 s)", "standin: awake"):
        assert line in out, out


def test_failures_and_loading(standin: Callable[..., tuple[int, subprocess.Popen[str]]]) -> None:
    port, _ = standin(sleep_status="500")
    with pytest.raises(SleepCallError) as info:
        sleepctl.sleep(f"http://127.0.0.1:{port}", API, 1, 5)
    assert info.value.status == 500
    broken, _ = standin(sleep_seconds="0", wake_seconds="0", wake_broken="1")
    sleepctl.sleep(f"http://127.0.0.1:{broken}", API, 1, 5)
    sleepctl.wake(f"http://127.0.0.1:{broken}", API, 5)
    assert call(broken, "GET", "/health")[0] == 503
    loading, _ = standin(wait_ready=False, load_seconds="5")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            status, headers, _ = call(loading, "POST", "/sleep?level=1")
            break
        except OSError:
            time.sleep(0.02)
    assert (status, headers.get("retry-after")) == (503, "1")
    assert call(loading, "GET", "/health")[0] == 404  # as without sleep: 404 until loaded


def test_without_standin_sleep_it_is_the_plain_httpd(standin: Callable[..., tuple[int, subprocess.Popen[str]]]) -> None:
    port, p = standin(sleep="0")
    assert call(port, "GET", "/health")[0] == 200
    assert call(port, "GET", "/is_sleeping")[0] == 404
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0


def test_openai_shaped_answers_read_by_the_official_client(standin: Callable[..., tuple[int, subprocess.Popen[str]]]) -> None:
    """STANDIN_OPENAI=1: what the Python stand-in answers, so the gateway's
    Docker tests can use this image (the official client parses each one)."""
    import openai

    port, _ = standin(openai="1", sleep="0", token_seconds="0.01")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=10)
    chat = client.chat.completions.create(model="qwen-7b", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 " and chat.model == "qwen-7b"
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    t0 = time.monotonic()
    stream = client.chat.completions.create(model="qwen-7b", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
    parts = [c.choices[0].delta.content for c in stream if c.choices]
    assert "".join(p or "" for p in parts) == "tok0 tok1 tok2 tok3 " and time.monotonic() - t0 >= 0.03  # paced tokens
    assert client.completions.create(model="m", prompt="x", max_tokens=2).choices[0].text == "tok0 tok1 "
    assert len(client.embeddings.create(model="e", input="x").data[0].embedding) == 8
    img = client.images.generate(model="sdxl", prompt="a cat", n=1)
    assert img.data and (img.data[0].b64_json or "").startswith("iVBORw0KGgo")  # a PNG
    assert call(port, "POST", "/v1/other")[2] == b'{"object": "standin"}'
