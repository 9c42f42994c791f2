"""Free TCP ports on 127.0.0.1."""

from __future__ import annotations

import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, never the same twice in this process.

    The kernel hands out ephemeral ports in turn, so two processes of one
    session (xdist workers) asking at nearly the same time get different ones;
    a port is free only until someone binds it."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")
