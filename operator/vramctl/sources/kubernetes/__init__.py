"""Kubernetes: ModelDeployment resources in; ``.status`` and Events out.

- ``client``: the blocking API client with kopf's credentials (retries with
  back-off through tenacity);
- ``status``: the ``.status`` document, rendered by a pure function;
- ``controller``: the bridge from specs to this node's GPU workers (one
  lock), with its parts: ``specs`` (parse and validate a raw spec),
  ``entries`` (what is known of each ModelDeployment), ``claims`` (two of
  them naming one node and GPU: the older keeps it), ``workers`` (starting,
  updating and retiring an entry's worker), ``outbox`` (what to publish,
  Events queued), ``writer`` (the thread that writes status and Events);
- ``handlers``: kopf's wiring (the only place that registers handlers).

Only this package imports kopf (an import-linter contract).
"""

from vramctl.sources.kubernetes.client import API_VERSION, GROUP, KIND, PLURAL, VERSION, KubeApi, KubeApiError, Session, StatusApi, login
from vramctl.sources.kubernetes.controller import EVENT_STEPS, SOURCE, InvalidSpec, ModelDeployments
from vramctl.sources.kubernetes.handlers import TIMER_INTERVAL_S, build_registry, finalizer_for, run
from vramctl.sources.kubernetes.status import HandedDesired, StatusSnapshot, render_status

__all__ = [
    "API_VERSION",
    "EVENT_STEPS",
    "GROUP",
    "KIND",
    "PLURAL",
    "SOURCE",
    "TIMER_INTERVAL_S",
    "VERSION",
    "HandedDesired",
    "InvalidSpec",
    "KubeApi",
    "KubeApiError",
    "ModelDeployments",
    "Session",
    "StatusApi",
    "StatusSnapshot",
    "build_registry",
    "finalizer_for",
    "login",
    "render_status",
    "run",
]
