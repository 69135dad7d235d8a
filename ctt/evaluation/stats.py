"""Pass@1 and its 95% confidence interval, as pure functions (no torch, no I/O).

Which interval `pass_at_1_ci` reports:

* every problem has exactly one sample (k == 1): the **Wilson score interval** of the binomial proportion
  correct / problems. It is the exact model there (one Bernoulli trial per problem), and unlike a bootstrap it
  does not collapse to a zero-width interval at 0% or 100% accuracy, which small evaluations hit often;
* otherwise (k > 1 samples per problem): a seeded **percentile bootstrap over problems**. Problems are resampled
  with replacement (their k samples travel together, so the within-problem correlation is kept), pass@1 is
  recomputed for each of `resamples` (2000) resamples, and the (1-level)/2 and (1+level)/2 percentiles are the
  bounds. The generator is seeded (seed 0), so the same samples always give the same interval.
  Exception: when every problem has the same pass rate the bootstrap has nothing to resample and would report a
  zero-width interval; the Wilson interval of that rate over n problems (each counted as one trial) is reported
  instead -- conservative, since k samples per problem carry no more independent evidence.

`pass_at_1_ci` returns the method it used ("wilson" or "bootstrap"); results.csv keeps it in `ci_method`.

Paired comparisons (two modes on the same problems, see `ctt.evaluation.comparisons`):

* `paired_delta_ci`: delta = mean over problems of (pass_a - pass_b). With one sample per problem (every pass
  rate 0 or 1) the interval is Newcombe's hybrid score interval for paired proportions (`newcombe_paired_ci`):
  like Wilson's for one proportion, it keeps its coverage with few discordant problems, where the percentile
  bootstrap does not (4 discordant of 100, all one way: the bootstrap excluded 0 while the exact McNemar p is
  0.125). With k > 1 samples, a seeded percentile bootstrap that resamples PROBLEMS with the same indices for both
  modes; Newcombe on fractional cells when every per-problem difference is the same (the bootstrap would be zero
  width).
* `paired_p_value`: the exact two-sided sign-flip (permutation) test of the per-problem differences: under "no
  difference between the modes" each difference is as likely positive as negative, and the p-value is the share
  of the 2^n sign assignments whose |sum| is at least the observed one, computed exactly by convolution. With one
  sample per problem it is the exact McNemar test (`sign_test_p`), and it always points the way delta does.
* `holm_adjust`: Holm's step-down adjustment of a FAMILY of p-values (every row of one comparisons table): it
  controls the family-wise error rate, so "some row with p_holm < 0.05" is a claim at the 5% level.

Over training seeds (`seed_problem_ci`, for `ctt-report --group-seeds`): the mean over seeds of a paired difference,
with an interval that covers the sampling of seeds AND of problems (two-way random effects; see its docstring).
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist
from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def per_problem_pass(correct: Sequence[Sequence[bool]]) -> list[float]:
    """Fraction of correct samples for each problem; `correct[i]` holds the k samples of problem i."""
    out = []
    for i, samples in enumerate(correct):
        if len(samples) == 0:
            raise ValueError(f"problem {i} has no samples")
        out.append(sum(bool(c) for c in samples) / len(samples))
    return out


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of (correct samples / k). NaN when there are no problems."""
    scores = per_problem_pass(correct)
    return sum(scores) / len(scores) if scores else math.nan


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes / n. (nan, nan) when n == 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return math.nan, math.nan
    return _wilson(successes / n, n, _z(level))


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score bounds for an observed proportion p out of n (n may be a fractional count; see
    `paired_cells`)."""
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p)) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    per_problem: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `per_problem` (problems resampled with replacement).

    Deterministic for a given seed. (nan, nan) for no problems; a single problem gives a zero-width interval.
    """
    _z(level)  # validates level
    values = np.asarray(per_problem, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def pass_at_1_ci(
    correct: Sequence[Sequence[bool]], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float, str]:
    """(pass@1, ci_low, ci_high, method): Wilson when every problem has one sample, else the problem bootstrap."""
    scores = per_problem_pass(correct)
    if not scores:
        return math.nan, math.nan, math.nan, "none"
    point = sum(scores) / len(scores)
    if all(len(s) == 1 for s in correct):
        lo, hi = wilson_ci(sum(int(bool(s[0])) for s in correct), len(correct), level)
        return point, lo, hi, "wilson"
    if max(scores) - min(scores) <= _TIE:  # one pass rate everywhere: the bootstrap would collapse to a point
        lo, hi = _wilson(point, len(scores), _z(level))
        return point, lo, hi, "wilson"
    lo, hi = bootstrap_ci(scores, level, resamples, seed)
    return point, lo, hi, "bootstrap"


# ---------------------------------------------------------------- paired comparisons

# Per-problem differences closer than this are equal (pass rates are fractions j/k, so real ones differ by >= 1/k^2).
_TIE = 1e-12


def _paired_arrays(pass_a: Sequence[float], pass_b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(pass_a, dtype=float), np.asarray(pass_b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two per-problem pass-rate lists of the same length, got {a.shape} and {b.shape}")
    if a.size and (a.min() < 0 or a.max() > 1 or b.min() < 0 or b.max() > 1):
        raise ValueError("per-problem pass rates must lie in [0, 1]")
    return a, b


def paired_cells(pass_a: Sequence[float], pass_b: Sequence[float]) -> tuple[float, float, float, float]:
    """The paired 2x2 table (a, b, c, d) = (both pass, only A, only B, neither) summed over problems.

    With one sample per problem (rates 0 or 1) these are the exact counts. With k > 1 samples each problem
    contributes FRACTIONAL cells that sum to 1: a_i = min(pa, pb), b_i = max(pa - pb, 0), c_i = max(pb - pa, 0),
    d_i = 1 - max(pa, pb) -- the table of maximally overlapping outcomes with those marginals. It keeps the
    marginals (a + b = sum pa, a + c = sum pb) and the difference (b - c = sum (pa - pb)) exact.
    """
    pa, pb = _paired_arrays(pass_a, pass_b)
    return (
        float(np.minimum(pa, pb).sum()),
        float(np.maximum(pa - pb, 0.0).sum()),
        float(np.maximum(pb - pa, 0.0).sum()),
        float((1.0 - np.maximum(pa, pb)).sum()),
    )


def newcombe_paired_ci(a: float, b: float, c: float, d: float, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for the paired difference p1 - p2 = (b - c) / n.

    Newcombe (1998), "Improved confidence intervals for the difference between binomial proportions based on
    paired data", Stat. Med. 17:2635, method 10: with Wilson intervals (l1, u1) of p1 = (a + b) / n and (l2, u2)
    of p2 = (a + c) / n, and the continuity-corrected correlation phi = A / sqrt((a+b)(c+d)(a+c)(b+d)) with
    A = max(ad - bc - n/2, 0) when ad > bc, else ad - bc (phi = 0 when the product is 0),

        lower = delta - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        upper = delta + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)

    Reproduces the paper's worked examples (tests/test_stats.py). Cells may be fractional (see `paired_cells`).
    (nan, nan) for an empty table.
    """
    if min(a, b, c, d) < 0:
        raise ValueError(f"cells must be non-negative, got {(a, b, c, d)}")
    n = a + b + c + d
    if n <= 0:
        return math.nan, math.nan
    z = _z(level)
    p1, p2, delta = (a + b) / n, (a + c) / n, (b - c) / n
    l1, u1 = _wilson(p1, n, z)
    l2, u2 = _wilson(p2, n, z)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    if cross > 0:
        cross = max(cross - n / 2, 0.0)
    phi = cross / math.sqrt(denom) if denom > 0 else 0.0
    down = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    up = (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2
    return max(-1.0, delta - math.sqrt(max(0.0, down))), min(1.0, delta + math.sqrt(max(0.0, up)))


def paired_delta_ci(
    pass_a: Sequence[float],
    pass_b: Sequence[float],
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float, str]:
    """(delta, ci_low, ci_high, method) for mode A minus mode B, from per-problem pass rates on the same problems.

    `pass_a[i]` and `pass_b[i]` belong to the same problem i; delta = mean(pass_a - pass_b). Method "newcombe":
    `newcombe_paired_ci` of `paired_cells`, when every rate is 0 or 1 (one sample per problem) or every per-problem
    difference is the same (the bootstrap would be zero width; fractional cells for k > 1). Otherwise "bootstrap":
    a seeded percentile bootstrap resampling problems with the same indices for both modes. (nan, nan, nan, "none")
    for no problems.
    """
    pa, pb = _paired_arrays(pass_a, pass_b)
    if pa.size == 0:
        return math.nan, math.nan, math.nan, "none"
    diff = pa - pb
    delta = float(diff.mean())
    binary = bool(np.all((pa == 0) | (pa == 1)) and np.all((pb == 0) | (pb == 1)))
    if binary or float(np.ptp(diff)) <= _TIE:
        lo, hi = newcombe_paired_ci(*paired_cells(pa, pb), level=level)
        return delta, lo, hi, "newcombe"
    lo, hi = bootstrap_ci(diff, level, resamples, seed)
    return delta, lo, hi, "bootstrap"


def sign_test_p(positive: int, negative: int) -> float:
    """Exact two-sided sign test: min(1, 2 P[Binom(m, 1/2) <= min(positive, negative)]), m = positive + negative.

    With one sample per problem, positive = b and negative = c are the discordant cells and this is the exact
    McNemar test. 1.0 when m = 0. Exact integer arithmetic, rounded once to a float.
    """
    if positive < 0 or negative < 0:
        raise ValueError(f"counts must be non-negative, got {positive}, {negative}")
    m = positive + negative
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(positive, negative) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**m)))


def paired_p_value(pass_a: Sequence[float], pass_b: Sequence[float], max_denominator: int = 1000) -> float:
    """Exact two-sided sign-flip test of the per-problem differences d_i = pass_a[i] - pass_b[i].

    Under "the modes do not differ" each d_i is as likely +|d_i| as -|d_i|; p = P(|sum s_i |d_i|| >= |sum d_i|) over
    the 2^n equally likely signs s_i. The |d_i| are fractions j/k (k samples per problem), so the sum lives on a grid:
    its distribution is computed exactly by convolving two-point distributions, in float64. With one sample per
    problem this is the exact McNemar test (`sign_test_p`, used then, in exact integer arithmetic). 1.0 when no
    problem differs.
    """
    pa, pb = _paired_arrays(pass_a, pass_b)
    diff = pa - pb
    if np.all(np.isin(np.round(diff, 12), (-1.0, 0.0, 1.0))):
        return sign_test_p(int((diff > _TIE).sum()), int((diff < -_TIE).sum()))
    fractions = [Fraction(float(x)).limit_denominator(max_denominator) for x in diff if abs(x) > _TIE]
    scale = math.lcm(*(f.denominator for f in fractions))
    steps = [abs(int(f * scale)) for f in fractions]
    total = sum(steps)
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0  # index total + s holds P(sum == s)
    for step in steps:
        dist = 0.5 * (np.roll(dist, step) + np.roll(dist, -step))  # no wrap-around: |sum| <= total
    observed = abs(int(sum(fractions) * scale))
    sums = np.abs(np.arange(-total, total + 1))
    return float(min(1.0, dist[sums >= observed].sum()))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order, for the whole family `p_values` (NaNs are left out
    of the family and stay NaN). With the m p-values sorted, p_(1) <= ... <= p_(m):
    adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))."""
    values = [float(p) for p in p_values]
    order = sorted((i for i, p in enumerate(values) if not math.isnan(p)), key=lambda i: values[i])
    m, running, out = len(order), 0.0, [math.nan] * len(values)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[i]))
        out[i] = running
    return out


# ---------------------------------------------------------------- over training seeds


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    out = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1.0 + num * d, 1.0 + num / c
            d, c = 1.0 / (d if abs(d) > tiny else tiny), c if abs(c) > tiny else tiny
            out *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return out


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` (> 0, may be fractional) degrees of freedom: I_x(df/2, 1/2)."""
    x = df / (df + t * t)
    a, b = df / 2.0, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) if 0 < x < 1 else 0.0
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_quantile(level: float, df: float) -> float:
    """q with P(|T| <= q) = level, by bisection on `t_two_sided_p`."""
    _z(level)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 1.0 - level:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 1.0 - level else (lo, mid)
    return (lo + hi) / 2.0


def seed_problem_ci(diffs: Sequence[Sequence[float]], level: float = 0.95) -> tuple[float, float, float, float, float]:
    """(mean, ci_low, ci_high, p_value, df) of the mean over seeds of a paired difference; `diffs[s][p]` is the
    per-problem difference (pass_a - pass_b) of training seed s on problem p (every seed on the same problems).

    Seeds and problems are crossed random effects, d_sp = mu + a_s + b_p + e_sp, so
    Var(mean) = s_a^2/S + s_b^2/P + s_e^2/(SP). Its unbiased ANOVA estimate is var(seed means)/S +
    var(problem means)/P - MSE/(SP) (each of the first two holds s_e^2/(SP) once), floored at the larger of the
    first two; the interval is mean +- t * sqrt(that), with Satterthwaite's degrees of freedom, and p is the two-sided
    t test of mean = 0. The t quantile matters: with 3 seeds and seed variance dominating, a percentile bootstrap
    over seeds covers about 75% (its variance is (S-1)/S of the truth and its quantile is z, not t with 2 df).
    A problems-only interval misses s_a^2/S altogether. nan for fewer than 2 seeds or 2 problems.
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2:
        raise ValueError(f"need a seeds x problems array of differences, got shape {d.shape}")
    seeds, problems = d.shape
    if seeds < 2 or problems < 2:
        return (float(d.mean()) if d.size else math.nan), math.nan, math.nan, math.nan, math.nan
    mean = float(d.mean())
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    v_seed, v_prob = float(rows.var(ddof=1)) / seeds, float(cols.var(ddof=1)) / problems
    resid = d - rows[:, None] - cols[None, :] + mean
    v_err = float((resid**2).sum()) / ((seeds - 1) * (problems - 1)) / (seeds * problems)
    var = max(v_seed + v_prob - v_err, v_seed, v_prob)
    if var <= 0.0:  # every difference the same: nothing varies
        return mean, mean, mean, (1.0 if mean == 0 else 0.0), math.inf
    df = var**2 / (v_seed**2 / (seeds - 1) + v_prob**2 / (problems - 1) + v_err**2 / ((seeds - 1) * (problems - 1)))
    half = t_quantile(level, df) * math.sqrt(var)
    return mean, mean - half, mean + half, t_two_sided_p(mean / math.sqrt(var), df), df
