"""The spec of request-driven switching: switching, queue, idle, a model's
priority and servedModelName. Every problem names its field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from vramctl.spec.models import ConfigError, parse_config


def base() -> dict[str, Any]:
    return {
        "models": {
            "llm": {"image": "x", "engine": "vllm", "vllm": {"model": "Qwen/Qwen2.5-14B"}},
            "coder": {"image": "x", "engine": "vllm", "vllm": {"model": "Qwen/Qwen2.5-Coder-7B", "servedModelName": "coder-7b"}},
            "sdxl": {"image": "y", "servedModelName": "sdxl-base", "priority": 5},
            "tts": {"class": "light", "image": "z"},
        }
    }


def with_(patch: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    doc = base()
    target = doc["models"][model] if model else doc
    target.update(copy.deepcopy(patch))
    return doc


def test_defaults_keep_todays_behaviour() -> None:
    d = parse_config(base()).gpus[0]
    assert d.switching.mode == "declared" and d.switching.default_model is None
    assert (d.queue.max_queue, d.queue.queue_timeout_seconds, d.queue.max_serve_seconds, d.queue.drain_timeout_seconds) == (
        512,
        300,
        60,
        30,
    )
    assert d.idle.after_seconds is None and d.idle_default_model is None
    assert d.models["llm"].priority == 0 and d.models["sdxl"].priority == 5


def test_served_names() -> None:
    d = parse_config(base()).gpus[0]
    assert [d.served_name(m) for m in ("llm", "coder", "sdxl", "tts")] == ["Qwen/Qwen2.5-14B", "coder-7b", "sdxl-base", "tts"]


def test_on_demand_with_idle_return() -> None:
    doc = with_(
        {
            "switching": {"mode": "onDemand", "defaultModel": "llm"},
            "queue": {"maxQueue": 64, "queueTimeoutSeconds": 120, "maxServeSeconds": 20, "drainTimeoutSeconds": 10},
            "idle": {"afterSeconds": 600, "action": "default"},
        }
    )
    d = parse_config(doc).gpus[0]
    assert d.switching.mode == "onDemand" and d.idle_default_model == "llm" and d.queue.max_queue == 64


def test_priority_and_served_name_do_not_recreate_the_container() -> None:
    a = parse_config(base()).gpus[0]
    b = parse_config(with_({"priority": 9, "servedModelName": "pictures"}, "sdxl")).gpus[0]
    assert a.spec_hash("sdxl") == b.spec_hash("sdxl")


@pytest.mark.parametrize(
    ("doc", "path", "words"),
    [
        (with_({"switching": {"mode": "lazy"}}), "gpus[0].switching.mode", ("declared", "onDemand")),
        (with_({"switching": {"defaultModel": "ghost"}}), "gpus[0].switching.defaultModel", ("ghost", "not one of the models")),
        (with_({"idle": {"afterSeconds": 60, "defaultModel": "tts"}}), "gpus[0].idle.defaultModel", ("light", "heavy")),
        (with_({"idle": {"afterSeconds": 60}}), "gpus[0].idle.defaultModel", ("needs a model", "switching.defaultModel")),
        (with_({"idle": {"afterSeconds": 60, "action": "nap"}}), "gpus[0].idle.action", ("default", "sleep", "free")),
        (with_({"idle": {"afterSeconds": 0, "action": "free"}}), "gpus[0].idle.afterSeconds", ("greater than 0",)),
        (with_({"queue": {"maxQueue": 0}}), "gpus[0].queue.maxQueue", ("greater than or equal to 1",)),
        (
            with_({"queue": {"queueTimeoutSeconds": 30}}),
            "gpus[0].queue.queueTimeoutSeconds",
            ("maxServeSeconds + drainTimeoutSeconds", "90"),
        ),
        (with_({"queue": {"drainTimeout": 3}}), "gpus[0].queue.drainTimeout", ("unknown field",)),
        (with_({"priority": 5000}, "llm"), "gpus[0].models.llm.priority", ("1000",)),
        (with_({"priority": "high"}, "llm"), "gpus[0].models.llm.priority", ("integer",)),
        (with_({"servedModelName": "other"}, "coder"), "gpus[0].models.coder.servedModelName", ("vllm.servedModelName",)),
        (with_({"servedModelName": "llm"}, "sdxl"), "gpus[0].models.sdxl.servedModelName", ("'llm'", "both reached")),
        (with_({"servedModelName": "coder-7b"}, "tts"), "gpus[0].models.tts.servedModelName", ("coder-7b",)),
    ],
)
def test_problems_name_the_field(doc: dict[str, Any], path: str, words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "t.yaml")
    assert len(info.value.problems) == 1, info.value.problems
    got_path, message = info.value.problems[0]
    assert got_path == path
    for w in words:
        assert w in message, message
