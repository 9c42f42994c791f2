"""Fixtures of the process tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.live_up import LiveUp


@pytest.fixture
def live(tmp_path: Path) -> Iterator[list[LiveUp]]:
    """The `vramctl up` processes a test starts: each stopped, and its models killed, at the end."""
    ups: list[LiveUp] = []
    yield ups
    for u in ups:
        u.stop()
        u.kill_models()
