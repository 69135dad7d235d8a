"""Paired comparisons from hand-built sample records: exact deltas, n, pairing by problem_id, columns and order, the
markdown section, comparisons.csv, the deltas plot, and how ctt-report shows the deltas with their CIs."""

from __future__ import annotations

import csv
import random
import statistics

import pytest

from ctt.evaluation.comparisons import (
    COMPARISON_COLUMNS,
    compare,
    comparisons_markdown,
    format_p,
    read_comparisons,
    write_comparisons,
)
from ctt.evaluation.results import SampleRecord
from ctt.evaluation.plots import deltas_plot
from ctt.report import main
from ctt.evaluation.stats import holm_adjust, paired_delta_ci, paired_p_value
from tests.test_report import base_config, make_run, read_csv

REFS = ("fixed:Wait", "fixed:Hmm")

# toy: k = 1, problems p0..p3 (one correct flag per problem); learned at N=2 never ran p1 (a middle one, so pairing
# by position would pair the wrong problems).
TOY = {
    ("base", 0): {"p0": [1], "p1": [0], "p2": [0], "p3": [1]},
    ("fixed:Wait", 1): {"p0": [1], "p1": [1], "p2": [0], "p3": [1]},
    ("fixed:Wait", 2): {"p0": [1], "p1": [1], "p2": [0], "p3": [0]},
    ("fixed:Hmm", 1): {"p0": [0], "p1": [1], "p2": [0], "p3": [1]},
    ("learned", 1): {"p0": [1], "p1": [1], "p2": [1], "p3": [1]},
    ("learned", 2): {"p0": [1], "p2": [1], "p3": [1]},
}
# big: k = 2, rates base [1, .5, 0, .5], Wait [.5, 1, 0, 1], learned [1, 1, .5, 1]
BIG = {
    ("base", 0): {"q0": [1, 1], "q1": [1, 0], "q2": [0, 0], "q3": [0, 1]},
    ("fixed:Wait", 1): {"q0": [1, 0], "q1": [1, 1], "q2": [0, 0], "q3": [1, 1]},
    ("learned", 1): {"q0": [1, 1], "q1": [1, 1], "q2": [1, 0], "q3": [1, 1]},
}

# (benchmark, mode, N, versus, delta, n, p_value), in the order compare must give
EXPECTED = [
    ("toy", "fixed:Wait", 1, "base", 0.25, 4, 1.0),
    ("toy", "fixed:Wait", 2, "base", 0.0, 4, 1.0),
    ("toy", "fixed:Hmm", 1, "base", 0.0, 4, 1.0),
    ("toy", "learned", 1, "base", 0.5, 4, 0.5),
    ("toy", "learned", 1, "fixed:Wait", 0.25, 4, 1.0),
    ("toy", "learned", 1, "fixed:Hmm", 0.5, 4, 0.5),
    ("toy", "learned", 2, "base", 1 / 3, 3, 1.0),  # p1 missing from learned N=2: 3 paired problems
    ("toy", "learned", 2, "fixed:Wait", 2 / 3, 3, 0.5),
    ("big", "fixed:Wait", 1, "base", 0.125, 4, 1.0),  # differences -.5 .5 0 .5: two up, one down
    ("big", "learned", 1, "base", 0.375, 4, 0.25),  # 0 .5 .5 .5: three up
    ("big", "learned", 1, "fixed:Wait", 0.25, 4, 0.5),  # .5 0 .5 0: two up
]


def _records(tables: dict[str, dict]) -> list[dict]:
    out = []
    for bench, runs in tables.items():
        for (mode, n), problems in runs.items():
            for pid, flags in problems.items():
                for s, c in enumerate(flags):
                    out.append({"benchmark": bench, "problem_id": pid, "mode": mode, "num_continuations": n,
                                "sample": s, "correct": bool(c)})
    return out


@pytest.fixture
def records():
    return _records({"toy": TOY, "big": BIG})


@pytest.fixture
def rows(records):
    return compare(records, baseline_modes=("base",), same_n_references=REFS)


def _rates(table: dict, key) -> dict[str, float]:
    return {pid: sum(f) / len(f) for pid, f in table[key].items()}


def test_exact_deltas_n_and_order(rows):
    got = [(r["benchmark"], r["mode"], r["num_continuations"], r["versus"]) for r in rows]
    assert got == [e[:4] for e in EXPECTED]
    for row, (bench, mode, n, versus, delta, pairs, p) in zip(rows, EXPECTED):
        assert row["delta"] == pytest.approx(delta, abs=1e-12), row
        assert row["n"] == pairs
        assert row["p_value"] == pytest.approx(p)
        assert row["versus_num_continuations"] == (0 if versus == "base" else n)
        assert row["ci_low"] <= row["delta"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
        # the interval and p are those of the paired per-problem rates (problems that both runs have, by id)
        table = TOY if bench == "toy" else BIG
        a, b = _rates(table, (mode, n)), _rates(table, (versus, row["versus_num_continuations"]))
        ids = sorted(set(a) & set(b))
        pa, pb = [a[i] for i in ids], [b[i] for i in ids]
        assert (row["delta"], row["ci_low"], row["ci_high"], row["ci_method"]) == paired_delta_ci(pa, pb)
        assert row["p_value"] == paired_p_value(pa, pb)
    assert list(rows[0]) == COMPARISON_COLUMNS
    assert COMPARISON_COLUMNS[:9] == ["benchmark", "mode", "num_continuations", "versus", "delta", "ci_low",
                                      "ci_high", "p_value", "n"]


def test_labels_are_opaque_and_roles_come_from_the_caller(records):
    # no references: only the baseline comparisons
    only_base = compare(records, baseline_modes=("base",))
    assert [(r["mode"], r["versus"]) for r in only_base if r["benchmark"] == "big"] == [("fixed:Wait", "base"), ("learned", "base")]
    # "learned" as the same-N reference, no baseline: base (N=0) has no same-N partner, so it gives no row
    flipped = compare(records, baseline_modes=(), same_n_references=("learned",))
    assert {(r["mode"], r["versus"], r["num_continuations"]) for r in flipped if r["benchmark"] == "big"} == {
        ("fixed:Wait", "learned", 1)
    }
    with pytest.raises(ValueError):
        compare(records, baseline_modes=("base",), same_n_references=("base",))


def test_independent_of_record_order_and_accepts_sample_records(records, rows):
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    order = {key: i for i, key in enumerate(dict.fromkeys((r["benchmark"], r["mode"]) for r in records))}
    shuffled.sort(key=lambda r: order[(r["benchmark"], r["mode"])])  # same first appearances, samples shuffled
    assert compare(shuffled, same_n_references=REFS) == rows
    full = [SampleRecord(answer=None, status="ok", thinking_tokens=1, total_tokens=2, forced=0, continuation_starts=[],
                         stop_reason="eos", **r) for r in records]
    assert compare(full, same_n_references=REFS) == rows


def test_comparisons_csv(rows, tmp_path):
    path = write_comparisons(tmp_path / "run", rows)
    assert path == tmp_path / "run" / "comparisons.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COMPARISON_COLUMNS
        written = list(reader)
    assert written == read_comparisons(path)
    assert read_comparisons(tmp_path / "nope.csv") is None
    learned2 = written[6]
    assert (learned2["mode"], learned2["num_continuations"], learned2["versus"]) == ("learned", "2", "base")
    assert learned2["delta"] == "0.3333" and learned2["n"] == "3" and learned2["versus_num_continuations"] == "0"
    for r, raw in zip(written, rows):
        for c in ("delta", "ci_low", "ci_high", "p_value"):
            assert float(r[c]) == round(raw[c], 4)
            assert len(r[c].split(".")[-1]) <= 4


def test_markdown_section(rows):
    md = comparisons_markdown(rows)
    assert md.startswith("## Paired comparisons")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == "| benchmark | mode | N | versus | delta (pp, 95% CI) | p | p_holm | n |"
    assert len(table) == 1 + len(rows)

    def cell(x):
        return f"{100 * x:+.1f}"

    learned2 = rows[6]
    assert table[1 + 6] == (
        f"| toy | learned | 2 | base (N=0) | +33.3 [{cell(learned2['ci_low'])}, {cell(learned2['ci_high'])}] | 1.000 | 1.000 | 3 |"
    )
    hmm = table[1 + 2]
    assert hmm.startswith("| toy | fixed:Hmm | 1 | base (N=0) | +0.0 [") and hmm.endswith("| 1.000 | 1.000 | 4 |")
    assert "| fixed:Hmm | 1 | fixed:Wait |" not in md  # references are not compared with each other
    assert "| toy | fixed:Wait | 2 | base (N=0) | +0.0 [" in md  # a zero delta is "+0.0", never "-0.0"
    # rows read back from comparisons.csv (strings) give the same section up to the 4-decimal rounding
    assert comparisons_markdown([{k: str(v) for k, v in r.items()} for r in rows]) == md
    assert comparisons_markdown([]) == ""


# 20 problems, one sample each: base solves none, Wait 6, Hmm 7, learned (N=1) all 20. Exact McNemar p-values:
# Wait-base 2/2^6, Hmm-base 2/2^7, learned-base 2/2^20, learned-Wait 2/2^14, learned-Hmm 2/2^13.
HOLM = {("base", 0): 0, ("fixed:Wait", 1): 6, ("fixed:Hmm", 1): 7, ("learned", 1): 20}


def test_holm_over_the_whole_table_by_hand(tmp_path):
    records = _records({"h": {key: {f"p{i}": [int(i < k)] for i in range(20)} for key, k in HOLM.items()}})
    rows = compare(records, baseline_modes=("base",), same_n_references=REFS)
    raw = {(r["mode"], r["versus"]): r["p_value"] for r in rows}
    assert raw == pytest.approx({("fixed:Wait", "base"): 2 / 2**6, ("fixed:Hmm", "base"): 2 / 2**7,
                                 ("learned", "base"): 2 / 2**20, ("learned", "fixed:Wait"): 2 / 2**14,
                                 ("learned", "fixed:Hmm"): 2 / 2**13}, rel=1e-12)
    # Holm by hand, m = 5: sorted p x (5, 4, 3, 2, 1), then the running maximum
    expected = {("learned", "base"): 5 * 2 / 2**20, ("learned", "fixed:Wait"): 4 * 2 / 2**14,
                ("learned", "fixed:Hmm"): 3 * 2 / 2**13, ("fixed:Hmm", "base"): 2 * 2 / 2**7,
                ("fixed:Wait", "base"): max(2 * 2 / 2**7, 1 * 2 / 2**6)}
    assert {(r["mode"], r["versus"]): r["p_holm"] for r in rows} == pytest.approx(expected, rel=1e-12)
    # one family: adjusting each row on its own (m = 1) would leave p_holm == p_value everywhere
    assert sum(r["p_holm"] > r["p_value"] for r in rows) == 4
    written = read_comparisons(write_comparisons(tmp_path, rows))
    assert [float(r["p_holm"]) for r in written] == [round(r["p_holm"], 4) for r in rows]
    md = comparisons_markdown(rows)
    assert "| h | fixed:Hmm | 1 | base (N=0) |" in md and "| 0.016 | 0.031 | 20 |" in md
    assert "Holm-adjusted over the 5 comparisons" in md


def test_holm_adjust_hand_example():
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.4]) == [0.8, 0.8] and holm_adjust([]) == []
    out = holm_adjust([0.02, float("nan"), 0.3])  # NaN is not a member of the family
    assert out[0] == pytest.approx(0.04) and out[2] == pytest.approx(0.3) and out[1] != out[1]


def test_format_p():
    assert [format_p(p) for p in (1.0, 0.5, 0.0312, 0.001, 0.000999, 1e-9)] == [
        "1.000", "0.500", "0.031", "0.001", "<0.001", "<0.001"
    ]
    assert format_p(float("nan")) == ""


def test_deltas_plot_lines(rows, tmp_path):
    path = tmp_path / "deltas.png"
    fig = deltas_plot(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    toy, big = fig.get_axes()
    assert (toy.get_title(), big.get_title()) == ("toy", "big")
    curves = {line.get_label(): line for line in toy.get_lines() if not line.get_label().startswith("_")}
    pairs = list(dict.fromkeys(f"{m} vs {v}" for b, m, _, v, *_ in EXPECTED if b == "toy"))
    assert list(curves) == pairs and len(pairs) == 5
    assert [t.get_text() for t in toy.get_legend().get_texts()] == pairs
    learned = curves["learned vs base"]
    assert [round(x) for x in learned.get_xdata()] == [1, 2]  # x = N (dodged by less than 0.5)
    assert list(learned.get_ydata()) == pytest.approx([0.5, 1 / 3])
    (zero,) = [line for line in toy.get_lines() if line.get_label() == "_zero"]
    assert list(zero.get_ydata()) == [0, 0]
    assert len(toy.collections) == len(pairs)  # one set of CI bars per pair
    big_curves = [line.get_label() for line in big.get_lines() if not line.get_label().startswith("_")]
    assert big_curves == ["fixed:Wait vs base", "learned vs base", "learned vs fixed:Wait"]
    # rows read back from comparisons.csv are strings
    written = read_comparisons(write_comparisons(tmp_path, rows))
    again = deltas_plot(written).get_axes()[1]
    ys = [list(line.get_ydata()) for line in again.get_lines() if line.get_label() == "learned vs base"]
    assert ys == [pytest.approx([0.375])]


# ------------------------------------------------------------------------------------------------ ctt-report


def _comparison(bench, mode, n, versus, delta, lo, hi):
    return {"benchmark": bench, "mode": mode, "num_continuations": n, "versus": versus, "delta": delta,
            "ci_low": lo, "ci_high": hi, "p_value": 0.5, "n": 8, "ci_method": "bootstrap",
            "versus_num_continuations": 0 if versus == "base" else n}


def test_report_shows_deltas_with_ci(tmp_path, capsys):
    root = tmp_path / "runs"
    results = [("toy", "base", 0, 0.25), ("toy", "fixed:Wait", 1, 0.3), ("toy", "learned", 1, 0.375)]
    with_ci = make_run(root / "a", rewards=[0.5], results=results)
    write_comparisons(with_ci, [
        _comparison("toy", "fixed:Wait", 1, "base", 0.05, -0.1, 0.2),
        _comparison("toy", "learned", 1, "base", 0.125, 0.03125, 0.21875),
        _comparison("toy", "learned", 1, "fixed:Wait", 0.075, -0.0625, 0.2),
    ])
    b_dir = root / "b"
    make_run(b_dir, base_config(b_dir, seed=1), [0.4], results)  # no comparisons.csv: computed deltas, no CI
    out = tmp_path / "rep"
    assert main([str(root), "--out", str(out)]) == 0
    assert "+0.1250 [+0.0312, +0.2188]" in capsys.readouterr().out
    header, (a, b) = read_csv(out.with_suffix(".csv"))
    accuracy = ["toy/base/N=0", "toy/fixed:Wait/N=1", "toy/learned/N=1"]
    assert header[header.index("train/reward") + 1:header.index("train/reward") + 4] == accuracy  # deltas after
    assert float(a["toy/learned-base/N=1"]) == 0.125
    # comparisons.csv keeps 4 decimals
    assert (float(a["toy/learned-base/N=1 ci_low"]), float(a["toy/learned-base/N=1 ci_high"])) == (0.0312, 0.2188)
    assert float(a["toy/fixed:Wait-base/N=1"]) == 0.05
    assert float(a["toy/learned-fixed:Wait/N=1"]) == 0.075
    # run b keeps today's deltas from the accuracies, and has no interval
    assert float(b["toy/learned-base/N=1"]) == pytest.approx(0.125)
    assert float(b["toy/learned-fixed:Wait/N=1"]) == pytest.approx(0.075)
    assert b["toy/fixed:Wait-base/N=1"] == "" and b["toy/learned-base/N=1 ci_low"] == ""
    md = out.with_suffix(".md").read_text().splitlines()
    cols = [c.strip() for c in md[0].strip("|").split("|")]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in md[2:]}
    at = cols.index("toy/learned-base/N=1")
    assert cells["a"][at] == "+0.1250 [+0.0312, +0.2188]"
    assert cells["b"][at] == "0.1250"
    assert cells["a"][cols.index("toy/fixed:Wait-base/N=1")] == "+0.0500 [-0.1000, +0.2000]"
    assert cells["a"][cols.index("toy/learned/N=1")] == "0.3750"


def test_report_group_seeds_mean_std_of_deltas(tmp_path):
    sweep = tmp_path / "multirun"
    deltas = {0: 0.1, 1: 0.25, 2: 0.4}
    for seed, delta in deltas.items():
        d = sweep / str(seed)
        make_run(d, base_config(d, seed=seed), [0.2], [("toy", "base", 0, 0.2), ("toy", "learned", 1, 0.2 + delta)])
        write_comparisons(d, [_comparison("toy", "learned", 1, "base", delta, delta - 0.1, delta + 0.1)])
    out = tmp_path / "grouped"
    assert main([str(sweep), "--group-seeds", "--out", str(out)]) == 0
    _, (row,) = read_csv(out.with_suffix(".csv"))
    values = list(deltas.values())
    assert int(row["seeds"]) == 3
    assert float(row["toy/learned-base/N=1"]) == pytest.approx(statistics.fmean(values))
    assert float(row["toy/learned-base/N=1 std"]) == pytest.approx(statistics.stdev(values))
    md = out.with_suffix(".md").read_text()
    assert f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" in md
