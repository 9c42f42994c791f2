"""Spec validation: every problem names the field path (camelCase, as in the
YAML) and says how to fix it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.builders import deployment, deployment_doc, heavy, light, model
from vramctl.spec.models import Config, ConfigError, DeploymentSpec, DesiredStateError, check_desired, parse_config


def problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "test.yaml")
    return info.value.problems


def only_problem(doc: dict[str, Any]) -> tuple[str, str]:
    found = problems(doc)
    assert len(found) == 1, found
    return found[0]


def one_gpu(models: dict[str, dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"gpus": [deployment_doc(models, **fields)]}


def with_llm(**fields: Any) -> dict[str, Any]:
    return one_gpu({"llm": heavy(12000, **fields)})


# (document, expected path, words the message must contain: what is wrong and how to fix it)
BAD: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    (
        "typo-vramMib",
        one_gpu({"llm": {"image": "x", "vramMib": 1000}}),
        "gpus[0].models.llm.vramMib",
        ("unknown field", "spelling", "vramMiB"),
    ),
    ("typo-top-level", {"gpus": [deployment_doc()], "resync": 3}, "resync", ("unknown field",)),
    ("typo-activemodel", one_gpu({"llm": heavy()}, activemodel="llm"), "gpus[0].activemodel", ("unknown field", "activeModel")),
    (
        "active-not-a-model",
        one_gpu({"llm": heavy(), "tts": light()}, activeModel="gpt"),
        "gpus[0].activeModel",
        ("'gpt'", "not one of the models", "llm, tts"),
    ),
    (
        "active-is-light",
        one_gpu({"llm": heavy(), "tts": light()}, activeModel="tts"),
        "gpus[0].activeModel",
        ("class light", "put it in companions", "class to heavy"),
    ),
    (
        "companion-heavy",
        one_gpu({"llm": heavy(), "sdxl": heavy()}, activeModel="llm", companions=["sdxl"]),
        "gpus[0].companions[0]",
        ("class heavy", "only light models"),
    ),
    (
        "companion-unknown",
        one_gpu({"llm": heavy(), "tts": light()}, companions=["tts", "asr"]),
        "gpus[0].companions[1]",
        ("'asr'", "not one of the models", "llm, tts"),
    ),
    ("companion-twice", one_gpu({"llm": heavy(), "tts": light()}, companions=["tts", "tts"]), "gpus[0].companions", ("twice",)),
    (
        "companions-over-budget",
        one_gpu({"llm": heavy(13000), "tts": light(4000)}, activeModel="llm", companions=["tts"], vramBudgetMiB=15872),
        "gpus[0].companions",
        ("llm 13000 + tts 4000 = 17000 MiB > vramBudgetMiB 15872 MiB", "drop a companion", "raise vramBudgetMiB"),
    ),
    (
        "health-path-without-port",
        with_llm(health={"path": "/health"}),
        "gpus[0].models.llm.health.port",
        ("needs health.port", "add `port:"),
    ),
    (
        "health-path-no-slash",
        with_llm(health={"path": "health", "port": 8000}),
        "gpus[0].models.llm.health.path",
        ("must start with '/'", "path: /health"),
    ),
    (
        "health-path-and-docker",
        with_llm(health={"path": "/h", "port": 8000, "dockerHealthcheck": True}),
        "gpus[0].models.llm.health.dockerHealthcheck",
        ("choose one",),
    ),
    ("health-port-out-of-range", with_llm(health={"path": "/h", "port": 70000}), "gpus[0].models.llm.health.port", ("65535",)),
    ("port-no-colon", with_llm(ports=["8000"]), "gpus[0].models.llm.ports", ("HOST:CONTAINER", '"8000:8000"')),
    ("port-too-big", with_llm(ports=["8000:70000"]), "gpus[0].models.llm.ports", ("1-65535",)),
    ("volume-relative-dst", with_llm(volumes=["/models:models"]), "gpus[0].models.llm.volumes", ("SRC:/abs/dst[:ro]",)),
    ("volume-bad-mode", with_llm(volumes=["/models:/models:rx"]), "gpus[0].models.llm.volumes", ("ro or rw",)),
    ("env-bad-name", with_llm(env={"CUDA-VISIBLE": "0"}), "gpus[0].models.llm.env", ("'CUDA-VISIBLE'", "letters, digits and _")),
    ("gpu-env-bad-name", one_gpu({"llm": heavy()}, env={"1ST": "x"}), "gpus[0].env", ("'1ST'", "letters, digits and _")),
    ("model-name-uppercase", one_gpu({"LLM": heavy()}), "gpus[0].models", ("'LLM'", "lowercase letters, digits and '-'")),
    ("model-name-underscore", one_gpu({"my_llm": heavy()}), "gpus[0].models", ("'my_llm'", "lowercase letters, digits and '-'")),
    ("stop-signal-unknown", with_llm(stop={"signal": "SIGFOO"}), "gpus[0].models.llm.stop.signal", ("'SIGFOO'", "use SIGTERM")),
    ("stop-signal-sigkill", with_llm(stop={"signal": "SIGKILL"}), "gpus[0].models.llm.stop.signal", ("uncatchable", "use SIGTERM")),
    ("stop-signal-sigstop", with_llm(stop={"signal": "stop"}), "gpus[0].models.llm.stop.signal", ("uncatchable",)),
    (
        "duplicate-gpu",
        {"gpus": [deployment_doc(gpu=0), deployment_doc(gpu=1), deployment_doc(gpu=0)]},
        "gpus[2].gpu",
        ("gpu 0 appears twice", "one entry per GPU"),
    ),
    (
        "no-way-to-run",
        one_gpu({"llm": {"class": "heavy", "vramMiB": 100}}),
        "gpus[0].models.llm",
        ("set one of image, composeService or command",),
    ),
    ("empty-command", one_gpu({"llm": {"command": []}}), "gpus[0].models.llm", ("set one of image, composeService or command",)),
    ("image-and-compose", one_gpu({"llm": heavy(composeService="llm")}), "gpus[0].models.llm", ("image or composeService, not both",)),
    ("empty-models", {"gpus": [{"models": {}}]}, "gpus[0].models", ("at least one",)),
    ("empty-gpus", {"gpus": []}, "gpus", ("at least one",)),
    ("missing-models", {"gpus": [{"gpu": 0}]}, "gpus[0].models", ("required", "missing")),
    ("bad-class", one_gpu({"llm": model("medium")}), "gpus[0].models.llm.class", ("'heavy'", "'light'")),
    ("negative-vram", one_gpu({"llm": heavy(-1)}), "gpus[0].models.llm.vramMiB", ("greater than or equal to 0",)),
    ("bad-gpu-probe", {"gpus": [deployment_doc()], "gpuProbe": {"totalMib": 8000}}, "gpuProbe.totalMib", ("unknown field", "camelCase")),
]


@pytest.mark.parametrize(("doc", "path", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_problem_names_the_field_and_the_fix(doc: dict[str, Any], path: str, words: tuple[str, ...]) -> None:
    where, msg = only_problem(doc)
    assert where == path, (where, msg)
    for w in words:
        assert w in msg, (w, msg)


def test_rendered_error_lists_source_path_and_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_llm(health={"path": "/health"}), "gpu.yaml")
    text = str(info.value)
    assert text.splitlines()[0] == "gpu.yaml: 1 problem(s)"
    assert "  gpus[0].models.llm.health.port: health.path needs health.port" in text


def test_several_problems_are_all_reported() -> None:
    doc = one_gpu({"llm": heavy(vramMib=1, ports=["x"]), "tts": light(stop={"signal": "SIGKILL"})}, env={"A-B": "1"})
    paths = sorted(p for p, _ in problems(doc))
    assert paths == ["gpus[0].env", "gpus[0].models.llm.ports", "gpus[0].models.llm.vramMib", "gpus[0].models.tts.stop.signal"]


def test_error_paths_keep_dict_keys_verbatim_in_bare_form() -> None:
    # The bare single-GPU mapping is wrapped as gpus[0]; paths say so.
    assert only_problem({"models": {"llm": {"image": "x", "vramMib": 1}}})[0] == "gpus[0].models.llm.vramMib"


# ------------------------------------------------------------------ valid documents


def test_camel_case_fields_are_read() -> None:
    cfg = parse_config(
        {
            "runtime": "process",
            "gpuProbe": {"kind": "simulated", "totalMiB": 16303, "baselineMiB": 400, "marginMiB": 128},
            "backoffInitialSeconds": 1,
            "gpus": [
                deployment_doc(
                    {
                        "llm": heavy(12000, health={"path": "/health", "port": 8000, "intervalSeconds": 0.5}),
                        "tts": light(3500, stop={"signal": "int", "gracePeriodSeconds": 3}),
                    },
                    name="box",
                    gpu=1,
                    activeModel="llm",
                    companions=["tts"],
                    vramBudgetMiB=15872,
                )
            ],
        }
    )
    g = cfg.gpus[0]
    assert (g.name, g.gpu, g.active_model, g.companions, g.vram_budget_mib) == ("box", 1, "llm", ["tts"], 15872)
    assert g.models["llm"].vram_mib == 12000 and g.models["llm"].heavy
    assert g.models["llm"].health is not None and g.models["llm"].health.interval_seconds == 0.5
    assert not g.models["tts"].heavy and g.models["tts"].stop.signal == "SIGINT" and g.models["tts"].stop.grace_period_seconds == 3
    assert (cfg.gpu_probe.total_mib, cfg.gpu_probe.baseline_mib, cfg.gpu_probe.margin_mib) == (16303, 400, 128)
    assert cfg.runtime == "process" and cfg.backoff_initial_seconds == 1


def test_dump_by_alias_round_trips() -> None:
    spec = deployment(activeModel="llm", companions=["tts"], vramBudgetMiB=15872)
    dumped = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["activeModel"] == "llm" and dumped["vramBudgetMiB"] == 15872
    assert dumped["models"]["llm"]["vramMiB"] == 12000 and dumped["models"]["tts"]["class"] == "light"
    assert DeploymentSpec.model_validate(dumped) == spec


def test_bare_single_gpu_mapping_is_one_gpu_entry() -> None:
    cfg = parse_config(deployment_doc(activeModel="llm", gpu=2))
    assert len(cfg.gpus) == 1
    assert cfg.gpus[0].gpu == 2 and cfg.gpus[0].active_model == "llm"
    assert cfg.gpus[0].display_name == "gpu2"


def test_empty_active_model_means_none() -> None:
    assert deployment(activeModel="").active_model is None


def test_companions_within_budget_and_without_budget() -> None:
    # Exactly at the budget fits; without a budget the sizes are not checked at parse time.
    deployment({"llm": heavy(12000), "tts": light(3872)}, activeModel="llm", companions=["tts"], vramBudgetMiB=15872)
    deployment({"llm": heavy(30000), "tts": light(30000)}, activeModel="llm", companions=["tts"])


def test_check_desired_uses_total_minus_margin_without_budget() -> None:
    spec = deployment({"llm": heavy(12000), "tts": light(4000)})
    check_desired(spec, "llm", ["tts"], total_mib=16512)  # budget 16000: exactly fits
    with pytest.raises(DesiredStateError, match=r"llm 12000 \+ tts 4000 = 16000 MiB > vramBudgetMiB 15999 MiB"):
        check_desired(spec, "llm", ["tts"], total_mib=16511)


def test_config_defaults() -> None:
    cfg = Config.model_validate({"gpus": [deployment_doc()]})
    assert cfg.runtime == "auto" and cfg.compose is None and cfg.gpu_probe.kind == "auto"
    m = cfg.gpus[0].models["tts"]
    assert m.stop.signal == "SIGTERM" and m.network_mode == "host" and m.args == [] and m.health is None


# ------------------------------------------------------------------ spec_hash and env


def _hash(models: dict[str, dict[str, Any]], name: str = "llm", **fields: Any) -> str:
    return deployment(models, **fields).spec_hash(name)


BASE = {"llm": heavy(12000, env={"A": "1"}, args=["--x"], health={"path": "/health", "port": 8000})}


@pytest.mark.parametrize(
    "change",
    [
        {"env": {"A": "2"}},
        {"env": {"A": "1", "B": "1"}},
        {"args": ["--y"]},
        {"args": []},
        {"image": "example/standin:v2"},
        {"ports": ["8000:8000"]},
        {"volumes": ["/models:/models:ro"]},
        {"stop": {"signal": "SIGINT"}},
        {"networkMode": "bridge"},
    ],
    ids=["env-value", "env-added", "args", "args-removed", "image", "ports", "volumes", "stop-signal", "network-mode"],
)
def test_spec_hash_changes_with_what_shapes_the_container(change: dict[str, Any]) -> None:
    changed = {"llm": {**BASE["llm"], **change}}
    assert _hash(BASE) != _hash(changed)


@pytest.mark.parametrize(
    "change",
    [
        {"health": {"path": "/ready", "port": 9000}},
        {"health": None},
        {"vramMiB": 1},
        {"startTimeoutSeconds": 5},
        {"class": "light"},
    ],
    ids=["health", "no-health", "vram", "start-timeout", "class"],
)
def test_spec_hash_ignores_what_does_not(change: dict[str, Any]) -> None:
    changed = {"llm": {k: v for k, v in {**BASE["llm"], **change}.items() if v is not None}}
    assert _hash(BASE) == _hash(changed)


def test_spec_hash_sees_global_env_and_gpu_and_is_stable() -> None:
    assert _hash(BASE) == _hash(BASE)
    assert len(_hash(BASE)) == 16
    assert _hash(BASE) != _hash(BASE, env={"HF_HOME": "/cache"})
    assert _hash(BASE) != _hash(BASE, gpu=1)
    # A global value the model overrides does not change the merged env.
    assert _hash(BASE) == _hash(BASE, env={"A": "global"})


def test_spec_hash_is_per_model() -> None:
    spec = deployment({"llm": heavy(env={"A": "1"}), "sdxl": heavy(env={"A": "2"})})
    assert spec.spec_hash("llm") != spec.spec_hash("sdxl")


def test_merged_env_model_wins() -> None:
    spec = deployment(
        {"llm": heavy(env={"A": "model", "M": "1"}), "tts": light()}, env={"A": "global", "G": "1"}, envPolicy={"sdpaDefaults": False}
    )
    assert spec.merged_env("llm") == {"A": "model", "G": "1", "M": "1"}
    assert spec.merged_env("tts") == {"A": "global", "G": "1"}
