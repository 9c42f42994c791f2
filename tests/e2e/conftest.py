"""Fixtures of the end-to-end tests: a real ``vramctl up`` against the real
Docker engine (tests/support/live_up.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_up import LiveUp


@pytest.fixture
def vramctl(tmp_path: Path, instance: str, free_port: Callable[[], int], standin_image: str) -> Iterator[Callable[[dict[str, Any]], LiveUp]]:
    """``vramctl(config)`` -> a ``LiveUp`` of this test's instance (not started);
    every one made is stopped at teardown."""
    made: list[LiveUp] = []

    def make(config: dict[str, Any]) -> LiveUp:
        v = LiveUp(tmp_path, config, instance=instance, port=free_port())
        made.append(v)
        return v

    yield make
    for v in made:
        v.stop()
