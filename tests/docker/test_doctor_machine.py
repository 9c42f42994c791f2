"""`vramctl doctor` on this machine: no NVIDIA GPU, a real Docker engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import docker.errors

PITFALLS = """\
runtime: process
gpus:
  - gpu: 0
    activeModel: llm
    env: {VLLM_ATTENTION_BACKEND: TORCH_SDPA, VLLM_USE_V1: "1"}
    models:
      llm:
        command: [vllm, serve]
        args: [--model, x, --num-scheduler-steps, "8", --enable-sleep-mode]
        env: {PYTORCH_CUDA_ALLOC_CONF: "expandable_segments:True"}
        vramMiB: 12000
"""


def doctor(*args: str) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "vramctl", "doctor", *args], capture_output=True, text=True, timeout=60)
    return res.returncode, res.stdout


def test_doctor_here_with_the_demo_config(docker_client: docker.DockerClient) -> None:
    rc, out = doctor()
    lines = out.splitlines()
    assert rc == 0, out
    assert all(line.split()[0] in ("OK", "WARN", "FAIL") for line in lines), out
    nvml = next(line for line in lines if line.split()[1] == "nvml:")
    assert nvml.startswith("WARN") and "simulated memory will be used" in nvml and "libnvidia-ml" in nvml
    engine = docker_client.version()["Version"]
    assert any(line.startswith("OK   docker:") and engine in line for line in lines), out
    assert any(line.startswith("OK   config: embedded demo config") for line in lines), out


def test_doctor_finds_the_pitfalls_of_a_config(tmp_path: Path, docker_client: docker.DockerClient) -> None:
    cfg = tmp_path / "vramctl.yaml"
    cfg.write_text(PITFALLS)
    rc, out = doctor("--config", str(cfg), "--json")
    assert rc == 0, out
    data = json.loads(out)
    warned = {c["name"] for c in data["checks"] if c["level"] == "WARN"}
    assert {
        "gpus[0].env.VLLM_ATTENTION_BACKEND",
        "gpus[0].env.VLLM_USE_V1",
        "gpus[0].models.llm.args",
        "gpus[0].models.llm.env.PYTORCH_CUDA_ALLOC_CONF",
    } <= warned, out
    assert data["ok"] is True


def test_doctor_exits_1_when_the_config_does_not_load(tmp_path: Path, docker_client: docker.DockerClient) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("gpus: [{gpu: 0}]\n")
    rc, out = doctor("--config", str(cfg))
    assert rc == 1
    assert out.splitlines()[0].startswith("FAIL config:"), out
