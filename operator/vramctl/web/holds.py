"""The HTTP face of holds: ``POST /holds``, ``POST /holds/{id}/renew``,
``DELETE /holds/{id}`` (what ``vramctl.client`` speaks).

``HoldsApi.handle`` dispatches by path itself, so the API server hands it the
requests ``HoldsApi.matches``; it waits on an ``InboxHolder``. A client that
goes away while its hold is queued withdraws it (the wait is cancelled).

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
import hmac
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from vramctl.demand.desk import InboxHolder, Refused

DEFAULT_TTL = 120.0
MAX_TTL = 86400.0
MAX_BODY = 64 * 1024
FIELDS = ("model", "ttlSeconds", "companions")


class _Bad(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _json(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(doc, status=status, headers=headers)


def _error(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return _json(status, {"error": message, "field": field}, headers)


class HoldsApi:
    """``models()`` lists the models holds may name; ``refusal(model)``
    refuses one up front (declared mode: 409 naming the mode), else None."""

    def __init__(
        self,
        holder: InboxHolder,
        models: Callable[[], list[str]],
        *,
        refusal: Callable[[str], Refused | None] = lambda _: None,
        token: str | None = None,
        poll_seconds: float = 0.25,
    ) -> None:
        self.holder = holder
        self.models = models
        self.refusal = refusal
        self.token = token
        self.poll_seconds = poll_seconds

    @staticmethod
    def matches(path: str) -> bool:
        return path == "/holds" or path.startswith("/holds/")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.token is not None:
            header = request.headers.get("Authorization", "")
            if not hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode()):
                return _error(401, "missing or wrong bearer token: send `Authorization: Bearer <token>`")
        if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
            return _error(403, "a request from a web page of another site may not hold the GPU", "Sec-Fetch-Site")
        parts = request.path.strip("/").split("/")
        try:
            if parts == ["holds"] and request.method == "POST":
                return await self._create(request)
            if len(parts) == 3 and parts[2] == "renew" and request.method == "POST":
                return await self._renew(request, parts[1])
            if len(parts) == 2 and request.method == "DELETE":
                if self.holder.release(parts[1]):
                    return web.Response(status=204)
                return _error(404, f"no hold {parts[1]!r}: released, expired or revoked")
        except _Bad as exc:
            return _error(exc.status, exc.message, exc.field)
        return _error(405, f"{request.method} {request.path}: use POST /holds, POST /holds/ID/renew or DELETE /holds/ID")

    async def _body(self, request: web.BaseRequest, required: bool) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise _Bad(413, f"the body is {request.content_length} bytes; at most {MAX_BODY} are taken")
        raw = await request.read() if request.can_read_body else b""
        if not raw and not required:
            return {}
        if request.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            raise _Bad(415, "Content-Type must be application/json", "Content-Type")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Bad(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise _Bad(400, 'the body must be a JSON object like {"model": "sdxl"}')
        unknown = sorted(set(doc) - set(FIELDS))
        if unknown:
            raise _Bad(400, f"unknown field {unknown[0]!r}; known: {', '.join(FIELDS)}", unknown[0])
        return doc

    @staticmethod
    def _ttl(doc: dict[str, Any]) -> float | None:
        ttl = doc.get("ttlSeconds")
        if ttl is None:
            return None
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
            raise _Bad(400, f"ttlSeconds must be a number of seconds above 0 and at most {MAX_TTL:g}, got {json.dumps(ttl)}", "ttlSeconds")
        return float(ttl)

    async def _create(self, request: web.BaseRequest) -> web.StreamResponse:
        doc = await self._body(request, required=True)
        model = doc.get("model")
        known = self.models()
        if not isinstance(model, str) or not model:
            raise _Bad(400, f"model is required: one of {', '.join(known)}", "model")
        if model not in known:
            raise _Bad(404, f"model {model!r} is not one of the models: {', '.join(known)}", "model")
        companions = doc.get("companions", [])
        if not isinstance(companions, list) or not all(isinstance(c, str) for c in companions):
            raise _Bad(400, "companions must be a list of model names", "companions")
        ttl = self._ttl(doc) or DEFAULT_TTL
        refused = self.refusal(model)
        if refused is not None:
            return self._refused(refused)
        wait = asyncio.ensure_future(self.holder.demand(model, ttl_seconds=ttl, companions=companions))
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
            return self._refused(exc)
        return _json(200, {"id": grant.id, "model": grant.model, "ttlSeconds": ttl})

    async def _renew(self, request: web.BaseRequest, hold_id: str) -> web.StreamResponse:
        doc = await self._body(request, required=False)
        answer = await self.holder.renew(hold_id, self._ttl(doc))
        if answer == "renewed":
            return _json(200, {"id": hold_id})
        if answer == "revoked":
            return _error(409, f"hold {hold_id} was revoked: a switch waited drainTimeoutSeconds for it")
        return _error(404, f"no hold {hold_id!r}: released or expired (renew more often than ttlSeconds)")

    @staticmethod
    def _refused(exc: Refused) -> web.Response:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return _error(exc.status, exc.message, "model", headers)


def make_app(api: HoldsApi) -> web.Application:
    """The holds API as an application of its own (tests, or a port of its own)."""
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", api.handle)
    return app
