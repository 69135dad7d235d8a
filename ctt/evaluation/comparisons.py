"""Paired comparisons between modes: accuracy deltas with a paired 95% CI and an exact p-value (no torch, no model).

Every mode runs on the same problems, so "is mode A better than mode B" is a paired question. `compare` reads the
per-sample records (the rows of samples.jsonl) and, for every benchmark, every mode and every N, compares the
mode with

* each N-independent baseline (`baseline_modes`, e.g. "base") at the baseline's N=0 run, and
* each same-N reference (`same_n_references`, e.g. "fixed:Wait") at the same N, unless the mode is itself a
  reference (references are baselines for the learned token, not each other's: that would double the table).

Mode labels are opaque strings: which label plays which role is the caller's choice. Baselines are not
compared with anything as `mode`; only their N=0 run is used.

A comparison pairs the problems by `problem_id` present in both runs (n = number of paired problems; a problem
missing from either run is left out, and a pair of runs with no problem in common gives no row). Per problem, the
pass rate is the mean of its samples' `correct`. delta = mean over problems of (pass_mode - pass_versus), its
interval and method come from `ctt.evaluation.stats.paired_delta_ci` (paired bootstrap over problems, Newcombe's score
interval when every problem's difference is the same), p_value from `ctt.evaluation.stats.paired_p_value` (exact sign test;
the exact McNemar test with one sample per problem). `p_holm` is Holm's adjustment of p_value over the FAMILY of
every row of the table (all benchmarks, modes, N and versus of one evaluation), not per row: with m rows, the
smallest p is multiplied by m (`ctt.evaluation.stats.holm_adjust`).

Columns: COMPARISON_COLUMNS. `versus_num_continuations` says which run of `versus` was used: 0 for a baseline
(its only run), N for a same-N reference. Rows are ordered by benchmark (first appearance), mode (first
appearance), N (ascending), then versus: the baselines, then the references, each in the order the caller gave.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ctt.outputs import atomic_open
from ctt.text import read_csv
from ctt.evaluation.stats import holm_adjust, paired_delta_ci, paired_p_value

# The nine columns first; ci_method and versus_num_continuations are appended.
COMPARISON_COLUMNS = [
    "benchmark", "mode", "num_continuations", "versus", "delta", "ci_low", "ci_high", "p_value", "n",
    "ci_method", "versus_num_continuations", "p_holm",
]
COMPARISONS_CSV = "comparisons.csv"

RunKey = tuple[str, str, int]  # (benchmark, mode, num_continuations)


def per_problem_rates(records: Iterable[Any]) -> dict[RunKey, dict[str, float]]:
    """{(benchmark, mode, N): {problem_id: fraction of its samples correct}}, runs in order of first appearance.

    Records are dicts with the samples.jsonl keys (or `SampleRecord`s)."""
    counts: dict[RunKey, dict[str, list[int]]] = {}
    for rec in records:
        if is_dataclass(rec):
            rec = asdict(rec)
        key = (str(rec["benchmark"]), str(rec["mode"]), int(rec["num_continuations"]))
        tally = counts.setdefault(key, {}).setdefault(str(rec["problem_id"]), [0, 0])
        tally[0] += int(bool(rec["correct"]))
        tally[1] += 1
    return {key: {pid: hits / total for pid, (hits, total) in problems.items()} for key, problems in counts.items()}


def _row(bench: str, mode: str, n: int, versus: str, versus_n: int, a: dict[str, float], b: dict[str, float]) -> dict | None:
    paired = sorted(set(a) & set(b))  # a canonical order: the seeded bootstrap does not depend on record order
    if not paired:
        return None
    pass_a, pass_b = [a[p] for p in paired], [b[p] for p in paired]
    delta, lo, hi, method = paired_delta_ci(pass_a, pass_b)
    return {
        "benchmark": bench, "mode": mode, "num_continuations": n, "versus": versus, "delta": delta,
        "ci_low": lo, "ci_high": hi, "p_value": paired_p_value(pass_a, pass_b), "n": len(paired),
        "ci_method": method, "versus_num_continuations": versus_n,
    }


def compare(
    records: Iterable[Any], baseline_modes: Sequence[str] = ("base",), same_n_references: Sequence[str] = ()
) -> list[dict]:
    """Paired comparison rows (COMPARISON_COLUMNS, unrounded) from per-sample records; see the module docstring.

    `baseline_modes`: labels compared, at their N=0 run, with every other mode at every N.
    `same_n_references`: labels every other non-baseline mode is compared with at the same N (the caller passes
    e.g. `[f"fixed:{w}" for w in fixed_words]`).
    """
    baselines, references = list(baseline_modes), list(same_n_references)
    if set(baselines) & set(references):
        raise ValueError(f"a mode cannot be both a baseline and a same-N reference: {set(baselines) & set(references)}")
    rates = per_problem_rates(records)
    benchmarks = list(dict.fromkeys(b for b, _, _ in rates))
    modes = [m for m in dict.fromkeys(m for _, m, _ in rates) if m not in baselines]
    rows: list[dict] = []
    for bench in benchmarks:
        for mode in modes:
            for n in sorted(k for b, m, k in rates if b == bench and m == mode):
                versus = [(base, 0) for base in baselines] + ([] if mode in references else [(ref, n) for ref in references])
                for other, other_n in versus:
                    if (bench, other, other_n) in rates:
                        row = _row(bench, mode, n, other, other_n, rates[(bench, mode, n)], rates[(bench, other, other_n)])
                        if row is not None:
                            rows.append(row)
    return with_holm(rows)


def with_holm(rows: list[dict]) -> list[dict]:
    """The rows with `p_holm`: Holm's adjustment of their `p_value`s, the whole list being one family."""
    for row, adjusted in zip(rows, holm_adjust([float(r["p_value"]) for r in rows])):
        row["p_holm"] = adjusted
    return rows


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) and not math.isnan(value) else value


def write_comparisons(out_dir: str | Path, rows: list[dict]) -> Path:
    """`<out_dir>/comparisons.csv` with COMPARISON_COLUMNS, floats rounded to 4 decimals; returns its path."""
    out_dir = Path(out_dir)
    path = out_dir / COMPARISONS_CSV
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=COMPARISON_COLUMNS)
        writer.writeheader()
        writer.writerows({c: _rounded(r.get(c, "")) for c in COMPARISON_COLUMNS} for r in rows)
    return path


def read_comparisons(path: str | Path) -> list[dict] | None:
    """The rows of a comparisons.csv (values as strings), or None when the file does not exist; a DataError naming
    the file and line when it is garbled (a missing column, a non-integer N, a delta that is not a number)."""
    path = Path(path)
    if not path.is_file():
        return None
    return read_csv(path, required=("benchmark", "mode", "num_continuations", "versus", "delta"),
                    kinds={"num_continuations": "int", "versus_num_continuations": "int?", "delta": "number",
                           **dict.fromkeys(("ci_low", "ci_high", "p_value", "p_holm"), "number?")})


def _pp(value: Any) -> str:
    """A fraction as signed percentage points with one decimal; never "-0.0"."""
    points = round(100.0 * float(value), 1)
    return f"{points:+.1f}" if points != 0 else "+0.0"  # -0.0 == 0


def format_p(p: Any) -> str:
    """"<0.001" below 0.001, else three decimals."""
    p = float(p)
    if math.isnan(p):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def comparisons_markdown(rows: list[dict]) -> str:
    """A results.md section: one table row per comparison, delta in percentage points with its 95% CI
    ("+12.3 [+4.0, +20.7]") and the p-value. Accepts the rows of `compare` or of a comparisons.csv read back.
    Empty string when there are no rows."""
    if not rows:
        return ""
    lines = [
        "## Paired comparisons",
        "",
        "delta: accuracy of `mode` minus accuracy of `versus` on the n problems both ran, in percentage points, "
        "with its 95% CI (paired bootstrap over problems; Newcombe's score interval when every problem's "
        "difference is the same); p: exact two-sided sign test over problems (McNemar with one sample per problem); "
        f"p_holm: Holm-adjusted over the {len(rows)} comparisons of this table (family-wise error rate).",
        "",
        "| benchmark | mode | N | versus | delta (pp, 95% CI) | p | p_holm | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n, versus_n = int(float(r["num_continuations"])), r.get("versus_num_continuations", "")
        versus = r["versus"]
        if versus_n not in ("", None) and int(float(versus_n)) != n:
            versus = f"{versus} (N={int(float(versus_n))})"
        interval = f"{_pp(r['delta'])} [{_pp(r['ci_low'])}, {_pp(r['ci_high'])}]"
        lines.append(f"| {r['benchmark']} | {r['mode']} | {n} | {versus} | {interval} | {format_p(r['p_value'])} | {format_p(r.get('p_holm', 'nan') or 'nan')} | {r['n']} |")
    return "\n".join(lines) + "\n"
