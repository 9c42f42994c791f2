"""Back-off after failed starts and crash loops. Pure: times are passed in.

A model that fails to start, or exits on its own soon after it became
healthy (``stable_s``), is a failure: attempt n waits
``initial * 2**(n-1)`` (capped) before the next start. A model that stayed
healthy for ``stable_s`` starts afresh at attempt 1 the next time it fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial_s: float = 2.0
    max_s: float = 300.0
    stable_s: float = 60.0
    failures: dict[str, int] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)
    healthy_at: dict[str, float] = field(default_factory=dict)

    def fail(self, model: str, now: float) -> tuple[int, float]:
        """Record a failure; returns (attempt number, delay before the next start)."""
        since = self.healthy_at.pop(model, None)
        if since is not None and now - since >= self.stable_s:
            self.failures.pop(model, None)  # it ran fine for a while: a fresh series
        n = self.failures.get(model, 0) + 1
        self.failures[model] = n
        delay = min(self.initial_s * 2 ** (n - 1), self.max_s)
        self.until[model] = now + delay
        return n, delay

    def healthy(self, model: str, now: float) -> None:
        """The model passed its health check. Its failure count is kept until
        it has been healthy for ``stable_s`` (see ``fail``): a crash loop of
        short healthy runs keeps backing off."""
        self.until.pop(model, None)
        self.healthy_at.setdefault(model, now)

    def settle(self, now: float) -> None:
        """Forget the failures of models healthy for ``stable_s`` or longer."""
        for m, since in self.healthy_at.items():
            if now - since >= self.stable_s:
                self.failures.pop(m, None)

    def gone(self, model: str) -> None:
        """The model was stopped on purpose: its healthy run ended without failing."""
        self.healthy_at.pop(model, None)

    def reset(self, model: str | None = None) -> None:
        """Forget failures (the spec changed: a fixed model deserves a try at once)."""
        if model is None:
            self.failures.clear()
            self.until.clear()
        else:
            self.failures.pop(model, None)
            self.until.pop(model, None)

    def failed(self, model: str) -> bool:
        return model in self.failures

    def remaining(self, now: float) -> dict[str, float]:
        return {m: max(0.0, t - now) for m, t in self.until.items() if t > now}
