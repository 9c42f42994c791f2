"""Bad values are refused where they are read, naming the field and the fix:
an image that is not a Docker reference (a newline and a flag in it), numbers
that would make a loop spin or an arithmetic absurd, snake_case keys (with
the camelCase they meant), and a state file whose recorded config default is
damaged (what runs is kept, the bad value named)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakes import FakeRuntime
from tests.support.workers import spec
from vramctl.app import initial_desired, open_state
from vramctl.observed import WorkloadState
from vramctl.spec.models import ConfigError, image_reference_problem, parse_config


def problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "test.yaml")
    return info.value.problems


def one_model(**fields: Any) -> dict[str, Any]:
    return {"gpus": [{"gpu": 0, "models": {"llm": {"image": "vllm/vllm-openai:v0.11.0", "vramMiB": 1000, **fields}}}]}


GOOD_IMAGES = [
    "i",
    "busybox",
    "vramctl/standin:dev",
    "vllm/vllm-openai:v0.11.0",
    "ghcr.io/owner/repo/sub:1.2.3-rc_1",
    "localhost:5000/a/b",
    "registry.example.com:443/x__y/z.w-v:TAG",
    "[::1]:5000/img:tag",
    "nvcr.io/nvidia/pytorch@sha256:" + "a" * 64,
    "img:latest@sha256:" + "0" * 64,
]
BAD_IMAGES = [
    "busybox\n--privileged",
    "--privileged",
    "busybox --privileged",
    "Busybox",
    "busybox:tag with space",
    "a:b:c",
    "img:" + "t" * 129,
    "img:",
    "/img",
    "img/",
    "img@sha256:abc",
    "",
    "x" * 256,
]


@pytest.mark.parametrize("image", GOOD_IMAGES)
def test_docker_references_are_accepted(image: str) -> None:
    assert image_reference_problem(image) is None
    parse_config(one_model(image=image), "test.yaml")


@pytest.mark.parametrize("image", BAD_IMAGES)
def test_an_image_that_is_not_a_docker_reference_is_refused_naming_the_field(image: str) -> None:
    assert image_reference_problem(image) is not None
    [(path, message)] = problems(one_model(image=image))
    assert path == "gpus[0].models.llm.image"
    assert "not a Docker image reference" in message and repr(image)[:40] in message


@pytest.mark.parametrize(
    ("probe", "path"),
    [
        ({"pollIntervalSeconds": 1e-9}, "gpuProbe.pollIntervalSeconds"),
        ({"totalMiB": 1e40}, "gpuProbe.totalMiB"),
        ({"totalMiB": 10**40}, "gpuProbe.totalMiB"),
        ({"baselineMiB": 10**12}, "gpuProbe.baselineMiB"),
        ({"marginMiB": 10**12}, "gpuProbe.marginMiB"),
    ],
)
def test_gpu_probe_numbers_out_of_bounds_are_refused(probe: dict[str, Any], path: str) -> None:
    doc = {"gpuProbe": probe, **one_model()}
    [(got, message)] = problems(doc)
    assert got == path
    assert any(w in message for w in ("greater than or equal", "less than or equal", "far too large")), message


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (one_model(vramMiB=10**12), "gpus[0].models.llm.vramMiB"),
        (one_model(health={"path": "/h", "port": 1, "intervalSeconds": 1e-9}), "gpus[0].models.llm.health.intervalSeconds"),
        ({"backoffInitialSeconds": 1e-9, **one_model()}, "backoffInitialSeconds"),
        ({"gpus": [{**one_model()["gpus"][0], "vramBudgetMiB": 10**12}]}, "gpus[0].vramBudgetMiB"),
        ({"gpus": [{**one_model()["gpus"][0], "hostMemoryBudgetMiB": 10**12}]}, "gpus[0].hostMemoryBudgetMiB"),
    ],
)
def test_other_numbers_out_of_bounds_are_refused(doc: dict[str, Any], path: str) -> None:
    assert [p for p, _ in problems(doc)] == [path]


@pytest.mark.parametrize(
    ("doc", "path", "meant"),
    [
        (one_model(vram_mib=1000), "gpus[0].models.llm.vram_mib", "vramMiB"),
        (one_model(start_timeout_seconds=5), "gpus[0].models.llm.start_timeout_seconds", "startTimeoutSeconds"),
        ({"gpu_probe": {"kind": "simulated"}, **one_model()}, "gpu_probe", "gpuProbe"),
        ({"gpus": [{**one_model()["gpus"][0], "active_model": "llm"}]}, "gpus[0].active_model", "activeModel"),
        (one_model(vramMib=1000), "gpus[0].models.llm.vramMib", "vramMiB"),
    ],
)
def test_keys_not_in_camel_case_are_refused_with_the_key_they_meant(doc: dict[str, Any], path: str, meant: str) -> None:
    [(got, message)] = [p for p in problems(doc) if p[0] != "gpus[0].models.llm"]
    assert got == path
    assert f"did you mean {meant}?" in message


def test_a_key_like_nothing_known_says_it_is_unknown() -> None:
    [(got, message)] = problems(one_model(flavour="x"))
    assert got == "gpus[0].models.llm.flavour"
    assert "unknown field" in message and "did you mean" not in message


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("x", "configDefault is 'x'"),
        (3, "configDefault is 3"),
        (["llm"], "configDefault is ['llm']"),
        ({"activeModel": 5}, "configDefault.activeModel is 5"),
        ({"activeModel": "llm", "companions": "tts"}, "configDefault.companions is 'tts'"),
    ],
)
def test_a_damaged_config_default_in_the_state_file_keeps_what_runs_and_names_the_value(tmp_path: Path, bad: Any, said: str) -> None:
    d = spec()
    path = tmp_path / "state.json"
    recorded = {"activeModel": "sdxl", "companions": [], "generation": 4}
    path.write_text(json.dumps({"version": 1, "gpus": {"0": {"desired": recorded, "configDefault": bad}}}))
    rt = FakeRuntime(states={"sdxl": WorkloadState.RUNNING})
    notes: list[str] = []
    got = initial_desired(open_state(path), d, rt, notes)
    assert (got.active, got.companions) == ("sdxl", ())  # not the config's llm
    assert len(notes) == 1 and f"gpus.0.{said}" in notes[0], notes
    assert "keeping what runs ('sdxl')" in notes[0]
    again = json.loads(path.read_text())["gpus"]["0"]
    assert again["configDefault"] == {"activeModel": "llm", "companions": []}  # rewritten clean


def test_a_known_key_in_the_wrong_place_is_said_so() -> None:
    doc = one_model()
    doc["gpus"][0]["gpuProbe"] = {"kind": "simulated"}
    [(path, message)] = problems(doc)
    assert path == "gpus[0].gpuProbe"
    assert "another part of the config" in message and "did you mean" not in message
