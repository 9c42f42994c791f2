"""The HTTP API: GET /status, GET /healthz, GET /metrics, POST /switch.

Routes only: the guards (token, Host, Origin, JSON bodies and their limits)
and the listener (connection cap, timeouts, one event loop) are the shared
parts of ``vramctl.web.guards`` and ``vramctl.web.server``. Bound anywhere
but loopback, the API needs a token (the composition root refuses to start
without one): a GPU switch endpoint open to a LAN is a denial-of-service
button.

- ``POST /switch`` acts only on a body that passed the guards and parses into
  ``SwitchBody`` (400 naming the field; 422 for a model or companion the GPU
  does not know, 404 for a GPU not managed here), and only after the state
  file was found writable (507 otherwise). A switch towards a model other
  than a held one waits behind the holds (202 ``queued``) unless ``force``.
- ``/status`` and ``/metrics`` read what the workers published; they never
  take a worker's lock. Concurrent scrapes share one collection.
- Secrets (``--api-key`` values, token env vars) are redacted from
  everything ``/status`` shows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from vramctl.spec.models import DeploymentSpec, DesiredStateError
from vramctl.status.redact import redact_status
from vramctl.web.guards import HttpError, body_of, dumps, parse_body, public
from vramctl.worker.actor import GpuWorker
from vramctl.worker.supervisor import Supervisor

log = logging.getLogger("vramctl.web.api")


class StateStore(Protocol):
    """Where desired state is recorded before it is acted on (the state file)."""

    def check_writable(self) -> None: ...


@dataclass(frozen=True)
class _StatusBody:
    """``GET /status`` rendered: the workers, statuses and specs it shows (compared by identity) and the count of notes."""

    seen: tuple[tuple[int, GpuWorker, Mapping[str, Any], DeploymentSpec], ...]
    notes: int
    body: bytes


class SwitchBody(BaseModel):
    """``POST /switch``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: StrictStr | None = Field(description='a string or null (a model name; null or "" frees the GPU)')
    companions: list[StrictStr] | None = Field(None, description="a list of model names (light models beside it)")
    gpu: StrictInt | None = Field(None, description="a whole number (a GPU index)")
    force: StrictBool = Field(False, description="true or false (switch now, even away from held models)")
    sleep: StrictBool = Field(False, description="true or false (with model null: put what can sleep to sleep instead of stopping it)")


class Api:
    """The API's handlers over ``supervisor``. ``switch_refusal``: desired
    state comes from elsewhere (the Kubernetes operator's ModelDeployments);
    POST /switch answers 409 with this text. ``state``: checked writable
    before each switch (507 when it is not)."""

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        state: StateStore | None = None,
        switch_refusal: str | None = None,
        metrics_body: Callable[[], bytes] | None = None,
    ) -> None:
        self.supervisor = supervisor
        # The exposition text; the composition root passes one rendering shared by concurrent scrapes (telemetry).
        self._render_metrics = metrics_body or functools.partial(generate_latest, supervisor.metrics.registry)
        # A shared rendering's body while it is fresh, asked on the loop: no trip to the rendering thread for it.
        self._metrics_fresh: Callable[[], bytes | None] | None = getattr(metrics_body, "fresh", None)
        self.state = state
        self.switch_refusal = switch_refusal
        self._switch_lock: asyncio.Lock | None = None
        # Concurrent scrapes share one collection (prometheus' collectors read probes).
        self._metrics_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramctl-metrics")
        self._metrics_inflight: asyncio.Future[bytes] | None = None
        self._status_cache: _StatusBody | None = None
        self._secrets: dict[int, tuple[DeploymentSpec, frozenset[str]]] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", public(self.healthz))
        app.router.add_get("/status", public(self.status))
        app.router.add_get("/metrics", public(self.metrics))
        app.router.add_post("/switch", self.switch)
        app.on_cleanup.append(self._close)

    async def _close(self, _: web.Application) -> None:
        self._metrics_pool.shutdown(wait=False, cancel_futures=True)

    async def healthz(self, _: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n", content_type="text/plain")

    async def status(self, request: web.Request) -> web.StreamResponse:
        body = self._status_now() if not request.query_string else self._status_body(request.rel_url.query)
        return web.Response(body=body, content_type="application/json")

    async def metrics(self, _: web.Request) -> web.StreamResponse:
        return web.Response(body=await self._metrics_body(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------ reads

    def _known_secrets(self) -> frozenset[str]:
        out: set[str] = set()
        for w in list(self.supervisor.workers.values()):
            spec = w.spec
            cached = self._secrets.get(w.gpu)
            if cached is None or cached[0] is not spec:
                cached = (spec, spec.secrets())
                self._secrets[w.gpu] = cached
            out |= cached[1]
        return frozenset(out)

    def _status_now(self) -> bytes:
        """The plain ``GET /status``: the bytes rendered when a worker last
        published (or a spec or the notes changed), found by identity: no
        JSON work per request."""
        cache, sup = self._status_cache, self.supervisor
        if cache is not None and len(sup.notes) == cache.notes and len(sup.workers) == len(cache.seen):
            workers = sup.workers
            for gpu, worker, status, spec in cache.seen:
                if worker.published_status() is not status or worker.spec is not spec or workers.get(gpu) is not worker:
                    break
            else:
                return cache.body
        return self._status_body({})

    def _status_body(self, query: Mapping[str, str]) -> bytes:
        raw = query.get("since")
        since = -1
        if raw is not None:
            try:
                since = int(raw)
            except ValueError:
                raise HttpError(400, f"since={raw!r} is not a whole number: use the progressSeq of a previous answer", "since") from None
        sup = self.supervisor
        notes = list(sup.notes)
        workers = sorted(sup.workers.items())
        seen = tuple((g, w, w.published_status(), w.spec) for g, w in workers)
        out: dict[str, Any] = {
            "runtime": sup.runtime.kind,
            "notes": notes,
            "gpus": {str(g): dict(st) for g, _, st, _ in seen},
        }
        if since >= 0:
            out["progress"] = [p for _, w in workers for p in w.progress(since)]
        body = dumps(redact_status(out, self._known_secrets())).encode() + b"\n"
        if since < 0:
            # The cache holds the objects it compares by identity, so none of them can be replaced by a look-alike while cached.
            self._status_cache = _StatusBody(seen, len(notes), body)
        return body

    async def _metrics_body(self) -> bytes:
        if self._metrics_fresh is not None:
            body = self._metrics_fresh()
            if body is not None:
                return body
        fut = self._metrics_inflight
        if fut is None or fut.done():
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._metrics_pool, self._render_metrics)
            self._metrics_inflight = fut
        return await asyncio.shield(fut)

    # ------------------------------------------------------------ POST /switch

    async def switch(self, request: web.Request) -> web.StreamResponse:
        if self.switch_refusal is not None:
            raise HttpError(409, self.switch_refusal, close=True)
        body = parse_body(SwitchBody, body_of(request))
        gpu, model, companions = self._target(body)
        if body.sleep and (model is not None or companions):
            raise HttpError(400, "field `sleep` puts the GPU's models to sleep: send it with model null and no companions", "sleep")
        worker = self.supervisor.workers[gpu]
        held = worker.holds_against(model)
        if held and not body.force and model is not None:
            # A demand like any other: it waits for the holds on the running model (drain), then switches.
            worker.demand_switch(model, companions or ())
            log.info("gpu%d: switch to %r queued behind %d hold(s) over HTTP", gpu, model, held)
            queued = {
                "gpu": gpu,
                "activeModel": model,
                "queued": True,
                "holds": held,
                "progressSeq": worker.published_status().get("progressSeq", 0),
            }
            return web.json_response(queued, status=202, dumps=dumps)
        loop = asyncio.get_running_loop()
        if self._switch_lock is None:
            self._switch_lock = asyncio.Lock()
        async with self._switch_lock:
            if self.state is not None:
                try:
                    await loop.run_in_executor(None, self.state.check_writable)
                except Exception as err:
                    log.warning("gpu%d: switch to %r refused: %s", gpu, model, err)
                    raise HttpError(507, f"the switch was not applied: {err}") from None
            seq = worker.published_status().get("progressSeq", 0)
            try:
                d = await loop.run_in_executor(None, functools.partial(worker.request, model, companions, "api", keep_asleep=body.sleep))
            except DesiredStateError as err:
                field = (err.field or "model").replace("activeModel", "model")
                raise HttpError(422, str(err), field.split("[")[0]) from None
            except Exception as err:  # the state write failed after the check above
                log.error("gpu%d: switch to %r could not be recorded: %s", gpu, model, err)
                raise HttpError(507, f"the switch could not be recorded: {err}") from None
        log.info("gpu%d: switch to %r requested over HTTP (generation %d)", gpu, d.active, d.generation)
        payload = {"gpu": gpu, "activeModel": d.active, "companions": list(d.companions), "generation": d.generation, "progressSeq": seq}
        return web.json_response(payload, status=202, dumps=dumps)

    def _target(self, body: SwitchBody) -> tuple[int, str | None, tuple[str, ...] | None]:
        """(gpu, model or None, companions or None); HttpError names the first wrong field."""
        workers = self.supervisor.workers
        gpu = body.gpu
        if gpu is None:
            if len(workers) != 1:
                raise HttpError(400, f"this host has {len(workers)} GPUs: say which with `gpu`", "gpu")
            gpu = next(iter(workers))
        if gpu not in workers:
            raise HttpError(404, f"gpu {gpu} is not managed here; managed: {sorted(workers)}", "gpu")
        worker = workers[gpu]
        known = sorted(worker.spec.models)
        for name, field in [(body.model, "model"), *((c, "companions") for c in body.companions or ())]:
            if name and name not in worker.spec.models:
                raise HttpError(422, f"unknown model {name!r} on gpu {gpu}: the known models are {', '.join(known)}", field)
        return gpu, body.model or None, tuple(body.companions) if body.companions is not None else None
