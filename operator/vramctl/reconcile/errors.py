"""Runtime errors mapped to what the worker does about them, in one place
(kopf's ``execution.py`` shape).

- transient: the engine or API is unreachable or timed out. Retried with
  back-off; the condition RuntimeUnavailable says so; a switch in progress
  stays in progress; the desired state never changes.
- permanent: retrying cannot help until the spec changes (image missing,
  not ours, no command). The model is Failed until then.
- failure: anything else the runtime raised. Failed, with back-off, like a
  start that did not come up.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum

from vramctl.runtimes.base import PermanentError, TransientError

_TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ENOENT, errno.EPIPE, errno.ETIMEDOUT, errno.EAGAIN})


class ErrorClass(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    FAILURE = "failure"


@dataclass(frozen=True)
class Classified:
    kind: ErrorClass
    reason: str  # CamelCase, for conditions and switch outcomes
    message: str


def classify(err: BaseException) -> Classified:
    """What an exception from a runtime call means for the worker."""
    text = str(err) or type(err).__name__
    if isinstance(err, TransientError):
        return Classified(ErrorClass.TRANSIENT, "RuntimeUnavailable", text)
    if isinstance(err, PermanentError):
        return Classified(ErrorClass.PERMANENT, "StartFailed", text)
    if isinstance(err, (TimeoutError, ConnectionError)):
        return Classified(ErrorClass.TRANSIENT, "RuntimeUnavailable", text)
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return Classified(ErrorClass.TRANSIENT, "RuntimeUnavailable", text)
    return Classified(ErrorClass.FAILURE, "RuntimeError", f"{type(err).__name__}: {text}")


@dataclass
class Outage:
    """The runtime has been unreachable since ``since``: retried with
    exponential back-off (0.2 s doubling, at most 1 s: converge within a
    second of its return) until it answers."""

    error: Classified
    since: float
    retry_at: float = 0.0
    tries: int = 0

    def again(self, err: Classified, now: float) -> float:
        """One more failed try; returns the delay before the next."""
        self.tries += 1
        self.error = err
        delay = min(0.2 * 2.0 ** min(self.tries - 1, 8), 1.0)  # bounded exponent: an outage may last for hours
        self.retry_at = now + delay
        return delay
