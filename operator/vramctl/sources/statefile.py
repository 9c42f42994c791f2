"""The compose-mode state file: desired state in, status out.

One JSON document, rewritten atomically (temp file + rename) under an
``fcntl`` lock, so a ``vramctl switch`` run while no supervisor is up and the
supervisor itself never interleave writes. Desired state carries a
generation that only grows; status records which generation it reflects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vramctl.observed import Desired

VERSION = 1


class StateFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"version": VERSION, "gpus": {}}
        except (OSError, ValueError) as err:
            # A corrupt file must not crash-loop the supervisor: keep a copy, start over.
            backup = self.path.with_name(self.path.name + f".corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, backup)
            return {"version": VERSION, "gpus": {}, "recovered": f"unreadable state file moved to {backup.name}: {err}"}
        if not isinstance(data, dict) or not isinstance(data.get("gpus"), dict):
            return {"version": VERSION, "gpus": {}}
        return data

    def update(self, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        with self._locked():
            data = self.read()
            mutate(data)
            data["version"] = VERSION
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(data, fh, indent=2, sort_keys=True)
                    fh.write("\n")
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return data

    # --- desired ---------------------------------------------------------

    def desired(self, gpu: int) -> Desired | None:
        entry = self.read()["gpus"].get(str(gpu), {}).get("desired")
        if not isinstance(entry, dict):
            return None
        return Desired(
            active=entry.get("activeModel") or None,
            companions=tuple(entry.get("companions") or ()),
            generation=int(entry.get("generation", 0)),
        )

    def config_default(self, gpu: int) -> dict[str, Any] | None:
        entry = self.read()["gpus"].get(str(gpu), {}).get("configDefault")
        return entry if isinstance(entry, dict) else None

    def write_desired(self, gpu: int, desired: Desired, source: str, config_default: dict[str, Any] | None = None) -> None:
        def mutate(data: dict[str, Any]) -> None:
            g = data["gpus"].setdefault(str(gpu), {})
            g["desired"] = {
                "activeModel": desired.active,
                "companions": list(desired.companions),
                "generation": desired.generation,
                "source": source,
                "requestedAt": time.time(),
            }
            if config_default is not None:
                g["configDefault"] = config_default

        self.update(mutate)

    def next_generation(self, gpu: int) -> int:
        d = self.desired(gpu)
        return (d.generation if d else 0) + 1

    # --- status ----------------------------------------------------------

    def write_status(self, gpu: int, status: dict[str, Any]) -> None:
        def mutate(data: dict[str, Any]) -> None:
            data["gpus"].setdefault(str(gpu), {})["status"] = status

        self.update(mutate)

    def write_supervisor(self, info: dict[str, Any] | None) -> None:
        def mutate(data: dict[str, Any]) -> None:
            if info is None:
                data.pop("supervisor", None)
            else:
                data["supervisor"] = info

        self.update(mutate)
