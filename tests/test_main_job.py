"""The default main job (experiment=demo on the model organism): a short training run beats the base model.

Slow (two to three minutes on 2 cores): 20 RL steps from the shipped seed, then base and learned at N=1 on the
held-out organism sums. Greedy evaluation and one thread make it deterministic.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_short_training_run_beats_the_base_model_with_a_paired_ci_excluding_zero(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ctt.train", f"hydra.run.dir={run}", "trainer.max_steps=20",
         "eval.modes=[base,learned]", "eval.num_continuations=[0,1]"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(run / "comparisons.csv")))
    [row] = [r for r in rows if r["mode"] == "learned" and r["num_continuations"] == "1" and r["versus"] == "base"]
    assert int(row["n"]) >= 300, row  # held out: the check drops training overlaps, at least 300 remain
    assert float(row["ci_low"]) > 0, row
    assert "wall time" in proc.stdout + proc.stderr
