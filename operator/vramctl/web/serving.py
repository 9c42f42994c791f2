"""Request-driven serving for a whole supervisor: holds and the gateway.

``SupervisorHolder`` is the event loop's side of every GPU's hold queue:
it posts demands into the right worker's inbox (``GpuWorker.post``) and
waits for the answer, and it tells the gateway where each model is served.
``GatewayServer`` runs the OpenAI-style gateway, and ``/holds`` beside it,
on an address of its own (``vramctl up --gateway 127.0.0.1:9401``), in a
thread with its own event loop; the API server mounts ``HoldsApi`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from vramctl.demand.desk import DeskCommand, Grant, InboxHolder, Lease, Refused
from vramctl.web.api import is_loopback
from vramctl.web.gateway import MAX_BODY, Gateway, ModelInfo, Route
from vramctl.web.holds import HoldsApi
from vramctl.worker.actor import GpuWorker
from vramctl.worker.supervisor import Supervisor


class SupervisorHolder(InboxHolder):
    """Holds on the models of every worker of ``supervisor`` (found by name)."""

    def __init__(self, supervisor: Supervisor, clock: Callable[[], float] = time.monotonic) -> None:
        self.supervisor = supervisor
        super().__init__(self._post, self._gpu_of, self._priority_of, clock)

    def _worker_of(self, model: str) -> GpuWorker:
        for w in list(self.supervisor.workers.values()):
            if model in w.spec.models:
                return w
        raise KeyError(model)

    def _gpu_of(self, model: str) -> str:
        return str(self._worker_of(model).gpu)

    def _priority_of(self, model: str) -> int:
        return int(self._worker_of(model).spec.models[model].priority)

    def _post(self, gpu: str, cmd: DeskCommand) -> None:
        w = self.supervisor.workers.get(int(gpu))
        if w is None:
            raise KeyError(f"no worker for gpu {gpu}")
        w.post(cmd)

    async def demand(self, model: str, **kw: Any) -> Grant:
        """Refused at once (409) where the spec decides: switching.mode
        declared admits holds only on the models it already runs."""
        w = self._worker_of(model)
        d = w.desired
        if w.spec.switching.mode == "declared" and model not in d.members:
            raise Refused(
                409,
                f"{model!r} is not running and gpu {w.gpu} uses switching.mode declared: the spec decides "
                f"({d.active or 'no model'} runs); set switching.mode onDemand to let holds and the gateway switch",
            )
        return await super().demand(model, **kw)

    def admit(self, model: str) -> Lease | None:
        """The gateway's hold for one request through the worker's fast lane,
        when it admits ``model`` (served, nothing queued); else None."""
        w = self._worker_of(model)
        return w.lane.admit(model)

    def names(self) -> list[str]:
        return sorted({m for w in list(self.supervisor.workers.values()) for m in w.spec.models})

    def resolve(self, name: str) -> Route | None:
        for w in list(self.supervisor.workers.values()):
            spec = w.spec
            for m, ms in spec.models.items():
                if name in (m, spec.served_name(m)):
                    h = spec.health_of(m)
                    if h is None or h.port is None:
                        return None
                    host = f"[{h.host}]" if ":" in h.host else h.host
                    return Route(m, f"http://{host}:{h.port}", str(w.gpu), spec.served_name(m), ms.engine)
        return None

    def models(self) -> list[ModelInfo]:
        out = []
        for w in list(self.supervisor.workers.values()):
            states, active = w.model_states(), w.desired.active
            for m, ms in sorted(w.spec.models.items()):
                out.append(ModelInfo(m, w.spec.served_name(m), str(w.gpu), states.get(m, "absent"), ms.engine, m == active))
        return out


def holds_refusal(refusal: str | None) -> Callable[[str], Refused | None]:
    """Holds refused up front (the spec decides: Kubernetes' declared mode), or none."""
    return (lambda _model: Refused(409, refusal)) if refusal else (lambda _model: None)


class GatewayServer:
    """The gateway and ``/holds`` on their own address, in a thread of their own."""

    def __init__(
        self,
        holder: SupervisorHolder,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        token: str | None = None,
        refusal: str | None = None,
    ) -> None:
        if not is_loopback(host) and not token:
            raise ValueError(f"the gateway on {host} (not loopback) needs a token: pass --token or set VRAMCTL_TOKEN")
        self.host, self.port = host, port
        self.gateway = Gateway(holder, registry, token=token)
        for info in holder.models():  # label sets at zero: rates over the first requests are not NaN
            self.gateway.metrics.requests.labels(info.gpu, info.name, "200")
            self.gateway.metrics.duration.labels(info.gpu, info.name)
            self.gateway.metrics.in_flight.labels(info.gpu, info.name)
        self.holds = HoldsApi(holder, holder.names, refusal=holds_refusal(refusal), token=token)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if HoldsApi.matches(request.path):
            return await self.holds.handle(request)
        return await self.gateway.handle(request)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vramctl-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the gateway did not start within 10 s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=MAX_BODY, handler_args={"max_field_size": 16 * 1024})
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        await self.gateway.start()
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=75)
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
            await site.start()
            server: Any = site._server  # the bound port, when 0 was asked for
            if self.port == 0 and server is not None and server.sockets:
                self.port = int(server.sockets[0].getsockname()[1])
        except OSError as err:
            self._error = err
            asyncio.get_running_loop().stop()
        finally:
            self._ready.set()

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def down() -> None:
            with contextlib.suppress(Exception):
                if self._runner is not None:
                    await self._runner.cleanup()
                await self.gateway.close()
            asyncio.get_running_loop().stop()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(down(), loop)
        self._thread.join(10)
