"""The default main job (experiment=demo on organism_r1): its table is produced, and the README quotes its figures.

Slow (about five minutes on 2 cores): the whole main job, `python -m ctt.train` with nothing overridden, then the
README's main-job table and paired comparisons are rebuilt from the run's results.csv / comparisons.csv and must be
found verbatim in README.md. Greedy evaluation and one thread make the run deterministic on one machine.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = [("base", "base"), ("fixed:Wait", 'fixed "Wait"'), ("fixed:\\n", 'fixed "\\n" (the step separator)'),
         ("fixed:Hmm", 'fixed "Hmm"'), ("no_string", "no string"), ("learned", "learned")]


def main_job_table(results: list[dict]) -> str:
    """The README's main-job table: accuracy per mode (rows) and N (columns), from results.csv rows."""
    acc = {(r["mode"], int(float(r["num_continuations"]))): 100 * float(r["accuracy"]) for r in results}
    lines = ["| mode | N=0 | N=1 | N=2 | N=4 |", "|---|---|---|---|---|"]
    for mode, label in MODES:
        cells = [f"{acc[(mode, n)]:.1f}%" if (mode, n) in acc else "" for n in (0, 1, 2, 4)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_job_deltas(comparisons: list[dict]) -> str:
    """The README's paired comparisons of the learned row: learned minus each baseline at N=1, 2, 4."""
    lines = ["| learned minus | N=1 | N=2 | N=4 |", "|---|---|---|---|"]
    cell = {}
    for r in comparisons:
        same_n = r.get("versus_num_continuations", "") in ("", r["num_continuations"])
        if r["mode"] == "learned" and (same_n or r["versus"] == "base"):
            n = int(float(r["num_continuations"]))
            cell[(r["versus"], n)] = (f"{100 * float(r['delta']):+.1f} [{100 * float(r['ci_low']):+.1f}, "
                                      f"{100 * float(r['ci_high']):+.1f}]")
    for versus, label in MODES[:5]:
        lines.append(f"| {label} | " + " | ".join(cell.get((versus, n), "") for n in (1, 2, 4)) + " |")
    return "\n".join(lines)


@pytest.mark.slow
def test_the_main_job_prints_its_table_and_the_readme_quotes_it(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ctt.train", f"hydra.run.dir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "wall time" in out and "## Paired comparisons" in out and "organism_r1_test" in out
    results = list(csv.DictReader(open(run / "results.csv")))
    comparisons = list(csv.DictReader(open(run / "comparisons.csv")))
    assert {r["mode"] for r in results} >= {m for m, _ in MODES}
    assert min(int(r["n"]) for r in results) >= 300  # the test split after the held-out check
    readme = (ROOT / "README.md").read_text()
    assert main_job_table(results) in readme, main_job_table(results)
    assert main_job_deltas(comparisons) in readme, main_job_deltas(comparisons)
