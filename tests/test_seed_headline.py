"""The headline over training seeds: `ctt.stats.seed_problem_ci` (coverage on simulated seeds x problems data with a
known mean; a problems-only interval under-covers when the seed variance is large) and `ctt-report --group-seeds`
(its section and files, from hand-built run dirs with samples.jsonl and comparisons.csv)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctt.evaluation.comparisons import compare, write_comparisons
from ctt.report import main
from ctt.evaluation.seed_headline import SEED_COLUMNS, seed_rows
from ctt.evaluation.stats import bootstrap_ci, holm_adjust, seed_problem_ci, t_quantile, t_two_sided_p
from tests.test_report import base_config, make_run, read_csv

TRUE_MEAN = 0.1


def _simulate(rng, seeds, problems, seed_sd, problem_sd, noise_sd):
    """d[s, p] = mu + a_s + b_p + e_sp: seeds crossed with problems (every seed runs the same problems)."""
    return (TRUE_MEAN + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, problem_sd, (1, problems))
            + rng.normal(0, noise_sd, (seeds, problems)))


def _coverage(interval, seed_sd, seeds=3, problems=100, reps=600):
    rng = np.random.default_rng(12345)
    hits = 0
    for _ in range(reps):
        lo, hi = interval(_simulate(rng, seeds, problems, seed_sd, 0.2, 0.5))
        hits += lo <= TRUE_MEAN <= hi
    return hits / reps


def _ours(d):
    return seed_problem_ci(d)[1:3]


def _problems_only(d):
    """What resampling only problems gives: the paired bootstrap of the per-problem means pooled over seeds."""
    return bootstrap_ci(d.mean(axis=0), resamples=400)


def test_t_distribution_against_tabulated_values():
    for df, q in ((1, 12.706205), (2, 4.302653), (5, 2.570582), (30, 2.042272), (1e7, 1.959964)):
        assert t_quantile(0.95, df) == pytest.approx(q, rel=1e-5)
    assert t_two_sided_p(2.0, 5) == pytest.approx(0.101939, rel=1e-5)
    assert t_two_sided_p(0.0, 3) == 1.0


@pytest.mark.parametrize("seed_sd", [0.0, 0.1, 0.3])
def test_interval_over_seeds_and_problems_covers(seed_sd):
    coverage = _coverage(_ours, seed_sd)
    assert 0.92 <= coverage <= 0.995, coverage


def test_resampling_only_problems_under_covers_when_seed_variance_is_large():
    """The check above can fail: an interval that ignores the seeds covers far less than 95% with 3 seeds."""
    assert _coverage(_problems_only, 0.3, reps=300) < 0.7
    assert _coverage(_ours, 0.3, reps=300) >= 0.92


def test_seed_problem_ci_degenerate_cases():
    mean, lo, hi, p, _ = seed_problem_ci([[0.5, 0.5], [0.5, 0.5]])
    assert (mean, lo, hi, p) == (0.5, 0.5, 0.5, 0.0)
    one_seed = seed_problem_ci([[1.0, 0.0, 1.0]])
    assert one_seed[0] == pytest.approx(2 / 3) and np.isnan(one_seed[1]) and np.isnan(one_seed[3])
    with pytest.raises(ValueError):
        seed_problem_ci([1.0, 0.0])


# ------------------------------------------------------------------------------------------------ ctt-report


def _records(seed: int, learned_right: int, problems: int = 20) -> list[dict]:
    """base solves p0..p4, Wait p0..p7, learned p0..p<learned_right - 1>; one sample each."""
    solved = {"base": (0, 5), "fixed:Wait": (1, 8), "learned": (1, learned_right)}
    return [{"benchmark": "toy", "problem_id": f"p{i}", "mode": mode, "num_continuations": n, "sample": 0,
             "correct": i < k} for mode, (n, k) in solved.items() for i in range(problems)]


def _seed_run(root, seed, learned_right, lr=0.01):
    d = root / f"{lr}-{seed}"
    records = _records(seed, learned_right)
    make_run(d, base_config(d, seed=seed, optimizer__lr=lr), [0.2], [("toy", "base", 0, 0.25)])
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_comparisons(d, compare(records, ("base",), ("fixed:Wait",)))
    return d


def test_group_seeds_headline(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    learned = {0: 14, 1: 11, 2: 9}  # learned minus base: +45, +30, +20 points
    dirs = [_seed_run(sweep, s, k) for s, k in learned.items()]
    _seed_run(sweep, 0, 20, lr=0.1)  # another config: its own group (a single seed: no interval)
    out = tmp_path / "rep"
    assert main([str(sweep), "--group-seeds", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## Over training seeds" in printed
    header, rows = read_csv(out.with_name("rep_seeds.csv"))
    assert header == SEED_COLUMNS
    group = [r for r in rows if r["seeds"] == "3"]
    assert [(r["mode"], r["versus"]) for r in group] == [("fixed:Wait", "base"), ("learned", "base"),
                                                        ("learned", "fixed:Wait")]
    lb = group[1]
    diffs = [[float(i < k) - float(i < 5) for i in range(20)] for k in learned.values()]
    mean, lo, hi, p, _ = seed_problem_ci(diffs)
    assert float(lb["mean"]) == pytest.approx(mean) == pytest.approx((0.45 + 0.30 + 0.20) / 3)
    assert (float(lb["ci_low"]), float(lb["ci_high"])) == pytest.approx((lo, hi))
    assert lb["per_seed"] == "+45.0,+30.0,+20.0" and lb["n"] == "20"
    assert [float(r["p_holm"]) for r in group] == pytest.approx(holm_adjust([float(r["p_value"]) for r in group]))
    single = [r for r in rows if r["seeds"] == "1"]
    assert len(single) == 3 and all(r["ci_low"] == "nan" for r in single)
    assert out.with_name("rep_seeds.md").read_text() in printed


def test_group_seeds_pairs_only_the_problems_every_seed_ran(tmp_path):
    sweep = tmp_path / "multirun"
    dirs = [_seed_run(sweep, s, 12) for s in range(2)]
    samples = dirs[1] / "samples.jsonl"  # seed 1 lost p19 to its held-out check
    samples.write_text("".join(line + "\n" for line in samples.read_text().splitlines() if '"p19"' not in line))
    (row,) = [r for r in seed_rows(dirs) if (r["mode"], r["versus"]) == ("learned", "base")]
    assert row["n"] == 19 and row["seeds"] == 2
