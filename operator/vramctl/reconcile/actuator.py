"""Stops, starts, cleanups, sleeps and wakes, run aside from the worker's loop.

The runtime's calls are slow (docker waits out a stop's grace period, a
model server takes its time to sleep): ``Actuator`` runs them on one thread
of their own so that the loop keeps hearing its inbox meanwhile. ``Op`` is
the one call in flight; while it runs, the reconciler plans nothing else,
and its completion pokes the loop. ``announcement`` is what the loop says
when it hands an action over.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vramctl.planner import Cleanup, Sleep, Start, Stop, Wake
from vramctl.reconcile.warm import HttpSleeper, Sleeper
from vramctl.runtimes.base import Runtime
from vramctl.spec.models import DeploymentSpec

# What the actuator runs: the planned actions that call out (the waits do not).
OpAction = Cleanup | Stop | Start | Sleep | Wake


@dataclass
class Op:
    """A stop, start or cleanup running aside."""

    action: OpAction
    future: Future[Any]
    spec: DeploymentSpec


class Actuator:
    """Runs the runtime's slow calls on one thread of their own; ``inline``
    runs them on the caller's thread (deterministic tests, ``--once``).
    ``sleeper``: the model servers' sleep API (``HttpSleeper`` by default)."""

    def __init__(self, runtime: Runtime, on_done: Callable[[], None], inline: bool = False, sleeper: Sleeper | None = None) -> None:
        self.runtime, self.on_done, self.inline = runtime, on_done, inline
        self._pool: ThreadPoolExecutor | None = None
        self.sleeper: Sleeper = sleeper or HttpSleeper()

    def submit(self, spec: DeploymentSpec, action: OpAction) -> Op:
        fn: Callable[[], Any]
        match action:
            case Stop(model=m):
                fn = lambda: self.runtime.stop(spec, m)  # noqa: E731
            case Start(model=m):
                fn = lambda: self.runtime.start(spec, m)  # noqa: E731
            case Cleanup(model=m):
                fn = lambda: self.runtime.cleanup(spec, m)  # noqa: E731
            case Sleep(model=m):
                fn = lambda: self.sleeper.sleep(spec, m)  # noqa: E731
            case Wake(model=m):
                fn = lambda: self.sleeper.wake(spec, m)  # noqa: E731
        if self.inline:
            fut: Future[Any] = Future()
            try:
                fut.set_result(fn())
            except Exception as err:
                fut.set_exception(err)
            return Op(action, fut, spec)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="vramctl-actuator")
        fut = self._pool.submit(fn)
        fut.add_done_callback(lambda _: self.on_done())
        return Op(action, fut, spec)

    def close(self) -> None:
        """Let a stop in flight finish on its own (a half-stopped model is the
        worst of both worlds); start nothing more."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def announcement(action: OpAction) -> tuple[str, str]:
    """The progress step and message said as ``action`` is handed over."""
    match action:
        case Stop(model=m, reason=reason):
            return "stopping", f"stopping {m!r} ({reason})"
        case Start(model=m, reason=reason):
            return "starting", f"starting {m!r} ({reason})"
        case Cleanup(model=m):
            return "cleanup", f"cleaning up what {m!r} left behind"
        case Sleep(model=m, reason=reason):
            return "sleeping", f"putting {m!r} to sleep ({reason})"
        case Wake(model=m):
            return "waking", f"waking {m!r}"
