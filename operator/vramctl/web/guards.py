"""The one set of guards in front of every route of every listener.

A GPU switch is one HTTP request away on each of vramctl's ports (``POST
/switch``, ``POST /holds``, every gateway request), so every listener applies
the same rules, in one aiohttp middleware, before any handler runs:

- **Bearer token**: when a token is configured, every route but the public
  reads (``GET /status``, ``/healthz``, ``/metrics``) needs
  ``Authorization: Bearer <token>``; a listener off loopback refuses to start
  without one (the composition root checks).
- **Host allow-list** (DNS rebinding): the ``Host`` must be the bound address,
  a loopback name on loopback, any IP address when bound to all interfaces,
  or a name given with ``--allow-host``; even on loopback.
- **Cross-site**: a foreign ``Origin`` is refused whether or not the browser
  sent ``Sec-Fetch-Site``; a ``Sec-Fetch-Site`` other than ``same-origin`` or
  ``none`` is refused.
- **Bodies are JSON only**: ``Content-Type: application/json`` (a page's
  no-cors request can only send ``text/plain`` or form bodies, so those never
  act), a ``Content-Length`` (a POST without one is 411, a chunked body 411),
  at most the listener's size (413, before reading), read whole within the
  body timeout (408; a short body that ends is 400), UTF-8, valid JSON, no key
  twice, nested at most ``max_depth`` levels (a body nested 100,000 deep is a
  400, never a RecursionError).

A refused request gets a 4xx whose JSON names the problem (and the field or
header) and its connection is closed, so a refused body is never read as the
next request. Under ``/v1/`` and ``/models/`` errors have OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``), elsewhere
``{"error", "field"}``. Handlers read the checked body from the request
(``request[RAW]``, ``request[DOC]``) and parse it into a pydantic model with
``parse_body``, whose 4xx names the field.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

from aiohttp import HttpVersion11, hdrs, web
from pydantic import BaseModel, ValidationError

log = logging.getLogger("vramctl.web")

MAX_DEPTH = 64  # tool schemas nest deeply; nothing real nests deeper
API_MAX_BODY = 256 * 1024  # switch and hold bodies are tiny; room to refuse a deep one as too deep
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
OPENAI_PREFIXES = ("/v1/", "/models/")

RAW: web.RequestKey[bytes] = web.RequestKey("vramctl_raw_body", bytes)
DOC: web.RequestKey[Any] = web.RequestKey("vramctl_json_body", object)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PUBLIC = "_vramctl_public"


class HttpError(Exception):
    """A refusal: ``status``, a message that says what to do, the field or
    header it is about; ``close`` ends the connection after the answer.
    ``kind``/``code``: OpenAI's error type and code, where the shape is OpenAI's."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        *,
        close: bool = False,
        headers: dict[str, str] | None = None,
        kind: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.close = status, message, field, close
        self.headers, self.kind, self.code = headers, kind, code


def public(handler: Handler) -> Handler:
    """Mark a read that anyone who reaches the port may make (no token, any
    Host): ``/status``, ``/healthz``, ``/metrics``, a status page."""

    # Marked in place (a bound method's mark is its function's), not
    # wrapped: a wrapper is one more coroutine on every read.
    setattr(getattr(handler, "__func__", handler), _PUBLIC, True)
    return handler


def is_public(handler: Any) -> bool:
    """Whether ``handler`` was marked ``public``."""
    return bool(getattr(handler, _PUBLIC, False))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_host(value: str) -> str:
    """The host part of a Host header ("[::1]:9400" -> "::1"), lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Policy:
    """What one listener accepts: its bound address, token, extra Host names,
    body size, nesting depth and body timeout."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | None = None,
        allowed_hosts: Collection[str] = (),
        max_body: int = API_MAX_BODY,
        max_depth: int = MAX_DEPTH,
        body_timeout: float = 10.0,
    ) -> None:
        self.host, self.port, self.token = host.lower(), port, token
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.max_body, self.max_depth, self.body_timeout = max_body, max_depth, body_timeout
        self.loopback = is_loopback(self.host)
        self.bound_any = self.host in ("0.0.0.0", "::", "")
        names = {*self.allowed_hosts, self.host, *(LOOPBACK_NAMES if self.loopback else ())}
        self.origins = frozenset(f"http://{f'[{n}]' if ':' in n else n}:{port}" for n in names)
        self._bearer = f"Bearer {token}".encode() if token else None

    def check_host(self, request: web.BaseRequest) -> None:
        header = request.headers.get("Host")
        if not header:
            raise HttpError(400, "the request has no Host header", "Host")
        host = split_host(header)
        if (
            host in self.allowed_hosts
            or host == self.host
            or (self.loopback and host in LOOPBACK_NAMES)
            or (self.bound_any and _is_ip(host))
        ):
            return
        raise HttpError(
            403,
            f"Host {header!r} is not this server's address ({self.host}): a page reached through another name "
            "(DNS rebinding) may not use vramctl; add the name with --allow-host if it is yours",
            "Host",
        )

    def check_origin(self, request: web.BaseRequest) -> None:
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            raise HttpError(403, f"a {site} request from a web page may not use vramctl", "Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        if origin is None:
            return
        seen = origin.strip().lower().rstrip("/")
        if seen in self.origins or seen == f"http://{request.headers.get('Host', '').strip().lower()}":
            return
        raise HttpError(403, f"Origin {origin!r} is not this server: a web page of another site may not use vramctl", "Origin")

    def check_token(self, request: web.BaseRequest) -> None:
        if self._bearer is None:
            return
        header = request.headers.get("Authorization", "")
        if not hmac.compare_digest(header.encode(), self._bearer):
            raise HttpError(
                401, "missing or wrong bearer token: send `Authorization: Bearer <token>`", "Authorization", kind="authentication_error"
            )

    async def read_body(self, request: web.BaseRequest) -> None:
        """Read and check the body (see the module docstring); store it in the
        request. Only for a request with a body or a body method (``check``
        skips the rest)."""
        if "Transfer-Encoding" in request.headers:
            raise HttpError(411, "chunked bodies are not taken: send the JSON with a Content-Length", "Transfer-Encoding", close=True)
        length = request.content_length
        if length is None:
            if request.method in BODY_METHODS:
                raise HttpError(411, 'a Content-Length is required: send a JSON body like {"model": "sdxl"}', "Content-Length", close=True)
            return
        if length == 0:
            return
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise HttpError(415, f"Content-Type must be application/json, not {ctype or 'missing'!r}", "Content-Type", close=True)
        if length > self.max_body:
            raise HttpError(413, f"the body is {length} bytes; at most {self.max_body} are taken", "Content-Length", close=True)
        if hdrs.EXPECT in request.headers:
            await _continue(request)  # the head passed every guard: now ask for the body
        try:
            if request.content.is_eof():  # all of it is here already (the usual case): no timer
                raw = await request.content.readexactly(length)
            else:
                async with asyncio.timeout(self.body_timeout):
                    raw = await request.content.readexactly(length)
        except TimeoutError:
            raise HttpError(408, f"the body did not arrive within {self.body_timeout:g} s (Content-Length {length})", close=True) from None
        except asyncio.IncompleteReadError as err:
            raise HttpError(400, f"the body ended after {len(err.partial)} of {length} bytes", "Content-Length", close=True) from None
        request[RAW] = raw
        request[DOC] = parse_json(raw, self.max_depth)


async def _continue(request: web.BaseRequest) -> None:
    """``Expect: 100-continue``, answered once the request's head has passed
    the guards (the server's dispatcher keeps aiohttp from saying 100 to any
    routed request before they ran); another expectation is a 417."""
    expect = request.headers[hdrs.EXPECT]
    if request.version != HttpVersion11:
        return  # HTTP/1.0 has no interim answers: the body comes anyway
    if expect.strip().lower() != "100-continue":
        raise HttpError(417, f"Expect {expect!r} is not supported: send `Expect: 100-continue` or none", "Expect", close=True)
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not the response's size


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(doc: Any, limit: int) -> bool:
    """True when ``doc`` nests at most ``limit`` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in items if isinstance(v, dict | list))
    return True


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no key twice, at most ``max_depth`` deep."""
    if not raw.strip():
        raise HttpError(400, 'the body is empty: send a JSON object like {"model": "sdxl"}')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HttpError(400, f"the body is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise HttpError(400, f"the body is nested too deeply (at most {max_depth} levels): send a flatter JSON document") from None
    except _DuplicateKey as err:
        raise HttpError(400, f"field {err.key!r} appears twice in the body: send it once", err.key) from None
    except ValueError as err:
        raise HttpError(400, f"the body is not valid JSON ({err})") from None
    # Fewer brackets than the limit cannot nest deeper than it: the walk is for the rest.
    if isinstance(doc, dict | list) and raw.count(b"[") + raw.count(b"{") > max_depth and not _depth(doc, max_depth):
        raise HttpError(400, f"the body is nested too deeply (at most {max_depth} levels): send a flatter JSON document")
    return doc


def body_of(request: web.BaseRequest, default: Any = ...) -> Any:
    """The checked JSON body; without one, ``default``, or a 400 when none is given."""
    if DOC in request:
        return request[DOC]
    if default is ...:
        raise HttpError(400, 'the body is empty: send a JSON object like {"model": "sdxl"}')
    return default


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], doc: Any, example: str = '{"model": "sdxl"}') -> M:
    """``doc`` as ``model``; a 400 naming the first wrong field, in the words
    of the field's description ("must be <description>")."""
    if not isinstance(doc, dict):
        raise HttpError(400, f"the body must be a JSON object like {example}, not a JSON {json_type(doc)}")
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        errors = err.errors()
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a misspelt field explains the missing one
        field = str(first["loc"][0]) if first["loc"] else None
        info = model.model_fields.get(field or "")
        what = info.description if info is not None and info.description else "another value"
        if first["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields)
            unknown = sorted(set(doc) - set(model.model_fields))
            raise HttpError(400, f"unknown field(s) {unknown}: allowed are {known}", unknown[0] if unknown else field) from None
        if first["type"] == "missing":
            raise HttpError(400, f"field `{field}` is required: {what}", field) from None
        value = doc.get(field or "")
        raise HttpError(400, f"field `{field}` must be {what}, not {_short(value)}", field) from None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return f"a JSON {json_type(value)}" if len(text) > 60 or isinstance(value, dict | list) else text


# -- rendering -------------------------------------------------------------------------------


_KINDS = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}


def render(path: str, err: HttpError) -> web.Response:
    """The JSON error for ``err``: OpenAI's shape under /v1/ and /models/."""
    if path.startswith(OPENAI_PREFIXES):
        kind = err.kind or _KINDS.get(err.status, "invalid_request_error")
        body: dict[str, Any] = {"error": {"message": err.message, "type": kind, "param": err.field, "code": err.code}}
    else:
        body = {"error": err.message, "field": err.field}
    resp = web.json_response(body, status=err.status, headers=err.headers, dumps=dumps)
    if err.close:
        resp.force_close()
    return resp


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2)


def unmatched(request: web.Request) -> HttpError | None:
    """The router's 404/405 as an HttpError naming the routes, or None."""
    exc = request.match_info.http_exception
    if exc is None:
        return None
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return HttpError(405, f"{request.method} is not allowed on {request.path}: use {allowed}", headers={"Allow": allowed}, close=True)
    routes = sorted({r.resource.canonical for r in request.app.router.routes() if r.resource is not None})
    return HttpError(404, f"no such endpoint {request.path!r}: this port serves {', '.join(routes)}", code="not_found", close=True)


async def check(policy: Policy, request: web.Request) -> None:
    """Every guard, in order, for a matched route (public reads skip token, Host and Origin)."""
    if not is_public(request.match_info.handler):
        policy.check_host(request)
        policy.check_origin(request)
        policy.check_token(request)
    if request.body_exists or request.method in BODY_METHODS:  # else read_body has nothing to check
        await policy.read_body(request)
