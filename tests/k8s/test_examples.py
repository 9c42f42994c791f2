"""manifests/examples: each ModelDeployment is valid for the CRD's schema and
for the pydantic models the operator reads its .spec with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.k8s.validation import ROOT, load_yaml_docs, validate
from vramctl.spec.models import DeploymentSpec, check_desired

EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def _example(name: str) -> dict[str, Any]:
    (doc,) = load_yaml_docs((ROOT / "manifests" / "examples" / name).read_text())
    return doc


def test_there_are_examples() -> None:
    assert [p.name for p in EXAMPLES] == ["rtx3050-8gb.yaml", "rtx5080-16gb.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    docs = load_yaml_docs(path.read_text())
    assert len(docs) == 1
    assert validate(docs[0]) == "crd+pydantic"


def test_rtx5080_is_the_users_setup() -> None:
    md = _example("rtx5080-16gb.yaml")
    spec = DeploymentSpec.model_validate(md["spec"])
    assert spec.vram_budget_mib == 15872
    assert (spec.active_model, spec.companions) == ("llm", ["tts"])
    assert {n: m.model_class for n, m in spec.models.items()} == {"llm": "heavy", "sdxl": "heavy", "tts": "light"}
    assert spec.env == {
        "VLLM_ATTENTION_BACKEND": "TORCH_SDPA",
        "XFORMERS_DISABLED": "1",
        "VLLM_USE_TRITON_FLASH_ATTN": "0",
        "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512",
    }
    assert "vllm/vllm-openai" in (spec.models["llm"].image or "")
    assert any("Qwen2.5" in a for a in spec.models["llm"].args)
    # The companion fits beside either heavy model.
    check_desired(spec, "llm", ["tts"])
    check_desired(spec, "sdxl", ["tts"])


def test_rtx3050_fits_8gb() -> None:
    spec = DeploymentSpec.model_validate(_example("rtx3050-8gb.yaml")["spec"])
    assert spec.vram_budget_mib is not None and spec.vram_budget_mib <= 8192 - 512
    assert all((m.vram_mib or 0) <= spec.vram_budget_mib for m in spec.models.values())
    check_desired(spec, "llm", ["tts"])
