"""A model on several GPUs sees each of them: docker's device request (a fake client, no engine)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tests.support.builders import deployment, heavy

docker_runtime = pytest.importorskip("vramctl.runtimes.docker")


def _host_config_of(gpus: list[int] | None, gpu: int = 0) -> dict[str, Any]:
    client = SimpleNamespace(api=SimpleNamespace(create_host_config=lambda **kw: kw))
    rt = docker_runtime.DockerRuntime(client, instance="t")  # type: ignore[arg-type]
    fields: dict[str, Any] = {"gpuRequest": "always"}
    if gpus is not None:
        fields["gpus"] = gpus
    d = deployment({"m": heavy(1000, **fields), "other": heavy(1000)}, gpu=gpu)
    host: dict[str, Any] = rt.create_kwargs(d, "m")["host_config"]
    return host


def test_one_gpu_is_one_device_id_as_before() -> None:
    [req] = _host_config_of(None, gpu=1)["device_requests"]
    assert req["DeviceIDs"] == ["1"]


def test_a_model_on_two_gpus_asks_for_both_ids() -> None:
    [req] = _host_config_of([1, 0])["device_requests"]
    assert (req["Driver"], req["DeviceIDs"], req["Capabilities"]) == ("nvidia", ["0", "1"], [["gpu"]])
