"""scaling_plot: a real PNG on disk, and one line per mode per benchmark panel in the returned figure."""

from __future__ import annotations

import csv

import matplotlib.image as mpimg
import pytest

from ctt.evaluation.plots import scaling_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(bench, mode, n, acc, thinking, lo=None, hi=None):
    lo = max(0.0, acc - 0.1) if lo is None else lo
    hi = min(1.0, acc + 0.1) if hi is None else hi
    return {
        "benchmark": bench, "mode": mode, "num_continuations": n, "accuracy": acc, "n": 10,
        "mean_thinking_tokens": thinking, "mean_total_tokens": thinking + 5, "ci_low": lo, "ci_high": hi,
    }


@pytest.fixture
def results():
    rows = [_row("gsm8k", "base", 0, 0.30, 100.0)]
    for n in (1, 2, 4):
        rows += [
            _row("gsm8k", "fixed:Wait", n, 0.30 + 0.02 * n, 100.0 + 50 * n),
            _row("gsm8k", "fixed:Hmm", n, 0.31 + 0.01 * n, 100.0 + 40 * n),
            _row("gsm8k", "learned", n, 0.32 + 0.03 * n, 100.0 + 45 * n),
        ]
    # a second benchmark without a base run and only two modes
    rows += [_row("math500", "learned", n, 0.1 * n, 200.0 * n) for n in (1, 2)]
    rows += [_row("math500", "fixed:Wait", n, 0.05 * n, 210.0 * n) for n in (1, 2)]
    return rows


def test_writes_valid_png(results, tmp_path):
    path = tmp_path / "sub" / "scaling.png"
    fig = scaling_plot(results, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert len(fig.get_axes()) == 2
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.shape[1] > image.shape[0]  # two panels side by side


def test_lines_per_axis(results, tmp_path):
    fig = scaling_plot(results, tmp_path / "scaling.png")
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["gsm8k", "math500"]
    gsm8k, math500 = axes

    labels = {line.get_label(): line for line in gsm8k.get_lines()}
    assert sorted(labels) == ["base", "fixed:Hmm", "fixed:Wait", "learned"]
    assert sorted(t.get_text() for t in gsm8k.get_legend().get_texts()) == sorted(labels)
    assert len(labels["base"].get_xdata()) == 1
    # each forced mode starts at the base point (N=0) and then follows N=1, 2, 4
    wait = [r for r in results if r["benchmark"] == "gsm8k" and r["mode"] == "fixed:Wait"]
    assert list(labels["fixed:Wait"].get_xdata()) == [100.0] + [r["mean_thinking_tokens"] for r in wait]
    assert list(labels["learned"].get_ydata())[0] == pytest.approx(0.30)
    annotations = [t.get_text() for t in gsm8k.texts]
    assert annotations.count("N=0") == 1 and annotations.count("N=4") == 3

    # no base run: the curves are just the forced points
    m_labels = {line.get_label(): line for line in math500.get_lines()}
    assert sorted(m_labels) == ["fixed:Wait", "learned"]
    assert list(m_labels["learned"].get_xdata()) == [200.0, 400.0]
    assert len(math500.get_legend().get_texts()) == 2


def test_accepts_rows_read_back_from_csv(results, tmp_path):
    """results.csv read with csv.DictReader gives strings; the plot must still place points numerically."""
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig = scaling_plot(rows)
    learned = {line.get_label(): line for line in fig.get_axes()[0].get_lines()}["learned"]
    assert [float(y) for y in learned.get_ydata()] == pytest.approx([0.30, 0.35, 0.38, 0.44])
