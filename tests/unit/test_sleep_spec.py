"""switchStrategy sleep: the spec fields, their validation (each problem names
its field and, for budgets, shows the arithmetic), what the engines render,
and the host memory reading the default budget comes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.builders import deployment, deployment_doc, heavy, light
from vramctl.host.memory import MIN_MARGIN_MIB, parse_meminfo, read_host_memory
from vramctl.spec.engines import SDXL_SLEEP_API, VLLM_SLEEP_API, SleepApi
from vramctl.spec.models import ConfigError, FieldProblem, check_sleep, parse_config


def vllm_model(util: float = 0.5, **fields: Any) -> dict[str, Any]:
    return {"engine": "vllm", "image": "vllm/vllm-openai", "vllm": {"model": "m", "gpuMemoryUtilization": util}, **fields}


def sdxl_model(vram: int = 9000, **fields: Any) -> dict[str, Any]:
    return {"engine": "sdxl", "image": "vramctl/sdxl", "sdxl": {"modelPath": "/m.safetensors"}, "vramMiB": vram, **fields}


SLEEP1 = {"switchStrategy": "sleep", "sleep": {"level": 1, "hostMemoryMiB": 15000}}
SLEEP2 = {"switchStrategy": "sleep", "sleep": {"level": 2}}
CONTAINER_SLEEP = {
    "switchStrategy": "sleep",
    "sleep": {"level": 2, "path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"},
    "health": {"path": "/health", "port": 8000},
}


def problem(models: dict[str, dict[str, Any]], **fields: Any) -> tuple[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"gpus": [deployment_doc(models, **fields)]}, "test.yaml")
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


# (case, models, GPU-level fields, expected path, words the message must contain)
BAD: list[tuple[str, dict[str, dict[str, Any]], dict[str, Any], str, tuple[str, ...]]] = [
    (
        "sovits-cannot-sleep",
        {"tts": {"engine": "sovits", "image": "sovits", **SLEEP2}},
        {},
        "gpus[0].models.tts.switchStrategy",
        ("engine sovits cannot sleep", "switchStrategy stop"),
    ),
    (
        "container-without-sleep-paths",
        {"llm": heavy(1000, switchStrategy="sleep", sleep={"level": 2}, health={"path": "/health", "port": 8000})},
        {},
        "gpus[0].models.llm.sleep.path",
        ("engine container", "sleep.path", "wakePath: /wake_up"),
    ),
    (
        "container-without-wake-path",
        {"llm": heavy(1000, switchStrategy="sleep", sleep={"level": 2, "path": "/s"}, health={"path": "/health", "port": 8000})},
        {},
        "gpus[0].models.llm.sleep.wakePath",
        ("sleep.wakePath",),
    ),
    (
        "container-without-health-port",
        {"llm": heavy(1000, **{**CONTAINER_SLEEP, "health": {"dockerHealthcheck": True}})},
        {},
        "gpus[0].models.llm.health",
        ("health.port",),
    ),
    (
        "vllm-with-its-own-paths",
        {"llm": vllm_model(switchStrategy="sleep", sleep={"level": 2, "path": "/zz"})},
        {},
        "gpus[0].models.llm.sleep.path",
        ("own sleep endpoints", "remove sleep.path"),
    ),
    (
        "level-1-without-host-memory",
        {"llm": vllm_model(switchStrategy="sleep")},
        {},
        "gpus[0].models.llm.sleep.hostMemoryMiB",
        ("level 1", "host memory", "sleep.hostMemoryMiB", "level: 2"),
    ),
    (
        "sleep-block-with-strategy-stop",
        {"llm": vllm_model(sleep={"level": 2})},
        {},
        "gpus[0].models.llm.sleep",
        ("switchStrategy is stop", "switchStrategy: sleep"),
    ),
    (
        "light-model-sleeping",
        {"tts": light(1000, **CONTAINER_SLEEP)},
        {},
        "gpus[0].models.tts.switchStrategy",
        ("heavy models",),
    ),
    (
        "relative-sleep-path",
        {"llm": heavy(1000, **{**CONTAINER_SLEEP, "sleep": {"level": 2, "path": "sleep", "wakePath": "/w"}})},
        {},
        "gpus[0].models.llm.sleep.path",
        ("must start with '/'",),
    ),
    ("level-3", {"llm": vllm_model(switchStrategy="sleep", sleep={"level": 3})}, {}, "gpus[0].models.llm.sleep.level", ("1", "2")),
    (
        "host-memory-over-budget",
        {"llm": vllm_model(**SLEEP1), "sdxl": sdxl_model(switchStrategy="sleep", sleep={"hostMemoryMiB": 7000})},
        {"hostMemoryBudgetMiB": 20000},
        "gpus[0].hostMemoryBudgetMiB",
        ("llm 15000 + sdxl 7000 = 22000 MiB", "> hostMemoryBudgetMiB 20000 MiB", "level 2"),
    ),
    (
        "residues-do-not-fit-beside-the-largest",
        {
            "llm": vllm_model(0.9, **SLEEP2, vramMiB=None),
            "sdxl": sdxl_model(9000, switchStrategy="sleep", sleep={"level": 2, "maxResidueMiB": 2000}),
        },
        {"vramBudgetMiB": 15000},
        "gpus[0].models.llm.sleep.maxResidueMiB",
        ("llm 13500 (0.9 x vramBudgetMiB 15000) + sdxl asleep 2000 = 15500 MiB", "> vramBudgetMiB 15000 MiB", "maxResidueMiB"),
    ),
]


@pytest.mark.parametrize(("models", "fields", "path", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_problem_names_the_field(models: dict[str, dict[str, Any]], fields: dict[str, Any], path: str, words: tuple[str, ...]) -> None:
    models = {n: {k: v for k, v in m.items() if v is not None} for n, m in models.items()}
    where, msg = problem(models, **fields)
    assert where == path, (where, msg)
    for w in words:
        assert w in msg, (w, msg)


def test_defaults_are_stop_and_no_sleep_api() -> None:
    d = deployment({"llm": vllm_model()})
    m = d.models["llm"]
    assert m.switch_strategy == "stop"
    assert m.sleep is None and m.sleep_api is None
    assert m.host_memory_asleep_mib == 0
    assert d.host_memory_budget_mib is None


def test_each_engine_says_how_it_sleeps() -> None:
    d = deployment(
        {
            "llm": vllm_model(**SLEEP1),
            "sdxl": sdxl_model(**SLEEP2),
            "box": heavy(1000, **CONTAINER_SLEEP),
        },
        vramBudgetMiB=40000,
    )
    assert d.models["llm"].sleep_api == VLLM_SLEEP_API
    assert d.models["llm"].sleep_api.sleep_target(1) == "/sleep?level=1&mode=wait"  # type: ignore[union-attr]
    assert d.models["sdxl"].sleep_api == SDXL_SLEEP_API
    assert d.models["sdxl"].sleep_api.sleep_target(2) == "/sleep?level=2"  # type: ignore[union-attr]
    assert d.models["box"].sleep_api == SleepApi("/sleep", "/wake_up", "/is_sleeping")
    assert d.models["llm"].host_memory_asleep_mib == 15000
    assert d.models["sdxl"].host_memory_asleep_mib == 0  # level 2 keeps nothing on the host


def test_sleep_renders_vllm_sleep_mode_and_sdxl_pinning() -> None:
    d = deployment({"llm": vllm_model(**SLEEP1), "sdxl": sdxl_model(switchStrategy="sleep", sleep={"hostMemoryMiB": 7000})})
    assert "--enable-sleep-mode" in (d.container_command("llm") or [])
    assert d.merged_env("llm")["VLLM_SERVER_DEV_MODE"] == "1"
    assert d.merged_env("sdxl")["SDXL_SLEEP"] == "1"
    level2 = deployment({"sdxl": sdxl_model(**SLEEP2)})
    assert "SDXL_SLEEP" not in level2.merged_env("sdxl")  # nothing to pin for level 2
    stop = deployment({"llm": vllm_model()})
    assert "--enable-sleep-mode" not in (stop.container_command("llm") or [])
    assert "VLLM_SERVER_DEV_MODE" not in stop.merged_env("llm")


def test_enable_sleep_mode_and_strategy_render_the_flag_once() -> None:
    m = vllm_model(**SLEEP1)
    m["vllm"]["enableSleepMode"] = True
    assert (deployment({"llm": m}).container_command("llm") or []).count("--enable-sleep-mode") == 1


def test_spec_hash_ignores_the_sleep_limits_but_not_the_rendering() -> None:
    base = deployment({"box": heavy(1000, health={"path": "/health", "port": 8000})})
    limits = deployment({"box": heavy(1000, **CONTAINER_SLEEP)})
    other_limits = deployment({"box": heavy(1000, **{**CONTAINER_SLEEP, "sleep": {**CONTAINER_SLEEP["sleep"], "maxCycles": 3}})})
    # Sleep settings are vramctl's own for a container: switching strategy recreates nothing.
    assert base.spec_hash("box") == limits.spec_hash("box") == other_limits.spec_hash("box")
    explicit_stop = deployment({"llm": vllm_model(switchStrategy="stop")})
    assert explicit_stop.spec_hash("llm") == deployment({"llm": vllm_model()}).spec_hash("llm")
    # vLLM's command changes (--enable-sleep-mode): that one must recreate.
    assert deployment({"llm": vllm_model(**SLEEP2)}).spec_hash("llm") != explicit_stop.spec_hash("llm")


def test_check_sleep_with_the_total_and_the_default_host_budget() -> None:
    d = deployment({"llm": vllm_model(0.9, **SLEEP1), "sdxl": sdxl_model(9000, switchStrategy="sleep", sleep={"hostMemoryMiB": 7000})})
    check_sleep(d)  # nothing known: nothing to check
    check_sleep(d, total_mib=81559, host_budget_mib=22000)
    with pytest.raises(FieldProblem) as info:
        check_sleep(d, host_budget_mib=21999)
    assert "= 22000 MiB" in str(info.value) and "the default host memory budget 21999" in str(info.value)
    assert info.value.field == "hostMemoryBudgetMiB"
    with pytest.raises(FieldProblem) as info:
        check_sleep(d, total_mib=16303)  # 0.9 x 16303 = 14673 + sdxl's 1536 > 15791
    assert "llm 14673 (0.9 x 16303 MiB) + sdxl asleep 1536 = 16209 MiB > the budget 15791 (total minus 512) MiB" in str(info.value)


def test_the_worst_heavy_model_is_the_one_shown() -> None:
    d = deployment(
        {
            "big": heavy(12000, **CONTAINER_SLEEP),
            "small": heavy(2000, **{**CONTAINER_SLEEP, "health": {"path": "/health", "port": 8001}}),
            "other": heavy(9000),  # 9000 + 1536 + 1536 = 12072: not the worst
        }
    )
    with pytest.raises(FieldProblem) as info:
        check_sleep(d, total_mib=14000)  # budget 13488: big 12000 + small asleep 1536 = 13536
    assert "big 12000 + small asleep 1536 = 13536 MiB" in str(info.value)
    check_sleep(d, total_mib=14100)


MEMINFO = """MemTotal:       65536000 kB
MemFree:         1000000 kB
MemAvailable:   40960000 kB
Buffers:          100000 kB
"""


def test_meminfo_gives_available_minus_a_margin() -> None:
    r = parse_meminfo(MEMINFO)
    assert r is not None
    assert (r.total_mib, r.available_mib, r.margin_mib, r.budget_mib) == (64000, 40000, 6400, 33600)
    assert r.describe() == "MemAvailable 40000 MiB - margin 6400 MiB (10% of MemTotal 64000 MiB, at least 2048) = 33600 MiB"


def test_small_machines_keep_at_least_the_minimum_margin_and_never_go_negative() -> None:
    r = parse_meminfo("MemTotal: 4096000 kB\nMemAvailable: 1024000 kB\n")
    assert r is not None and r.margin_mib == MIN_MARGIN_MIB and r.budget_mib == 0


def test_meminfo_without_mem_available_is_unknown(tmp_path: Path) -> None:
    assert parse_meminfo("MemTotal: 4096000 kB\nMemFree: 1 kB\n") is None
    assert read_host_memory(tmp_path / "absent") is None
    real = read_host_memory()
    assert real is not None and 0 <= real.budget_mib < real.total_mib
