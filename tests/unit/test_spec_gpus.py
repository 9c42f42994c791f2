"""A model on several GPUs (gpus) and a model placed on any of them (placement): the spec."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.builders import deployment, deployment_doc, heavy, light
from vramctl.spec.models import ConfigError, parse_config


def two_gpus(big: dict[str, Any], lead: int = 0) -> dict[str, Any]:
    models0 = {"a0": heavy(8000), "big": big} if lead == 0 else {"a0": heavy(8000)}
    models1 = {"a1": heavy(8000), "big": big} if lead == 1 else {"a1": heavy(8000)}
    return {"runtime": "process", "gpus": [deployment_doc(models0, gpu=0), deployment_doc(models1, gpu=1)]}


def problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as err:
        parse_config(doc, "test.yaml")
    return err.value.problems


def test_a_model_on_two_gpus_is_declared_once_in_either_entry() -> None:
    for lead in (0, 1):
        cfg = parse_config(two_gpus(heavy(9000, gpus=[1, 0]), lead))
        d = cfg.gpus[lead]
        assert d.gpus_of("big") == (0, 1)
        assert d.gpus_of(f"a{lead}") == (lead,)


@pytest.mark.parametrize(
    ("big", "path", "words"),
    [
        (heavy(9000, gpus=[0, 0]), "gpus[0].models.big.gpus", "names a GPU twice"),
        (heavy(9000, gpus=[0]), "gpus[0].models.big.gpus", "leave gpus out"),
        (light(900, gpus=[0, 1]), "gpus[0].models.big.class", "heavy on each"),
        (heavy(9000, gpus=[0, 1], switchStrategy="sleep"), "gpus[0].models.big.switchStrategy", "stop only for now"),
        (heavy(9000, gpus=[0, 1], placement="any"), "gpus[0].models.big.placement", "remove placement"),
        (heavy(9000, gpus=[1, 2]), "gpus[0].models.big.gpus", "leaves out this entry's gpu 0"),
        (heavy(9000, gpus=[0, 64]), "gpus[0].models.big.gpus[1]", "less than or equal to 63"),
    ],
)
def test_bad_gpus_are_named_by_field_with_the_fix(big: dict[str, Any], path: str, words: str) -> None:
    found = problems(two_gpus(big))
    assert any(p == path and words in msg for p, msg in found), found


def test_every_gpu_of_a_model_needs_an_entry() -> None:
    doc = {"runtime": "process", "gpus": [deployment_doc({"a0": heavy(8000), "big": heavy(9000, gpus=[0, 3])}, gpu=0)]}
    [(path, msg)] = problems(doc)
    assert path == "gpus[0].models.big.gpus"
    assert "gpu 3, which has no entry in gpus: add one" in msg


def test_gpus_change_the_spec_hash_but_a_single_gpu_model_keeps_its_hash() -> None:
    one = deployment({"m": heavy(9000)})
    assert one.models["m"].gpus is None and one.models["m"].placement == "pinned"
    # The hash of a model without gpus is what it was before the field existed.
    before = deployment({"m": heavy(9000)}).spec_hash("m")
    assert deployment({"m": heavy(9000, placement="any")}).spec_hash("m") == before
    assert deployment({"m": heavy(9000, gpus=[0, 1])}).spec_hash("m") != before


def test_placement_any_is_accepted_on_each_entry() -> None:
    m = heavy(9000, placement="any")
    cfg = parse_config({"gpus": [deployment_doc({"x": m}, gpu=0), deployment_doc({"x": m}, gpu=1)]})
    assert [d.models["x"].placement for d in cfg.gpus] == ["any", "any"]
