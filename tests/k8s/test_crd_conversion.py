"""structural(): pydantic JSON schema -> Kubernetes structural schema, table-tested
on the shapes engine sub-specs are likely to bring (unions, maps, tuples, Any)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from vramctl.spec.crd import SchemaError, structural


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return structural(model.model_json_schema(by_alias=True, mode="validation"))["properties"]


class _Inner(BaseModel):
    """Inner docs."""

    a: int = 1


class _Vllm(BaseModel):
    kind: Literal["vllm"] = "vllm"
    model: str
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)


class _Sdxl(BaseModel):
    kind: Literal["sdxl"] = "sdxl"
    model: str
    steps: int = 30


class _Shapes(BaseModel):
    model_config = ConfigDict(regex_engine="python-re")  # lookahead below

    opt_str: str | None = None
    inner: _Inner | None = Field(default=None, description="The field's words.")
    by_name: dict[str, _Inner] = Field(default_factory=dict)
    anything: dict[str, Any] = Field(default_factory=dict)
    any_value: Any = None
    port: int | str = 8000
    tags: set[str] = Field(default_factory=set)
    pair: tuple[int, int] = (1, 2)
    mode: Literal["a", "b"] | None = None
    engine: Annotated[_Vllm | _Sdxl, Field(discriminator="kind")] | None = None
    ratio: float = Field(default=0.5, ge=0, lt=1)
    word: str = Field(default="x", pattern=r"^[a-z]+$", min_length=1, max_length=8)
    lookahead: str = Field(default="x", pattern=r"^(?!bad)[a-z]+$")


@pytest.fixture(scope="module")
def props() -> dict[str, Any]:
    return _schema(_Shapes)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("opt_str", {"type": "string", "nullable": True}),
        ("anything", {"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
        ("any_value", {"x-kubernetes-preserve-unknown-fields": True}),
        ("port", {"x-kubernetes-int-or-string": True, "default": 8000}),
        ("tags", {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}),
        ("pair", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2, "default": [1, 2]}),
        ("mode", {"type": "string", "enum": ["a", "b"], "nullable": True}),
        ("ratio", {"type": "number", "minimum": 0, "maximum": 1, "exclusiveMaximum": True, "default": 0.5}),
        ("word", {"type": "string", "pattern": "^[a-z]+$", "minLength": 1, "maxLength": 8, "default": "x"}),
        ("lookahead", {"type": "string", "default": "x"}),  # RE2 has no lookahead: the pattern is left to pydantic
    ],
)
def test_conversion(props: dict[str, Any], field: str, expected: dict[str, Any]) -> None:
    assert props[field] == expected


def test_refs_are_inlined_and_the_fields_description_wins(props: dict[str, Any]) -> None:
    assert props["inner"] == {
        "description": "The field's words.",
        "type": "object",
        "properties": {"a": {"type": "integer", "default": 1}},
        "nullable": True,
    }
    assert props["by_name"] == {
        "type": "object",
        "additionalProperties": {"description": "Inner docs.", "type": "object", "properties": {"a": {"type": "integer", "default": 1}}},
    }


def test_a_tagged_union_becomes_one_object_with_every_property(props: dict[str, Any]) -> None:
    engine = props["engine"]
    assert engine["type"] == "object" and engine["nullable"] is True
    assert engine["properties"]["kind"] == {"type": "string", "enum": ["vllm", "sdxl"]}
    assert set(engine["properties"]) == {"kind", "model", "gpu_memory_utilization", "steps"}
    assert engine["properties"]["gpu_memory_utilization"] == {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1}
    assert engine["required"] == ["model"]
    # A default of one alternative only would be applied to the others too.
    assert "default" not in engine["properties"]["steps"]


def test_a_recursive_model_is_refused() -> None:
    class Node(BaseModel):
        children: list[Node] = Field(default_factory=list)

    with pytest.raises(SchemaError, match="contains itself"):
        structural(Node.model_json_schema())


def test_an_unresolvable_ref_is_refused() -> None:
    with pytest.raises(SchemaError, match="names no definition"):
        structural({"type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}})
