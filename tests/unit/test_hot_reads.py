"""The hot reads of the HTTP face: GET /status, /metrics and /healthz are
found by their exact path (not aiohttp's router walk), /status is served from
the bytes rendered when a worker last published, and a shared /metrics
rendering that is still fresh is answered on the event loop."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.web_urldispatcher import UrlDispatcher
from prometheus_client import CollectorRegistry

from tests.support.http_face import Served, running
from vramctl.telemetry import SharedRendering
from vramctl.web import api as api_module
from vramctl.web.server import FaceOptions, serve
from vramctl.worker.actor import GpuWorker


class _Rendering:
    """A shared rendering whose fresh body is always there; rendering anew fails the test."""

    def __init__(self) -> None:
        self.rendered = 0

    def fresh(self) -> bytes | None:
        return b"# fresh\n"

    def __call__(self) -> bytes:
        self.rendered += 1
        return b"# rendered\n"


@pytest.fixture
def face() -> Iterator[tuple[Served, GpuWorker, _Rendering]]:
    sup, w, _ = running()
    rendering = _Rendering()
    f = serve(sup, FaceOptions(api=("127.0.0.1", 0), metrics_body=rendering))
    f.start()
    served = Served(f)
    yield served, w, rendering
    served.stop()


def get(port: int, path: str, **headers: str) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_public_reads_skip_the_router_walk(face: tuple[Served, GpuWorker, _Rendering], monkeypatch: pytest.MonkeyPatch) -> None:
    served, _, _ = face
    walks: list[str] = []
    resolve = UrlDispatcher.resolve

    async def counted(self: UrlDispatcher, request: Any) -> Any:
        walks.append(request.path)
        return await resolve(self, request)

    monkeypatch.setattr(UrlDispatcher, "resolve", counted)
    for path in ("/status", "/metrics", "/healthz"):
        assert get(served.port, path)[0] == 200
    assert walks == []
    # Anything else takes the router: a query is fine, a wrong method is its 405, an unknown path its 404.
    assert get(served.port, "/status?since=0")[0] == 200
    assert get(served.port, "/nowhere")[0] == 404
    assert walks == ["/nowhere"]


def test_public_reads_keep_the_guards_and_the_count(face: tuple[Served, GpuWorker, _Rendering]) -> None:
    served, _, _ = face
    # A body on a read is still checked by the guards (here: not JSON).
    req = urllib.request.Request(f"http://127.0.0.1:{served.port}/status", data=b"x", method="GET", headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 415
    assert get(served.port, "/status")[0] == 200
    assert get(served.port, "/metrics")[0] == 200
    _, counted = get(served.port, "/status")
    assert json.loads(counted)["gpus"]["0"]["phase"]


def test_status_is_rendered_once_per_publish(face: tuple[Served, GpuWorker, _Rendering], monkeypatch: pytest.MonkeyPatch) -> None:
    served, w, _ = face
    first = get(served.port, "/status")[1]
    renders: list[int] = []
    dumps = api_module.dumps

    def counted(obj: Any) -> str:
        renders.append(1)
        return dumps(obj)

    monkeypatch.setattr(api_module, "dumps", counted)
    assert all(get(served.port, "/status")[1] == first for _ in range(20))
    assert renders == []
    w.publish()  # a new snapshot: rendered once more
    get(served.port, "/status")
    get(served.port, "/status")
    assert len(renders) == 1


def test_fresh_metrics_are_answered_without_a_rendering(face: tuple[Served, GpuWorker, _Rendering]) -> None:
    served, _, rendering = face
    assert get(served.port, "/metrics") == (200, b"# fresh\n")
    assert rendering.rendered == 0


def test_shared_rendering_fresh_follows_the_window() -> None:
    now = [0.0]
    shared = SharedRendering(CollectorRegistry(), max_age_s=0.1, clock=lambda: now[0], render=lambda _: b"one")
    assert shared.fresh() is None
    assert shared() == b"one"
    now[0] = 0.1
    assert shared.fresh() == b"one"
    now[0] = 0.11
    assert shared.fresh() is None
