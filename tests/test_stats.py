"""pass@1 and its confidence intervals, checked against hand-computed values on a small per-sample JSONL; the paired
delta's interval and p-value checked against exact computations (enumerated outcomes, exact binomial sums)."""

from __future__ import annotations

import csv
import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from ctt.evaluation.results import RESULT_COLUMNS, SampleRecord, markdown_table, results_from_samples, write_results
from ctt.evaluation.stats import (
    bootstrap_ci,
    newcombe_paired_ci,
    paired_cells,
    paired_delta_ci,
    paired_p_value,
    pass_at_1,
    pass_at_1_ci,
    per_problem_pass,
    sign_test_p,
    wilson_ci,
)

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
    """(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), written out independently of ctt.evaluation.stats."""
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


# ------------------------------------------------------------------------------------------------ paired statistics

Z95 = 1.959963984540054


def _pairs(a: int, b: int, c: int, d: int) -> tuple[list[float], list[float]]:
    """Per-problem pass rates (k = 1) of modes A and B for the paired table: a both, b only A, c only B, d neither."""
    return [1.0] * (a + b) + [0.0] * (c + d), [1.0] * a + [0.0] * b + [1.0] * c + [0.0] * d


def mcnemar_by_enumeration(b: int, c: int) -> Fraction:
    """Exact two-sided p of b positive vs c negative signs, by listing all 2^m equally likely sign sequences under
    H0 and counting those at least as far from m/2 as the observed one."""
    m = b + c
    if m == 0:
        return Fraction(1)
    extreme = sum(1 for signs in itertools.product((0, 1), repeat=m) if abs(2 * sum(signs) - m) >= abs(b - c))
    return Fraction(extreme, 2**m)


@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (0, 3), (5, 0), (6, 1), (3, 3), (4, 7), (2, 9), (10, 2)])
def test_mcnemar_p_matches_enumeration(b, c):
    expected = float(mcnemar_by_enumeration(b, c))
    assert sign_test_p(b, c) == pytest.approx(expected, rel=1e-12)
    pa, pb = _pairs(4, b, c, 5)  # concordant problems do not change the test
    assert paired_p_value(pa, pb) == pytest.approx(expected, rel=1e-12)
    assert paired_p_value(pb, pa) == pytest.approx(expected, rel=1e-12)  # two-sided: symmetric


def test_mcnemar_hand_checked():
    assert paired_p_value([1, 1, 0], [1, 1, 0]) == 1.0  # no discordant problem
    assert sign_test_p(5, 0) == 2 / 2**5  # 0.0625: five of five discordant pairs favour A
    assert sign_test_p(6, 1) == 2 * (1 + 7) / 2**7  # 0.125
    assert sign_test_p(3, 3) == 1.0  # 2 * P[X <= 3] = 84/64, capped
    assert sign_test_p(20, 0) == pytest.approx(2.0**-19)  # exact arithmetic, no underflow or rounding to 0
    with pytest.raises(ValueError):
        paired_p_value([1, 0], [1])


def _sign_flip_by_enumeration(pa, pb) -> float:
    """All 2^n sign assignments of the per-problem differences, counted one by one."""
    diffs = [Fraction(a).limit_denominator(1000) - Fraction(b).limit_denominator(1000) for a, b in zip(pa, pb)]
    observed = abs(sum(diffs))
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed
               for signs in itertools.product((1, -1), repeat=len(diffs)))
    return hits / 2 ** len(diffs)


def test_k_above_one_p_value_is_the_exact_sign_flip_test():
    """k > 1: the sizes of the differences count, so the test points the way delta does."""
    pa = [1.0, 0.5, 0.75, 0.25, 2 / 3, 0.0, 0.5]
    pb = [0.5, 0.5, 0.0, 0.25, 1 / 3, 0.25, 0.75]
    assert paired_p_value(pa, pb) == pytest.approx(_sign_flip_by_enumeration(pa, pb), abs=1e-12)
    # delta > 0 carried by a few large gains against many small losses: the sign test would call it a loss
    up = [1.0] * 3 + [0.75] * 9
    down = [0.0] * 3 + [1.0] * 9
    assert sum(up) > sum(down)
    assert paired_p_value(up, down) == pytest.approx(_sign_flip_by_enumeration(up, down), abs=1e-12)
    rng = np.random.default_rng(4)
    for _ in range(5):
        a, b = rng.integers(0, 5, 12) / 4, rng.integers(0, 5, 12) / 4
        assert paired_p_value(a, b) == pytest.approx(_sign_flip_by_enumeration(a, b), abs=1e-12)
    # one sample per problem: exactly McNemar
    assert paired_p_value([1, 1, 1, 0, 1], [0, 0, 0, 0, 1]) == float(mcnemar_by_enumeration(3, 0))


def newcombe_by_hand(a, b, c, d, z=Z95):
    """Newcombe (1998) method 10, written out from the paper's formula with `wilson_by_hand`."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = (max(0.0, v) if i == 0 else min(1.0, v) for i, v in enumerate(wilson_by_hand(a + b, n, z)))
    l2, u2 = (max(0.0, v) if i == 0 else min(1.0, v) for i, v in enumerate(wilson_by_hand(a + c, n, z)))
    prod = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    cross = max(cross - n / 2, 0) if cross > 0 else cross  # the paper's continuity correction of phi
    phi = cross / math.sqrt(prod) if prod else 0.0
    delta = (b - c) / n
    return (
        delta - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2),
        delta + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2),
    )


@pytest.mark.parametrize("table", [(5, 3, 1, 11), (36, 12, 2, 0), (10, 0, 4, 6), (2, 8, 1, 0), (0, 20, 0, 0), (20, 0, 0, 0)])
def test_newcombe_matches_formula(table):
    assert newcombe_paired_ci(*table) == pytest.approx(newcombe_by_hand(*table), abs=1e-12)


@pytest.mark.parametrize("table,published", [
    ((36, 12, 2, 0), (0.0569, 0.3404)), ((18, 12, 2, 18), (0.0562, 0.3290)),
    ((53, 0, 0, 1), (-0.0729, 0.0729)), ((0, 30, 0, 0), (0.8395, 1.0)),
])
def test_newcombe_reproduces_the_papers_examples(table, published):
    """Newcombe (1998), method 10, the paper's worked examples (as its Table II gives them, 4 decimals)."""
    assert newcombe_paired_ci(*table) == pytest.approx(published, abs=5e-5)


def test_newcombe_no_discordant_pairs_never_zero_width():
    for a in range(21):
        lo, hi = newcombe_paired_ci(a, 0, 0, 20 - a)
        assert lo < 0 < hi and hi - lo > 0.05


def test_paired_cells_fractional():
    assert paired_cells(*_pairs(3, 2, 1, 4)) == (3, 2, 1, 4)
    a, b, c, d = paired_cells([1.0, 0.5, 0.25], [0.5, 0.5, 1.0])
    assert (a, b, c, d) == pytest.approx((0.5 + 0.5 + 0.25, 0.5, 0.75, 0.0 + 0.5 + 0.0))
    assert a + b + c + d == pytest.approx(3)


def _tables(n):
    for a in range(n + 1):
        for b in range(n + 1 - a):
            for c in range(n + 1 - a - b):
                yield a, b, c, n - a - b - c


def _coverage(n, truths, interval):
    """Exact coverage of `interval(table) -> (lo, hi)` for each true cell distribution (p11, p10, p01, p00): the
    sum of the multinomial probabilities of the tables whose interval contains p10 - p01."""
    intervals = {t: interval(t) for t in _tables(n)}
    out = []
    for probs in truths:
        delta = probs[1] - probs[2]
        total = covered = 0.0
        for t, (lo, hi) in intervals.items():
            a, b, c, d = t
            coef = math.comb(n, a) * math.comb(n - a, b) * math.comb(n - a - b, c)
            prob = coef * math.prod(p**k for p, k in zip(probs, t))
            total += prob
            covered += prob if lo <= delta <= hi else 0.0
        assert total == pytest.approx(1.0, abs=1e-9)  # every outcome enumerated
        out.append(covered)
    return out


# True (p11, p10, p01, p00): the deltas (.04, .17, .11, -.09, .31, -.05, 0, .81) are off the 1/20 lattice, so no
# coverage is won by an interval end landing exactly on the truth; from independent to strongly correlated modes,
# little to much disagreement.
TRUTHS = [
    (0.25, 0.27, 0.23, 0.25), (0.42, 0.28, 0.11, 0.19), (0.55, 0.17, 0.06, 0.22), (0.30, 0.07, 0.16, 0.47),
    (0.12, 0.52, 0.21, 0.15), (0.60, 0.03, 0.08, 0.29), (0.47, 0.13, 0.13, 0.27), (0.05, 0.83, 0.02, 0.10),
]


def test_newcombe_exact_coverage():
    """k = 1, n = 20: all 1771 tables. Measured with the paper's phi correction: 0.946 0.955 0.964 0.957 0.943 0.993
    0.965 0.949 (mean 0.959): never below nominal by more than 0.01; conservative (0.993) when discordant problems
    are rare (p10 + p01 = 0.11), the price of the continuity correction."""
    cov = _coverage(20, TRUTHS, lambda t: newcombe_paired_ci(*t))
    assert min(cov) >= 0.94, cov
    assert max(cov) <= 0.995, cov  # not bought with needlessly wide intervals ([-1, 1] would give 1.0)
    assert 0.945 <= sum(cov) / len(cov) <= 0.97, cov


def test_one_sample_per_problem_uses_newcombe_because_the_bootstrap_under_covers():
    """Why k = 1 comparisons report Newcombe's interval: over all tables of n = 20 the percentile bootstrap of the
    differences covers less often (it ignores the extra variance of a mean of 20, and with few discordant problems
    it can exclude 0 while the exact McNemar p is 0.125, e.g. 4 of 100 all one way)."""
    newcombe = _coverage(20, TRUTHS, lambda t: newcombe_paired_ci(*t))
    boot_cache: dict[tuple, tuple[float, float]] = {}

    def bootstrap(t):
        a, b, c, d = t
        if (b, c) not in boot_cache:  # the bootstrap of the differences sees only b and c
            pa, pb = _pairs(a, b, c, d)
            boot_cache[(b, c)] = bootstrap_ci([x - y for x, y in zip(pa, pb)])
        return boot_cache[(b, c)]

    boot = _coverage(20, TRUTHS, bootstrap)
    assert sum(boot) / len(boot) < sum(newcombe) / len(newcombe) - 0.01, (boot, newcombe)
    assert paired_delta_ci(*_pairs(20, 3, 1, 16))[3] == "newcombe"
    lo, hi = paired_delta_ci(*_pairs(0, 4, 0, 96))[1:3]
    assert lo <= 0.0 < hi  # agrees with McNemar's p = 0.125
    assert paired_p_value(*_pairs(0, 4, 0, 96)) == pytest.approx(0.125)


def test_paired_degenerate_cases():
    n = 12
    half = Z95**2 / (n + Z95**2)
    # every problem correct in both modes: not a zero-width bootstrap
    delta, lo, hi, method = paired_delta_ci([1.0] * n, [1.0] * n)
    assert (delta, method) == (0.0, "newcombe")
    assert lo < 0.0 < hi and (lo, hi) == pytest.approx((-half, half))
    # half solved by both, half by neither (without the paper's phi correction this was [0, 0])
    delta, lo, hi, method = paired_delta_ci(*_pairs(6, 0, 0, 6))
    assert method == "newcombe" and lo < 0 < hi
    # A always right, B always wrong: delta 1, interval below 1 with positive width
    delta, lo, hi, method = paired_delta_ci([1.0] * n, [0.0] * n)
    assert (delta, method) == (1.0, "newcombe")
    assert 0.5 < lo < hi == 1.0
    assert (lo, hi) == pytest.approx(newcombe_by_hand(0, n, 0, 0))
    # k > 1, the same non-zero difference on every problem: fractional cells, still a positive-width interval
    delta, lo, hi, method = paired_delta_ci([0.75, 1.0, 0.5], [0.25, 0.5, 0.0])
    assert method == "newcombe" and delta == pytest.approx(0.5) and lo < 0.5 < hi
    assert (lo, hi) == pytest.approx(newcombe_paired_ci(*paired_cells([0.75, 1.0, 0.5], [0.25, 0.5, 0.0])))
    # no problems
    assert paired_delta_ci([], [])[3] == "none"


def test_paired_bootstrap_is_the_bootstrap_of_differences():
    pa = [1.0, 0.5, 0.0, 1.0, 0.5, 1.0, 0.0, 1.0]
    pb = [0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0, 0.5]
    delta, lo, hi, method = paired_delta_ci(pa, pb)
    diffs = [x - y for x, y in zip(pa, pb)]
    assert method == "bootstrap" and delta == pytest.approx(sum(diffs) / 8)
    assert (lo, hi) == bootstrap_ci(diffs)
    spread_a = [i / 29 for i in range(30)]
    spread_b = [(i * 7 % 30) / 29 for i in range(30)]
    assert paired_delta_ci(spread_a, spread_b, seed=3) != paired_delta_ci(spread_a, spread_b)  # the seed is used
    assert paired_delta_ci(pa, pb, level=0.5)[1] > lo


def test_pass_at_1_never_reports_a_zero_width_interval():
    """Every problem at the same pass rate (here 0.5 with k = 2, or a single problem): the bootstrap would give a
    point; the Wilson interval of that rate over the problems is reported instead."""
    for correct in ([[True, False]] * 6, [[True, False]], [[True, True, False, False]] * 3):
        point, lo, hi, method = pass_at_1_ci(correct)
        assert method == "wilson" and lo < point < hi
