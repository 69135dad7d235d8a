"""pass@1 and its confidence intervals, checked against hand-computed values on a small per-sample JSONL."""

from __future__ import annotations

import csv
import json
import math

import pytest

from ctt.evaluate import RESULT_COLUMNS, SampleRecord, markdown_table, results_from_samples, write_results
from ctt.stats import bootstrap_ci, pass_at_1, pass_at_1_ci, per_problem_pass, wilson_ci

# 4 problems x 2 samples for "learned" (per-problem fractions 1, 1/2, 0, 1/2 -> pass@1 = 2/4 = 0.5), and 5 problems x
# 1 sample for "base" (3 of 5 correct).
LEARNED = {"p0": [True, True], "p1": [True, False], "p2": [False, False], "p3": [False, True]}
BASE = {"q0": [True], "q1": [False], "q2": [True], "q3": [True], "q4": [False]}


def _record(mode, n, pid, sample, correct, thinking, total):
    return {
        "benchmark": "toy", "problem_id": pid, "mode": mode, "num_continuations": n, "sample": sample,
        "answer": "1" if correct else "2", "correct": correct, "status": "ok" if correct else "wrong",
        "thinking_tokens": thinking, "total_tokens": total, "forced": n, "continuation_starts": [],
        "stop_reason": "eos",
    }


@pytest.fixture
def samples_path(tmp_path):
    lines, thinking = [], 10
    for pid, samples in BASE.items():
        for s, c in enumerate(samples):
            lines.append(_record("base", 0, pid, s, c, thinking, thinking + 5))
            thinking += 10  # base thinking tokens 10, 20, 30, 40, 50 -> mean 30
    for pid, samples in LEARNED.items():
        for s, c in enumerate(samples):
            lines.append(_record("learned", 2, pid, s, c, 100 + s, 120 + s))  # mean 100.5, total mean 120.5
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def wilson_by_hand(k: int, n: int, z: float = 1.959963984540054):
    """(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), written out independently of ctt.stats."""
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half, centre + half


def test_pass_at_1_by_hand():
    assert pass_at_1(list(LEARNED.values())) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert per_problem_pass(list(LEARNED.values())) == [1.0, 0.5, 0.0, 0.5]
    assert pass_at_1([[True], [False], [False]]) == pytest.approx(1 / 3)
    # unequal k: the mean of per-problem rates, not of all samples (which would be 2/4 here)
    assert pass_at_1([[True], [True, False, False]]) == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ValueError):
        pass_at_1([[True], []])


@pytest.mark.parametrize("k,n", [(3, 5), (0, 4), (4, 4), (17, 40)])
def test_wilson_matches_closed_form(k, n):
    lo, hi = wilson_ci(k, n)
    exp_lo, exp_hi = wilson_by_hand(k, n)
    assert lo == pytest.approx(max(0.0, exp_lo), abs=1e-9)
    assert hi == pytest.approx(min(1.0, exp_hi), abs=1e-9)
    assert lo <= k / n <= hi
    if k == 0:  # Wilson never collapses to a point at the boundary
        assert lo == pytest.approx(0.0, abs=1e-12) and hi > 0.3


def test_wilson_level_widens_interval():
    lo90, hi90 = wilson_ci(3, 5, level=0.90)
    lo95, hi95 = wilson_ci(3, 5, level=0.95)
    assert lo95 < lo90 and hi90 < hi95
    assert wilson_by_hand(3, 5, z=1.6448536269514722) == pytest.approx((lo90, hi90))


def test_bootstrap_ci_properties():
    per_problem = [1.0, 0.5, 0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    point = sum(per_problem) / len(per_problem)
    lo, hi = bootstrap_ci(per_problem)
    assert 0.0 <= lo <= point <= hi <= 1.0
    assert lo < hi
    assert bootstrap_ci(per_problem) == (lo, hi)  # deterministic for the default seed
    assert bootstrap_ci(per_problem, seed=7) == bootstrap_ci(per_problem, seed=7)
    # with many distinct values the percentiles depend on the draws, so another seed moves them
    spread = [i / 37 for i in range(0, 37, 2)]
    assert bootstrap_ci(spread, seed=1) != bootstrap_ci(spread, seed=2)
    lo80, hi80 = bootstrap_ci(per_problem, level=0.8)
    assert lo <= lo80 and hi80 <= hi
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_pass_at_1_ci_picks_method():
    _, lo, hi, method = pass_at_1_ci([[c] for c in [True, False, True, True, False]])
    assert method == "wilson" and (lo, hi) == pytest.approx(wilson_by_hand(3, 5))
    point, lo, hi, method = pass_at_1_ci(list(LEARNED.values()))
    assert method == "bootstrap" and point == 0.5
    assert (lo, hi) == bootstrap_ci([1.0, 0.5, 0.0, 0.5])
    # k > 1 but every problem failed (or passed): not a zero-width bootstrap, Wilson over the problems
    for value, k in ((False, 0), (True, 4)):
        point, lo, hi, method = pass_at_1_ci([[value, value, value]] * 4)
        assert method == "wilson" and point == k / 4
        assert (lo, hi) == pytest.approx(tuple(min(1.0, max(0.0, b)) for b in wilson_by_hand(k, 4)))
        assert hi - lo > 0.3


def test_results_from_samples_by_hand(samples_path):
    rows = results_from_samples(samples_path)
    assert [(r["benchmark"], r["mode"], r["num_continuations"]) for r in rows] == [("toy", "base", 0), ("toy", "learned", 2)]
    base, learned = rows
    assert list(base)[:7] == RESULT_COLUMNS[:7]
    assert base["accuracy"] == pytest.approx(3 / 5)
    assert base["n"] == 5 and base["samples"] == 1
    assert base["mean_thinking_tokens"] == pytest.approx(30.0)
    assert base["mean_total_tokens"] == pytest.approx(35.0)
    assert (base["ci_low"], base["ci_high"]) == pytest.approx(wilson_by_hand(3, 5), abs=1e-4)
    assert learned["accuracy"] == pytest.approx(0.5)
    assert learned["n"] == 4 and learned["samples"] == 2
    assert learned["mean_thinking_tokens"] == pytest.approx(100.5)
    assert learned["mean_total_tokens"] == pytest.approx(120.5)
    assert learned["ci_low"] <= 0.5 <= learned["ci_high"]
    assert 0.0 <= learned["ci_low"] and learned["ci_high"] <= 1.0
    assert results_from_samples(samples_path) == rows


def test_written_results_recompute_from_samples(samples_path, tmp_path):
    """write_results -> samples.jsonl -> results_from_samples gives back the rows in results.csv."""
    records = [SampleRecord(**json.loads(line)) for line in samples_path.read_text().splitlines()]
    rows = results_from_samples(samples_path)
    out = tmp_path / "run"
    write_results(out, rows, records)
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == RESULT_COLUMNS
        assert RESULT_COLUMNS[:7] == [
            "benchmark", "mode", "num_continuations", "accuracy", "n", "mean_thinking_tokens", "mean_total_tokens"
        ]
        written = list(reader)
    again = results_from_samples(out / "samples.jsonl")
    assert [{k: str(v) for k, v in r.items()} for r in again] == written
    assert (out / "results.md").read_text().strip() == markdown_table(rows, RESULT_COLUMNS)
