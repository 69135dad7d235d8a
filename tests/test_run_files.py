"""Reading other runs' files (issue 20, family 6): ctt-report skips a malformed run with one warning naming the file
and reads the others; ctt-export stops with one line; debate.png follows --out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ctt.report import main
from tests.test_cli_errors import assert_user_error, run_main
from tests.test_report import base_config, make_run, read_csv

RESULTS = [("b", "base", 0, 0.4), ("b", "learned", 1, 0.6)]
HEADER = "benchmark,mode,num_continuations,accuracy,mean_thinking_tokens,mean_total_tokens\n"
COMPARISONS = "benchmark,mode,num_continuations,versus,delta,ci_low,ci_high\nb,learned,1,base,{delta},0.1,0.3\n"


def _python_tag(run: Path) -> None:
    (run / ".hydra" / "config.yaml").write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")


# what to do to a good run dir -> the file the warning must name
BREAKAGES = {
    "config-list": (lambda r: (r / ".hydra" / "config.yaml").write_text("- 1\n- 2\n"), ".hydra/config.yaml"),
    "config-python-tag": (_python_tag, ".hydra/config.yaml"),
    "config-malformed": (lambda r: (r / ".hydra" / "config.yaml").write_text("seed: [1\n"), ".hydra/config.yaml"),
    "config-token-count": (lambda r: (r / ".hydra" / "config.yaml").write_text("token:\n  count: many\n"),
                           ".hydra/config.yaml"),
    "hydra-yaml-list": (lambda r: (r / ".hydra" / "hydra.yaml").write_text("- x\n"), ".hydra/hydra.yaml"),
    "results-N": (lambda r: (r / "results.csv").write_text(HEADER + "b,base,zero,0.4,5,9\n"), "results.csv:2"),
    "results-accuracy": (lambda r: (r / "results.csv").write_text(HEADER + "b,base,0,0.4,5,9\nb,learned,1,,5,9\n"),
                         "results.csv:3"),
    "results-no-column": (lambda r: (r / "results.csv").write_text("benchmark,mode,num_continuations,accuracy\nb,base,0,0.4\n"),
                          "results.csv"),
    "results-short-row": (lambda r: (r / "results.csv").write_text(HEADER + "b,base\n"), "results.csv:2"),
    "results-binary": (lambda r: (r / "results.csv").write_bytes(b"benchmark,mode\n\xff\xfe\x00\n"), "results.csv"),
    "comparisons-delta": (lambda r: (r / "comparisons.csv").write_text(COMPARISONS.format(delta="+0.2x")),
                          "comparisons.csv:2"),
    "comparisons-N": (lambda r: (r / "comparisons.csv").write_text(COMPARISONS.format(delta="0.2").replace(",1,", ",one,")),
                      "comparisons.csv:2"),
    "metrics-binary": (lambda r: (r / "csv" / "metrics.csv").write_bytes(b"step,train/reward\n0,\xff\n"),
                       "csv/metrics.csv"),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_report_skips_a_malformed_run_naming_its_file(tmp_path, caplog, capsys, breakage):
    make_run(tmp_path / "good", rewards=[0.5], results=RESULTS)
    bad = make_run(tmp_path / "bad", rewards=[0.5], results=RESULTS)
    (bad / "comparisons.csv").write_text(COMPARISONS.format(delta="0.2"))
    damage, named = BREAKAGES[breakage]
    damage(bad)
    with caplog.at_level(logging.WARNING):
        assert main([str(tmp_path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "skipped run bad" in warnings[0] and str(bad / named) in warnings[0], warnings
    _, rows = read_csv(tmp_path / "report.csv")
    assert [r["run"] for r in rows] == ["good"]
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_report_with_no_readable_run_is_one_line(tmp_path, capsys):
    bad = make_run(tmp_path / "bad", results=RESULTS)
    (bad / ".hydra" / "config.yaml").write_text("- 1\n")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ctt-report: no readable run dirs") and "Traceback" not in "\n".join(err)
    assert main(["--diff", str(bad), str(bad)]) == 2  # --diff names its runs: a malformed one is an error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad / ".hydra" / "config.yaml") in err[0] and "expected a YAML mapping" in err[0]


def test_debate_png_follows_out(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs / "a", rewards=[0.5], results=RESULTS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "debate.png").write_bytes(b"mine")  # a file of the user's, beside the report
    assert main([str(runs), "--out", str(tmp_path / "out" / "r1")]) == 0
    assert (tmp_path / "out" / "r1_debate.png").is_file() and (tmp_path / "out" / "r1.csv").is_file()
    assert (tmp_path / "out" / "debate.png").read_bytes() == b"mine"
    assert str(tmp_path / "out" / "r1_debate.png") in capsys.readouterr().out
    assert not (runs / "debate.png").exists() and not (runs / "report_debate.png").exists()


@pytest.mark.parametrize("name, text, needles", [
    ("config.yaml", "- 1\n- 2\n", [".hydra/config.yaml", "expected a YAML mapping"]),
    ("config.yaml", "seed: !!python/object/apply:os.system ['touch pwned']\n", [".hydra/config.yaml", "python/object"]),
    ("config.yaml", "forcing: [1, 2]\n", [".hydra/config.yaml", "forcing must be a mapping"]),
    ("overrides.yaml", "a: 1\n", [".hydra/overrides.yaml", "expected a YAML list"]),
    ("../results.md", b"| a |\n\xff\n", ["results.md:2", "not valid UTF-8"]),
], ids=["list", "python-tag", "forcing-list", "overrides-mapping", "results-md-binary"])
def test_export_from_a_malformed_run_dir_is_one_line(tmp_path, capfd, name, text, needles):
    from tests.test_export import tiny_config, write_token_file

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    target = run / ".hydra" / name
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    token = write_token_file(run / "continue_thinking_token.safetensors", tiny_config(True, 0, None))
    code, _, err = run_main("ctt.export", "experiment=smoke", f"token.path={token}", f"export.dir={tmp_path}/hf",
                            f"hydra.run.dir={tmp_path}/export_run", capfd=capfd)
    assert_user_error(code, err, "DataError", *needles)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "pwned").exists()
