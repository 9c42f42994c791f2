"""app.build_probe: NVML when it loads and the GPU exists, else simulated, said plainly."""

from __future__ import annotations

import pytest

from tests.support.fake_nvml import FakeNvml, FakeProc
from tests.support.fakes import FakeRuntime
from vramctl.app import _SpecRef, build_probe
from vramctl.gpu import nvml
from vramctl.gpu.nvml import NvmlProbe, NvmlSession
from vramctl.gpu.simulated import SimulatedGpu
from vramctl.observed import WorkloadState
from vramctl.spec.models import ConfigError, parse_config


def config(kind: str, gpu: int = 0) -> object:
    return parse_config({"gpuProbe": {"kind": kind}, "gpus": [{"gpu": gpu, "models": {"llm": {"command": ["x"], "vramMiB": 100}}}]})


def build(kind: str, gpu: int = 0, runtime: FakeRuntime | None = None) -> tuple[object, list[str]]:
    cfg = config(kind, gpu)
    notes: list[str] = []
    probe = build_probe(cfg, _SpecRef(cfg.gpus[0]), runtime or FakeRuntime(), notes)  # type: ignore[attr-defined]
    return probe, notes


def test_auto_without_nvml_is_the_simulated_gpu_and_says_why() -> None:
    probe, notes = build("auto")
    assert isinstance(probe, SimulatedGpu)
    assert len(notes) == 1 and "SIMULATED GPU memory (NVML unavailable: " in notes[0] and "libnvidia-ml" in notes[0]


def test_kind_nvml_without_nvml_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        build("nvml")
    path, msg = err.value.problems[0]
    assert path == "gpuProbe.kind" and "NVML cannot be used for gpu 0" in msg and "kind: auto" in msg


def test_kind_simulated_never_asks_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setattr(nvml, "_default", NvmlSession(fake))
    probe, notes = build("simulated")
    assert isinstance(probe, SimulatedGpu) and "gpuProbe.kind: simulated" in notes[0]
    assert fake.calls["nvmlInit"] == 0


def test_nvml_when_it_loads_with_the_runtime_as_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(compute=[FakeProc(4242, 1000)])
    monkeypatch.setattr(nvml, "_default", NvmlSession(fake))
    rt = FakeRuntime(states={"llm": WorkloadState.RUNNING})
    rt.owners = lambda d: {"4242": "llm"}  # type: ignore[method-assign]
    probe, notes = build("auto", runtime=rt)
    assert isinstance(probe, NvmlProbe)
    assert notes == ["gpu 0: NVML: NVIDIA H100 80GB HBM3, 81559 MiB, driver 580.95.05, GPU-fake-0"]
    assert [(p.pid, p.model) for p in probe.snapshot().processes or ()] == [(4242, "llm")]


def test_a_gpu_index_nvml_does_not_see(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml, "_default", NvmlSession(FakeNvml(devices=1)))
    probe, notes = build("auto", gpu=3)
    assert isinstance(probe, SimulatedGpu) and "GPU index 3 does not exist (NVML sees 1 GPU(s))" in notes[0]
    with pytest.raises(ConfigError, match="GPU index 3 does not exist"):
        build("nvml", gpu=3)
