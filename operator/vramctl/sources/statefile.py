"""The compose-mode state file: desired state in, status out.

One JSON document, rewritten atomically (temp file + fsync + rename) under an
``fcntl`` lock, so a ``vramctl switch`` run while no supervisor is up and the
supervisor itself never interleave writes. Desired state carries a
generation that only grows; status records which generation it reflects.

What it promises about broken input and a broken disk:

- Reading never raises and never changes the file. A file that is not
  UTF-8 JSON, not an object, or holds an entry of the wrong shape is
  *damaged*: ``problem()`` says which file and why, and the damaged part
  reads as absent. The caller decides what absent means (the supervisor
  keeps the model that runs rather than the config's default) and may
  ``set_aside()`` the file (``.corrupt-<time>``) before writing a new one.
- A write that fails raises ``StateWriteError`` naming the file and the
  reason (read-only, full, not a directory). Desired state is written
  before it is acted on, so a failed write means the request was refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vramctl.host.procfs import read_cmdline, read_stat, started_at
from vramctl.observed import Desired
from vramctl.status.redact import redact_status

VERSION = 1
MAX_BYTES = 4 * 1024 * 1024
# JSON numbers beyond this lose precision in other readers (and 1e400 is inf).
MAX_GENERATION = 2**53

log = logging.getLogger("vramctl.state")


class StateWriteError(Exception):
    """The state file could not be written; the message names it and says why."""


def _empty() -> dict[str, Any]:
    return {"version": VERSION, "gpus": {}}


def _parse_desired(entry: Any) -> Desired | str:
    """The recorded desired state, or why the entry is damaged."""
    if not isinstance(entry, dict):
        return f"desired is a {type(entry).__name__}, not an object"
    active = entry.get("activeModel")
    if active is not None and not isinstance(active, str):
        return f"desired.activeModel is a {type(active).__name__}, not a model name"
    companions = entry.get("companions", [])
    if companions is None:
        companions = []
    if not isinstance(companions, list) or not all(isinstance(c, str) for c in companions):
        return "desired.companions is not a list of model names"
    gen = entry.get("generation", 0)
    if type(gen) is not int or not 0 <= gen < MAX_GENERATION:
        return f"desired.generation is {gen!r}, not a whole number from 0 to 2^53"
    keep = entry.get("keepAsleep", False)
    if not isinstance(keep, bool):
        return f"desired.keepAsleep is {keep!r}, not true or false"
    return Desired(active or None, tuple(companions), gen, keep and not active and not companions)


def _config_default_problem(entry: Any) -> str | None:
    """Why a recorded ``configDefault`` (the config's activeModel and
    companions when the desired state was recorded) is damaged, or None.
    A damaged one says nothing about whether the config changed since: it
    must not pass for "changed" and switch the GPU to the config's model."""
    if not isinstance(entry, dict):
        return f"configDefault is {entry!r:.60}, not an object with activeModel and companions"
    active = entry.get("activeModel")
    if active is not None and not isinstance(active, str):
        return f"configDefault.activeModel is {active!r:.60}, not a model name"
    companions = entry.get("companions", [])
    if not isinstance(companions, list) or not all(isinstance(c, str) for c in companions):
        return f"configDefault.companions is {companions!r:.60}, not a list of model names"
    return None


def _entry_problem(entry: dict[str, Any]) -> str | None:
    """The first damage of one GPU's entry (its desired state, its configDefault), or None."""
    if "desired" in entry:
        parsed = _parse_desired(entry["desired"])
        if isinstance(parsed, str):
            return parsed
    if "configDefault" in entry:
        return _config_default_problem(entry["configDefault"])
    return None


class StateFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._problem: str | None = None
        self._gpu_problems: dict[str, str] = {}  # per GPU entry, sticky like _problem
        self._reported: str | None = None  # the damage last logged
        self._write_failed: str | None = None  # the status write failure last logged

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self._lock_path, "a+")  # noqa: SIM115 - held for the block below
        except OSError as err:
            raise StateWriteError(f"cannot write the state file {self.path}: {err.strerror or err}") from None
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- reading ---------------------------------------------------------

    def problem(self) -> str | None:
        """Why the file was found damaged, at any read since this object was made
        (None: it was always fine or absent)."""
        return self._problem

    def set_aside(self) -> str | None:
        """Move a damaged file to ``<name>.corrupt-<time>`` (kept for the user); its new name, or None."""
        backup = self.path.with_name(self.path.name + f".corrupt-{int(time.time())}")
        try:
            os.replace(self.path, backup)
        except OSError:
            return None
        if self._problem is not None:
            self._problem += f" (kept as {backup.name})"
        return backup.name

    def read(self) -> dict[str, Any]:
        """The document; never raises. A damaged file reads as empty (see ``problem()``)."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return _empty()
        except OSError as err:
            return self._damaged(f"cannot be read: {err.strerror or err}")
        why = None
        data: Any = None
        if len(raw) > MAX_BYTES:
            why = f"is larger than {MAX_BYTES // (1024 * 1024)} MiB"
        elif not raw.strip():
            why = "is empty"
        else:
            try:
                data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
            except UnicodeDecodeError as err:
                why = f"is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})"
            except (ValueError, RecursionError) as err:
                why = f"is not valid JSON ({str(err)[:120] or type(err).__name__})"
        if why is None:
            if not isinstance(data, dict):
                why = f"holds a JSON {type(data).__name__}, not an object"
            elif not isinstance(data.get("gpus", {}), dict):
                why = "has `gpus` that is not an object"
        if why is not None:
            return self._damaged(why)
        data.setdefault("gpus", {})
        for key, entry in data["gpus"].items():
            if not isinstance(entry, dict):
                self._gpu_problems.setdefault(key, f"state file {self.path}: gpus.{key} is a {type(entry).__name__}, not an object")
            elif (problem := _entry_problem(entry)) is not None:
                self._gpu_problems.setdefault(key, f"state file {self.path}: gpus.{key}.{problem}")
        return data  # type: ignore[no-any-return]

    def _damaged(self, why: str) -> dict[str, Any]:
        message = f"state file {self.path} {why}"
        self._problem = message
        if self._reported != message:
            self._reported = message
            log.warning("%s", message)
        return _empty()

    def _gpu_entry(self, data: dict[str, Any], gpu: int) -> dict[str, Any]:
        entry = data["gpus"].get(str(gpu), {})
        return entry if isinstance(entry, dict) else {}

    def desired_or_problem(self, gpu: int) -> tuple[Desired | None, str | None]:
        """(the recorded desired state of ``gpu`` or None, why it could not be used or None)."""
        data = self.read()
        if self._problem is not None:
            return None, self._problem
        if str(gpu) in self._gpu_problems:
            return None, self._gpu_problems[str(gpu)]
        raw = data["gpus"].get(str(gpu))
        if not isinstance(raw, dict) or "desired" not in raw:
            return None, None
        parsed = _parse_desired(raw["desired"])
        return (parsed, None) if isinstance(parsed, Desired) else (None, f"state file {self.path}: gpus.{gpu}.{parsed}")

    def desired(self, gpu: int) -> Desired | None:
        return self.desired_or_problem(gpu)[0]

    def costs(self, gpu: int) -> Any:
        """The switch costs last recorded with ``gpu``'s status (its ``costs``;
        ``vramctl.costs.CostBook.from_dict`` reads them and drops what is
        damaged), or None: a restarted supervisor keeps what it learned."""
        status = self._gpu_entry(self.read(), gpu).get("status")
        return status.get("costs") if isinstance(status, dict) else None

    def config_default(self, gpu: int) -> dict[str, Any] | None:
        entry = self._gpu_entry(self.read(), gpu).get("configDefault")
        return entry if isinstance(entry, dict) else None

    # --- writing ---------------------------------------------------------

    def update(self, mutate: Callable[[dict[str, Any]], None], durable: bool = False) -> dict[str, Any]:
        """Read, ``mutate``, write atomically. ``durable``: fsync before the rename
        (desired state: what a restart acts on). Raises StateWriteError."""
        with self._locked():
            data = self.read()
            data["gpus"] = {k: v for k, v in data["gpus"].items() if isinstance(v, dict)}
            for key in self._gpu_problems:
                # A damaged desired entry or configDefault is not carried on as if it were valid.
                entry = data["gpus"].get(key)
                if isinstance(entry, dict) and isinstance(_parse_desired(entry.get("desired")), str):
                    entry.pop("desired", None)
                if isinstance(entry, dict) and "configDefault" in entry and _config_default_problem(entry["configDefault"]):
                    entry.pop("configDefault", None)
            mutate(data)
            data["version"] = VERSION
            tmp: str | None = None
            try:
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
                with os.fdopen(fd, "w") as fh:
                    json.dump(data, fh, indent=2, sort_keys=True)
                    fh.write("\n")
                    fh.flush()
                    if durable:
                        os.fsync(fh.fileno())
                os.replace(tmp, self.path)
                tmp = None
            except OSError as err:
                raise StateWriteError(f"cannot write the state file {self.path}: {err.strerror or err}") from None
            finally:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            return data

    def check_writable(self) -> None:
        """Rewrite the file as it is (durably): StateWriteError when it cannot be."""
        self.update(lambda _data: None, durable=True)

    def write_desired(self, gpu: int, desired: Desired, source: str, config_default: dict[str, Any] | None = None) -> None:
        def mutate(data: dict[str, Any]) -> None:
            g = data["gpus"].setdefault(str(gpu), {})
            g["desired"] = {
                "activeModel": desired.active,
                "companions": list(desired.companions),
                "generation": desired.generation,
                **({"keepAsleep": True} if desired.keep_asleep else {}),
                "source": source,
                "requestedAt": time.time(),
            }
            if config_default is not None:
                g["configDefault"] = config_default

        self.update(mutate, durable=True)

    def next_generation(self, gpu: int) -> int:
        d = self.desired(gpu)
        return (d.generation if d else 0) + 1

    # --- status ----------------------------------------------------------

    def write_status(self, gpu: int, status: dict[str, Any]) -> None:
        """Status is a report, not a decision: a failed write is logged once
        (until writes work again), never raised into the worker's loop."""
        clean = redact_status(status)

        def mutate(data: dict[str, Any]) -> None:
            data["gpus"].setdefault(str(gpu), {})["status"] = clean

        try:
            self.update(mutate)
        except StateWriteError as err:
            if self._write_failed != str(err):
                self._write_failed = str(err)
                log.warning("gpu%d: status not recorded: %s", gpu, err)
            return
        if self._write_failed is not None:
            self._write_failed = None
            log.info("gpu%d: status is recorded again in %s", gpu, self.path)

    def write_supervisor(self, info: dict[str, Any] | None) -> None:
        def mutate(data: dict[str, Any]) -> None:
            if info is None:
                data.pop("supervisor", None)
            else:
                data["supervisor"] = info

        self.update(mutate)


def running_supervisor(state: StateFile) -> int | None:
    """The pid of the ``vramctl up`` this state file records, while it still
    runs: the process exists and is not exiting, runs vramctl, and started
    before it recorded itself (a pid reused since started later). None
    otherwise: none recorded, or it ended (cleanly, or killed)."""
    sup = state.read().get("supervisor")
    if not isinstance(sup, dict):
        return None
    pid, at = sup.get("pid"), sup.get("startedAt")
    if type(pid) is not int or pid <= 1 or pid == os.getpid() or not isinstance(at, (int, float)):
        return None
    st = read_stat(pid)
    if st is None or st.exited:
        return None
    began = started_at(st)
    if began is None or began > at + 1.0:
        return None
    return pid if any("vramctl" in a for a in read_cmdline(pid)) else None


def _no_constant(name: str) -> float:
    """NaN and Infinity are not JSON: a file holding them is damaged."""
    raise ValueError(f"{name} is not a JSON number")

