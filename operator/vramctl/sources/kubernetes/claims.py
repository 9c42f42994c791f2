"""Claims on a GPU: two ModelDeployments naming this node and the same GPU.

Why: one GPU has one owner, whatever order kopf delivers the objects in. The
older ModelDeployment (by creationTimestamp) keeps the GPU; the newer gets
Degraded, reason Conflict, naming the other, and one Warning Event, and
nothing runs for it. An older one seen second (e.g. after a restart) takes
the GPU from the newer. When the holder goes (deleted, moved), the waiting
ones are applied again, oldest first (``waiting``).

All methods expect the controller's lock held; none blocks.
"""

from __future__ import annotations

import logging

from vramctl.sources.kubernetes.entries import Entry, Key, Retiring
from vramctl.sources.kubernetes.outbox import Outbox
from vramctl.sources.kubernetes.status import Conflict

log = logging.getLogger("vramctl.kubernetes")


class GpuClaims:
    """Decides which entry holds a GPU; reports the others as conflicted."""

    def __init__(self, entries: dict[Key, Entry], outbox: Outbox, node_name: str) -> None:
        self.entries, self.outbox, self.node_name = entries, outbox, node_name

    def claim(self, entry: Entry, gpu: int, generation: int | None) -> tuple[bool, Retiring | None]:
        """May ``entry`` (at ``generation``) hold ``gpu``? Also what must retire:
        ``entry``'s worker when an older one holds the GPU, else the newer holder's."""
        holder = self.holder(entry, gpu)
        if holder is None:
            return True, None
        if holder.age_key() < entry.age_key():
            self.conflicted(entry, holder, gpu, generation)
            return False, entry.detach()
        # This one is older (seen second, e.g. after a restart): it takes the GPU.
        self.conflicted(holder, entry, gpu, holder.raw_generation)
        return True, holder.detach()

    def holder(self, entry: Entry, gpu: int) -> Entry | None:
        """The other entry whose worker runs ``gpu``, if any."""
        for other in self.entries.values():
            if other is not entry and not other.gone and other.worker is not None and other.worker.gpu == gpu:
                return other
        return None

    def conflicted(self, entry: Entry, holder: Entry, gpu: int, generation: int | None) -> None:
        """``entry`` waits for ``holder``'s GPU: a Conflict on its status, one Event per holder."""
        conflict = Conflict(holder.namespace, holder.name, gpu)
        if entry.conflict != conflict:
            self.outbox.event(
                entry.ref(),
                "Warning",
                "Conflict",
                f"gpu {gpu} of node {self.node_name} is already managed by ModelDeployment {holder.namespace}/{holder.name} "
                "(older): nothing runs for this one until that one is deleted or moved",
            )
            log.warning("%s/%s: gpu %d is held by %s/%s: conflict", entry.namespace, entry.name, gpu, holder.namespace, holder.name)
        entry.conflict, entry.problem_generation = conflict, generation
        entry.problems, entry.reported = [], None
        self.outbox.mark(entry)

    def waiting(self) -> list[Entry]:
        """The conflicted entries with a spec to apply again, oldest first."""
        return sorted((e for e in self.entries.values() if e.conflict is not None and e.raw is not None), key=Entry.age_key)
