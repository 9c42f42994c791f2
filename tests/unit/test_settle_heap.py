"""settle_heap: startup's objects leave the collector's walk (gc.freeze), so
a full collection afterwards walks only what was made since."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

from vramctl.app import settle_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def _full_collection_seconds() -> float:
    t0 = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t0


def test_after_settling_a_full_collection_walks_only_the_new_objects(unfrozen: None) -> None:
    startup = [{"n": i, "cycle": []} for i in range(200_000)]  # a startup's worth of live objects
    for d in startup[:1000]:
        d["cycle"].append(d)
    tracked_before = len(gc.get_objects())
    before = min(_full_collection_seconds() for _ in range(3))
    frozen = settle_heap()
    assert frozen >= len(startup)
    assert len(gc.get_objects()) < tracked_before - len(startup)  # out of the collector's walk
    after = min(_full_collection_seconds() for _ in range(3))
    print(f"\n[settle_heap] full collection {before * 1e3:.1f} ms -> {after * 1e3:.1f} ms ({frozen} objects frozen)")
    assert after < before / 2
    assert startup[0]["n"] == 0  # frozen objects stay alive and usable
