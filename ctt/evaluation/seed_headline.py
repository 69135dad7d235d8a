"""The headline over training seeds (`ctt-report --group-seeds`): for runs that differ only in `seed`, the mean over
seeds of every paired difference their comparisons.csv reports, with a 95% interval that covers the sampling of the
training seeds and of the problems (`ctt.stats.seed_problem_ci`), its p-value and Holm's adjustment over the group's
table.

A comparison enters when every run of the group reports it (same benchmark, mode, N, versus and versus' N). Its
per-problem differences are recomputed from each run's samples.jsonl (pass rate of the mode minus that of versus,
per problem_id) on the problems that every run evaluated both modes on (n): with `data=organism`, whose training
sums depend on the seed, the held-out check drops different problems in each run, and only the common ones are
paired across seeds. Single-seed intervals stay in each run's comparisons.csv.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from ctt.evaluation.comparisons import _pp, format_p, per_problem_rates, read_comparisons
from ctt.evaluation.stats import holm_adjust, seed_problem_ci
from ctt.outputs import atomic_open
from ctt.text import jsonl_rows

SEED_COLUMNS = [
    "group", "benchmark", "mode", "num_continuations", "versus", "versus_num_continuations", "seeds", "n", "mean",
    "ci_low", "ci_high", "p_value", "p_holm", "df", "per_seed",
]
Key = tuple[str, str, int, str, int]  # benchmark, mode, N, versus, versus' N


def _read_samples(run_dir: Path) -> list[dict] | None:
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        return None
    return [row for _, row in jsonl_rows(path)]  # file:line on a garbled line (ctt.text)


def _keys(run_dir: Path) -> list[Key]:
    rows = read_comparisons(Path(run_dir) / "comparisons.csv") or []
    return [(r["benchmark"], r["mode"], int(float(r["num_continuations"])), r["versus"],
             int(float(r["versus_num_continuations"]))) for r in rows]


def _differences(rates: list[dict], key: Key) -> tuple[list[list[float]], int]:
    """(per seed, the differences on the common problems in a canonical order; how many problems)."""
    bench, mode, n, versus, versus_n = key
    pairs = [(r[(bench, mode, n)], r[(bench, versus, versus_n)]) for r in rates]
    common = sorted(set.intersection(*(set(a) & set(b) for a, b in pairs)))
    return [[a[p] - b[p] for p in common] for a, b in pairs], len(common)


def seed_rows(run_dirs: Sequence[str | Path], group: str = "") -> list[dict]:
    """The headline rows (SEED_COLUMNS, unrounded) of one group of runs, one per comparison they all report."""
    samples = [_read_samples(Path(d)) for d in run_dirs]
    if not run_dirs or any(s is None for s in samples):
        return []
    rates = [per_problem_rates(s) for s in samples]
    shared = set.intersection(*(set(_keys(Path(d))) for d in run_dirs))
    keys = [k for k in _keys(Path(run_dirs[0])) if k in shared]
    rows = []
    for key in keys:
        if not all((key[0], key[1], key[2]) in r and (key[0], key[3], key[4]) in r for r in rates):
            continue
        diffs, n = _differences(rates, key)
        if n == 0:
            continue
        mean, lo, hi, p, df = seed_problem_ci(diffs)
        per_seed = ",".join(_pp(sum(d) / len(d)) for d in diffs)
        rows.append(dict(zip(SEED_COLUMNS, (group, *key[:4], key[4], len(diffs), n, mean, lo, hi, p, 0.0, df, per_seed))))
    for row, adjusted in zip(rows, holm_adjust([r["p_value"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def write_seed_rows(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=SEED_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def seed_markdown(rows: list[dict]) -> str:
    """A section with one line per comparison: mean over seeds (points) with its interval, p, p_holm, per seed."""
    if not rows:
        return ""
    lines = [
        "## Over training seeds",
        "",
        "mean: the mean over the training seeds of (accuracy of `mode` minus accuracy of `versus`) on the n problems "
        "every seed ran, in percentage points; 95% CI over seeds AND problems (two-way random effects, t with "
        "Satterthwaite's df); p: its t test; p_holm: Holm-adjusted over each group's comparisons; per seed: each "
        "seed's difference.",
        "",
        "| group | benchmark | mode | N | versus | mean (pp, 95% CI) | p | p_holm | seeds | n | per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        versus = r["versus"] + (f" (N={r['versus_num_continuations']})" if r["versus_num_continuations"] != r["num_continuations"] else "")
        interval = f"{_pp(r['mean'])} [{_pp(r['ci_low'])}, {_pp(r['ci_high'])}]" if r["ci_low"] == r["ci_low"] else _pp(r["mean"])
        lines.append(f"| {r['group']} | {r['benchmark']} | {r['mode']} | {r['num_continuations']} | {versus} | {interval} | "
                     f"{format_p(r['p_value'])} | {format_p(r['p_holm'])} | {r['seeds']} | {r['n']} | {r['per_seed']} |")
    return "\n".join(lines) + "\n"
