"""Free TCP ports on 127.0.0.1: the one picker the benchmarks use too
(benchmarks/free_ports.py, on the tests' path by pyproject's pytest
``pythonpath``), so a benchmark a test runs and the test draw from one scheme."""

from __future__ import annotations

from free_ports import free_port, port_range

__all__ = ["free_port", "port_range"]
