"""The shipped compose stacks: valid for the real `docker compose`, and
consistent with the vramctl configs that adopt their services."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vramctl.spec.models import load_config

ROOT = Path(__file__).resolve().parents[2]
STACKS = [
    (ROOT / "compose" / "docker-compose.yml", ROOT / "compose" / "vramctl.yaml", ["sdxl", "sovits", "monitoring"]),
    (ROOT / "compose" / "demo" / "docker-compose.yml", ROOT / "compose" / "demo" / "vramctl.yaml", ["vllm", "sdxl", "sovits"]),
]


@pytest.mark.parametrize(("compose_file", "config_file", "profiles"), STACKS, ids=["real", "demo"])
def test_compose_stack_matches_its_vramctl_config(compose_file: Path, config_file: Path, profiles: list[str]) -> None:
    args = ["docker", "compose", "-f", str(compose_file)]
    for p in profiles:
        args += ["--profile", p]
    out = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    for name, svc in services.items():
        assert svc.get("network_mode") == "host", f"{name}: tests and health checks assume host networking"
    config = load_config(config_file)
    (gpu,) = config.gpus
    for model, spec in gpu.models.items():
        if spec.compose_service is None:
            continue
        svc = services[spec.compose_service]
        labels = svc.get("labels") or {}
        assert labels.get("app.kubernetes.io/managed-by") == "vramctl", f"{spec.compose_service} lacks vramctl's label"
        assert labels.get("vramctl.io/model") == model
        assert labels.get("vramctl.io/gpu") == str(gpu.gpu)
        assert labels.get("vramctl.io/class") == spec.model_class
