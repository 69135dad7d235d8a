"""Plots: test-time scaling (accuracy against mean thinking tokens) and paired accuracy deltas against N."""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctt.outputs import atomic_write_bytes
from ctt.policy.modes import base_label, label_rank


def _num(value) -> float:
    """results rows come as numbers (from `evaluate`) or strings (read back from results.csv)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _accuracy_axes(ax, title: str, xlabel: str, ylabel: str, legend_size: int) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


# The PNG `Software` text chunk of every plot ctt writes: how a later command recognises its own plot (ctt-report
# replaces only a <out>_debate.png it wrote, ctt.report.REPORT_FILES).
PLOT_SOFTWARE = "ctt"


def written_by(path: Path, software: str, prefix: bool = False) -> bool:
    """Whether `path` is a PNG whose `Software` text chunk is exactly `software` (with `prefix`: starts with it).
    Reads the chunks before the image data only (where Pillow writes text), at most 1 MiB: no image decoder needed."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    if not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    at = 8
    while at + 8 <= len(head):
        size, kind = int.from_bytes(head[at:at + 4], "big"), head[at + 4:at + 8]
        if kind == b"IDAT":
            return False
        text, wanted = head[at + 8:at + 8 + size], b"Software\x00" + software.encode("latin-1")
        if kind == b"tEXt" and (text.startswith(wanted) if prefix else text == wanted):
            return True
        at += 12 + size  # length, type, data, CRC
    return False


def _saved(fig: Figure, path: str | Path | None, software: str = PLOT_SOFTWARE) -> Figure:
    if path is not None:
        path = Path(path)
        buffer = io.BytesIO()
        fmt = path.suffix.lstrip(".") or "png"
        fig.savefig(buffer, dpi=120, format=fmt, metadata={"Software": software} if fmt == "png" else None)
        atomic_write_bytes(buffer.getbuffer(), path)  # rendered first: a failure leaves no 0-byte or half a png
    return fig


def scaling_plot(results: list[dict], path: str | Path | None = None) -> Figure:
    """One subplot per benchmark: x = mean thinking tokens, y = accuracy (pass@1) with its CI as error bars.

    One line per mode (`base`, `fixed:<word>`, `learned`), so `ax.get_lines()` holds exactly one Line2D per mode
    (the error bars are line collections). `base` runs once (N=0) and is a single point; every other mode's curve
    is ordered by N and starts at the base point when the benchmark has one and the mode has no N=0 run of its
    own. Points are annotated "N=k" (the shared base point once). Rendered with the Agg canvas (no pyplot, no
    display); saved to `path` when given.
    """
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in results))
    ncols = max(1, len(benchmarks))
    fig = Figure(figsize=(5.0 * ncols, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    if not benchmarks:
        axes[0].set_title("no results")
    for ax, bench in zip(axes, benchmarks):
        rows = [r for r in results if r["benchmark"] == bench]
        base = next((r for r in rows if r["mode"] == base_label()), None)
        modes = sorted(dict.fromkeys(r["mode"] for r in rows), key=label_rank)
        for i, mode in enumerate(modes):
            points = sorted((r for r in rows if r["mode"] == mode), key=lambda r: int(_num(r["num_continuations"])))
            own = points
            if mode != base_label() and base is not None and all(int(_num(r["num_continuations"])) != 0 for r in points):
                points = [base] + points
            xs = [_num(r["mean_thinking_tokens"]) for r in points]
            ys = [_num(r["accuracy"]) for r in points]
            color = f"C{i}"
            ax.plot(xs, ys, marker="o", color=color, label=mode, linestyle="-" if len(points) > 1 else "none")
            lows = [_num(r.get("ci_low")) for r in own]
            highs = [_num(r.get("ci_high")) for r in own]
            bars = [(_num(r["mean_thinking_tokens"]), lo, hi) for r, lo, hi in zip(own, lows, highs)]
            bars = [b for b in bars if not (math.isnan(b[1]) or math.isnan(b[2]))]
            if bars:
                ax.vlines([b[0] for b in bars], [b[1] for b in bars], [b[2] for b in bars], colors=color, alpha=0.6)
            for r in own:
                ax.annotate(
                    f"N={int(_num(r['num_continuations']))}",
                    (_num(r["mean_thinking_tokens"]), _num(r["accuracy"])),
                    textcoords="offset points", xytext=(4, 4), fontsize=8, color=color,
                )
        _accuracy_axes(ax, bench, "mean thinking tokens", "accuracy (pass@1, 95% CI)", legend_size=8)
    return _saved(fig, path)


def deltas_plot(comparisons: list[dict], path: str | Path | None = None) -> Figure:
    """One subplot per benchmark: x = N (num_continuations), y = accuracy delta (mode minus versus) with its 95%
    CI as error bars, from the rows of `ctt.evaluation.comparisons.compare` (or comparisons.csv read back as strings).

    One line per (mode, versus) pair, labelled "<mode> vs <versus>", so `ax.get_lines()` holds exactly one Line2D
    per pair; the dashed zero line is an `axhline` labelled "_zero" (kept out of the legend) and the error bars are
    line collections. Pairs that share an N are dodged sideways by at most +-0.2 so their bars stay apart.
    Rendered with the Agg canvas; saved to `path` when given.
    """
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in comparisons))
    ncols = max(1, len(benchmarks))
    fig = Figure(figsize=(5.0 * ncols, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    if not benchmarks:
        axes[0].set_title("no comparisons")
    for ax, bench in zip(axes, benchmarks):
        rows = [r for r in comparisons if r["benchmark"] == bench]
        pairs = list(dict.fromkeys((r["mode"], r["versus"]) for r in rows))
        ax.axhline(0.0, color="0.4", linewidth=0.8, linestyle="--", label="_zero")
        width = min(0.4, 0.08 * (len(pairs) - 1))
        for i, (mode, versus) in enumerate(pairs):
            points = sorted(
                (r for r in rows if (r["mode"], r["versus"]) == (mode, versus)),
                key=lambda r: _num(r["num_continuations"]),
            )
            shift = 0.0 if len(pairs) == 1 else -width / 2 + width * i / (len(pairs) - 1)
            xs = [_num(r["num_continuations"]) + shift for r in points]
            color = f"C{i % 10}"
            ax.plot(xs, [_num(r["delta"]) for r in points], marker="o", color=color, label=f"{mode} vs {versus}",
                    linestyle="-" if len(points) > 1 else "none")
            bars = [(x, _num(r.get("ci_low")), _num(r.get("ci_high"))) for x, r in zip(xs, points)]
            bars = [b for b in bars if not (math.isnan(b[1]) or math.isnan(b[2]))]
            if bars:
                ax.vlines([b[0] for b in bars], [b[1] for b in bars], [b[2] for b in bars], colors=color, alpha=0.6)
        ns = sorted({int(_num(r["num_continuations"])) for r in rows})
        ax.set_xticks(ns)
        ax.set_xlim(ns[0] - 0.5, ns[-1] + 0.5)  # a lone N would otherwise stretch the dodge across the panel
        ax.set_title(bench)
        ax.set_xlabel("N (forced continuations)")
        ax.set_ylabel("accuracy delta (pass@1, paired 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _saved(fig, path)


def _curve(rows: list[dict], base: dict | None) -> list[dict]:
    points = sorted(rows, key=lambda r: int(_num(r["num_continuations"])))
    return ([base] if base is not None else []) + points


DEBATE_SOFTWARE = "ctt-report"  # the debate plot's PNG Software chunk


def debate_plot(runs: list[tuple[int, list[dict]]], path: str | Path | None = None) -> Figure:
    """The filler debate at equal compute: one subplot per benchmark, x = mean total tokens per problem (thinking
    and answer), y = accuracy; one line per kind of continuation over N, each starting at the base point: the
    learned token of every run, labelled by its k (`token.count`), and every other mode (fixed words, filler, no
    string) once (they do not depend on the training, so the first run that has them gives them).

    `runs`: (k, results rows) per run, as results.csv rows. Rendered with the Agg canvas; saved when `path` given."""
    benchmarks = list(dict.fromkeys(r["benchmark"] for _, rows in runs for r in rows))
    fig = Figure(figsize=(6.0 * max(1, len(benchmarks)), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(benchmarks)), squeeze=False)[0]
    for ax, bench in zip(axes, benchmarks):
        lines: dict[str, list[dict]] = {}
        base = None
        for k, rows in runs:
            rows = [r for r in rows if r["benchmark"] == bench]
            base = base or next((r for r in rows if r["mode"] == base_label()), None)
            for mode in dict.fromkeys(r["mode"] for r in rows if r["mode"] != base_label()):
                label = f"learned k={k}" if mode == "learned" else mode
                if label not in lines:
                    lines[label] = [r for r in rows if r["mode"] == mode]
        for i, (label, rows) in enumerate(sorted(lines.items(), key=lambda kv: (label_rank(kv[0].split()[0]), len(kv[0]), kv[0]))):
            points = _curve(rows, base)
            ax.plot([_num(r["mean_total_tokens"]) for r in points], [_num(r["accuracy"]) for r in points],
                    marker="o", color=f"C{i % 10}", linestyle="-" if label.startswith("learned") else "--", label=label)
        if base is not None:
            ax.plot([_num(base["mean_total_tokens"])], [_num(base["accuracy"])], marker="s", color="black",
                    linestyle="none", label="base (N=0)")
        _accuracy_axes(ax, bench, "mean total tokens per problem", "accuracy (pass@1)", legend_size=7)
    return _saved(fig, path, DEBATE_SOFTWARE)
