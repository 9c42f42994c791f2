"""Request-driven serving for a whole supervisor: holds and the gateway.

``SupervisorHolder`` is the event loop's side of every GPU's hold queue:
it posts demands into the right worker's inbox (``GpuWorker.post``) and
waits for the answer, and it tells the gateway where each model is served.
One instance serves ``/holds`` and the gateway on every port
(``vramctl.web.server.serve``), so hold ids are known on each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from vramctl.demand.desk import DeskCommand, Grant, InboxHolder, Lease, Refused
from vramctl.demand.policy import retry_after
from vramctl.spec.models import check_desired
from vramctl.web.gateway import ModelInfo, Route
from vramctl.worker.actor import GpuWorker
from vramctl.worker.supervisor import Supervisor


class SupervisorHolder(InboxHolder):
    """Holds on the models of every worker of ``supervisor`` (found by name)."""

    def __init__(self, supervisor: Supervisor, clock: Callable[[], float] = time.monotonic) -> None:
        self.supervisor = supervisor
        super().__init__(self._post, self._gpu_of, self._priority_of, clock)

    def _worker_of(self, model: str) -> GpuWorker:
        # The GPU that declares it; for placement any, the placement rule's choice.
        return self.supervisor.worker_for(model)

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

    def check(self, model: str, companions: Sequence[str]) -> None:
        """Raise DesiredStateError when a hold on ``model`` with ``companions``
        can never be granted: a companion that is unknown, heavy or the model
        itself, or companions that do not fit the declared budget."""
        spec = self._worker_of(model).spec
        if spec.models[model].heavy:
            check_desired(spec, model, companions)
        else:
            check_desired(spec, None, [model, *companions])

    def _retry_after(self, w: GpuWorker, model: str) -> int:
        """When ``model`` is expected to serve again, by the worker's forecast
        from its cost book (the rest of the switch in flight, then the way
        back to ``model``): the same prediction as the queue's Retry-After."""
        return retry_after(w.forecast, model, w.clock())

    def not_ready(self, model: str) -> Refused | None:
        """A 503 while ``model`` is not ready now (the worker's last look)."""
        try:
            w = self._worker_of(model)
        except KeyError:
            return None
        state = w.model_states().get(model, "absent")
        if state == "running":
            return None
        return Refused(503, f"{model} is {state} on gpu {w.gpu}, not ready to answer", self._retry_after(w, model))

    def backend_failed(self, model: str) -> None:
        """Ask ``model``'s worker to observe now (``GpuWorker.poke``)."""
        with contextlib.suppress(KeyError):
            self._worker_of(model).poke()

    def taken_away(self, model: str) -> Refused | None:
        """A 503 when ``model`` is no longer wanted on its GPU (the desired
        state moved away from it), else None. Retry-After: the worker's
        forecast (``_retry_after``), as for a model not ready."""
        try:
            w = self._worker_of(model)
        except KeyError:
            return None
        d = w.desired
        if model in d.members:
            return None
        now = f"{d.active!r}" if d.active else "no model"
        why = f"gpu {w.gpu} was switched to {now}" + (f" with {', '.join(d.companions)}" if d.companions else "")
        return Refused(503, why, self._retry_after(w, model))

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
