"""Engines: what each one renders (arguments, environment, health, VRAM
reservation), how a model's own args/env/health combine with it, and the
spec errors that name the field and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.builders import deployment, desired, heavy, light, obs
from tests.support.fakes import FakeGpu, FakeRuntime
from vramctl.observed import WorkloadState
from vramctl.planner import WaitForMemory, plan
from vramctl.spec.engines import (
    SDXL_SLEEP_API,
    VLLM_SLEEP_API,
    SdxlSpec,
    SleepApi,
    SovitsSpec,
    VllmSpec,
    render_sdxl,
    render_sovits,
    render_vllm,
    sleep_api,
)
from vramctl.spec.models import SDPA_DEFAULT_ENV, ConfigError, DeploymentSpec, DesiredStateError, HealthSpec, check_desired, parse_config
from vramctl.worker.actor import GpuWorker, WorkerSettings

VLLM_IMAGE = "vllm/vllm-openai:v0.11.2"


def vllm(vram: int | None = None, **fields: Any) -> dict[str, Any]:
    """A heavy vLLM model; ``fields`` go under ``vllm:`` (camelCase)."""
    out: dict[str, Any] = {"class": "heavy", "engine": "vllm", "image": VLLM_IMAGE, "vllm": {"model": "Qwen/Qwen2.5-7B-Instruct", **fields}}
    if vram is not None:
        out["vramMiB"] = vram
    return out


def argv(text: str) -> list[str]:
    """A table's argument list written as one line."""
    return text.split()


def problems(models: dict[str, dict[str, Any]], **fields: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config({"gpus": [{"models": models, **fields}]}, "t.yaml")
    return info.value.problems


# ------------------------------------------------------------------ vLLM flags

VLLM_FLAGS: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "minimal: model, vLLM's default utilization, port",
        {},
        ["--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory-utilization", "0.9", "--port", "8000"],
    ),
    (
        "every typed field, in a fixed order",
        {
            "servedModelName": "qwen2.5-7b",
            "gpuMemoryUtilization": 0.85,
            "maxModelLen": 8192,
            "dtype": "bfloat16",
            "quantization": "awq",
            "kvCacheDtype": "fp8",
            "enablePrefixCaching": True,
            "maxNumSeqs": 256,
            "maxNumBatchedTokens": 8192,
            "attentionBackend": "FLASHINFER",
            "cpuOffloadGB": 4,
            "enableSleepMode": True,
            "port": 8001,
            "extraArgs": ["--enforce-eager", "--max-num-partial-prefills=2"],
        },
        argv(
            "--model Qwen/Qwen2.5-7B-Instruct --served-model-name qwen2.5-7b --gpu-memory-utilization 0.85 --max-model-len 8192 "
            "--dtype bfloat16 --quantization awq --kv-cache-dtype fp8 --enable-prefix-caching --max-num-seqs 256 "
            "--max-num-batched-tokens 8192 --attention-backend FLASHINFER --cpu-offload-gb 4 --enable-sleep-mode --port 8001 "
            "--enforce-eager --max-num-partial-prefills=2"
        ),
    ),
    (
        "prefix caching off is spelled out",
        {"enablePrefixCaching": False, "gpuMemoryUtilization": 1},
        ["--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory-utilization", "1", "--no-enable-prefix-caching", "--port", "8000"],
    ),
    (
        "fractional offload keeps its digits",
        {"cpuOffloadGB": 2.5, "gpuMemoryUtilization": 0.5},
        ["--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory-utilization", "0.5", "--cpu-offload-gb", "2.5", "--port", "8000"],
    ),
]


@pytest.mark.parametrize(("fields", "flags"), [c[1:] for c in VLLM_FLAGS], ids=[c[0] for c in VLLM_FLAGS])
def test_vllm_renders_flags(fields: dict[str, Any], flags: list[str]) -> None:
    r = render_vllm(VllmSpec.model_validate({"model": "Qwen/Qwen2.5-7B-Instruct", **fields}))
    assert list(r.args) == flags
    assert r.program == ()  # the vllm/vllm-openai entrypoint runs the server: the flags are the container's command
    assert (r.health_path, r.port, r.health_host) == ("/health", fields.get("port", 8000), "127.0.0.1")


@pytest.mark.parametrize(("sleep", "env"), [(False, {}), (True, {"VLLM_SERVER_DEV_MODE": "1"})], ids=["awake", "sleep-mode"])
def test_vllm_sleep_mode_needs_the_dev_mode_endpoints(sleep: bool, env: dict[str, str]) -> None:
    assert dict(render_vllm(VllmSpec(model="m", enable_sleep_mode=sleep)).env) == env


@pytest.mark.parametrize(
    ("util", "total", "mib"),
    [(0.85, 16303, 13858), (0.9, 16303, 14673), (0.7, 10000, 7000), (1.0, 81559, 81559), (0.5, 3, 2)],
    ids=["rtx5080-0.85", "default-0.9", "no-float-noise", "all-of-it", "rounds-up"],
)
def test_vllm_reservation_is_utilization_times_total_rounded_up(util: float, total: int, mib: int) -> None:
    assert VllmSpec(model="m", gpu_memory_utilization=util).reservation_mib(total) == mib


# ------------------------------------------------------------------ SDXL and GPT-SoVITS

SDXL_ENV: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    (
        "defaults",
        {},
        {
            "SDXL_MODEL": "/models/sdxl/base.safetensors",
            "SDXL_VAE_SLICING": "1",
            "SDXL_VAE_TILING": "auto",
            "PORT": "7860",
        },
    ),
    (
        "tiling as a YAML boolean, slicing off, bf16, two LoRAs, another port",
        {
            "dtype": "bfloat16",
            "vaeSlicing": False,
            "vaeTiling": True,
            "loras": [{"path": "/models/lora/a.safetensors", "weight": 0.8}, {"path": "/models/lora/b:c.safetensors"}],
            "port": 7861,
        },
        {
            "SDXL_MODEL": "/models/sdxl/base.safetensors",
            "SDXL_DTYPE": "bfloat16",
            "SDXL_VAE_SLICING": "0",
            "SDXL_VAE_TILING": "1",
            "SDXL_LORAS": "/models/lora/a.safetensors:0.8,/models/lora/b:c.safetensors:1",
            "PORT": "7861",
        },
    ),
    ("tiling off", {"vaeTiling": False}, {"SDXL_VAE_TILING": "0"}),
    ("tiling on, spelled", {"vaeTiling": "on"}, {"SDXL_VAE_TILING": "1"}),
]


@pytest.mark.parametrize(("fields", "env"), [c[1:] for c in SDXL_ENV], ids=[c[0] for c in SDXL_ENV])
def test_sdxl_renders_the_servers_environment(fields: dict[str, Any], env: dict[str, str]) -> None:
    r = render_sdxl(SdxlSpec.model_validate({"modelPath": "/models/sdxl/base.safetensors", **fields}))
    assert {k: v for k, v in r.env.items() if k in env} == env
    if not fields:
        assert dict(r.env) == env  # nothing else: SDXL_DTYPE is the server's choice unless set
    assert (r.program, r.args, r.health_path, r.port) == ((), (), "/health", fields.get("port", 7860))


SOVITS: list[tuple[str, dict[str, Any], list[str], str]] = [
    ("defaults: every interface, 9880", {}, ["-a", "0.0.0.0", "-p", "9880"], "127.0.0.1"),
    (
        "config and port",
        {"config": "GPT_SoVITS/configs/tts_infer.yaml", "port": 9881},
        ["-a", "0.0.0.0", "-p", "9881", "-c", "GPT_SoVITS/configs/tts_infer.yaml"],
        "127.0.0.1",
    ),
    ("loopback only", {"bind": "127.0.0.1"}, ["-a", "127.0.0.1", "-p", "9880"], "127.0.0.1"),
    ("one address: probed there", {"bind": "127.0.0.5"}, ["-a", "127.0.0.5", "-p", "9880"], "127.0.0.5"),
]


@pytest.mark.parametrize(("fields", "flags", "host"), [c[1:] for c in SOVITS], ids=[c[0] for c in SOVITS])
def test_sovits_renders_api_v2_with_docs_as_health(fields: dict[str, Any], flags: list[str], host: str) -> None:
    r = render_sovits(SovitsSpec.model_validate(fields))
    assert r.program == ("python", "api_v2.py")
    assert list(r.args) == flags
    assert (r.health_path, r.port, r.health_host) == ("/docs", fields.get("port", 9880), host)  # api_v2.py has no health endpoint
    assert dict(r.env) == {}


# ------------------------------------------------------------------ a model: engine + its own args, env, health

MODELS: list[tuple[str, dict[str, Any], list[str] | None, HealthSpec | None]] = [
    (
        "vllm: flags, then the model's args",
        {**vllm(), "args": ["--trust-remote-code"]},
        ["--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory-utilization", "0.9", "--port", "8000", "--trust-remote-code"],
        HealthSpec(path="/health", port=8000),
    ),
    (
        "vllm: an explicit health replaces the engine's",
        {**vllm(port=8001), "health": {"path": "/v1/models", "port": 8001}},
        ["--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory-utilization", "0.9", "--port", "8001"],
        HealthSpec(path="/v1/models", port=8001),
    ),
    (
        "sovits: the program, its flags, then args",
        {"class": "light", "engine": "sovits", "image": "vramctl/sovits:dev", "sovits": {"config": "/models/tts.yaml"}, "args": ["--x"]},
        ["python", "api_v2.py", "-a", "0.0.0.0", "-p", "9880", "-c", "/models/tts.yaml", "--x"],
        HealthSpec(path="/docs", port=9880),
    ),
    (
        "sovits: all defaults without a sovits block",
        {"class": "light", "engine": "sovits", "image": "vramctl/sovits:dev"},
        ["python", "api_v2.py", "-a", "0.0.0.0", "-p", "9880"],
        HealthSpec(path="/docs", port=9880),
    ),
    (
        "sdxl: the image's own command",
        {"engine": "sdxl", "image": "vramctl/sdxl:dev", "sdxl": {"modelPath": "/m.safetensors"}},
        None,
        HealthSpec(path="/health", port=7860),
    ),
    ("container: args as written, no health", {"image": "x", "args": ["--a", "1"]}, ["--a", "1"], None),
    ("container: no args keeps the image's CMD", {"image": "x"}, None, None),
]


@pytest.mark.parametrize(("model", "command", "health"), [c[1:] for c in MODELS], ids=[c[0] for c in MODELS])
def test_container_command_and_health(model: dict[str, Any], command: list[str] | None, health: HealthSpec | None) -> None:
    d = deployment({"m": model})
    assert d.container_command("m") == command
    assert d.health_of("m") == health


def test_process_argv_is_command_then_engine_flags_then_args() -> None:
    d = deployment(
        {
            "llm": {**vllm(maxModelLen=4096), "image": None, "command": ["vllm", "serve"], "args": ["--enforce-eager"]},
            "tts": {"class": "light", "engine": "sovits", "command": ["/opt/venv/bin/python", "api_v2.py"]},
            "plain": {"command": ["srv", "-v"], "args": ["--a"]},
            "boxed": {"image": "x", "args": ["--a"]},
        }
    )
    assert d.process_argv("llm") == argv(
        "vllm serve --model Qwen/Qwen2.5-7B-Instruct --gpu-memory-utilization 0.9 --max-model-len 4096 --port 8000 --enforce-eager"
    )
    assert d.process_argv("tts") == ["/opt/venv/bin/python", "api_v2.py", "-a", "0.0.0.0", "-p", "9880"]
    assert d.process_argv("plain") == ["srv", "-v", "--a"]
    assert d.process_argv("boxed") == []  # no command: not runnable as a process


# ------------------------------------------------------------------ environment policy


def test_sdpa_defaults_reach_every_model_of_every_engine() -> None:
    d = deployment({"llm": vllm(), "img": {"image": "x"}, "tts": {"class": "light", "engine": "sovits", "image": "y"}})
    for m in d.models:
        env = d.merged_env(m)
        assert {k: env[k] for k in SDPA_DEFAULT_ENV} == dict(SDPA_DEFAULT_ENV)
        assert "VLLM_ATTENTION_BACKEND" not in env  # never injected: current vLLM ignores it


def test_env_precedence_defaults_then_gpu_then_engine_then_model() -> None:
    d = deployment(
        {
            "img": {
                "engine": "sdxl",
                "image": "vramctl/sdxl:dev",
                "sdxl": {"modelPath": "/m.safetensors", "port": 7861},
                "env": {"XFORMERS_DISABLED": "model", "SDXL_DTYPE": "float32"},
            },
            "other": {"image": "x"},
        },
        env={"PYTORCH_CUDA_ALLOC_CONF": "gpu", "XFORMERS_DISABLED": "gpu", "PORT": "gpu", "VLLM_ATTENTION_BACKEND": "FLASH_ATTN"},
    )
    img = d.merged_env("img")
    assert img["VLLM_USE_TRITON_FLASH_ATTN"] == "0"  # default, untouched
    assert img["PYTORCH_CUDA_ALLOC_CONF"] == "gpu"  # the GPU's env beats the defaults
    assert img["PORT"] == "7861"  # the engine beats the GPU's env
    assert img["SDXL_DTYPE"] == "float32"  # the model beats its engine
    assert img["XFORMERS_DISABLED"] == "model"  # and everything else
    assert img["VLLM_ATTENTION_BACKEND"] == "FLASH_ATTN"  # passed on because the user set it
    assert d.merged_env("other")["XFORMERS_DISABLED"] == "gpu"


def test_sdpa_defaults_can_be_turned_off() -> None:
    d = deployment({"llm": heavy(env={"A": "1"})}, envPolicy={"sdpaDefaults": False}, env={"G": "1"})
    assert d.merged_env("llm") == {"A": "1", "G": "1"}


# ------------------------------------------------------------------ spec hash: what recreates a container


def _hash(model: dict[str, Any], **fields: Any) -> str:
    return deployment({"m": model}, **fields).spec_hash("m")


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (vllm(gpuMemoryUtilization=0.85), vllm(gpuMemoryUtilization=0.8)),
        (vllm(), vllm(maxModelLen=8192)),
        (vllm(), vllm(attentionBackend="FLASH_ATTN")),
        (vllm(), vllm(enableSleepMode=True)),
        (
            {"engine": "sdxl", "image": "i", "sdxl": {"modelPath": "/a"}},
            {"engine": "sdxl", "image": "i", "sdxl": {"modelPath": "/a", "loras": [{"path": "/l"}]}},
        ),
        ({"engine": "sovits", "image": "i"}, {"engine": "sovits", "image": "i", "sovits": {"bind": "127.0.0.1"}}),
        ({"image": "i"}, {"image": "i", "engine": "sovits"}),
        ({"image": "i"}, {"image": "i", "ipcMode": "host"}),
    ],
    ids=["gpu-memory-utilization", "max-model-len", "attention-backend", "sleep-mode", "sdxl-lora", "sovits-bind", "engine", "ipc-mode"],
)
def test_spec_hash_follows_the_rendered_container(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert _hash(before) != _hash(after)


def test_spec_hash_follows_the_env_policy_and_ignores_what_does_not_shape_the_container() -> None:
    assert _hash({"image": "i"}) != _hash({"image": "i"}, envPolicy={"sdpaDefaults": False})
    # The engine's default health written out explicitly changes nothing in the container.
    assert _hash(vllm()) == _hash({**vllm(), "health": {"path": "/health", "port": 8000}})
    assert _hash(vllm(1000)) == _hash(vllm(2000))


# ------------------------------------------------------------------ reservation and the budget


def test_reservation_of_vllm_is_utilization_times_total() -> None:
    d = deployment({"llm": vllm(12000, gpuMemoryUtilization=0.85), "tts": light(3500)})
    r = d.reservation("llm", 16303)
    assert r is not None and (r.mib, r.formula) == (13858, "0.85 x 16303 MiB")
    assert d.reservation_mib("llm", 16303) == 13858
    assert d.reservation_mib("llm") == 12000  # total unknown: its vramMiB stands in
    assert d.reservation_mib("tts", 16303) == 3500  # other engines: vramMiB
    no_size = deployment({"llm": vllm(gpuMemoryUtilization=0.5)})
    assert no_size.reservation_mib("llm") is None
    budgeted = deployment({"llm": vllm(gpuMemoryUtilization=0.5)}, vramBudgetMiB=15000)
    r = budgeted.reservation("llm")
    assert r is not None and (r.mib, r.formula) == (7500, "0.5 x vramBudgetMiB 15000")


def test_budget_message_shows_the_vllm_arithmetic() -> None:
    d = deployment({"llm": vllm(12000, gpuMemoryUtilization=0.85), "tts": light(3500)}, vramBudgetMiB=15872)
    check_desired(d, "llm", ["tts"])  # total unknown: 12000 + 3500 fits
    with pytest.raises(DesiredStateError) as info:
        check_desired(d, "llm", ["tts"], total_mib=16303)
    msg = str(info.value)
    assert "llm 13858 (0.85 x 16303 MiB) + tts 3500 = 17358 MiB > vramBudgetMiB 15872 MiB" in msg
    assert "lower vllm.gpuMemoryUtilization" in msg and "raise vramBudgetMiB" in msg
    assert info.value.field == "companions"
    smaller = deployment({"llm": vllm(12000, gpuMemoryUtilization=0.75), "tts": light(3500)}, vramBudgetMiB=15872)
    check_desired(smaller, "llm", ["tts"], total_mib=16303)  # 12228 + 3500 = 15728 fits


def test_budget_is_checked_at_parse_time_with_utilization_times_budget() -> None:
    ((path, msg),) = problems(
        {"llm": vllm(gpuMemoryUtilization=0.85), "tts": light(3500)}, activeModel="llm", companions=["tts"], vramBudgetMiB=15872
    )
    assert path == "gpus[0].companions"
    assert "llm 13492 (0.85 x vramBudgetMiB 15872) + tts 3500 = 16992 MiB > vramBudgetMiB 15872 MiB" in msg


# ------------------------------------------------------------------ spec errors name the field and the fix

BAD: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    ("vllm-without-settings", {"engine": "vllm", "image": "i"}, "gpus[0].models.m.vllm", ("engine vllm needs", "vllm: {model:")),
    ("sdxl-without-settings", {"engine": "sdxl", "image": "i"}, "gpus[0].models.m.sdxl", ("engine sdxl needs", "modelPath")),
    (
        "settings-of-another-engine",
        {"image": "i", "vllm": {"model": "m"}},
        "gpus[0].models.m.vllm",
        ("engine is container", "add `engine: vllm`"),
    ),
    (
        "engine-with-compose-service",
        {"engine": "vllm", "composeService": "vllm", "vllm": {"model": "m"}},
        "gpus[0].models.m.engine",
        ("compose creates", "use image", "engine: container"),
    ),
    ("unknown-engine", {"engine": "ollama", "image": "i"}, "gpus[0].models.m.engine", ("'vllm'", "'container'")),
    (
        "utilization-above-one",
        vllm(gpuMemoryUtilization=1.2),
        "gpus[0].models.m.vllm.gpuMemoryUtilization",
        ("less than or equal to 1",),
    ),
    ("utilization-zero", vllm(gpuMemoryUtilization=0), "gpus[0].models.m.vllm.gpuMemoryUtilization", ("greater than 0",)),
    (
        "torch-sdpa-is-no-attention-backend",
        vllm(attentionBackend="TORCH_SDPA"),
        "gpus[0].models.m.vllm.attentionBackend",
        ("'FLASH_ATTN'", "'FLEX_ATTENTION'"),
    ),
    ("vllm-typo", vllm(gpuMemoryUtilisation=0.8), "gpus[0].models.m.vllm.gpuMemoryUtilisation", ("unknown field",)),
    (
        "utilization-in-extra-args",
        vllm(extraArgs=["--gpu-memory-utilization=0.95"]),
        "gpus[0].models.m.vllm.extraArgs",
        ("set vllm.gpuMemoryUtilization instead",),
    ),
    (
        "port-in-args",
        {**vllm(), "args": ["--port", "9000"]},
        "gpus[0].models.m.args",
        ("--port in args", "set vllm.port instead"),
    ),
    (
        "utilization-in-command-underscored",
        {**vllm(), "image": None, "command": ["vllm", "serve", "--gpu_memory_utilization=0.95"]},
        "gpus[0].models.m.command",
        ("--gpu_memory_utilization in command", "set vllm.gpuMemoryUtilization instead"),
    ),
    (
        "sovits-bind-in-args",
        {"engine": "sovits", "image": "i", "args": ["-a", "127.0.0.1"]},
        "gpus[0].models.m.args",
        ("-a in args", "set sovits.bind instead"),
    ),
    (
        "sovits-bind-not-an-ip",
        {"engine": "sovits", "image": "i", "sovits": {"bind": "localhost"}},
        "gpus[0].models.m.sovits.bind",
        ("0.0.0.0",),
    ),
    (
        "sdxl-tiling-unknown",
        {"engine": "sdxl", "image": "i", "sdxl": {"modelPath": "/a", "vaeTiling": "sometimes"}},
        "gpus[0].models.m.sdxl.vaeTiling",
        ("'auto'", "'on'", "'off'"),
    ),
    (
        "sdxl-lora-comma",
        {"engine": "sdxl", "image": "i", "sdxl": {"modelPath": "/a", "loras": [{"path": "a,b"}]}},
        "gpus[0].models.m.sdxl.loras[0].path",
        ("pattern",),
    ),
    ("ipc-mode-unknown", {"image": "i", "ipcMode": "shared"}, "gpus[0].models.m.ipcMode", ("pattern",)),
]


@pytest.mark.parametrize(("model", "path", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_engine_problems_name_the_field_and_the_fix(model: dict[str, Any], path: str, words: tuple[str, ...]) -> None:
    found = problems({"m": model})
    assert len(found) == 1, found
    where, msg = found[0]
    assert where == path, (where, msg)
    for w in words:
        assert w in msg, (w, msg)


def test_env_policy_typo_is_named() -> None:
    assert problems({"m": {"image": "i"}}, envPolicy={"sdpaDefault": False}) == [
        ("gpus[0].envPolicy.sdpaDefault", "unknown field: check its spelling, did you mean sdpaDefaults?")
    ]


def test_camel_case_round_trip_of_engine_fields() -> None:
    d = deployment(
        {
            "llm": vllm(gpuMemoryUtilization=0.85, cpuOffloadGB=2, enableSleepMode=True, extraArgs=["--enforce-eager"]),
            "img": {
                "engine": "sdxl",
                "image": "i",
                "sdxl": {"modelPath": "/a", "vaeTiling": True, "loras": [{"path": "/l", "weight": 0.5}]},
            },
            "tts": {"class": "light", "engine": "sovits", "image": "i", "sovits": {"config": "/c.yaml"}},
        },
        envPolicy={"sdpaDefaults": False},
    )
    dumped = d.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["models"]["llm"]["vllm"]["cpuOffloadGB"] == 2
    assert dumped["models"]["llm"]["vllm"]["gpuMemoryUtilization"] == 0.85
    assert dumped["models"]["img"]["sdxl"]["vaeTiling"] == "on"
    assert dumped["envPolicy"] == {"sdpaDefaults": False}
    assert DeploymentSpec.model_validate(dumped) == d


# ------------------------------------------------------------------ the planner and the worker plan with the reservation


def test_planner_needs_and_keeps_the_vllm_reservation() -> None:
    d = deployment({"llm": vllm(12000, gpuMemoryUtilization=0.85), "tts": light(3500)}, vramBudgetMiB=15872)
    p = plan(d, desired("llm"), obs(), now=0.0, baseline_mib=300, margin_mib=256, total_mib=16303)
    assert p.actions[0] == WaitForMemory(released=(), need_free_mib=13858, max_used_mib=556)
    # A running vLLM keeps its reservation: a companion may only start once used <= baseline + margin + 13858.
    p = plan(d, desired("llm", "tts"), obs(llm="running"), now=0.0, baseline_mib=300, margin_mib=256, total_mib=16303)
    assert p.actions[0] == WaitForMemory(released=(), need_free_mib=3500, max_used_mib=556 + 13858)
    # Total unknown: the vramMiB stands in, as before.
    p = plan(d, desired("llm"), obs(), now=0.0, baseline_mib=300, margin_mib=256)
    assert p.actions[0] == WaitForMemory(released=(), need_free_mib=12000, max_used_mib=556)


def test_worker_waits_for_the_vllm_reservation_of_the_probes_total() -> None:
    d = deployment({"llm": vllm(13600, gpuMemoryUtilization=0.85), "sdxl": heavy(11000)}, activeModel="sdxl")
    rt = FakeRuntime(states={"sdxl": WorkloadState.RUNNING})
    gpu = FakeGpu(rt, d, total_mib=16000)
    w = GpuWorker(d, rt, gpu, WorkerSettings(poll_interval_s=0.001, memory_timeout_s=0.05, baseline_mib=0))
    w.request("llm", ())
    w.reconcile_once()
    assert rt.calls == [("stop", "sdxl"), ("start", "llm")]
    assert any("need 13600 MiB free" in p["message"] for p in w.progress())  # 0.85 x 16000


def test_switch_strategy_sleep_renders_vllm_sleep_mode_and_sdxl_pinning() -> None:
    r = render_vllm(VllmSpec(model="m"), sleep=True)
    assert r.args.count("--enable-sleep-mode") == 1 and dict(r.env) == {"VLLM_SERVER_DEV_MODE": "1"}
    assert render_vllm(VllmSpec(model="m", enable_sleep_mode=True), sleep=True).args.count("--enable-sleep-mode") == 1
    assert "--enable-sleep-mode" not in render_vllm(VllmSpec(model="m")).args
    assert render_sdxl(SdxlSpec(model_path="/m"), pin_for_sleep=True).env["SDXL_SLEEP"] == "1"
    assert "SDXL_SLEEP" not in render_sdxl(SdxlSpec(model_path="/m")).env


@pytest.mark.parametrize(
    ("engine", "paths", "expected"),
    [
        ("vllm", {}, VLLM_SLEEP_API),
        ("sdxl", {}, SDXL_SLEEP_API),
        ("sovits", {}, None),
        ("container", {}, None),
        ("container", {"path": "/s"}, None),
        ("container", {"path": "/s", "wake_path": "/w"}, SleepApi("/s", "/w", None)),
        ("container", {"path": "/s", "wake_path": "/w", "state_path": "/q"}, SleepApi("/s", "/w", "/q")),
    ],
)
def test_each_engine_says_how_it_sleeps(engine: str, paths: dict[str, str], expected: SleepApi | None) -> None:
    assert sleep_api(engine, **paths) == expected
