"""The switch cost book kept across restarts: the worker's status carries
its ``costs``, the state file records the status, and a restarted
supervisor reads them back (vramctl.sources.statefile.StateFile.costs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vramctl.app import build
from vramctl.costs import CostBook, Estimate
from vramctl.sources.statefile import StateFile
from vramctl.spec.models import parse_config


def test_costs_written_with_the_status_are_read_back(tmp_path: Path) -> None:
    book = CostBook()
    book.record("llm", "start", 25.0)
    book.record("llm", "wake-l1", 0.5, residue_mib=900)
    sf = StateFile(tmp_path / "state.json")
    sf.write_status(0, {"phase": "Ready", "costs": book.to_dict()})
    again = CostBook.from_dict(StateFile(tmp_path / "state.json").costs(0))
    assert again.to_dict() == book.to_dict()
    assert again.estimate("llm", "wake-l1") == Estimate(0.5, "measured", 1)
    assert sf.costs(1) is None  # another GPU: nothing recorded


def test_a_damaged_record_reads_as_nothing_learned(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    damaged = {"llm": {"start": {"recent": ["x", -3]}}}
    path.write_text(json.dumps({"version": 1, "gpus": {"0": {"status": {"costs": damaged}}, "1": {"status": 7}}}))
    sf = StateFile(path)
    assert CostBook.from_dict(sf.costs(0)).to_dict() == {}
    assert sf.costs(1) is None
    path.write_text("{not json")
    assert sf.costs(0) is None


def test_a_supervisor_built_on_the_state_file_starts_from_what_it_recorded(tmp_path: Path) -> None:
    book = CostBook()
    book.record("llm", "start", 42.0)
    StateFile(tmp_path / "state.json").write_status(0, {"costs": book.to_dict()})
    standin = [sys.executable, "-m", "vramctl.demo.standin"]
    config = parse_config(
        {
            "runtime": "process",
            "gpuProbe": {"kind": "simulated", "totalMiB": 16303},
            "gpus": [{"gpu": 0, "models": {"llm": {"command": standin, "vramMiB": 12000}, "sdxl": {"command": standin}}}],
        }
    )
    built = build(config, tmp_path / "state.json", instance="costs-test")
    try:
        costs = built.supervisor.workers[0].status()["costs"]
        assert costs["llm"]["start"] == {"seconds": 42.0, "source": "measured", "recent": [42.0]}
        assert costs["sdxl"]["start"]["source"] == "prior"
    finally:
        built.supervisor.runtime.close()
