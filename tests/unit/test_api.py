"""The HTTP API in-process on 127.0.0.1, over a worker with recording fakes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fakes import FakeGpu, FakeRuntime
from tests.support.http_face import Served, running, serve_face
from tests.support.workers import spec
from vramctl.telemetry import register as register_collector
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings
from vramctl.worker.supervisor import Supervisor


@pytest.fixture
def stack() -> Iterator[tuple[Served, GpuWorker, FakeRuntime]]:
    sup, w, rt = running()
    register_collector(sup)  # as app.build does: phase, holder and GPU series are read at scrape time
    api = serve_face(sup)
    yield api, w, rt
    api.stop()


def call(api: Served, method: str, path: str, body: Any = None, token: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{api.port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            payload = r.read()
            return r.status, json.loads(payload) if r.headers.get("Content-Type", "").startswith("application/json") else payload.decode()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_status_healthz_metrics(stack: tuple[Served, GpuWorker, FakeRuntime]) -> None:
    api, _, _ = stack
    code, st = call(api, "GET", "/status")
    assert code == 200 and st["gpus"]["0"]["phase"] == "Ready" and st["gpus"]["0"]["runningModels"] == ["llm"]
    assert call(api, "GET", "/healthz") == (200, "ok\n")
    code, text = call(api, "GET", "/metrics")
    assert code == 200 and 'vramctl_phase{gpu="0",phase="Ready"} 1.0' in text


def test_switch_is_accepted_and_applied(stack: tuple[Served, GpuWorker, FakeRuntime]) -> None:
    api, w, rt = stack
    code, reply = call(api, "POST", "/switch", {"model": "sdxl"})
    assert code == 202 and reply["activeModel"] == "sdxl" and reply["generation"] == w.desired.generation
    w.reconcile_once()
    assert rt.calls == [("stop", "llm"), ("start", "sdxl")]


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        ({"model": "nope"}, 422, "model", "unknown model 'nope' on gpu 0: the known models are big, llm, sdxl, tts"),
        ({"model": "tts"}, 422, "model", "class light"),
        ({"model": "llm", "companions": ["big", "tts"]}, 422, "companions", "do not fit"),
        ({"modle": "sdxl"}, 400, "modle", "unknown field"),
        ({}, 400, "model", "required"),
        ({"model": 3}, 400, "model", "string or null"),
        ({"model": "sdxl", "gpu": 7}, 404, "gpu", "not managed here"),
        ({"model": "sdxl", "companions": "tts"}, 400, "companions", "list of model names"),
    ],
)
def test_bad_switch_names_the_field_and_changes_nothing(
    stack: tuple[Served, GpuWorker, FakeRuntime], body: dict[str, Any], status: int, field: str, words: str
) -> None:
    api, w, rt = stack
    gen = w.desired.generation
    code, reply = call(api, "POST", "/switch", body)
    assert code == status and reply["field"] == field and words in reply["error"]
    assert w.desired.generation == gen
    w.reconcile_once()
    assert rt.calls == []


def test_invalid_json_and_unknown_endpoint(stack: tuple[Served, GpuWorker, FakeRuntime]) -> None:
    api, _, _ = stack
    code, reply = call(api, "POST", "/switch", raw=b"{model: sdxl")
    assert code == 400 and "not valid JSON" in reply["error"]
    assert call(api, "GET", "/nope")[0] == 404


def test_token_is_required_when_configured() -> None:
    rt = FakeRuntime()
    d = spec()
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(baseline_mib=0))
    api = serve_face(Supervisor([w], rt, Metrics()), token="s3cret")
    try:
        assert call(api, "POST", "/switch", {"model": "sdxl"})[0] == 401
        assert call(api, "POST", "/switch", {"model": "sdxl"}, token="wrong")[0] == 401
        assert call(api, "POST", "/switch", {"model": "sdxl"}, token="s3cret")[0] == 202
        assert call(api, "GET", "/status")[0] == 200  # reads stay open
    finally:
        api.stop()


def test_non_loopback_without_token_refuses_to_start() -> None:
    rt = FakeRuntime()
    d = spec()
    w = GpuWorker(d, rt, FakeGpu(rt, d), WorkerSettings(baseline_mib=0))
    with pytest.raises(ValueError, match="needs a token"):
        serve_face(Supervisor([w], rt, Metrics()), host="0.0.0.0")
