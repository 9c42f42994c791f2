"""The worker-side desk of one GPU's queue: demands in, answers out.

``demand_queue`` decides; this desk keeps what the decision needs around it,
on the worker's one thread: the ``QueueState``, and for every demand the
future its client waits on. The worker passes it the commands from its inbox
(``AddDemand``, ``Withdraw``, ``Release``, ``Renew``) and its own news
(``switch_done``, ``switch_failed``, ``companions_done``, ``companions_failed``,
``went_away``), then calls ``tick(now)``, which answers the granted and
refused clients itself and returns the ``Decision`` for the worker to act
on: ``switch_to``, ``companions``, ``idle``, ``wake_at``
(revoked holds are recorded, so their renew answers 409).

The other side, ``InboxHolder``, is what the gateway (and the ``/holds``
handlers) call from the event loop: it posts the commands into the worker's
inbox and waits on the futures; a cancelled wait withdraws its demand.

Threads: everything on ``HoldDesk`` runs on the worker's thread only; the
futures are ``concurrent.futures.Future``, safe to resolve there and await
(``asyncio.wrap_future``) on the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, Gauge, Histogram

from vramctl.demand import policy as dq

RenewAnswer = Literal["renewed", "revoked", "unknown"]


class Refused(Exception):
    """A demand that will not be granted: ``status`` 503 (with
    ``retry_after`` seconds) or 409 (declared mode, revoked), and why."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Grant:
    """What a granted client gets: its hold (``id`` = the demand's id)."""

    id: str
    model: str
    expires: float | None


class QueueMetrics:
    """The queue's series (one set for all GPUs), updated by each desk's ``tick``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.depth = Gauge("vramctl_queue_depth", "Demands waiting for a model, per GPU.", ["gpu"], registry=registry)
        self.wait = Histogram(
            "vramctl_queue_wait_seconds",
            "How long a granted demand waited (queue, drain and switch).",
            ["gpu", "model"],
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.holds = Gauge(
            "vramctl_holds", "Live holds (API holds and gateway requests), per GPU and model.", ["gpu", "model"], registry=registry
        )


# -- inbox commands ----------------------------------------------------------------


@dataclass(frozen=True)
class AddDemand:
    demand: dq.Demand
    reply: Future[Grant] = field(compare=False)


@dataclass(frozen=True)
class Withdraw:
    demand_id: str


@dataclass(frozen=True)
class Release:
    hold_id: str
    error: str | None = None  # the backend failed during the hold (the worker may re-observe at once)


@dataclass(frozen=True)
class Renew:
    hold_id: str
    ttl_seconds: float
    reply: Future[RenewAnswer] = field(compare=False)


DeskCommand = AddDemand | Withdraw | Release | Renew


class HoldDesk:
    """One GPU's queue state and the clients waiting on it (worker thread only)."""

    def __init__(
        self,
        policy: dq.QueuePolicy,
        idle: dq.IdlePolicy,
        *,
        active: str | None = None,
        now: float = 0.0,
        gpu: str = "0",
        metrics: QueueMetrics | None = None,
        light: frozenset[str] = frozenset(),
        companions: tuple[str, ...] = (),
        defer_answers: bool = False,
    ) -> None:
        self.state = dq.QueueState(
            policy=policy, idle=idle, active=active, active_companions=companions, active_since=now, last_activity=now, light=light
        )
        self.gpu = gpu
        self.metrics = metrics
        self._held_models: set[str] = set()
        self._replies: dict[str, Future[Grant]] = {}
        # Answers wait here until the worker has published the state they
        # belong to (``deliver``): a client granted a hold finds it in /status.
        # With ``defer_answers`` (the worker) they go out only on ``deliver``.
        self._outbox: list[tuple[Future[Grant], Grant | Refused]] = []
        self._defer = defer_answers
        self.backend_errors: list[tuple[str, str]] = []  # (hold id, error) since the worker last looked

    def handle(self, cmd: DeskCommand, now: float) -> None:
        """Fold one inbox command into the state; answers come with ``tick``."""
        if isinstance(cmd, AddDemand):
            if cmd.reply.set_running_or_notify_cancel():
                self._replies[cmd.demand.id] = cmd.reply
                self.state = dq.add_demand(self.state, cmd.demand)
        elif isinstance(cmd, Withdraw):
            self._replies.pop(cmd.demand_id, None)
            self.state = dq.withdraw(self.state, cmd.demand_id, now)
        elif isinstance(cmd, Release):
            self._replies.pop(cmd.hold_id, None)
            self.state = dq.release(self.state, cmd.hold_id, now)
            if cmd.error is not None:
                self.backend_errors.append((cmd.hold_id, cmd.error))
        else:
            self.state, answer = dq.renew(self.state, cmd.hold_id, cmd.ttl_seconds, now)
            cmd.reply.set_result(answer)

    def tick(self, now: float) -> dq.Decision:
        """Decide, answer the granted and refused clients, return the decision."""
        decision = dq.decide(self.state, now)
        by_id = {d.id: d for d in self.state.demands}
        self.state = dq.apply(self.state, decision, now)
        for did in decision.grant:
            d = by_id[did]
            expires = None if d.kind == "switch" or d.ttl_seconds is None else now + d.ttl_seconds
            self._answer(did, Grant(did, d.model, expires))
        for r in decision.reject:
            self._fail(r.demand_id, Refused(503, r.message, r.retry_after_seconds))
        if self.metrics is not None:
            self._observe(self.metrics, decision, by_id, now)
        return decision

    def _observe(self, m: QueueMetrics, decision: dq.Decision, by_id: dict[str, dq.Demand], now: float) -> None:
        for did in decision.grant:
            m.wait.labels(self.gpu, by_id[did].model).observe(now - by_id[did].arrived)
        m.depth.labels(self.gpu).set(len(self.state.demands))
        counts: dict[str, int] = {}
        for h in self.state.holds:
            counts[h.model] = counts.get(h.model, 0) + 1
        for model in self._held_models | set(counts):
            m.holds.labels(self.gpu, model).set(counts.get(model, 0))
        self._held_models |= set(counts)

    def switch_done(self, target: dq.Target, now: float) -> None:
        self.state = dq.switch_done(self.state, target, now)

    def switch_superseded(self, running: dq.Target | None, now: float) -> None:
        self.state = dq.switch_superseded(self.state, running, now)

    def switch_failed(self, reason: str, now: float) -> None:
        """The switch failed: its demands are refused (503: the model may recover after the backoff)."""
        models = {d.id: d.model for d in self.state.demands}
        self.state, failed = dq.switch_failed(self.state, now)
        for did in failed:
            self._fail(did, Refused(503, reason, dq.switch_retry_after(self.state, now, models.get(did))))

    def companions_done(self, companions: tuple[str, ...], now: float) -> None:
        self.state = dq.companions_done(self.state, companions, now)

    def companions_failed(self, reason: str, now: float) -> None:
        """Starting light models failed: their demands are refused (503)."""
        self.state, failed = dq.companions_failed(self.state, now)
        for did in failed:
            self._fail(did, Refused(503, reason, dq.switch_retry_after(self.state, now)))

    def went_away(self, now: float) -> None:
        self.state = dq.went_away(self.state, now)

    def refuse_all(self, status: int, message: str) -> None:
        """Answer every waiting client (the worker stops), at once."""
        for did in list(self._replies):
            self._fail(did, Refused(status, message))
        self.deliver()
        self.state = dq.QueueState(
            policy=self.state.policy,
            idle=self.state.idle,
            active=self.state.active,
            active_companions=self.state.active_companions,
            active_since=self.state.active_since,
            light=self.state.light,
        )

    def snapshot(self) -> dict[str, object]:
        """For /status and metrics: queue depth per model, holds per model."""
        s = self.state
        waiting: dict[str, int] = {}
        for d in s.demands:
            waiting[d.model] = waiting.get(d.model, 0) + 1
        holds: dict[str, int] = {}
        hold_ids: dict[str, list[str]] = {}
        for h in s.holds:
            holds[h.model] = holds.get(h.model, 0) + 1
            hold_ids.setdefault(h.model, []).append(h.id)
        return {
            "active": s.active,
            "switchingTo": s.switching_to.model if s.switching_to else None,
            "queueDepth": len(s.demands),
            "waiting": waiting,
            "holds": holds,
            "holdIds": hold_ids,  # what DELETE /holds/{id} takes (the status page's "cancel")
            "draining": s.drain_since is not None,
        }

    def deliver(self) -> None:
        """Answer the clients decided since the last call (after the publish)."""
        outbox, self._outbox = self._outbox, []
        for reply, answer in outbox:
            if reply.done():
                continue
            if isinstance(answer, Refused):
                reply.set_exception(answer)
            else:
                reply.set_result(answer)

    def _answer(self, did: str, grant: Grant) -> None:
        reply = self._replies.pop(did, None)
        if reply is not None:
            self._outbox.append((reply, grant))
            if not self._defer:
                self.deliver()

    def _fail(self, did: str, exc: Refused) -> None:
        reply = self._replies.pop(did, None)
        if reply is not None:
            self._outbox.append((reply, exc))
            if not self._defer:
                self.deliver()


# -- the event loop's side -----------------------------------------------------------


Post = Callable[[str, DeskCommand], None]  # (gpu, command) -> into that worker's inbox; never blocks


class Lease(Protocol):
    """A hold for one request (the gateway's)."""

    def release(self, error: str | None = None) -> None:
        """End the hold; idempotent. ``error``: the backend failed during
        the lease (the worker may re-observe the model at once)."""


@dataclass
class DeskLease:
    """The gateway's lease: one hold, released once."""

    holder: InboxHolder
    grant: Grant
    released: bool = False

    def release(self, error: str | None = None) -> None:
        if not self.released:
            self.released = True
            self.holder.release(self.grant.id, error)


class InboxHolder:
    """Waits for grants through the workers' inboxes; the gateway's ``Holder``
    (give it ``resolve`` and ``models`` too) and the ``/holds`` handlers' tool.

    ``gpu_of(model)`` names the GPU (worker) of a model, ``priority_of`` its
    priority; ``clock`` is the workers' clock (monotonic seconds).
    """

    def __init__(
        self,
        post: Post,
        gpu_of: Callable[[str], str],
        priority_of: Callable[[str], int] = lambda _: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.post = post
        self.gpu_of = gpu_of
        self.priority_of = priority_of
        self.clock = clock
        self._ids = itertools.count(1)
        self._holds: dict[str, tuple[str, float | None]] = {}  # granted hold id -> (gpu, ttl), for renew and release by id

    def new_id(self) -> str:
        return f"h{next(self._ids)}-{time.time_ns() % 1_000_000_000:09d}"

    async def demand(
        self,
        model: str,
        *,
        kind: dq.DemandKind = "hold",
        ttl_seconds: float | None = None,
        companions: Sequence[str] = (),
        force: bool = False,
    ) -> Grant:
        """Queue a demand and wait for its answer (``Refused`` raised as is).
        Cancelled (the client went away): the demand is withdrawn, or, when
        the grant raced the cancellation, the hold released."""
        gpu = self.gpu_of(model)
        d = dq.Demand(
            id=self.new_id(),
            model=model,
            arrived=self.clock(),
            companions=tuple(companions),
            priority=self.priority_of(model),
            kind=kind,
            force=force,
            ttl_seconds=ttl_seconds,
        )
        reply: Future[Grant] = Future()
        self.post(gpu, AddDemand(d, reply))
        try:
            grant = await asyncio.wrap_future(reply)
        except asyncio.CancelledError:
            # Release, not Withdraw: the grant may be on its way; releasing a
            # demand that was not granted yet withdraws it.
            reply.cancel()
            self.post(gpu, Release(d.id))
            raise
        if kind == "hold":
            self._holds[grant.id] = (gpu, ttl_seconds)
        return grant

    def admit(self, model: str) -> Lease | None:
        """No fast path here: every hold is queued (``SupervisorHolder`` has one)."""
        return None

    async def acquire(self, model: str) -> DeskLease:
        """The gateway's acquire: a hold for the request's life (no ttl)."""
        grant = await self.demand(model)
        return DeskLease(self, grant)

    async def renew(self, hold_id: str, ttl_seconds: float | None = None) -> RenewAnswer:
        """``POST /holds/{id}/renew`` (by default for the ttl it was granted
        with): renewed (200), revoked (409), unknown (404)."""
        known = self._holds.get(hold_id)
        if known is None:
            return "unknown"
        gpu, ttl = known
        reply: Future[RenewAnswer] = Future()
        self.post(gpu, Renew(hold_id, ttl_seconds or ttl or 0.0, reply))
        answer = await asyncio.wrap_future(reply)
        if answer != "renewed":
            self._holds.pop(hold_id, None)
        return answer

    def release(self, hold_id: str, error: str | None = None) -> bool:
        """``DELETE /holds/{id}``; False: no such hold here (404)."""
        known = self._holds.pop(hold_id, None)
        if known is not None:
            self.post(known[0], Release(hold_id, error))
        return known is not None
