"""ctt-report: differing config keys, metrics and deltas, seed grouping, run status, --diff.

Fast tests build fake run dirs by hand; the slow one runs a real 2x2 Hydra multirun of `experiment=smoke`.
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctt.evaluation.results import results_from_samples
from ctt.report import main

REPO = Path(__file__).resolve().parents[1]
ACC_COLUMNS = ["benchmark", "mode", "num_continuations", "accuracy", "n", "mean_thinking_tokens", "mean_total_tokens"]


def base_config(run_dir: Path, **changes) -> dict:
    cfg = {
        "task_name": "smoke",
        "seed": 0,
        "evaluate": True,
        "paths": {"root_dir": "${ctt_root:}", "output_dir": "${hydra:runtime.output_dir}"},
        "token": {"init": {"name": "word", "word": "Wait"}, "text": "<|continue-thinking|>"},
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.01},
        "rl": {"baseline": "group_mean", "samples_per_prompt": 2},
        "eval": {"num_continuations": [0, 1], "fixed_words": ["Wait"]},
        # resolved absolute paths of the run dir itself must never count as a difference
        "logger": {"csv": {"save_dir": str(run_dir.resolve())}},
        "callbacks": {"token_export": {"dirpath": str(run_dir.resolve() / "tokens")}},
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def make_run(
    run_dir: Path,
    config: dict | None = None,
    rewards: list[float | None] | None = None,
    results: list[tuple[str, str, int, float]] | None = None,
    log: str = "",
    extra: bool = False,
) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = config if config is not None else base_config(run_dir)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run_dir / ".hydra" / "overrides.yaml").write_text("[]\n")
    (run_dir / "train.log").write_text(log)
    if rewards is not None:
        (run_dir / "csv").mkdir()
        with open(run_dir / "csv" / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "step", "train/loss", "train/reward"])
            for step, r in enumerate(rewards):
                w.writerow([0, step, 0.1, "" if r is None else r])
    if results is not None:
        with open(run_dir / "results.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(ACC_COLUMNS + ["ci_low", "ci_high"])
            for bench, mode, n, acc in results:
                w.writerow([bench, mode, n, acc, 10, 5.0, 9.0, 0.0, 1.0])
    if extra:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run_dir


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def config_columns(header: list[str], metrics_from: str) -> list[str]:
    """The columns between the bookkeeping ones and the first metric column."""
    skip = {"run", "status", "seeds", "path"}
    end = header.index(metrics_from)
    return [c for c in header[:end] if c not in skip]


# ------------------------------------------------------------------------------------------------ fast


def test_differing_keys_and_metrics(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    lrs = {"0": 0.01, "1": 0.003, "2": 0.01}
    seeds = {"0": 0, "1": 0, "2": 1}
    rewards = {"0": [0.1, 0.4], "1": [0.2, None], "2": [0.0, 0.3, 0.9]}
    for name in lrs:
        d = sweep / name
        make_run(d, base_config(d, optimizer__lr=lrs[name], seed=seeds[name]), rewards[name],
                 [("toy", "base", 0, 0.25), ("toy", "learned", 1, 0.5)])
    assert main([str(sweep)]) == 0
    header, rows = read_csv(sweep / "report.csv")
    assert (sweep / "report.md").read_text() in capsys.readouterr().out + "\n"
    assert set(config_columns(header, "train/reward")) == {"seed", "optimizer.lr"}
    assert not any(c.startswith(("paths.", "logger.", "callbacks.")) for c in header)
    by_run = {r["run"]: r for r in rows}
    assert sorted(by_run) == ["0", "1", "2"]
    assert {k: float(by_run[k]["optimizer.lr"]) for k in by_run} == lrs
    # last non-empty train/reward of each metrics.csv
    assert float(by_run["0"]["train/reward"]) == 0.4
    assert float(by_run["1"]["train/reward"]) == 0.2
    assert float(by_run["2"]["train/reward"]) == 0.9
    assert float(by_run["0"]["toy/learned/N=1"]) == 0.5
    assert all(r["status"] == "ok" for r in rows)


def test_deltas(tmp_path):
    run = make_run(
        tmp_path / "run",
        rewards=[0.5],
        results=[
            ("toy", "base", 0, 0.2), ("toy", "fixed:Wait", 1, 0.3), ("toy", "fixed:Hmm", 1, 0.25),
            ("toy", "learned", 1, 0.5), ("toy", "fixed:Wait", 2, 0.35), ("toy", "learned", 2, 0.6),
            ("other", "base", 0, 0.9), ("other", "learned", 1, 0.8),
        ],
    )
    out = tmp_path / "rep" / "r"
    assert main([str(run), "--out", str(out)]) == 0
    header, (row,) = read_csv(out.with_suffix(".csv"))
    expected = {
        "toy/learned-base/N=1": 0.5 - 0.2,
        "toy/learned-base/N=2": 0.6 - 0.2,
        "toy/learned-fixed:Wait/N=1": 0.5 - 0.3,
        "toy/learned-fixed:Wait/N=2": 0.6 - 0.35,
        "toy/learned-fixed:Hmm/N=1": 0.5 - 0.25,
        "other/learned-base/N=1": 0.8 - 0.9,
    }
    deltas = {c: float(row[c]) for c in header if "/learned-" in c}
    assert deltas == pytest.approx(expected)
    assert "toy/learned-fixed:Hmm/N=2" not in header  # no fixed:Hmm run at N=2
    assert row["status"] == "ok"
    assert out.with_suffix(".md").is_file()


def test_group_seeds_mean_std(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    rewards = {(0.01, 0): 0.2, (0.01, 1): 0.5, (0.01, 2): 0.6, (0.003, 0): 0.1, (0.003, 1): 0.4}
    accs = {(0.01, 0): 0.25, (0.01, 1): 0.5, (0.01, 2): 0.75, (0.003, 0): 0.0, (0.003, 1): 0.5}
    for i, (lr, seed) in enumerate(rewards):
        d = sweep / str(i)
        make_run(d, base_config(d, optimizer__lr=lr, seed=seed), [0.0, rewards[(lr, seed)]],
                 [("toy", "base", 0, 0.1), ("toy", "learned", 1, accs[(lr, seed)])])
    out = tmp_path / "grouped"
    assert main([str(sweep), "--group-seeds", "--out", str(out)]) == 0
    header, rows = read_csv(out.with_suffix(".csv"))
    assert "seed" not in header and "seeds" in header
    assert config_columns(header, "train/reward") == ["optimizer.lr"]
    assert len(rows) == 2
    for lr in (0.01, 0.003):
        (row,) = [r for r in rows if float(r["optimizer.lr"]) == lr]
        seeds = [s for (l, s) in rewards if l == lr]
        assert int(row["seeds"]) == len(seeds)
        r = [rewards[(lr, s)] for s in seeds]
        a = [accs[(lr, s)] - 0.1 for s in seeds]
        assert float(row["train/reward"]) == pytest.approx(sum(r) / len(r))
        assert float(row["train/reward std"]) == pytest.approx(statistics.stdev(r))
        assert float(row["toy/learned-base/N=1"]) == pytest.approx(sum(a) / len(a))
        assert float(row["toy/learned-base/N=1 std"]) == pytest.approx(statistics.stdev(a))
    md = out.with_suffix(".md").read_text()
    r = [0.2, 0.5, 0.6]
    assert f"{sum(r) / 3:.4f} ± {statistics.stdev(r):.4f}" in md


def test_status_failed_and_no_results(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "a_ok", rewards=[0.3], results=[("toy", "base", 0, 0.5)])
    make_run(root / "b_failed_empty")  # .hydra and an empty log, nothing else
    make_run(root / "c_no_results", extra=True)  # left a checkpoint, but no metrics and no results.csv
    make_run(root / "d_error", rewards=[0.1], log="[2026-01-01 00:00:00,000][ctt.train][ERROR] - CttError: boom\n")
    make_run(root / "e_partial", rewards=[0.1])  # trained (evaluate=true) but results.csv never written
    assert main([str(root), "--out", str(tmp_path / "rep")]) == 0
    _, rows = read_csv(tmp_path / "rep.csv")
    status = {r["run"]: r["status"] for r in rows}
    assert status == {
        "a_ok": "ok", "b_failed_empty": "failed", "c_no_results": "no-results", "d_error": "failed", "e_partial": "partial",
    }
    failed = next(r for r in rows if r["run"] == "b_failed_empty")
    assert failed["train/reward"] == "" and failed["toy/base/N=0"] == ""


def test_discovery_nested_and_several_dirs(tmp_path):
    a, b = tmp_path / "exp_a", tmp_path / "exp_b"
    for i in (0, 1, 2, 10):
        make_run(a / "multiruns" / "2026-01-01_00-00-00" / str(i), results=[("toy", "base", 0, 0.1 * i / 10)])
    single = make_run(b / "runs" / "r1", rewards=[0.2])
    (a / "multiruns" / "notes").mkdir()  # not a run: ignored
    assert main([str(a), str(b), "--out", str(tmp_path / "all")]) == 0
    _, rows = read_csv(tmp_path / "all.csv")
    names = [r["run"] for r in rows]
    stem = "exp_a/multiruns/2026-01-01_00-00-00/"
    assert names == [stem + "0", stem + "1", stem + "2", stem + "10", "exp_b/runs/r1"]
    # a run dir passed directly is its own single row
    assert main([str(single), "--out", str(tmp_path / "one")]) == 0
    _, rows = read_csv(tmp_path / "one.csv")
    assert [r["run"] for r in rows] == ["r1"]


def test_diff_fake_runs(tmp_path, capsys):
    a = make_run(tmp_path / "a", None, [0.2], [("toy", "base", 0, 0.25), ("toy", "learned", 1, 0.5)])
    b_dir = tmp_path / "b"
    b = make_run(b_dir, base_config(b_dir, rl__baseline="batch_mean"), [0.7], [("toy", "learned", 1, 0.75)])
    assert main(["--diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    config_part, metric_part = out.split("| metric |")
    assert "| rl.baseline | group_mean | batch_mean |" in config_part
    assert config_part.count("\n| ") == 2  # header + the one differing key
    assert "+0.5000" in metric_part  # train/reward 0.7 - 0.2
    assert "+0.2500" in metric_part  # toy/learned/N=1
    assert "toy/base/N=0" not in metric_part  # only in A


def test_usage_errors(tmp_path):
    with pytest.raises(SystemExit):
        main([])
    assert main([str(tmp_path)]) == 2  # no runs under it
    assert main(["--diff", str(tmp_path), str(tmp_path)]) == 2


def test_a_folder_as_out_a_missing_dir_and_unicode_digits_are_one_line(tmp_path, capsys, monkeypatch):
    """`--out .` and `--out /` raised ValueError from Path.with_name; a mistyped DIR was created with a lock file
    inside; a subfolder named "²" ("²".isdigit(), int("²") raises) broke the natural sort."""
    run = make_run(tmp_path / "runs" / "0", results=[("gsm8k", "base", 0, 0.5)])
    (tmp_path / "runs" / "²").mkdir()
    make_run(tmp_path / "runs" / "x²1", results=[("gsm8k", "base", 0, 0.25)])
    monkeypatch.chdir(tmp_path)
    for out in (".", "/", "..", str(tmp_path / "runs")):
        capsys.readouterr()
        assert main([str(run), "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"--out {out} is a folder" in err and "Traceback" not in err, err
    typo = tmp_path / "rnus"
    assert main([str(typo)]) == 2
    assert "rnus is not there" in capsys.readouterr().err and not typo.exists()
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    assert "x²1" in (tmp_path / "rep.md").read_text()


# ------------------------------------------------------------------------------------------------ slow


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_report_on_real_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    _run([
        "-m", "ctt.train", "-m", "experiment=smoke", "token/init=wait,mean", "seed=0,1",
        f"hydra.sweep.dir={sweep}", "evaluate=true", "trainer.max_steps=2", "eval.num_continuations=[0,1]",
    ])
    runs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/config.yaml"))
    assert len(runs) == 4
    for run in runs:
        for name in ("results.csv", "results.md", "samples.jsonl", "scaling.png"):
            assert (run / name).is_file(), f"{run / name} missing"
        _, written = read_csv(run / "results.csv")
        recomputed = results_from_samples(run / "samples.jsonl")
        assert [{k: str(v) for k, v in r.items()} for r in recomputed] == written

    _run(["-m", "ctt.report", str(sweep)])
    header, rows = read_csv(sweep / "report.csv")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    # exactly the two swept keys, named as they were overridden (the group, not the keys its options set)
    assert set(config_columns(header, "train/reward")) == {"seed", "token/init"}
    assert sorted(r["token/init"] for r in rows) == ["mean", "mean", "wait", "wait"]

    _run(["-m", "ctt.report", str(sweep), "--group-seeds", "--out", str(tmp_path / "grouped")])
    header, rows = read_csv(tmp_path / "grouped.csv")
    assert len(rows) == 2 and [int(r["seeds"]) for r in rows] == [2, 2]
    assert "seed" not in config_columns(header, "train/reward")

    # two runs whose overrides differ only in seed: --diff shows `seed` and no other config key
    overrides = {run: set(yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())) for run in runs}
    a, b = next(
        (x, y) for x in runs for y in runs
        if x != y and {o.split("=")[0] for o in overrides[x] ^ overrides[y]} == {"seed"}
    )
    out = _run(["-m", "ctt.report", "--diff", str(a), str(b)]).stdout
    config_part = out.split("| metric |")[0] if "| metric |" in out else out.split("no metrics in common")[0]
    table = [line for line in config_part.splitlines() if line.startswith("| ")]
    assert table[0] == "| key | A | B |"
    assert [line.split("|")[1].strip() for line in table[1:]] == ["seed"]


def test_a_swept_group_is_one_column(tmp_path):
    """token/init=wait,mean changes token.init.name and token.init.word: the report shows the group choice only,
    while an explicit override of a key inside an unswept group still shows as that key."""
    runs = tmp_path / "sweep"
    for name, choice, init, lr in [("0", "wait", {"name": "word", "word": "Wait"}, 0.01),
                                   ("1", "mean", {"name": "mean"}, 0.01), ("2", "mean", {"name": "mean"}, 0.02)]:
        d = runs / name
        cfg = base_config(d, optimizer__lr=lr)
        cfg["token"]["init"] = init
        make_run(d, cfg, [0.1])
        choices = {"token/init": choice, "model": "tiny_random", "hydra/launcher": "basic"}
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    assert main([str(runs)]) == 0
    header, rows = read_csv(runs / "report.csv")
    assert set(config_columns(header, "train/reward")) == {"token/init", "optimizer.lr"}
    assert [r["token/init"] for r in rows] == ["wait", "mean", "mean"]


def test_debate_plot_has_one_line_per_kind_of_continuation(tmp_path, capsys):
    """A token.count sweep: the report's debate.png has a learned line per k (from each run's results) and every
    other mode once, each over N from the base point, at x = mean total tokens."""
    from ctt.evaluation.plots import debate_plot

    shared = [("b", "base", 0, 0.4), ("b", "fixed:Wait", 1, 0.45), ("b", "fixed:Wait", 2, 0.5),
              ("b", "filler:. x8", 1, 0.42), ("b", "no_string", 1, 0.5)]
    for k, acc in ((1, 0.6), (4, 0.7)):
        cfg = base_config(tmp_path / f"k{k}")
        cfg["token"]["count"] = k
        make_run(tmp_path / f"k{k}", cfg, rewards=[0.5],
                 results=shared + [("b", "learned", 1, acc), ("b", "learned", 2, acc + 0.05)])
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report_debate.png").is_file() and "report_debate.png" in capsys.readouterr().out
    header, _ = read_csv(tmp_path / "report.csv")
    assert config_columns(header, "train/reward") == ["token.count"]  # exactly the swept key
    from ctt.evaluation.runs import load_runs

    runs = [(int(r.config.get("token.count") or 1), r.results) for r in load_runs([tmp_path])]
    ax = debate_plot(runs).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["no_string", "fixed:Wait", "filler:. x8", "learned k=1", "learned k=4", "base (N=0)"]
    learned = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert learned["learned k=4"] == [0.4, 0.7, 0.75] and learned["fixed:Wait"] == [0.4, 0.45, 0.5]


def test_filler_debate_experiment_composes_as_a_token_count_sweep(compose_cfg):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ctt.config.hydra_glue import CONFIG_DIR
    from ctt.policy.modes import expand_modes

    cfg = compose_cfg("train", ["experiment=filler_debate"])  # validated in test_settings with every experiment
    assert cfg.model.name == "organism" and cfg.task_name == "filler_debate"
    labels = {m.label for m in expand_modes(list(cfg.eval.modes), list(cfg.eval.num_continuations),
                                              list(cfg.eval.fixed_words))}
    assert {"no_string", "filler:. x8", "fixed:Wait", "learned"} <= labels
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        full = compose("train", overrides=["experiment=filler_debate"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert dict(full.hydra.sweeper.params) == {"token.count": "1,2,4,8"}
