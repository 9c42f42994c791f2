"""images/sdxl: POST /v1/images/generations, OpenAI's shape beside /generate.

The request rules (pure), the HTTP app with the gated fake engine, and the
real server on the CPU (tiny random SDXL) called by the official openai client.
"""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import openai
import pytest

from tests.support.sdxl import FakeEngine, RealServer, png_size, request, server


def test_defaults_and_vendor_fields() -> None:
    req, n = server.parse_images(b'{"prompt": "a cat", "model": "sdxl", "user": "u1"}')
    assert n == 1 and (req.prompt, req.width, req.height, req.steps, req.seed) == ("a cat", 1024, 1024, 30, None)
    req, n = server.parse_images(
        json.dumps({"prompt": "a", "n": 3, "size": "512x768", "steps": 4, "seed": 9, "negative_prompt": "blur", "guidance": 2}).encode()
    )
    assert n == 3 and (req.width, req.height, req.steps, req.seed, req.negative_prompt, req.guidance) == (512, 768, 4, 9, "blur", 2.0)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"n": 1}, "prompt", "prompt is required"),
        ({"prompt": "a", "size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "a", "size": "1000x65"}, "size", "multiple of 8"),
        ({"prompt": "a", "size": "4096x4096"}, "size", "between 64 and 2048"),
        ({"prompt": "a", "response_format": "url"}, "response_format", "b64_json"),
        ({"prompt": "a", "n": 5}, "n", "between 1 and 4"),
        ({"prompt": "a", "width": 512}, "width", "unknown field"),
    ],
)
def test_bad_fields_are_named_as_openai_names_them(body: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(server.BadRequest) as info:
        server.parse_images(json.dumps(body).encode())
    assert info.value.field == field and message in info.value.message


def test_images_through_the_app(gated: tuple[str, threading.Event, FakeEngine, Any]) -> None:
    base, gate, engine, app = gated
    r = request(base, "/v1/images/generations", {"prompt": "a cat"})
    assert r.status == 503 and r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "server_error"
    r = request(base, "/v1/images/generations", {"prompt": "a cat", "size": "7x7"})
    assert r.status == 400 and r.json()["error"]["param"] == "size"
    gate.set()
    assert app.loaded.wait(5)
    r = request(base, "/v1/images/generations", {"prompt": "a cat", "n": 2, "size": "512x768", "seed": 42, "steps": 3})
    assert r.status == 200 and r.headers["X-Seed"] == "42"
    assert [base64.b64decode(d["b64_json"]) for d in r.json()["data"]] == [b"\x89PNG fake"] * 2
    assert [c[5] for c in engine.calls] == [42, 43]  # each image its own seed
    assert [c[3:5] for c in engine.calls] == [(512, 768)] * 2


def test_real_server_with_the_openai_client(real: RealServer) -> None:
    client = openai.OpenAI(base_url=real.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = client.images.generate(model="sdxl", prompt="a lighthouse", size="64x64", extra_body={"steps": 2, "seed": 3})  # type: ignore[call-overload]
    assert out.data is not None and len(out.data) == 1
    png = base64.b64decode(out.data[0].b64_json or "")
    assert png_size(png) == ((64, 64), "RGB")
    again = client.images.generate(model="sdxl", prompt="a lighthouse", size="64x64", extra_body={"steps": 2, "seed": 3})  # type: ignore[call-overload]
    assert again.data is not None and base64.b64decode(again.data[0].b64_json or "") == png  # same seed, same image
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="sdxl", prompt="a", size="64x63")  # type: ignore[call-overload]
    assert info.value.body is not None and info.value.body["param"] == "size"  # type: ignore[index]
