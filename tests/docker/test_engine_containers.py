"""Engines through the real docker engine: the rendered command, environment
and health check reach the container vramctl creates, and a changed typed
field (gpuMemoryUtilization) recreates it.

The stand-in image ignores its arguments, so it can play a vLLM server: it
gets the rendered vLLM flags as its command and serves /health on the port
of ``vllm.port`` (STANDIN_PORT).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# `import docker.errors` also binds `docker`; ruff would sort a bare `import docker`
# as first-party because of the tests/docker package.
import docker.errors

from tests.support.docker_engine import STANDIN_TAG
from vramctl.runtimes.base import LABEL_SPEC_HASH
from vramctl.runtimes.docker import DockerRuntime
from vramctl.spec.models import SDPA_DEFAULT_ENV, DeploymentSpec


def vllm_standin(port: int, utilization: float) -> dict[str, Any]:
    return {
        "engine": "vllm",
        "image": STANDIN_TAG,
        "ipcMode": "private",
        "vllm": {"model": "Qwen/Qwen2.5-7B-Instruct", "gpuMemoryUtilization": utilization, "maxModelLen": 4096, "port": port},
        "env": {"STANDIN_PORT": str(port), "STANDIN_LOAD_SECONDS": "0.2", "STANDIN_STOP_SECONDS": "0.1"},
        "args": ["--enforce-eager"],
        "stop": {"gracePeriodSeconds": 3},
    }


def spec(model: dict[str, Any]) -> DeploymentSpec:
    return DeploymentSpec.model_validate({"gpu": 0, "models": {"llm": model}, "env": {"HF_HOME": "/models/hf"}})


def wait_healthy(runtime: DockerRuntime, d: DeploymentSpec, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not runtime.check_health(d, "llm"):
        assert time.monotonic() < deadline, "not healthy in time"
        time.sleep(0.05)


def test_vllm_engine_renders_into_the_container_and_a_new_utilization_recreates_it(
    runtime: DockerRuntime, docker_client: docker.DockerClient, free_port: Callable[[], int]
) -> None:
    port = free_port()
    d = spec(vllm_standin(port, 0.85))
    ref = runtime.start(d, "llm")
    wait_healthy(runtime, d)  # the engine's own health check: GET /health on vllm.port (no `health:` written)

    c = docker_client.containers.get(ref)
    assert c.attrs["Config"]["Cmd"] == [
        *("--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory-utilization", "0.85", "--max-model-len", "4096", "--port", str(port)),
        "--enforce-eager",
    ]
    assert c.attrs["Config"]["Entrypoint"] == ["/bin/sh", "/standin.sh"]  # the image's entrypoint runs the server
    env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
    assert {k: env[k] for k in SDPA_DEFAULT_ENV} == dict(SDPA_DEFAULT_ENV)
    assert env["HF_HOME"] == "/models/hf"
    assert "VLLM_ATTENTION_BACKEND" not in env
    assert c.attrs["HostConfig"]["IpcMode"] == "private"

    # The second pass does nothing: same spec, same container.
    assert runtime.start(d, "llm") == ref
    d2 = spec(vllm_standin(port, 0.8))
    assert d2.spec_hash("llm") != d.spec_hash("llm")
    assert runtime.observe(d2)["llm"].drifted
    ref2 = runtime.start(d2, "llm")
    assert ref2 != ref
    wait_healthy(runtime, d2)
    c2 = docker_client.containers.get(ref2)
    assert "0.8" in c2.attrs["Config"]["Cmd"] and "0.85" not in c2.attrs["Config"]["Cmd"]
    assert c2.labels[LABEL_SPEC_HASH] == d2.spec_hash("llm")
    runtime.remove(d2, "llm")


def test_sovits_and_sdxl_create_kwargs(runtime: DockerRuntime) -> None:
    d = DeploymentSpec.model_validate(
        {
            "models": {
                "tts": {"class": "light", "engine": "sovits", "image": STANDIN_TAG, "sovits": {"config": "/models/tts_infer.yaml"}},
                "sdxl": {
                    "engine": "sdxl",
                    "image": STANDIN_TAG,
                    "sdxl": {"modelPath": "/models/sdxl/base.safetensors", "loras": [{"path": "/models/l.safetensors", "weight": 0.7}]},
                    "env": {"SDXL_DTYPE": "bfloat16"},
                },
            }
        }
    )
    tts = runtime.create_kwargs(d, "tts")
    assert tts["command"] == ["python", "api_v2.py", "-a", "0.0.0.0", "-p", "9880", "-c", "/models/tts_infer.yaml"]
    sdxl = runtime.create_kwargs(d, "sdxl")
    assert sdxl["command"] is None  # the image's own CMD
    assert sdxl["environment"]["SDXL_MODEL"] == "/models/sdxl/base.safetensors"
    assert sdxl["environment"]["SDXL_LORAS"] == "/models/l.safetensors:0.7"
    assert sdxl["environment"]["SDXL_DTYPE"] == "bfloat16"  # the model's env wins over its engine
    assert sdxl["environment"]["PORT"] == "7860"
    assert sdxl["environment"]["XFORMERS_DISABLED"] == "1"
