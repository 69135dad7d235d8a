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
  <bench>/<mode>-<versus>/N=<n>    paired delta from comparisons.csv (`ctt.evaluation.comparisons`): <mode> at N minus
                                   <versus> (a baseline at N=0, or a same-N reference); the markdown cell shows
                                   it with its 95% CI, "+0.1250 [+0.0312, +0.2188]", and report.csv adds
                                   "<metric> ci_low" / "<metric> ci_high" columns; with the Holm-adjusted p of
                                   comparisons.csv ("p_holm 0.031", column "<metric> p_holm") where it has one
Runs without comparisons.csv get deltas computed from results.csv instead (no CI):
  <bench>/learned-base/N=<n>       learned at N minus base (N=0)
  <bench>/learned-fixed:<w>/N=<n>  learned at N minus fixed word <w> at the same N

status: ok (results.csv, or train metrics of a run with evaluate=false); partial (train metrics but the evaluation
that `evaluate=true` asks for is missing); no-results (neither, but the run left files); failed (an ERROR record in
the run's log, or nothing but `.hydra/` and the log).

--group-seeds folds runs whose configs differ only in `seed` into one row: every metric becomes mean +- std over
those runs (sample std, n-1; 0 for a single run) and a `seeds` column counts them; it also gives the headline over
seeds (`ctt.evaluation.seed_headline`): per group, the mean over seeds of every paired difference with a 95% CI over seeds and
problems, p and Holm's p, written to <out>_seeds.csv / <out>_seeds.md and printed after the table. Writes <out>.csv
and <out>.md (default <first DIR>/report) and prints the markdown table; with results, <out>_debate.png
(`ctt.evaluation.plots.debate_plot`). A run whose files are malformed is skipped with one warning naming the file.
Only files an earlier ctt-report wrote under the same --out are replaced (REPORT_FILES), one report at a time.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from ctt.errors import ConfigError, CttError, DataError, exit_for_closed_stdout, guard_closed_stdout, user_error_message
from ctt.inputs import check_input
from ctt.evaluation.comparisons import format_p
from ctt.evaluation.results import markdown_table
from ctt.evaluation.plots import DEBATE_SOFTWARE, debate_plot, written_by
from ctt.evaluation.runs import ABSENT, Run, differing_keys, fmt_value, is_run_dir, load_run, load_runs
from ctt.evaluation.seed_headline import SEED_COLUMNS, seed_markdown, seed_rows, write_seed_rows
from ctt.outputs import atomic_open, atomic_write_text, check_output_file, hold_output, writing


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


def _fmt_metric(value: float | None, interval: tuple[float, float] | None = None, p_holm: float | None = None) -> str:
    """"0.1250"; a delta with its CI as "+0.1250 [+0.0312, +0.2188]", and its Holm-adjusted p when known."""
    if value is None:
        return ""
    if interval is None:
        return f"{value:.4f}"
    lo, hi = interval
    return f"{value:+.4f} [{lo:+.4f}, {hi:+.4f}]" + ("" if p_holm is None else f" p_holm {format_p(p_holm)}")


def _interval_columns(runs: Sequence[Run], metrics: Sequence[str]) -> list[str]:
    """The metric columns, each delta that has a CI in some run followed by its `ci_low` / `ci_high` columns."""
    with_ci = {k for r in runs for k, v in r.deltas.items() if v is not None}
    with_p = {k for r in runs for k in r.p_holm}
    cols: list[str] = []
    for m in metrics:
        cols += [m, f"{m} ci_low", f"{m} ci_high"] if m in with_ci else [m]
        cols += [f"{m} p_holm"] if m in with_p else []
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
                            **{m: _fmt_metric(r.metrics.get(m), r.deltas.get(m), r.p_holm.get(m)) for m in metrics}})
            values: dict[str, Any] = {m: r.metrics.get(m, "") for m in metrics}
            for m, interval in r.deltas.items():
                if interval is not None:
                    values[f"{m} ci_low"], values[f"{m} ci_high"] = interval
            values.update({f"{m} p_holm": p for m, p in r.p_holm.items()})
            csv_rows.append({"run": r.name, "status": r.status, **cells, **values, "path": str(r.path)})
        return md_cols, md_rows, csv_cols, csv_rows

    group_keys, groups = seed_groups(runs)
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


def seed_groups(runs: Sequence[Run]) -> tuple[list[str], dict[tuple, list[Run]]]:
    """(the differing keys other than `seed`, runs grouped by their values of those keys)."""
    group_keys = [k for k in differing_keys(runs) if k != "seed"]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(fmt_value(r.config[k]) if k in r.config else ABSENT for k in group_keys), []).append(r)
    return group_keys, groups


def over_seeds(runs: Sequence[Run], out: Path) -> str:
    """The headline over seeds of every group (`ctt.evaluation.seed_headline`), written to <out>_seeds.csv / .md; its markdown."""
    rows = [row for members in seed_groups(runs)[1].values()
            for row in seed_rows([r.path for r in members], ",".join(r.name for r in members))]
    if not rows:
        return ""
    text = seed_markdown(rows)
    write_seed_rows(report_file(out, "_seeds.csv"), rows)
    atomic_write_text(text, report_file(out, "_seeds.md"))
    return text


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1); the std of a single value is 0."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def write_report(out: str | Path, md_cols: list[str], md_rows: list[dict], csv_cols: list[str], csv_rows: list[dict]) -> tuple[Path, Path]:
    out = Path(out)
    csv_path, md_path = report_file(out, ".csv"), report_file(out, ".md")
    with atomic_open(csv_path) as f:
        writer = csv.DictWriter(f, fieldnames=csv_cols)
        writer.writeheader()
        writer.writerows(csv_rows)
    atomic_write_text(markdown_table(md_rows, md_cols) + "\n", md_path)
    return csv_path, md_path


def report(dirs: Sequence[str | Path], out: str | Path | None = None, group_seeds: bool = False) -> tuple[str, Path, Path]:
    for d in map(Path, dirs):  # before anything is created: a mistyped DIR was made, with a lock file inside
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is {'not a folder' if d.exists() else 'not there'}: give run dirs, "
                                    "multirun dirs or parents of them")
    out = Path(out or Path(dirs[0]) / "report")
    if out.name in ("", ".", "..") or out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a path prefix for <out>.csv and <out>.md, e.g. "
                          f"--out {out / 'report'}")
    with hold_output(out, "ctt-report --out"):  # one writer of these files at a time
        check_report_outputs(out)  # before any run is read: nothing of the user's is replaced
        runs = load_runs(dirs)  # a malformed run is skipped with a warning naming its file
        if not runs:
            raise FileNotFoundError(f"no readable run dirs (with .hydra/config.yaml) under {', '.join(map(str, dirs))}")
        md_cols, md_rows, csv_cols, csv_rows = report_rows(runs, group_seeds)
        csv_path, md_path = write_report(out, md_cols, md_rows, csv_cols, csv_rows)
        table = markdown_table(md_rows, md_cols)
        written = {csv_path, md_path}
        if group_seeds:
            seeds = over_seeds(runs, out)
            table += "\n\n" + seeds if seeds else ""
            written |= {report_file(out, "_seeds.csv"), report_file(out, "_seeds.md")} if seeds else set()
        evaluated = [(int(r.config.get("token.count") or 1), r.results) for r in runs if r.results]
        if evaluated:  # accuracy against compute, one line per kind of continuation (learned per k)
            debate_plot(evaluated, debate_path(out))
            written.add(debate_path(out))
        for stale, recognise in report_outputs(out).items():  # an earlier report's seeds or plot: other runs
            if stale not in written and stale.is_file() and recognise(stale):  # still ours (checked again)
                with writing(stale):
                    stale.unlink()
    return table, csv_path, md_path


def report_file(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def _lines(path: Path) -> list[str]:
    try:
        check_input(path, "run file", error=DataError)
        with open(path, encoding="utf-8", newline="") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError, CttError):
        return []


def _csv_table(path: Path, header_ok) -> bool:
    """A CSV ctt-report wrote: its header passes `header_ok` and every row has the header's columns."""
    rows = list(csv.reader(_lines(path)))
    return bool(rows) and header_ok(",".join(rows[0])) and all(len(row) == len(rows[0]) for row in rows[1:])


def _md_table(path: Path, first: str, prelude: int = 0) -> bool:
    """A markdown file ctt-report wrote: `first` opens it and every line after the `prelude` is a table row."""
    lines = _lines(path)
    return bool(lines) and lines[0].startswith(first) and all(line.startswith("|") for line in lines[prelude:])


# How ctt-report recognises each file it writes under --out (a file's own content, like ctt-generate's outputs):
# it replaces such a file and nothing else. The WHOLE file is checked, so a line a user added (a note under the
# table) keeps it from being replaced. The report's CSV and markdown both start with its `run, status` columns.
REPORT_FILES = {
    ".csv": lambda p: _csv_table(p, lambda header: header.startswith("run,status,")),
    ".md": lambda p: _md_table(p, "| run | status |"),
    "_seeds.csv": lambda p: _csv_table(p, lambda header: header == ",".join(SEED_COLUMNS)),
    "_seeds.md": lambda p: _md_table(p, "## Over training seeds", prelude=4),
    "_debate.png": lambda p: written_by(p, DEBATE_SOFTWARE) or _earlier_debate_plot(p),
}


def _earlier_debate_plot(path: Path) -> bool:
    """A debate plot from before plots carried ctt's Software chunk (matplotlib's own) beside that report's CSV."""
    csv_path = path.with_name(path.name.removesuffix("_debate.png") + ".csv")
    return written_by(path, "Matplotlib", prefix=True) and REPORT_FILES[".csv"](csv_path)


def report_outputs(out: Path) -> dict[Path, Any]:
    """Every file a report to `out` may write, with the test that recognises an earlier one."""
    return {report_file(out, suffix): recognise for suffix, recognise in REPORT_FILES.items()}


def check_report_outputs(out: Path) -> None:
    """ConfigError unless every file a report to `out` may write is absent, empty, or an earlier ctt-report's:
    `--out <run dir>/results` would otherwise replace that run's results.csv, `--out paper/table` a user's table."""
    for path, recognise in report_outputs(out).items():
        check_output_file(path, "ctt-report --out", recognise)


def debate_path(out: Path) -> Path:
    """<out>_debate.png: beside <out>.csv and <out>.md, named after them like <out>_seeds.csv."""
    return report_file(out, "_debate.png")


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
    parser.add_argument("--group-seeds", action="store_true", help="one row per config, mean ± std over seeds, and the mean paired differences with CIs over seeds and problems")
    parser.add_argument("--diff", nargs=2, metavar=("RUN_A", "RUN_B"), help="only the config keys and metrics that differ")
    args = parser.parse_args(argv)
    if bool(args.diff) == bool(args.dirs):
        parser.error("give DIR [DIR ...] or --diff RUN_A RUN_B")
    guard_closed_stdout()  # a log line to a closed stdout is dropped, not a wall (ctt.errors)
    try:
        if args.diff:
            config_rows, metric_rows = diff(*args.diff)
            print(f"A: {args.diff[0]}\nB: {args.diff[1]}\n")
            print(markdown_table(config_rows, ["key", "A", "B"]) if config_rows else "no config differences")
            print()
            print(markdown_table(metric_rows, ["metric", "A", "B", "B-A"]) if metric_rows else "no metrics in common")
            return 0
        table, csv_path, md_path = report(args.dirs, args.out, args.group_seeds)
        print(table)
        debate = debate_path(csv_path.with_suffix(""))
        print(f"\nwritten: {csv_path} {md_path}" + (f" {debate}" if debate.is_file() else ""))
    except (FileNotFoundError, CttError) as err:  # --diff's runs are named: a malformed one is an error, not skipped
        print(f"ctt-report: {user_error_message(err) or err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ctt-report DIR | head`
        exit_for_closed_stdout()
    return 0


if __name__ == "__main__":
    sys.exit(main())
