"""The benchmarks' GPU workload and tensor-parallel launcher stop on SIGTERM
whenever it lands, a second one included.

A model's process group gets the runtime's SIGTERM, and a launcher may send
its workers one more. Python runs a signal handler on the main thread between
two bytecodes, wherever that thread is: a handler that took a lock the main
thread can hold (setting the threading.Event it waits on) hung the process
when the signal landed inside that wait. Here the process is traced and
SIGTERM is raised at every line it runs once its handler is installed, so
every such moment is tried, deterministically.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ports import free_port

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

# Runs a benchmark script as __main__, raising SIGTERM at each of the main
# thread's lines from the moment a Python handler is installed.
TRACED = """
import runpy, signal, sys
sys.path.insert(0, sys.argv[2])

def trace(frame, event, arg):
    if event == "line" and callable(signal.getsignal(signal.SIGTERM)):
        signal.raise_signal(signal.SIGTERM)
    return trace

sys.settrace(trace)
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.parametrize(
    ("script", "env"),
    [
        ("cuda_workload.py", {}),
        ("cuda_workload.py", {"WORKLOAD_MODE": "llm", "WEIGHTS_MIB": "64", "TENSORS": "4"}),
        ("tp_launcher.py", {"CUDA_VISIBLE_DEVICES": "0,1"}),
    ],
    ids=["holder", "llm", "tp_launcher"],
)
def test_sigterm_at_any_moment_stops_the_process(script: str, env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", TRACED, str(BENCHMARKS / script), str(BENCHMARKS)],
        env={**os.environ, "CUDA_WORKLOAD_FAKE": "1", "VRAM_MIB": "64", "PORT": str(free_port()), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script} did not stop within 30 s of SIGTERMs:\n{out.decode(errors='replace')[-2000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "EXIT_AT" in text, text[-2000:]
