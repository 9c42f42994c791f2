"""The state file against any bytes and any JSON: start-up either adopts a
valid recorded state or keeps what runs and says why, never raises, and
leaves a file that reads back clean."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fakes import FakeRuntime
from tests.support.workers import spec
from vramctl.app import initial_desired, open_state
from vramctl.observed import Desired, WorkloadState
from vramctl.sources.statefile import StateFile, _parse_desired

SPEC = spec()
DEFAULT = {"activeModel": SPEC.active_model, "companions": list(SPEC.companions)}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
desired_like = st.fixed_dictionaries(
    {},
    optional={
        "activeModel": st.none() | st.sampled_from(["llm", "sdxl", "tts", "nope", ""]) | json_values,
        "companions": st.lists(st.sampled_from(["tts", "big", "llm"]), max_size=3) | json_values,
        "generation": st.integers(-3, 2**60) | json_values,
    },
)
documents = st.one_of(
    st.binary(max_size=80),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda d, dflt, extra: json.dumps({"version": 1, "gpus": {"0": {"desired": d, "configDefault": dflt}, **extra}}).encode(),
        desired_like,
        st.sampled_from([DEFAULT, {"activeModel": "sdxl", "companions": []}]) | json_values,
        st.dictionaries(st.sampled_from(["1", "x"]), json_values, max_size=1),
    ),
    st.sampled_from([b'{"gpus": {"0": {"desired": {"generation": 1e400}}}}', b"[" * 5000, "ü".encode("utf-16")]),
)


def _oracle(raw: bytes) -> tuple[bool, Desired | None]:
    """(is the state of gpu 0 damaged, the valid recorded desired state of gpu 0 or None), read independently."""
    if not raw.strip():
        return True, None
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=lambda c: 1 / 0)
    except Exception:
        return True, None
    if not isinstance(doc, dict) or not isinstance(doc.get("gpus", {}), dict):
        return True, None
    entry = doc.get("gpus", {}).get("0")
    if entry is None:
        return False, None
    if not isinstance(entry, dict):
        return True, None
    if "desired" not in entry:
        return False, None
    d = entry["desired"]
    if not isinstance(d, dict):
        return True, None
    a, c, g = d.get("activeModel"), d.get("companions", []), d.get("generation", 0)
    c = [] if c is None else c
    if (a is not None and not isinstance(a, str)) or not isinstance(c, list) or not all(isinstance(x, str) for x in c):
        return True, None
    if type(g) is not int or not 0 <= g < 2**53:
        return True, None
    if "configDefault" in entry:  # what the config said when it was recorded: damaged, it proves nothing
        dflt = entry["configDefault"]
        if not isinstance(dflt, dict):
            return True, None
        da, dc = dflt.get("activeModel"), dflt.get("companions", [])
        if (da is not None and not isinstance(da, str)) or not isinstance(dc, list) or not all(isinstance(x, str) for x in dc):
            return True, None
    return False, Desired(a or None, tuple(c), g)


def _recorded_default(raw: bytes) -> object:
    """The configDefault recorded for gpu 0 (None when there is none)."""
    try:
        return json.loads(raw.decode("utf-8"))["gpus"]["0"].get("configDefault")
    except Exception:
        return None


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(raw=documents, running=st.booleans())
def test_any_state_file_is_adopted_or_what_runs_is_kept(raw: bytes, running: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.json"
        path.write_bytes(raw)
        rt = FakeRuntime(states={"sdxl": WorkloadState.RUNNING, "tts": WorkloadState.RUNNING} if running else {})
        notes: list[str] = []
        state = open_state(path)
        got = initial_desired(state, SPEC, rt, notes)
        damaged, valid = _oracle(raw)
        if damaged:
            # What runs is kept (the config's default when nothing runs), and a note names the file.
            assert len(notes) == 1 and str(path) in notes[0], notes
            assert got.active == ("sdxl" if running else SPEC.active_model)
            assert got.companions == (("tts",) if running else tuple(SPEC.companions))
        else:
            assert notes == []
            if valid is not None and valid.active == got.active and valid.companions == got.companions:
                if _recorded_default(raw) == DEFAULT:
                    assert got.generation == valid.generation  # adopted as recorded
                else:  # the config's default changed and happens to name the same models: a new generation of it
                    assert got.generation == valid.generation + 1
            else:
                assert (got.active, got.companions) == (SPEC.active_model, tuple(SPEC.companions))  # the config's (changed, or no longer fits)
        # Whatever happened, the file now reads back clean and records what was chosen.
        again = StateFile(path)
        recorded, problem = again.desired_or_problem(0)
        assert problem is None and recorded is not None
        assert (recorded.active, recorded.companions, recorded.generation) == (got.active, got.companions, got.generation)


def test_keep_asleep_is_recorded_and_read_back(tmp_path: Path) -> None:
    """Idle action sleep survives a restart: the state file keeps it (and a
    wrong value is named, not guessed)."""
    sf = StateFile(tmp_path / "state.json")
    sf.write_desired(0, Desired(None, (), 4, keep_asleep=True), "idle (sleep)")
    sf.write_desired(1, Desired(None, (), 2), "api")
    again = StateFile(tmp_path / "state.json")
    assert again.desired(0) == Desired(None, (), 4, keep_asleep=True)
    assert again.desired(1) == Desired(None, (), 2, keep_asleep=False)
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["gpus"]["0"]["desired"]["keepAsleep"] is True and "keepAsleep" not in doc["gpus"]["1"]["desired"]
    doc["gpus"]["0"]["desired"]["keepAsleep"] = "yes"
    assert "desired.keepAsleep is 'yes'" in str(_parse_desired(doc["gpus"]["0"]["desired"]))
