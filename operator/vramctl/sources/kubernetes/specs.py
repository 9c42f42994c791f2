"""A ModelDeployment's raw ``.spec``: parsed, validated, and its problems reported.

Why: the operator reads ``.spec`` with the same pydantic ``DeploymentSpec`` as
the config file, then asks the runtime what it cannot do. Every problem is a
(``spec.<field>``, message) pair, so the Degraded condition and the one
Warning Event name the field as kubectl shows it. An invalid spec stops
nothing: the worker keeps the last valid one.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from vramctl.runtimes.base import Runtime
from vramctl.sources.kubernetes.client import KIND
from vramctl.sources.kubernetes.entries import Entry
from vramctl.sources.kubernetes.outbox import Outbox
from vramctl.spec.models import ConfigError, DeploymentSpec, problems_from

log = logging.getLogger("vramctl.kubernetes")


class InvalidSpec(Exception):
    """The spec cannot be acted on; ``problems`` are (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


def spec_path(path: str) -> str:
    """A field path of ``DeploymentSpec`` as the ModelDeployment spells it."""
    return "spec" if path in ("", "(top level)") else f"spec.{path}"


def parse_spec(name: str, raw: dict[str, Any], runtime: Runtime) -> DeploymentSpec:
    """``raw`` as a ``DeploymentSpec`` this runtime can run; raises InvalidSpec."""
    try:
        spec = DeploymentSpec.model_validate({**raw, "name": name})
    except ValidationError as err:
        raise InvalidSpec([(spec_path(p), m) for p, m in problems_from(err)]) from None
    problems = runtime.validate(spec)
    if problems:
        raise InvalidSpec([(spec_path(p), m) for p, m in problems])
    return spec


def report_invalid(outbox: Outbox, entry: Entry, generation: int | None, problems: list[tuple[str, str]]) -> None:
    """Remember ``problems`` for the status (lock held); one Warning Event per
    generation and set of problems, however often the spec is delivered."""
    entry.problems, entry.problem_generation = problems, generation
    rendered = ConfigError(f"{KIND} {entry.namespace}/{entry.name}", problems).render()
    if entry.reported != (generation, rendered):
        entry.reported = (generation, rendered)
        what = "not applied; the models keep running as before" if entry.worker is not None else "nothing is started"
        msg = "invalid spec, " + what + ": " + "; ".join(f"{p}: {m}" for p, m in problems)
        outbox.event(entry.ref(), "Warning", "InvalidSpec", msg)
        log.warning("%s/%s: %s", entry.namespace, entry.name, rendered)
    outbox.mark(entry)
