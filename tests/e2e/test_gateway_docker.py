"""The gateway on a real Docker engine: `vramctl up --gateway` with the
docker runtime runs two heavy stand-in containers (the busybox image,
answering OpenAI-shaped requests with STANDIN_OPENAI=1), and the official
`openai` client sends requests for both from 20 concurrent clients. Each
answer is correct, no request is cut by a switch, and the session's
exclusivity recorder (docker events) sees no two heavy containers at once."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.support.exclusivity import ExclusivityRecorder
from tests.support.figures import report
from tests.support.live_up import LiveUp, standin_model
from tests.support.openai_mix import IMAGE, TOKENS, one

pytestmark = pytest.mark.docker


def test_openai_clients_for_two_heavy_containers_through_the_gateway(
    vramctl: Callable[[dict[str, Any]], LiveUp], free_port: Callable[[], int], exclusivity: ExclusivityRecorder, instance: str
) -> None:
    ports = {"llm": free_port(), "sdxl": free_port()}
    served = {"llm": "qwen-7b", "sdxl": "sdxl-base"}
    models = {
        m: {
            **standin_model(ports[m], 11000, load=0.3, stop=0.1, STANDIN_OPENAI="1", STANDIN_TOKEN_SECONDS="0.01"),
            "servedModelName": served[m],
        }
        for m in ports
    }
    cfg = {
        "runtime": "docker",
        "gpuProbe": {"kind": "simulated", "releaseDelaySeconds": 0.05},
        "gpus": [
            {
                "gpu": 0,
                "activeModel": "llm",
                "vramBudgetMiB": 15000,
                "queue": {"maxServeSeconds": 3, "drainTimeoutSeconds": 2},
                "switching": {"mode": "onDemand"},
                "models": models,
            }
        ],
    }
    v = vramctl(cfg)
    gw = free_port()
    v.extra_args = ["--gateway", f"127.0.0.1:{gw}"]
    v.start()
    seq = exclusivity.seq
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw}/v1", api_key="unused", max_retries=0, timeout=60)
    assert {"qwen-7b", "sdxl-base"} <= {m.id for m in client.models.list().data}

    t0 = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: one(client, i), range(120)))
    took = time.monotonic() - t0
    bad = [(i, r) for i, r in enumerate(results) if r not in (IMAGE, TOKENS)]
    assert not bad, bad[:5]  # every answer whole: none cut by a switch, none refused
    exclusivity.assert_no_violations(instance, since_seq=seq)
    starts = [p for p in v.status_progress() if p["step"] == "started"]
    assert {p["model"] for p in starts} >= {"sdxl", "llm"}  # it did switch back and forth for them
    metrics = urllib.request.urlopen(v.url + "/metrics", timeout=5).read().decode()
    ok = {
        line.split('model="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vramctl_gateway_requests_total{") and 'code="200"' in line
    }
    assert ok == {"llm": 90.0, "sdxl": 30.0}, ok
    line = f"[gateway docker] 120 requests (90 chat, 30 images) from 20 clients in {took:.1f}s; {len(starts)} starts; no overlap"
    report(line)
