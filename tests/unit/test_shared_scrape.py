"""Scrapes that arrive together share one rendering (telemetry.SharedRendering):
a scrape that comes while one renders waits for it, one within the freshness
window after it began gets its bytes, a later one renders anew; a failed
rendering is not kept; the window is said in the scrape metric's help."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from vramctl.telemetry import SHARED_WINDOW_S, SharedRendering, VramctlCollector


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class SlowRender:
    """A rendering that takes its time and counts its calls."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.calls, self.seconds = 0, seconds
        self.fail: Exception | None = None

    def __call__(self, _registry: CollectorRegistry) -> bytes:
        self.calls += 1
        if self.seconds:
            time.sleep(self.seconds)
        if self.fail is not None:
            raise self.fail
        return f"render {self.calls}\n".encode()


def test_scrapes_that_arrive_while_one_renders_share_it() -> None:
    render = SlowRender(0.2)
    shared = SharedRendering(CollectorRegistry(), render=render)
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(shared.body())) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert render.calls == 1 and got == [b"render 1\n"] * 50


def test_the_freshness_window_is_shared_and_then_renders_anew() -> None:
    clock, render = Clock(), SlowRender()
    shared = SharedRendering(CollectorRegistry(), max_age_s=0.1, clock=clock, render=render)
    assert shared.body() == b"render 1\n"
    clock.t += 0.1  # at the end of the window: still shared
    assert shared.body() == b"render 1\n"
    clock.t += 0.001
    assert shared.body() == b"render 2\n"
    assert render.calls == 2


def test_a_failed_rendering_is_raised_to_its_scrapes_and_not_kept() -> None:
    clock, render = Clock(), SlowRender()
    shared = SharedRendering(CollectorRegistry(), clock=clock, render=render)
    render.fail = RuntimeError("probe gone")
    with pytest.raises(RuntimeError, match="probe gone"):
        shared.body()
    render.fail = None
    assert shared.body() == b"render 2\n"  # at once: nothing cached from the failure


def test_the_window_is_said_in_the_scrape_metrics_help() -> None:
    reg = CollectorRegistry()
    reg.register(VramctlCollector(lambda: []))
    text = generate_latest(reg).decode()
    help_line = next(line for line in text.splitlines() if line.startswith("# HELP vramctl_scrape_duration_seconds"))
    assert f"{SHARED_WINDOW_S:g} s" in help_line and "share" in help_line


def test_a_real_registry_renders_once_for_concurrent_scrapes() -> None:
    reg = CollectorRegistry()
    reg.register(VramctlCollector(lambda: []))
    shared = SharedRendering(reg)
    bodies: list[bytes] = []
    threads = [threading.Thread(target=lambda: bodies.append(shared.body())) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(set(bodies)) == 1 and b"vramctl_scrape_duration_seconds" in bodies[0]
