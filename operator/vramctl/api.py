"""The HTTP API: GET /status, POST /switch, GET /healthz, GET /metrics.

Binds 127.0.0.1 by default. Bound anywhere else, mutating endpoints require
``Authorization: Bearer <token>`` and the server refuses to start without a
token: a GPU switch endpoint open to a LAN is a denial-of-service button.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vramctl.spec import DesiredStateError
from vramctl.supervisor import Supervisor

log = logging.getLogger("vramctl.api")

MAX_BODY = 64 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


class ApiServer:
    def __init__(
        self, supervisor: Supervisor, host: str = "127.0.0.1", port: int = 9400, token: str | None = None, switch_refusal: str | None = None
    ) -> None:
        """``switch_refusal``: desired state comes from elsewhere (the Kubernetes
        operator's ModelDeployments); POST /switch answers 409 with this text,
        and nothing here mutates, so no token is needed off loopback."""
        self.switch_refusal = switch_refusal
        if not is_loopback(host) and not token and switch_refusal is None:
            raise ValueError(f"listening on {host} (not loopback) needs a token: pass --token or set VRAMCTL_TOKEN")
        self.supervisor = supervisor
        self.token = token
        handler = _make_handler(self)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = str(self.httpd.server_address[0]), int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="vramctl-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------ handlers

    def authorize(self, header: str | None) -> None:
        if self.token is None:
            return
        expected = f"Bearer {self.token}"
        if header is None or not hmac.compare_digest(header.encode(), expected.encode()):
            raise ApiError(401, "missing or wrong bearer token: send `Authorization: Bearer <token>`")

    def get_status(self, query: dict[str, list[str]]) -> dict[str, Any]:
        out = self.supervisor.status()
        since = int(query.get("since", ["-1"])[0])
        if since >= 0:
            out["progress"] = [p for w in self.supervisor.workers.values() for p in w.progress(since)]
        return out

    def post_switch(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.switch_refusal is not None:
            raise ApiError(409, self.switch_refusal)
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object like {"model": "sdxl"}')
        unknown = set(body) - {"model", "companions", "gpu"}
        if unknown:
            raise ApiError(400, f"unknown field(s) {sorted(unknown)}: allowed are model, companions, gpu", sorted(unknown)[0])
        if "model" not in body:
            raise ApiError(400, 'field `model` is required (null or "" frees the GPU)', "model")
        model = body["model"]
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "field `model` must be a string or null", "model")
        gpu = body.get("gpu")
        workers = self.supervisor.workers
        if gpu is None:
            if len(workers) != 1:
                raise ApiError(400, f"this host has {len(workers)} GPUs: say which with `gpu`", "gpu")
            gpu = next(iter(workers))
        if not isinstance(gpu, int) or gpu not in workers:
            raise ApiError(404, f"gpu {gpu!r} is not managed here; managed: {sorted(workers)}", "gpu")
        companions = body.get("companions")
        if companions is not None and (not isinstance(companions, list) or not all(isinstance(c, str) for c in companions)):
            raise ApiError(400, "field `companions` must be a list of model names", "companions")
        worker = workers[gpu]
        seq = worker.status().get("progressSeq", 0)
        try:
            d = worker.request(model or None, tuple(companions) if companions is not None else None, source="api")
        except DesiredStateError as err:
            field = (err.field or "model").replace("activeModel", "model")
            raise ApiError(422, str(err), field.split("[")[0]) from None
        return {"gpu": gpu, "activeModel": d.active, "companions": list(d.companions), "generation": d.generation, "progressSeq": seq}


def _make_handler(server: ApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "vramctl"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj, indent=2).encode() + b"\n")

        def _error(self, err: ApiError) -> None:
            payload: dict[str, Any] = {"error": str(err)}
            if err.field:
                payload["field"] = err.field
            self._json(err.status, payload)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            try:
                if url.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif url.path == "/status":
                    self._json(200, server.get_status(parse_qs(url.query)))
                elif url.path == "/metrics":
                    self._send(200, generate_latest(server.supervisor.metrics.registry), CONTENT_TYPE_LATEST)
                else:
                    raise ApiError(404, f"no such endpoint {url.path}: try /status, /switch, /healthz, /metrics")
            except ApiError as err:
                self._error(err)
            except ValueError as err:
                self._error(ApiError(400, str(err)))

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            try:
                if url.path != "/switch":
                    raise ApiError(404, f"no such endpoint {url.path}: POST /switch")
                server.authorize(self.headers.get("Authorization"))
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise ApiError(413, "body too large")
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    raise ApiError(400, 'the body is not valid JSON; send {"model": "sdxl"}') from None
                self._json(202, server.post_switch(body))
            except ApiError as err:
                self._error(err)

    return Handler
