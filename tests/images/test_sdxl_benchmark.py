"""benchmarks/sdxl_gpu.py keeps running: a CPU dry run with the tiny pipeline."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.images import ROOT


@pytest.mark.timeout(360)
def test_cpu_dry_run_writes_the_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")} | {"OUT": str(tmp_path)}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "sdxl_gpu.py"),
        "--tiny",
        "--steps",
        "2",
        "--size",
        "64",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--vae-steps",
        "1",
    ]
    # Its own process group: the SDXL server it starts goes with it, whatever ends the test.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "server overhead ratio" in res.stdout
    doc = json.loads((tmp_path / "sdxl_gpu.json").read_text())
    assert doc["device"] == "cpu" and doc["pipeline"] == "SDXL_RANDOM_INIT=tiny" and doc["attention"] == ["AttnProcessor2_0"]
    assert len(doc["http"]["runs"]) == len(doc["direct"]["runs"]) == 2
    assert all(r["png_bytes"] > 0 and r["pipeline_seconds"] > 0 for r in doc["http"]["runs"])
    assert doc["server_overhead_ratio"] > 0 and doc["server_fixed_overhead_ratio"] >= 1
    assert [(v["size"], v["slicing"], v["tiling"]) for v in doc["vae"]["variants"]] == [
        (64, False, False),
        (64, True, False),
        (64, False, True),
        (64, True, True),
        (128, False, False),
        (128, True, False),
        (128, False, True),
        (128, True, True),
    ]
