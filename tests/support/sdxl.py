"""The SDXL server of images/sdxl as the image tests drive it: loaded by path
(``server``), a gated fake engine, the real server as a subprocess on the CPU,
and a tiny HTTP client."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tests.support.images import SDXL_DIR, load_module, sdxl_on_path
from tests.support.ports import free_port

sdxl_on_path()
server = load_module("vramctl_sdxl_server", SDXL_DIR / "server.py")

@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def request(base: str, path: str, body: Any = None, raw: bytes | None = None, timeout: float = 120) -> Reply:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, resp.read(), dict(resp.headers.items()))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read(), dict(exc.headers.items()))


def png_size(data: bytes) -> tuple[tuple[int, int], str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return im.size, im.mode


def pixels(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").tobytes()



@dataclass(frozen=True)
class FakeImage:
    png: bytes
    seed: int
    seconds: float = 0.5
    pipeline_seconds: float = 0.4
    encode_seconds: float = 0.1
    peak_bytes: int = 123


@dataclass
class FakeEngine:
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def generate(self, *args: Any) -> FakeImage:
        self.calls.append((*args, threading.current_thread().name))
        return FakeImage(png=b"\x89PNG fake", seed=args[5])

    def vram(self) -> dict[str, Any]:
        return {"device": "cpu", "allocated_bytes": 0, "reserved_bytes": 0, "peak_bytes": 0}

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu", "attention": ["AttnProcessor2_0"]}

    sleep_gate: threading.Event = field(default_factory=lambda: _opened())
    asleep: int = 0

    def sleep(self, level: int) -> dict[str, Any]:
        assert self.sleep_gate.wait(30), "the test never opened the sleep gate"
        self.calls.append(("sleep", level, threading.current_thread().name))
        self.asleep = level
        return {"level": level, "seconds": 0.01, "host_bytes": 0, "host_memory": "none"}

    def wake(self) -> dict[str, Any]:
        self.calls.append(("wake", threading.current_thread().name))
        self.asleep = 0
        return {"level": 1, "seconds": 0.01}


def _opened() -> threading.Event:
    e = threading.Event()
    e.set()
    return e


@dataclass
class RealServer:
    base: str
    proc: subprocess.Popen[str]
    statuses: list[int]
    log: list[str]


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str], str]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")} | {"HOST": "127.0.0.1", "PORT": str(port)} | env
    proc = subprocess.Popen(
        [sys.executable, str(SDXL_DIR / "server.py")], env=full, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    log: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return proc, log, f"http://127.0.0.1:{port}"
