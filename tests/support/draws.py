"""Shared pieces of the hypothesis strategies that draw a GPU's limits and a
cost book (the switch-way tests): plain functions of a composite
strategy's ``draw``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hypothesis import strategies as st

from vramctl.costs import CostBook

Draw = Callable[[st.SearchStrategy[Any]], Any]


def host_fields(draw: Draw, host_budget_max: int) -> dict[str, Any]:
    """Maybe a host-memory budget, maybe a pinned-memory ceiling (spec fields)."""
    fields: dict[str, Any] = {}
    if draw(st.booleans()):
        fields["hostMemoryBudgetMiB"] = draw(st.integers(1, host_budget_max))
    if draw(st.booleans()):
        fields["pinnedMemoryCeilingMiB"] = draw(st.integers(0, 40000))
    return fields


def limits(draw: Draw) -> dict[str, Any]:
    """The GPU's and the host's limits as keyword arguments of the way choice."""
    return {
        "total_mib": draw(st.none() | st.integers(8000, 141000)),
        "margin_mib": draw(st.integers(0, 1024)),
        "host_budget_mib": draw(st.none() | st.integers(0, 200000)),
        "pinned_ceiling_mib": draw(st.none() | st.integers(0, 2048)),
        "cycles_left": draw(st.booleans()),
    }


def cost_book(draw: Draw, paths: Iterable[str]) -> CostBook:
    """A book with a measured cost of model ``a`` for some of ``paths``."""
    costs = CostBook()
    for path in paths:
        if draw(st.booleans()):
            costs.record("a", path, draw(st.floats(0, 200)))  # type: ignore[arg-type]
    return costs
