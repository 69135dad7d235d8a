"""`ctt-report`: one table over many Hydra runs -- the config keys that differ between them, and their metrics.

    ctt-report DIR [DIR ...] [--out PATH_PREFIX] [--group-seeds]
    ctt-report --diff RUN_A RUN_B

A DIR may be a run dir (it holds `.hydra/config.yaml`), a multirun dir (`0/`, `1/`, ... are run dirs) or any
parent of those: run dirs are discovered recursively. Each run's `.hydra/config.yaml` is flattened to dotted keys
(lists stay one value, interpolations are kept unresolved); `hydra.*` and `paths.*` are skipped, and so is any key
whose value contains the run's own directory. The keys whose values differ between runs become the columns.

Metrics per run:
  train/reward                     last logged value in the CSV logger's metrics.csv (csv/metrics.csv)
  <bench>/<mode>/N=<n>             accuracy (pass@1) from results.csv
  <bench>/<mode>-<versus>/N=<n>    paired delta from comparisons.csv (`ctt.comparisons`): <mode> at N minus
                                   <versus> (a baseline at N=0, or a same-N reference); the markdown cell shows
                                   it with its 95% CI, "+0.1250 [+0.0312, +0.2188]", and report.csv adds
                                   "<metric> ci_low" / "<metric> ci_high" columns
Runs without comparisons.csv get deltas computed from results.csv instead (no CI):
  <bench>/learned-base/N=<n>       learned at N minus base (N=0)
  <bench>/learned-fixed:<w>/N=<n>  learned at N minus fixed word <w> at the same N

status: ok (results.csv, or train metrics of a run with evaluate=false); partial (train metrics but the evaluation
that `evaluate=true` asks for is missing); no-results (neither, but the run left files); failed (an ERROR record in
the run's log, or nothing but `.hydra/` and the log).

--group-seeds folds runs whose configs differ only in `seed` into one row: every metric becomes mean +- std over
those runs (sample std, n-1; 0 for a single run) and a `seeds` column counts them. Writes <out>.csv and <out>.md
(default <first DIR>/report) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import OmegaConf

from ctt.comparisons import COMPARISONS_CSV, read_comparisons
from ctt.evaluate import markdown_table
from ctt.modes import label_family
from ctt.plots import debate_plot

SKIP_PREFIXES = ("hydra", "paths")
ABSENT = "(absent)"
METRICS_CSV = "metrics.csv"


@dataclass
class Run:
    path: Path
    name: str
    config: dict[str, Any]  # flattened, filtered
    local_keys: set[str] = field(default_factory=set)  # keys holding this run's own directory
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    # delta metrics (a subset of `metrics`) -> their 95% CI, or None for deltas computed without one
    deltas: dict[str, tuple[float, float] | None] = field(default_factory=dict)


# ---------------------------------------------------------------- discovery


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def discover_runs(dirs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(run dir, display name) for every run under `dirs`, in natural order (0, 1, ..., 10); no run twice."""
    found: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"not a directory: {d}")
        prefix = d.name if len(dirs) > 1 else ""
        if is_run_dir(d):
            hits = [(d, d.name or str(d))]
        else:
            hits = []
            for root, subdirs, _ in os.walk(d):
                root_path = Path(root)
                if is_run_dir(root_path):
                    hits.append((root_path, str(root_path.relative_to(d))))
                    subdirs[:] = []  # a run dir holds no further runs (checkpoints, csv, ...)
                    continue
                subdirs[:] = sorted((s for s in subdirs if not s.startswith(".")), key=_natural)
            if prefix:
                hits = [(p, f"{prefix}/{n}") for p, n in hits]
        for path, name in hits:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append((path, name))
    return found


# ---------------------------------------------------------------- config


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists (and empty dicts) stay single values."""
    if isinstance(node, dict) and (node or not prefix):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _skipped(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in SKIP_PREFIXES)


def group_choices(run_dir: Path) -> dict[str, Any]:
    """Config-group choices (`token/init: mean`) from `.hydra/hydra.yaml`, Hydra's own groups left out."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    choices = OmegaConf.to_container(OmegaConf.load(path).hydra.runtime.choices, resolve=False) or {}
    return {g: c for g, c in choices.items() if not (g == "hydra" or g.startswith("hydra/") or g == "paths")}


def load_config(run_dir: Path) -> tuple[dict[str, Any], set[str]]:
    """The run's flattened config (unresolved), minus hydra.* / paths.*, plus its group choices under their
    group names (`token/init`); and the keys naming the run's own dir."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    flat = {k: v for k, v in flatten(OmegaConf.to_container(cfg, resolve=False)).items() if not _skipped(k)}
    flat.update(group_choices(run_dir))
    own = {str(run_dir), str(run_dir.resolve()), os.path.abspath(run_dir)}
    local = {k for k, v in flat.items() if isinstance(v, str) and any(o in v for o in own)}
    return flat, local


def fmt_value(value: Any) -> str:
    """A config value as a Hydra override would spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{fmt_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Keys (in first-seen order) whose value is not the same in every run; a key absent somewhere differs.

    A swept config group (`token/init=wait,mean`) is one column, named like the override: the keys its options
    set (`token.init.name`, `token.init.word`) are what the group choice already says, so they are left out.
    """
    local = set().union(*(r.local_keys for r in runs)) if runs else set()
    keys = list(dict.fromkeys(k for r in runs for k in r.config))

    def differs(key: str) -> bool:
        return len({fmt_value(r.config[key]) if key in r.config else ABSENT for r in runs}) > 1

    swept_groups = [k.replace("/", ".") for k in keys if "/" in k and differs(k)]
    covered = lambda key: any(key == g or key.startswith(g + ".") for g in swept_groups)  # noqa: E731
    return [k for k in keys if k not in local and differs(k) and not ("/" not in k and covered(k))]


# ---------------------------------------------------------------- metrics


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def find_metrics_csv(run_dir: Path) -> Path | None:
    direct = run_dir / "csv" / METRICS_CSV
    if direct.is_file():
        return direct
    others = sorted((p for p in run_dir.rglob(METRICS_CSV) if ".hydra" not in p.parts), key=lambda p: _natural(str(p)))
    return others[0] if others else None


def read_train_reward(run_dir: Path) -> float | None:
    """The last non-empty `train/reward` logged by the CSV logger, or None."""
    path = find_metrics_csv(run_dir)
    if path is None:
        return None
    last = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            value = _float(row.get("train/reward"))
            if value is not None:
                last = value
    return last


def _accuracies(rows: Iterable[dict]) -> dict[tuple[str, str, int], float]:
    acc: dict[tuple[str, str, int], float] = {}
    for row in rows:
        value = _float(row.get("accuracy"))
        if value is not None:
            acc[(row["benchmark"], row["mode"], int(float(row["num_continuations"])))] = value
    return acc


def accuracy_metrics(rows: Iterable[dict]) -> dict[str, float]:
    """Accuracy per `<bench>/<mode>/N=<n>` from the rows of results.csv."""
    return {f"{b}/{m}/N={n}": v for (b, m, n), v in _accuracies(rows).items()}


def comparison_metrics(rows: Iterable[dict]) -> dict[str, tuple[float, float, float]]:
    """(delta, ci_low, ci_high) per `<bench>/<mode>-<versus>/N=<n>` from the rows of comparisons.csv."""
    out = {}
    for row in rows:
        delta = _float(row.get("delta"))
        if delta is None:
            continue
        lo, hi = _float(row.get("ci_low")), _float(row.get("ci_high"))
        name = f"{row['benchmark']}/{row['mode']}-{row['versus']}/N={int(float(row['num_continuations']))}"
        out[name] = (delta, math.nan if lo is None else lo, math.nan if hi is None else hi)
    return out


def eval_metrics(rows: Iterable[dict]) -> dict[str, float]:
    """Accuracy per `<bench>/<mode>/N=<n>`, then the learned-base and learned-fixed:<w> deltas per bench and N
    computed from those accuracies (for runs without comparisons.csv)."""
    acc = _accuracies(rows)
    out = {f"{b}/{m}/N={n}": v for (b, m, n), v in acc.items()}
    for bench in dict.fromkeys(b for b, _, _ in acc):
        base = acc.get((bench, "base", 0))
        learned = sorted(n for b, m, n in acc if b == bench and m == "learned")
        for n in learned:
            value = acc[(bench, "learned", n)]
            if base is not None:
                out[f"{bench}/learned-base/N={n}"] = round(value - base, 4)
            for b, mode, n2 in acc:
                if b == bench and n2 == n and label_family(mode) == "fixed":
                    out[f"{bench}/learned-{mode}/N={n}"] = round(value - acc[(b, mode, n2)], 4)
    return out


def read_results(run_dir: Path) -> list[dict] | None:
    path = run_dir / "results.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _log_has_error(run_dir: Path) -> bool:
    for log in run_dir.glob("*.log"):
        try:
            if "][ERROR] - " in log.read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def run_status(run_dir: Path, has_results: bool, has_train: bool, evaluate: Any) -> str:
    if _log_has_error(run_dir):
        return "failed"
    if has_results:
        return "ok"
    if has_train:
        return "partial" if evaluate is True else "ok"
    leftovers = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    return "no-results" if leftovers else "failed"


def load_run(path: Path, name: str) -> Run:
    config, local = load_config(path)
    metrics: dict[str, float] = {}
    reward = read_train_reward(path)
    if reward is not None:
        metrics["train/reward"] = reward
    results = read_results(path)
    comparisons = read_comparisons(path / COMPARISONS_CSV)
    deltas: dict[str, tuple[float, float] | None] = {}
    if comparisons is not None:  # paired deltas with CIs replace the ones computed from accuracies
        metrics.update(accuracy_metrics(results or []))
        for metric, (delta, lo, hi) in comparison_metrics(comparisons).items():
            metrics[metric] = delta
            deltas[metric] = (lo, hi)
    elif results:
        computed = eval_metrics(results)
        metrics.update(computed)
        deltas = {m: None for m in computed if m not in accuracy_metrics(results)}
    status = run_status(path, bool(results), reward is not None, config.get("evaluate"))
    return Run(path, name, config, local, metrics, status, deltas)


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    return [load_run(path, name) for path, name in discover_runs(dirs)]


# ---------------------------------------------------------------- tables


def metric_columns(runs: Sequence[Run]) -> list[str]:
    """train/reward first, then accuracies, then deltas, each in first-seen order."""
    names = list(dict.fromkeys(k for r in runs for k in r.metrics))
    delta_names = {k for r in runs for k in r.deltas}

    def rank(name: str) -> int:
        if name == "train/reward":
            return 0
        return 2 if name in delta_names else 1

    return sorted(names, key=rank)  # stable: keeps first-seen order inside each rank


def _fmt_metric(value: float | None, interval: tuple[float, float] | None = None) -> str:
    """"0.1250"; a delta with its CI as "+0.1250 [+0.0312, +0.2188]"."""
    if value is None:
        return ""
    if interval is None:
        return f"{value:.4f}"
    lo, hi = interval
    return f"{value:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _interval_columns(runs: Sequence[Run], metrics: Sequence[str]) -> list[str]:
    """The metric columns, each delta that has a CI in some run followed by its `ci_low` / `ci_high` columns."""
    with_ci = {k for r in runs for k, v in r.deltas.items() if v is not None}
    cols: list[str] = []
    for m in metrics:
        cols += [m, f"{m} ci_low", f"{m} ci_high"] if m in with_ci else [m]
    return cols


def report_rows(runs: Sequence[Run], group_seeds: bool = False) -> tuple[list[str], list[dict], list[str], list[dict]]:
    """(markdown columns, markdown rows, csv columns, csv rows) for the runs."""
    keys = differing_keys(runs)
    metrics = metric_columns(runs)
    if not group_seeds:
        md_cols = ["run", "status", *keys, *metrics]
        csv_cols = ["run", "status", *keys, *_interval_columns(runs, metrics), "path"]
        md_rows, csv_rows = [], []
        for r in runs:
            cells = {k: fmt_value(r.config[k]) if k in r.config else ABSENT for k in keys}
            md_rows.append({"run": r.name, "status": r.status, **cells,
                            **{m: _fmt_metric(r.metrics.get(m), r.deltas.get(m)) for m in metrics}})
            values: dict[str, Any] = {m: r.metrics.get(m, "") for m in metrics}
            for m, interval in r.deltas.items():
                if interval is not None:
                    values[f"{m} ci_low"], values[f"{m} ci_high"] = interval
            csv_rows.append({"run": r.name, "status": r.status, **cells, **values, "path": str(r.path)})
        return md_cols, md_rows, csv_cols, csv_rows

    group_keys = [k for k in keys if k != "seed"]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(fmt_value(r.config[k]) if k in r.config else ABSENT for k in group_keys), []).append(r)
    md_cols = ["run", "status", "seeds", *group_keys, *metrics]
    csv_cols = ["run", "status", "seeds", *group_keys]
    for m in metrics:
        csv_cols += [m, f"{m} std"]
    md_rows, csv_rows = [], []
    for values, members in groups.items():
        statuses = [r.status for r in members]
        counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
        status = statuses[0] if len(counts) == 1 else ", ".join(f"{s} x{c}" for s, c in counts.items())
        head = {"run": ",".join(r.name for r in members), "status": status, "seeds": len(members), **dict(zip(group_keys, values))}
        md_row, csv_row = dict(head), dict(head)
        for m in metrics:
            vals = [r.metrics[m] for r in members if m in r.metrics]
            if not vals:
                md_row[m] = ""
                csv_row[m] = csv_row[f"{m} std"] = ""
                continue
            mean, std = mean_std(vals)
            cell = f"{mean:.4f} ± {std:.4f}"
            if len(vals) < len(members):
                cell += f" (n={len(vals)})"
            md_row[m] = cell
            csv_row[m], csv_row[f"{m} std"] = mean, std
        md_rows.append(md_row)
        csv_rows.append(csv_row)
    return md_cols, md_rows, csv_cols, csv_rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1); the std of a single value is 0."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def write_report(out: str | Path, md_cols: list[str], md_rows: list[dict], csv_cols: list[str], csv_rows: list[dict]) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out.with_name(out.name + ".csv"), out.with_name(out.name + ".md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_cols)
        writer.writeheader()
        writer.writerows(csv_rows)
    md_path.write_text(markdown_table(md_rows, md_cols) + "\n")
    return csv_path, md_path


def report(dirs: Sequence[str | Path], out: str | Path | None = None, group_seeds: bool = False) -> tuple[str, Path, Path]:
    runs = load_runs(dirs)
    if not runs:
        raise FileNotFoundError(f"no run dirs (with .hydra/config.yaml) under {', '.join(map(str, dirs))}")
    md_cols, md_rows, csv_cols, csv_rows = report_rows(runs, group_seeds)
    csv_path, md_path = write_report(out or Path(dirs[0]) / "report", md_cols, md_rows, csv_cols, csv_rows)
    evaluated = [(int(r.config.get("token.count") or 1), read_results(r.path)) for r in runs]
    evaluated = [(k, rows) for k, rows in evaluated if rows]
    if evaluated:  # accuracy against compute, one line per kind of continuation (learned per k)
        debate_plot(evaluated, csv_path.with_name("debate.png"))
    return markdown_table(md_rows, md_cols), csv_path, md_path


def diff(run_a: str | Path, run_b: str | Path) -> tuple[list[dict], list[dict]]:
    """(config keys that differ: key / A / B, metric deltas B - A for the metrics both runs have)."""
    runs = []
    for d in (Path(run_a), Path(run_b)):
        if not is_run_dir(d):
            raise FileNotFoundError(f"not a run dir (no .hydra/config.yaml): {d}")
        runs.append(load_run(d, d.name))
    a, b = runs
    config_rows = [
        {"key": k, "A": fmt_value(a.config[k]) if k in a.config else ABSENT, "B": fmt_value(b.config[k]) if k in b.config else ABSENT}
        for k in differing_keys(runs)
    ]
    metric_rows = [
        {"metric": m, "A": f"{a.metrics[m]:.4f}", "B": f"{b.metrics[m]:.4f}", "B-A": f"{b.metrics[m] - a.metrics[m]:+.4f}"}
        for m in metric_columns(runs)
        if m in a.metrics and m in b.metrics
    ]
    return config_rows, metric_rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctt-report", description="Compare Hydra runs: the config keys that differ, and their metrics."
    )
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="run dirs, multirun dirs, or parents of them")
    parser.add_argument("--out", help="output path prefix for <out>.csv and <out>.md (default: <first DIR>/report)")
    parser.add_argument("--group-seeds", action="store_true", help="one row per config, mean ± std over seeds")
    parser.add_argument("--diff", nargs=2, metavar=("RUN_A", "RUN_B"), help="only the config keys and metrics that differ")
    args = parser.parse_args(argv)
    if bool(args.diff) == bool(args.dirs):
        parser.error("give DIR [DIR ...] or --diff RUN_A RUN_B")
    try:
        if args.diff:
            config_rows, metric_rows = diff(*args.diff)
            print(f"A: {args.diff[0]}\nB: {args.diff[1]}\n")
            print(markdown_table(config_rows, ["key", "A", "B"]) if config_rows else "no config differences")
            print()
            print(markdown_table(metric_rows, ["metric", "A", "B", "B-A"]) if metric_rows else "no metrics in common")
            return 0
        table, csv_path, md_path = report(args.dirs, args.out, args.group_seeds)
    except FileNotFoundError as err:
        print(f"ctt-report: {err}", file=sys.stderr)
        return 2
    print(table)
    debate = csv_path.with_name("debate.png")
    print(f"\nwritten: {csv_path} {md_path}" + (f" {debate}" if debate.is_file() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
