"""The HTTP face of holds: ``POST /holds``, ``POST /holds/{id}/renew``,
``DELETE /holds/{id}`` (what ``vramctl.client`` speaks).

Served on the API port and on the gateway port by one ``HoldsApi`` over one
``InboxHolder``, so a hold made on either port is renewed and released on
either. The guards (``vramctl.web.guards``) have checked the caller and the
body before a handler runs; a handler parses the body into ``HoldBody`` or
``RenewBody``. A client that goes away while its hold is queued withdraws it
(the wait is cancelled): a 499, no switch.

    POST /holds {"model", "ttlSeconds" (default 120), "companions"}
        200 {"id", "model", "ttlSeconds"} once the model is active and healthy
        503 + Retry-After (queue full, queue timeout, failed switch), 409 (the
        GPU is in declared mode), 404 (unknown model), 400 naming the field
    POST /holds/{id}/renew [{"ttlSeconds"}]    200 | 409 revoked | 404 unknown or expired
    DELETE /holds/{id}                          204 | 404
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from vramctl.demand.desk import InboxHolder, Refused
from vramctl.spec.models import DesiredStateError
from vramctl.web.guards import HttpError, body_of, parse_body

DEFAULT_TTL = 120.0
MAX_TTL = 86400.0
TTL_WORDS = f"a number of seconds above 0 and at most {MAX_TTL:g}"


class HoldBody(BaseModel):
    """``POST /holds``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: StrictStr = Field(min_length=1, description="the name of a model (GET /v1/models lists them)")
    ttlSeconds: float = Field(DEFAULT_TTL, gt=0, le=MAX_TTL, description=TTL_WORDS)
    companions: list[StrictStr] = Field(default_factory=list, description="a list of model names")


class RenewBody(BaseModel):
    """``POST /holds/{id}/renew`` (the body is optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ttlSeconds: float | None = Field(None, gt=0, le=MAX_TTL, description=TTL_WORDS)


def _json(status: int, doc: dict[str, object], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(doc, status=status, headers=headers)


class HoldsApi:
    """``models()`` lists the models holds may name; ``refusal(model)``
    refuses one up front (declared mode: 409 naming the mode), else None;
    ``check(model, companions)`` raises DesiredStateError for a hold that can
    never be granted (an unknown or heavy companion, companions that do not
    fit): a 422 naming the field, not a 503 the client would retry."""

    def __init__(
        self,
        holder: InboxHolder,
        models: Callable[[], list[str]],
        *,
        refusal: Callable[[str], Refused | None] = lambda _: None,
        check: Callable[[str, list[str]], None] = lambda _model, _companions: None,
        poll_seconds: float = 0.25,
    ) -> None:
        self.holder = holder
        self.models = models
        self.refusal = refusal
        self.check = check
        self.poll_seconds = poll_seconds

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/holds", self.create)
        app.router.add_post("/holds/{id}/renew", self.renew)
        app.router.add_delete("/holds/{id}", self.release)

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = parse_body(HoldBody, body_of(request))
        known = self.models()
        if body.model not in known:
            raise HttpError(404, f"model {body.model!r} is not one of the models: {', '.join(known)}", "model")
        try:
            self.check(body.model, body.companions)
        except DesiredStateError as err:
            field = (err.field or "companions").split("[")[0].replace("activeModel", "model")
            raise HttpError(422, str(err), field) from None
        refused = self.refusal(body.model)
        if refused is not None:
            raise self._refused(refused)
        wait = asyncio.ensure_future(self.holder.demand(body.model, ttl_seconds=body.ttlSeconds, companions=body.companions))
        try:
            while True:
                done, _ = await asyncio.wait({wait}, timeout=self.poll_seconds)
                if done:
                    break
                transport = request.transport
                if transport is None or transport.is_closing():
                    wait.cancel()  # the client went away: withdraw
                    with contextlib.suppress(asyncio.CancelledError, Refused):
                        await wait
                    return web.Response(status=499)
        except asyncio.CancelledError:
            wait.cancel()
            raise
        try:
            grant = wait.result()
        except Refused as exc:
            raise self._refused(exc) from None
        return _json(200, {"id": grant.id, "model": grant.model, "ttlSeconds": body.ttlSeconds})

    async def renew(self, request: web.Request) -> web.StreamResponse:
        hold_id = request.match_info["id"]
        body = parse_body(RenewBody, body_of(request, {}))
        answer = await self.holder.renew(hold_id, body.ttlSeconds)
        if answer == "renewed":
            return _json(200, {"id": hold_id})
        if answer == "revoked":
            raise HttpError(409, f"hold {hold_id} was revoked: a switch waited drainTimeoutSeconds for it")
        raise HttpError(404, f"no hold {hold_id!r}: released or expired (renew more often than ttlSeconds)")

    async def release(self, request: web.Request) -> web.StreamResponse:
        hold_id = request.match_info["id"]
        if self.holder.release(hold_id):
            return web.Response(status=204)
        raise HttpError(404, f"no hold {hold_id!r}: released, expired or revoked")

    @staticmethod
    def _refused(exc: Refused) -> HttpError:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return HttpError(exc.status, exc.message, "model", headers=headers)
