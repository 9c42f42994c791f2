"""benchmarks/gpu_proof.py --gpus 0,1 in its dry run: two simulated GPUs,
the per-GPU workloads and the two-GPU launcher without torch, through one
``vramctl up`` per phase.

The proof itself is what is tested here (the real one needs two GPUs): its
JSON has the shape the two-GPU run will be read by, every planned switch ran
(phase A on GPU 0 alone, phase B on both at once with the two-GPU model in
between), neither sampler saw two heavy models on one GPU, the two-GPU model
was seen on both GPUs, and the figures agree with each other (medians from
the switches, the verdicts from the medians).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.figures import report
from tests.support.images import load_module

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
gpu_proof = load_module("vramctl_gpu_proof", ROOT / "benchmarks" / "gpu_proof.py")
SWITCHES = 4


def test_two_gpu_proof_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_proof.json"
    t0 = time.monotonic()
    rc = gpu_proof.main(["--gpus", "0,1", "--dry-run", "--switches", str(SWITCHES), "--out", str(out)])
    wall = time.monotonic() - t0
    r: dict[str, Any] = json.loads(out.read_text())

    assert r["mode"] == "two-gpus" and r["gpus"] == [0, 1] and r["environment"]["dry_run"] is True
    assert set(r["environment"]["gpus"]) == {"0", "1"}
    assert set(r["workloads_mib"]) == {"a0", "b0", "a1", "b1", "tp"}
    total = r["environment"]["gpus"]["0"]["total_mib"]
    assert all(0 < mib < total for mib in r["workloads_mib"].values())
    assert r["plan"] == {"switches_per_gpu": SWITCHES, "two_gpu_rounds": 2, "budget_s": 330}

    # Phase A: GPU 0 alone, a start and SWITCHES switches between its two workloads.
    a = r["phase_a"]["switches"]
    assert [s["to"] for s in a] == ["a0", "b0"] * (SWITCHES // 2) + ["a0"]
    assert all(s["ok"] and s["gpu"] == 0 for s in a), a
    # Phase B: both GPUs each round; the two-GPU model twice, GPU 1 freed for it.
    b = r["phase_b"]["switches"]
    rounds = max(s["round"] for s in b) + 1
    assert rounds == 1 + SWITCHES + 2 and len(b) == 2 * rounds
    assert all(s["ok"] for s in b), [s for s in b if not s["ok"]]
    to_tp = [s for s in b if s["to"] == "tp"]
    assert len(to_tp) == 2 and all(s["gpu"] == 0 for s in to_tp)
    freed = [s for s in b if s["to"] is None]
    assert [s["round"] for s in freed] == [s["round"] for s in to_tp] and all(s["gpu"] == 1 for s in freed)
    # GPU 1's model after the two-GPU model waits for it to leave GPU 1; the wait is told.
    after = [s for s in b if s["kind"] == "after-two-gpu-model"]
    assert len(after) == 2 and all(s["gpu"] == 1 for s in after)

    # Plausible figures: positive, below their timeouts, vramctl's own under the client's.
    for s in a + b:
        assert 0 < s["seconds"] < 60, s
        assert s["vramctl_seconds"] is None or 0 <= s["vramctl_seconds"] <= s["seconds"] + 0.05, s
    base = r["phase_a"]["per_gpu"]["0"]
    assert base["n"] == SWITCHES
    assert base["median_s"] == pytest.approx(statistics.median(s["seconds"] for s in a if s["kind"] == "per-gpu"))
    assert base["median_s"] <= base["p95_s"] <= base["max_s"]
    ratios = r["verdicts"]["per_gpu_switch_median_vs_one_gpu"]["value"]
    for g in ("0", "1"):
        st = r["phase_b"]["per_gpu"][g]
        assert st["n"] == SWITCHES - 2  # each GPU's switches after the two-GPU model are counted apart
        assert ratios[f"gpu{g}"] == pytest.approx(st["median_s"] / base["median_s"])
    assert {"gpu0:to-two-gpu-model", "gpu0:from-two-gpu-model", "gpu1:free-for-two-gpu-model", "gpu1:after-two-gpu-model"} <= set(
        r["phase_b"]["by_kind"]
    )

    # Exclusivity: no moment with two heavy models on one GPU, by /status and by /proc.
    for name in ("status_holders", "processes"):
        ex = r["exclusivity"][name]
        assert ex["moments_with_two_heavy_on_one_gpu"] == 0, ex
        for phase in ("A", "B"):
            ph = ex["phases"][phase]
            assert ph["samples"] > 20 and 0 < ph["period_ms_median"] < 100, (name, phase, ph)
            assert all(s["overlaps"] == 0 and s["max_heavy"] <= 1 for s in ph["gpus"].values())
        assert ex["phases"]["A"]["gpus"]["0"]["max_heavy"] == 1 and ex["phases"]["A"]["gpus"]["1"]["max_heavy"] == 0
        seen = [ex["phases"]["B"]["gpus"][g]["two_gpu_model_seen"] for g in ("0", "1")]
        assert all(n > 0 for n in seen), (name, seen)
    assert r["verdicts"]["never_two_heavy_on_one_gpu"]["pass"]
    assert r["verdicts"]["two_gpu_model_held_both_gpus"]["pass"]
    assert r["verdicts"]["switches_ok_one_gpu"]["pass"] and r["verdicts"]["switches_ok_two_gpus"]["pass"]
    assert rc == (0 if all(v["pass"] for v in r["verdicts"].values()) else 1)
    report(
        f"[gpu proof two gpus, dry run] {wall:.1f}s; one-GPU median {base['median_s']:.2f}s, "
        f"two-GPU per-GPU medians {r['phase_b']['per_gpu']['0']['median_s']:.2f}s / {r['phase_b']['per_gpu']['1']['median_s']:.2f}s; "
        f"samples (status, /proc): {r['exclusivity']['status_holders']['phases']['B']['samples']}, "
        f"{r['exclusivity']['processes']['phases']['B']['samples']}; overlaps 0"
    )
