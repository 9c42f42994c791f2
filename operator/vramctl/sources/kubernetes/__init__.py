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
