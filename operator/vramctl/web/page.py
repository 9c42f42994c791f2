"""``GET /``: the status page, and what it reads beside the event stream.

One HTML page, one stylesheet and one JavaScript module, served from the
package's ``static/`` folder as they are (no build step). The page follows
``GET /events`` and acts through the same routes as any client
(``POST /switch``, ``DELETE /holds/{id}``), so the API's guards apply to it
unchanged: same origin only, the Host allow-list, the bearer token off
loopback (the page asks for it and keeps it in ``sessionStorage``, never in
a URL).

Every answer carries a Content-Security-Policy that allows scripts, styles,
images and connections from this origin only, no inline script or style,
no framing: the page loads nothing from anywhere else.

``memory_view`` and ``page_extra`` are what the event stream adds for the
page: each GPU's memory split by model (residues of sleeping models and
memory held by processes that are not vramctl's shown apart), and what the
page needs to draw every model of the spec (also those that never ran).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from vramctl.web.events import EventStream
from vramctl.web.events import add_routes as add_event_routes
from vramctl.web.guards import public
from vramctl.worker.actor import GpuWorker
from vramctl.worker.supervisor import Supervisor

CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Model states in which a model holds GPU memory (beside "asleep": its residue).
_HOLDING = frozenset({"running", "starting", "stopping", "sleeping", "waking", "paused"})


class StatusPage:
    """Serves ``/`` and ``/static/{name}`` from the package, read once."""

    def __init__(self) -> None:
        root = importlib.resources.files("vramctl.web") / "static"
        self.files = {name: (root / name).read_bytes() for name in FILES}

    @staticmethod
    def matches(path: str) -> bool:
        return path == "/" or path.startswith("/static/")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.json_response({"error": f"{request.rel_url.path} answers GET only"}, status=405, headers={"Allow": "GET, HEAD"})
        path = request.rel_url.path
        name = "index.html" if path == "/" else path.removeprefix("/static/")
        body = self.files.get(name)
        if body is None:
            return web.json_response({"error": f"no such file {path!r}"}, status=404, headers=HEADERS)
        return web.Response(body=body, headers={**HEADERS, "Content-Type": FILES[name]})


def add_routes(app: web.Application, page: StatusPage) -> None:
    """``GET /`` and ``/static/{name}``: public reads (what they show, ``/status`` shows)."""
    app.router.add_get("/", public(page.handle))
    app.router.add_get("/static/{name}", public(page.handle))


def status_page(supervisor: Supervisor, *, refusal: str | None = None, token_set: bool = False) -> Callable[[web.Application], None]:
    """The route adder of the page and ``GET /events`` over ``supervisor``
    (``FaceOptions.api_routes``). ``refusal``: why the page may not act
    (the desired state comes from ModelDeployments), shown on it."""
    page = StatusPage()
    stream = event_stream_for(supervisor, refusal=refusal, token_set=token_set)

    def add(app: web.Application) -> None:
        add_routes(app, page)
        add_event_routes(app, stream)

    return add


# ------------------------------------------------------------ what the page reads


def memory_view(worker: GpuWorker) -> dict[str, Any]:
    """``worker``'s GPU memory now, in MiB: used and total, each model's part
    (per process where the probe tells, else its declared reservation),
    memory of processes that are not vramctl's (``foreignMiB``), the rest
    above the baseline (``otherMiB``). Blocking (reads the probe)."""
    snap = worker.probe.snapshot()
    spec, states = worker.spec, dict(worker.model_states())
    total, used = snap.memory.total_mib, snap.memory.used_mib
    models: dict[str, int] = {}
    foreign = 0
    if snap.processes is not None:
        for p in snap.processes:
            if p.model is None:
                foreign += p.used_mib or 0
            elif p.used_mib:
                models[p.model] = models.get(p.model, 0) + p.used_mib
    for m, st in states.items():
        if m not in models and st in _HOLDING and m in spec.models:
            models[m] = spec.reservation_mib(m, total) or 0
    baseline = worker.baseline_mib or 0
    return {
        "totalMiB": total,
        "usedMiB": used,
        "baselineMiB": baseline,
        "models": dict(sorted(models.items())),
        "asleep": sorted(m for m, st in states.items() if st == "asleep"),
        "foreignMiB": foreign,
        "otherMiB": max(0, used - baseline - sum(models.values()) - foreign),
    }


def page_extra(supervisor: Supervisor, refusal: str | None, token_set: bool) -> Callable[[], Mapping[str, Any]]:
    """What the hello adds to the journal's view: the runtime, the notes, each
    GPU's models as the spec declares them, ``readOnly`` (why the page may not
    act, when the desired state comes from elsewhere), ``tokenSet``."""

    def extra() -> Mapping[str, Any]:
        specs: dict[str, Any] = {}
        for g, w in sorted(supervisor.workers.items()):
            spec = w.spec
            specs[str(g)] = {
                "deployment": spec.display_name,
                "models": {
                    name: {
                        "class": "heavy" if m.heavy else "light",
                        "canSleep": m.warm_switch,
                        "switchStrategy": m.switch_strategy,
                        "reservationMiB": spec.reservation_mib(name),
                    }
                    for name, m in sorted(spec.models.items())
                },
            }
        return {
            "runtime": supervisor.runtime.kind,
            "notes": list(supervisor.notes),
            "specs": specs,
            "readOnly": refusal,
            "tokenSet": token_set,
        }

    return extra


def event_stream_for(supervisor: Supervisor, *, refusal: str | None = None, token_set: bool = False) -> EventStream:
    """The ``GET /events`` handler of ``supervisor``'s journal, with the page's additions."""

    cache: dict[int, tuple[object, frozenset[str]]] = {}

    def secrets() -> frozenset[str]:
        out: set[str] = set()
        for g, w in list(supervisor.workers.items()):
            spec = w.spec
            if g not in cache or cache[g][0] is not spec:
                cache[g] = (spec, spec.secrets())
            out |= cache[g][1]
        return frozenset(out)

    def memory() -> Mapping[int, Mapping[str, Any]]:
        out: dict[int, Mapping[str, Any]] = {}
        for g, w in sorted(supervisor.workers.items()):
            try:
                out[g] = memory_view(w)
            except Exception:
                continue  # the probe cannot tell now: no sample rather than a wrong one
        return out

    return EventStream(supervisor.journal, secrets=secrets, extra=page_extra(supervisor, refusal, token_set), memory=memory)
