"""Figures a test measures (chaos, gateway), shown in the session's summary.

``report(line)`` prints the line (seen with ``-s``) and keeps it; the root
conftest attaches what a test kept to its teardown report, so the figures
reach the summary from an xdist worker too (CI runs ``pytest -q``: they are
read there)."""

from __future__ import annotations

FIGURES: list[str] = []


def report(line: str) -> None:
    print("\n" + line)
    FIGURES.append(line)


def take() -> list[str]:
    """The lines kept since the last call."""
    out = FIGURES[:]
    FIGURES.clear()
    return out
