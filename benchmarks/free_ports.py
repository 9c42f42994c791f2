"""Free TCP ports on 127.0.0.1 for the benchmarks and the test suite.

``bind(("127.0.0.1", 0))`` hands out a port of the kernel's ephemeral range,
the range every outgoing connection takes its local port from: between the
moment a port is picked and the moment its server binds it, a client
connection (or another process asking the kernel the same way) can take it,
and the server fails with "Address already in use". Ports here come from
below that range instead, where only an explicit bind lands, in a slice of
their own for each pytest-xdist worker, starting at a place drawn from the
process id (a benchmark run by a test shares the test's slice), and each is
checked by a bind without SO_REUSEADDR before it is handed out, never twice
by one process.
"""

from __future__ import annotations

import os
import random
import socket

_FLOOR = 10000
_handed_out: set[int] = set()
_cursor: list[int] = []


def _ephemeral() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_range() -> range:
    """This process's slice of the ports outside the ephemeral range."""
    lo, hi = _ephemeral()
    span = range(_FLOOR, lo) if lo - _FLOOR >= 4000 else range(hi + 1, 65536)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    size = len(span) // max(workers, 1)
    start = span.start + (index % max(workers, 1)) * size
    return range(start, start + size)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, never the same twice in this process."""
    ports = port_range()
    if not _cursor:
        _cursor.append(random.Random(os.getpid()).randrange(len(ports)))
    for _ in range(len(ports)):
        port = ports[_cursor[0] % len(ports)]
        _cursor[0] += 1
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")
