"""Taking down what one vramctl instance runs: at a graceful stop of
``vramctl up`` (process runtime) and for ``vramctl down``.

What stays and what goes, per runtime (the README says the same):

- process: the models are vramctl's children; a graceful stop of ``up``
  (SIGTERM, Ctrl-C) stops them unless ``--keep-models`` (for a restart that
  adopts them); a crash or SIGKILL leaves them for the next ``up`` to adopt.
- docker: containers outlive ``up`` as compose's do; ``down`` stops them,
  and removes those vramctl created (a compose service's container is only
  stopped: its project owns it).

``take_down`` is called with no worker running, so nothing starts a model
again behind it. Every workload of the instance on the given GPUs is taken,
sleeping ones too (asleep is a running process), and models no longer in the
spec. What was done comes back as one line per model, for the user.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vramctl.observed import WorkloadState
from vramctl.runtimes.base import Runtime
from vramctl.spec.models import DeploymentSpec


@dataclass(frozen=True)
class Taken:
    """One model taken down: what was done to it, in words."""

    gpu: int
    model: str
    said: str


def take_down(runtime: Runtime, deployments: Iterable[DeploymentSpec], remove_created: bool) -> list[Taken]:
    """Stop every workload of these GPUs that the runtime's instance runs;
    with ``remove_created``, also delete those vramctl created (stopped ones
    too). A model that cannot be stopped is reported, never skipped in
    silence; the others are still taken."""
    out: list[Taken] = []
    for d in deployments:
        for model, w in sorted(runtime.observe(d).items()):
            spec = d.models.get(model)
            created = spec is not None and spec.compose_service is None
            pid = f" ({'pid' if runtime.kind == 'process' else runtime.kind} {w.ref[:12]})" if w.ref else ""
            try:
                said = ""
                if w.state.live:
                    outcome = runtime.stop(d, model)
                    said = f"stopped {model}{pid} in {outcome.seconds:.1f}s" + (" (killed after its grace period)" if outcome.killed else "")
                elif w.leftover:
                    runtime.cleanup(d, model)
                    said = f"ended what {model}{pid} left running"
                if remove_created and created and w.state is not WorkloadState.ABSENT:
                    runtime.remove(d, model)
                    said = (said + "; removed its container") if said else f"removed the stopped container of {model}{pid}"
                elif remove_created and not created and said:
                    said += "; its container belongs to its compose project: kept"
            except Exception as err:
                said = f"could not take {model}{pid} down: {err}"
            if said:
                out.append(Taken(d.gpu, model, said))
    return out
