"""The runs `ctt-report` (ctt.report) tabulates: discovering Hydra run dirs, reading each one's flattened config,
metrics (train reward, results.csv accuracies, comparisons.csv deltas) and status into a `Run`."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ctt.errors import DataError
from ctt.inputs import check_input
from ctt.evaluation.comparisons import COMPARISONS_CSV, read_comparisons
from ctt.policy.modes import base_label, label_family
from ctt.text import read_csv, read_yaml
from ctt.settings import flatten

log = logging.getLogger(__name__)

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
    results: list[dict] | None = None  # its results.csv rows, if it has one
    p_holm: dict[str, float] = field(default_factory=dict)  # delta metric -> its Holm-adjusted p (comparisons.csv)


# ---------------------------------------------------------------- discovery


NESTED_RUNS = ("eval", "generate", "export")  # the subfolders other commands' runs have inside a run dir


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def _natural(name: str) -> list:
    # ASCII digits only: "²".isdigit() is true and int("²") raises (a folder of that name broke ctt-report)
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"([0-9]+)", name))]


def discover_runs(dirs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(run dir, display name) for every run under `dirs`, in natural order (0, 1, ..., 10); no run twice."""
    found: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"not a directory: {d}")
        prefix = d.name if len(dirs) > 1 else ""
        hits = []
        for root, subdirs, _ in os.walk(d):
            root_path = Path(root)
            if is_run_dir(root_path):
                hits.append((root_path, str(root_path.relative_to(d))))
                # a run dir holds no further runs (checkpoints, csv, ...) except the ones other commands wrote in a
                # subfolder of their own (ctt.run_dir.own_run_dir: <run dir>/eval/<time>/)
                subdirs[:] = sorted((s for s in subdirs if s in NESTED_RUNS), key=_natural)
                continue
            subdirs[:] = sorted((s for s in subdirs if not s.startswith(".")), key=_natural)
        hits = [(p, (d.name or str(d)) if n == "." else f"{prefix}/{n}" if prefix else n) for p, n in hits]
        for path, name in hits:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append((path, name))
    return found


# ---------------------------------------------------------------- config


def _skipped(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in SKIP_PREFIXES)


def group_choices(run_dir: Path) -> dict[str, Any]:
    """Config-group choices (`token/init: mean`) from `.hydra/hydra.yaml`, Hydra's own groups left out."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    node = read_yaml(path)
    for key in ("hydra", "runtime", "choices"):
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node or {}, dict):
        raise DataError(f"{path}: hydra.runtime.choices must be a mapping, got {type(node).__name__}")
    return {g: c for g, c in (node or {}).items() if not (g == "hydra" or g.startswith("hydra/") or g == "paths")}


def load_config(run_dir: Path) -> tuple[dict[str, Any], set[str]]:
    """The run's flattened config (unresolved), minus hydra.* / paths.*, plus its group choices under their
    group names (`token/init`); and the keys naming the run's own dir."""
    path = run_dir / ".hydra" / "config.yaml"
    flat = {k: v for k, v in flatten(read_yaml(path)).items() if not _skipped(k)}
    count = flat.get("token.count") or 1  # the debate plot's k
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        raise DataError(f"{path}: token.count must be an integer >= 1, got {count!r}")
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
    for row in read_csv(path, kinds={"train/reward": "number?"}, ragged=True):  # Lightning's rows may be short
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


def holm_metrics(rows: Iterable[dict]) -> dict[str, float]:
    """The Holm-adjusted p (`p_holm`, over the run's whole table) per delta metric, where comparisons.csv has it."""
    out = {}
    for row in rows:
        value = _float(row.get("p_holm"))
        if value is not None:
            out[f"{row['benchmark']}/{row['mode']}-{row['versus']}/N={int(float(row['num_continuations']))}"] = value
    return out


def eval_metrics(rows: Iterable[dict]) -> dict[str, float]:
    """Accuracy per `<bench>/<mode>/N=<n>`, then the learned-base and learned-fixed:<w> deltas per bench and N
    computed from those accuracies (for runs without comparisons.csv)."""
    acc = _accuracies(rows)
    out = {f"{b}/{m}/N={n}": v for (b, m, n), v in acc.items()}
    for bench in dict.fromkeys(b for b, _, _ in acc):
        base = acc.get((bench, base_label(), 0))
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
    # the columns the report and its debate plot read
    required = ("benchmark", "mode", "num_continuations", "accuracy", "mean_thinking_tokens", "mean_total_tokens")
    return read_csv(path, required=required, kinds={"num_continuations": "int", **dict.fromkeys(required[3:], "number"),
                                                    "ci_low": "number?", "ci_high": "number?"})


ERROR_LINE = b"][ERROR] - "  # how ctt's log format marks an error line


def _log_has_error(run_dir: Path) -> bool:
    """Whether a log of the run holds an error line: read in 1 MiB pieces, a FIFO or device never opened."""
    for log in run_dir.glob("*.log"):
        try:
            check_input(log, "run file", error=DataError)
            with open(log, "rb") as f:
                tail = b""
                while piece := f.read(1 << 20):
                    if ERROR_LINE in tail + piece:
                        return True
                    tail = piece[-len(ERROR_LINE):]
        except (OSError, DataError):
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
    p_holm: dict[str, float] = {}
    if comparisons is not None:  # paired deltas with CIs replace the ones computed from accuracies
        metrics.update(accuracy_metrics(results or []))
        for metric, (delta, lo, hi) in comparison_metrics(comparisons).items():
            metrics[metric] = delta
            deltas[metric] = (lo, hi)
        p_holm = holm_metrics(comparisons)
    elif results:
        computed = eval_metrics(results)
        metrics.update(computed)
        deltas = {m: None for m in computed if m not in accuracy_metrics(results)}
    status = run_status(path, bool(results), reward is not None, config.get("evaluate"))
    return Run(path, name, config, local, metrics, status, deltas, results, p_holm)


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """The runs under `dirs`; a run whose files are malformed (DataError naming the file) is skipped with one warning
    line, and the others are read."""
    runs = []
    for path, name in discover_runs(dirs):
        try:
            runs.append(load_run(path, name))
        except DataError as err:
            log.warning("ctt-report: skipped run %s: %s", name, err)
    return runs
