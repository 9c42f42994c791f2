"""kopf's handlers for one node's ModelDeployments. They only hand state over.

Why: kopf handlers never act (see ``controller``). create/update/resume and
a timer every ~10 s parse ``.spec`` and pass it to the controller; delete
asks it to remove the GPU's models. An invalid spec is a
``kopf.PermanentError`` (no retry loop: the next edit is handled afresh).

Each instance sees only the ModelDeployments whose ``spec.nodeName`` is its
node: a kopf ``when=`` filter, so kopf itself stores nothing on the others
(no annotations, no status, no events). The finalizer names the node,
because kopf strips its own finalizer from every object it is blind to: a
shared name would let one node's instance release another node's object.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Collection
from typing import Any

import kopf

from vramctl.sources.kubernetes.client import GROUP, PLURAL, VERSION, login
from vramctl.sources.kubernetes.controller import ModelDeployments
from vramctl.sources.kubernetes.specs import InvalidSpec

TIMER_INTERVAL_S = 10.0


def finalizer_for(node: str) -> str:
    """This node's finalizer: ``vramctl.io/node.<node>`` (a qualified name, at most 63 characters after the slash)."""
    name = f"node.{node}"
    if len(name) > 63:
        name = f"node.{node[:40]}-{hashlib.sha256(node.encode()).hexdigest()[:12]}"
    return f"{GROUP}/{name}"


def build_registry(
    controller: ModelDeployments, *, clusterwide: bool = True, timer_interval: float = TIMER_INTERVAL_S
) -> kopf.OperatorRegistry:
    """kopf's handlers for ``controller``'s node. They only hand state over.

    Namespaced (not ``clusterwide``): the namespaces are exact names, and kopf
    does not scan the cluster (no list/watch of namespaces and CRDs), so a
    namespaced Role is enough; the CRD must exist when the operator starts.
    """
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    def concerns(spec: kopf.Spec, namespace: str | None = None, name: str | None = None, **_: Any) -> bool:
        return controller.concerns(namespace, name, spec)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = finalizer_for(controller.node_name)
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
        # Our own Events say what happened; kopf's "Handler succeeded" ones would drown them.
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = "vramctl.io/operator"
        settings.scanning.disabled = not clusterwide
        controller.session.settings = settings
        controller.start()

    @kopf.on.login(registry=registry)
    def log_in(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
        info = login(settings=settings, **kwargs)
        controller.logged_in(settings, info)
        return info

    @kopf.on.resume(*resource, id="reconcile", registry=registry, when=concerns)
    @kopf.on.create(*resource, id="reconcile", registry=registry, when=concerns)
    @kopf.on.update(*resource, id="reconcile", registry=registry, when=concerns)
    def reconcile(
        spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, namespace: str | None, name: str | None, uid: str | None, **_: Any
    ) -> None:
        try:
            controller.apply(
                namespace or "", name or "", uid or "", meta.get("generation"), spec, status, meta.get("creationTimestamp") or ""
            )
        except InvalidSpec as err:
            raise kopf.PermanentError(f"invalid spec: {err}") from None

    @kopf.timer(*resource, id="resync", registry=registry, interval=timer_interval, when=concerns)
    def resync(
        spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, namespace: str | None, name: str | None, uid: str | None, **_: Any
    ) -> None:
        controller.refresh(namespace or "", name or "", uid or "", meta.get("generation"), spec, meta.get("creationTimestamp") or "", status)

    @kopf.on.delete(*resource, id="remove", registry=registry, when=concerns)
    def remove(spec: kopf.Spec, namespace: str | None, name: str | None, **_: Any) -> None:
        try:
            controller.delete(namespace or "", name or "", spec)
        except Exception as err:
            raise kopf.TemporaryError(f"the models could not be removed yet: {err}", delay=5) from err

    @kopf.on.cleanup(registry=registry)
    def stop_writing(**_: Any) -> None:
        controller.close()

    return registry


def run(
    controller: ModelDeployments,
    *,
    clusterwide: bool,
    namespaces: Collection[str] = (),
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
    timer_interval: float = TIMER_INTERVAL_S,
) -> None:
    """Run kopf in this thread until SIGINT/SIGTERM (main thread) or ``stop_flag``.

    Standalone: every node runs its own instance, each acting on other
    objects, so kopf's peering (one active operator per cluster) must not
    pause them.
    """
    kopf.run(
        registry=build_registry(controller, clusterwide=clusterwide, timer_interval=timer_interval),
        standalone=True,
        clusterwide=clusterwide,
        namespaces=list(namespaces),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
