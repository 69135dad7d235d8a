"""Pass@1 and its 95% confidence interval, as pure functions (no torch, no I/O).

Which interval `pass_at_1_ci` reports:

* every problem has exactly one sample (k == 1): the **Wilson score interval** of the binomial proportion
  correct / problems. It is the exact model there (one Bernoulli trial per problem), and unlike a bootstrap it
  does not collapse to a zero-width interval at 0% or 100% accuracy, which small evaluations hit often;
* otherwise (k > 1 samples per problem): a seeded **percentile bootstrap over problems**. Problems are resampled
  with replacement (their k samples travel together, so the within-problem correlation is kept), pass@1 is
  recomputed for each of `resamples` (2000) resamples, and the (1-level)/2 and (1+level)/2 percentiles are the
  bounds. The generator is seeded (seed 0), so the same samples always give the same interval.
  Exception: when every problem scores 0 (or every problem 1) the bootstrap has nothing to resample and would
  report a zero-width interval; the Wilson interval over problems (each counted as one trial, all failed or all
  passed) is reported instead -- conservative, since k samples per problem carry no more independent evidence.

`pass_at_1_ci` returns the method it used ("wilson" or "bootstrap"); results.csv keeps it in `ci_method`.
"""

from __future__ import annotations

import math
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
    z = _z(level)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
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
    if all(v == 0.0 for v in scores) or all(v == 1.0 for v in scores):  # the bootstrap would collapse to a point
        lo, hi = wilson_ci(int(point) * len(scores), len(scores), level)
        return point, lo, hi, "wilson"
    lo, hi = bootstrap_ci(scores, level, resamples, seed)
    return point, lo, hi, "bootstrap"
