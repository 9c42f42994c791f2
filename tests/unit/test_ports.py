"""The test suite's port picker: outside the kernel's ephemeral range, one
slice per xdist worker, checked free, never handed out twice."""

from __future__ import annotations

import socket

import pytest

import free_ports


def test_ports_come_from_outside_the_ephemeral_range() -> None:
    lo, hi = free_ports._ephemeral()
    for _ in range(50):
        port = free_ports.free_port()
        assert not lo <= port <= hi
        assert port in free_ports.port_range()


def test_each_xdist_worker_has_a_slice_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for w in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", w)
        slices.append(set(free_ports.port_range()))
    assert all(len(s) >= 1000 for s in slices)
    assert not (slices[0] & slices[1]) and not (slices[1] & slices[2]) and not (slices[0] & slices[2])


def test_a_port_in_use_is_skipped_and_none_comes_twice() -> None:
    first = free_ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", first + 1))  # the next one the cursor would reach
        s.listen()
        seen = {free_ports.free_port() for _ in range(20)}
    assert first not in seen and first + 1 not in seen
    assert len(seen) == 20
