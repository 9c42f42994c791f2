"""vramctl doctor's verdicts over made-up machines (doctor.checks is pure).
The run on this very machine is in tests/docker/test_doctor_machine.py."""

from __future__ import annotations

from typing import Any

from vramctl.doctor import Check, Facts, checks, exit_code
from vramctl.gpu.nvml import DeviceFacts, NvmlFacts
from vramctl.observed import GpuMemory
from vramctl.runtimes.docker import EngineFacts
from vramctl.spec.models import Config, ConfigError, parse_config

NO_NVML = "the NVML library (libnvidia-ml.so.1) is not installed: no NVIDIA driver here"
ENGINE = EngineFacts("28.2.2", "1.51", ("io.containerd.runc.v2", "runc"), "runc")
ENGINE_NVIDIA = EngineFacts("28.2.2", "1.51", ("io.containerd.runc.v2", "nvidia", "runc"), "runc")


def h100(per_process: bool | None = True, processes: int | None = 1, index: int = 0, v: int = 2) -> DeviceFacts:
    return DeviceFacts(index, "NVIDIA H100 80GB HBM3", f"GPU-{index}", GpuMemory(81559, 5, 540), v, processes, per_process)


def nvml(*devices: DeviceFacts) -> NvmlFacts:
    return NvmlFacts("580.95.05", "13.580.95.05", "13.0", devices or (h100(),))


def config(
    runtime: str = "auto",
    kind: str = "auto",
    command: bool = True,
    env: dict[str, str] | None = None,
    model_env: dict[str, str] | None = None,
    **model: Any,
) -> Config:
    m: dict[str, Any] = {"image": "vramctl/standin:dev", "vramMiB": 1000, "env": model_env or {}, **model}
    if command:
        m["command"] = ["python3", "-m", "vramctl.demo.standin"]
    return parse_config({"runtime": runtime, "gpuProbe": {"kind": kind}, "gpus": [{"gpu": 0, "env": env or {}, "models": {"llm": m}}]})


def facts(cfg: Config | ConfigError | None = None, **kw: Any) -> Facts:
    base: dict[str, Any] = {
        "config": cfg if cfg is not None else config(),
        "config_source": "test.yaml",
        "nvml": NO_NVML,
        "wsl2": False,
        "docker": ENGINE,
        "missing_images": None,
    }
    base.update(kw)
    return Facts(**base)


def by_name(found: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in found}


def test_no_gpu_here_is_a_warning_and_says_simulated_memory_will_be_used() -> None:
    found = checks(facts())
    c = by_name(found)
    assert c["nvml"].level == "WARN" and "simulated memory will be used" in c["nvml"].message
    assert c["docker"].level == "OK" and c["nvidia runtime"].level == "WARN"
    assert exit_code(found) == 0


def test_kind_nvml_without_nvml_fails() -> None:
    found = checks(facts(config(kind="nvml")))
    assert by_name(found)["nvml"].level == "FAIL" and exit_code(found) == 1


def test_kind_simulated_does_not_need_nvml() -> None:
    assert by_name(checks(facts(config(kind="simulated"))))["nvml"].level == "OK"


def test_a_real_gpu_lists_driver_memory_and_per_process_memory() -> None:
    c = by_name(checks(facts(nvml=nvml(), docker=ENGINE_NVIDIA)))
    assert c["nvml"].level == "OK" and "driver 580.95.05" in c["nvml"].message and "CUDA 13.0" in c["nvml"].message
    assert "81559 MiB total" in c["gpu 0"].message and "memory info v2" in c["gpu 0"].message
    assert c["per-process memory"].level == "OK"
    assert c["nvidia runtime"].level == "OK"


def test_wsl2_says_what_it_costs() -> None:
    c = by_name(checks(facts(nvml=nvml(h100(per_process=False)), wsl2=True)))
    assert c["wsl2"].level == "WARN" and "no per-process GPU memory" in c["wsl2"].message and "attributed" in c["wsl2"].message
    assert c["per-process memory"].level == "WARN" and "not available" in c["per-process memory"].message


def test_a_configured_gpu_that_does_not_exist() -> None:
    cfg = parse_config({"gpuProbe": {"kind": "nvml"}, "gpus": [{"gpu": 1, "models": {"llm": {"command": ["x"]}}}]})
    found = checks(facts(cfg, nvml=nvml()))
    assert by_name(found)["gpu 1"].level == "FAIL" and exit_code(found) == 1
    cfg = parse_config({"gpus": [{"gpu": 1, "models": {"llm": {"command": ["x"]}}}]})
    assert by_name(checks(facts(cfg, nvml=nvml())))["gpu 1"].level == "WARN"


def test_docker_needed_but_absent_fails_only_when_there_is_no_fallback() -> None:
    down = "no Docker engine answers (connection refused)"
    assert exit_code(checks(facts(config(command=False), docker=down))) == 1
    assert exit_code(checks(facts(config(runtime="docker"), docker=down))) == 1
    found = checks(facts(config(), docker=down))
    assert by_name(found)["docker"].level == "WARN" and "process runtime will be used" in by_name(found)["docker"].message
    assert exit_code(found) == 0
    assert by_name(checks(facts(config(runtime="process"), docker=down)))["docker"].level == "OK"


def test_missing_images() -> None:
    missing = "image(s) vramctl/standin:dev not present locally (vramctl never pulls; build or pull them)"
    assert by_name(checks(facts(config(), missing_images=missing)))["images"].level == "WARN"
    assert by_name(checks(facts(config(command=False), missing_images=missing)))["images"].level == "FAIL"


def test_pitfalls_are_reported_per_field() -> None:
    cfg = config(
        env={"VLLM_ATTENTION_BACKEND": "TORCH_SDPA", "VLLM_USE_V1": "1"},
        args=["--num-scheduler-steps", "8", "--enable-sleep-mode"],
        model_env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    )
    found = checks(facts(cfg))
    names = [c.name for c in found if c.level == "WARN"]
    assert "gpus[0].env.VLLM_ATTENTION_BACKEND" in names
    assert "gpus[0].env.VLLM_USE_V1" in names
    assert "gpus[0].models.llm.args" in names
    assert "gpus[0].models.llm.env.PYTORCH_CUDA_ALLOC_CONF" in names
    assert any("TORCH_SDPA" in c.message for c in found)
    assert exit_code(found) == 0  # the models may fail; vramctl itself can run


def test_a_config_that_does_not_load_fails_but_the_machine_is_still_checked() -> None:
    err = ConfigError("bad.yaml", [("gpus[0].models", "required field is missing")])
    found = checks(facts(err))
    assert found[0] == Check("FAIL", "config", "test.yaml does not load: gpus[0].models: required field is missing", found[0].fix)
    assert {"nvml", "docker"} <= {c.name for c in found}
    assert exit_code(found) == 1


def test_render() -> None:
    assert Check("WARN", "x", "y", "z").render() == "WARN x: y -> fix: z"
    assert Check("OK", "x", "y").render() == "OK   x: y"


def test_gpu_numbering_is_said_and_mixed_cards_are_a_warning() -> None:
    two_alike = by_name(checks(facts(nvml=nvml(h100(index=0), h100(index=1)))))
    assert two_alike["gpu numbering"].level == "OK"
    assert "PCI bus order: 0: NVIDIA H100 80GB HBM3 (GPU-0), 1: NVIDIA H100 80GB HBM3 (GPU-1)" in two_alike["gpu numbering"].message
    other = DeviceFacts(1, "NVIDIA GeForce RTX 4090", "GPU-1", GpuMemory(24564, 5, 300), 2, 0, None)
    mixed = by_name(checks(facts(nvml=nvml(h100(index=0), other))))["gpu numbering"]
    assert mixed.level == "WARN"
    assert "fastest first" in mixed.message and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in mixed.fix
    assert "gpu numbering" not in by_name(checks(facts(nvml=nvml(h100()))))
