"""Outputs: no command deletes, truncates or overwrites what it did not create, and none leaves a half-written result
(ctt.outputs). Export folders, generate outputs, eval in another run's dir, organism folders, plots, lock files and
file modes; the kills at random points are in tests/test_output_kills.py."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from ctt.outputs import MARKER, atomic_write_bytes, check_not_input, replacing_dir
from ctt.errors import ConfigError
from tests.test_cli_errors import assert_user_error, run_main
from tests.test_export import tiny_config, write_token_file

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def token(tmp_path: Path) -> Path:
    path = tmp_path / "tok" / "continue_thinking_token.safetensors"
    return path if path.exists() else write_token_file(path, tiny_config(True, 0, None))


def export(tmp_path: Path, capfd, *overrides: str):
    return run_main("ctt.export", "experiment=smoke", f"token.path={token(tmp_path)}",
                    f"hydra.run.dir={tmp_path}/exp-run", *overrides, capfd=capfd)


def umask_mode(directory: bool = False) -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


# --- export folders ------------------------------------------------------------------------------------------


def test_export_refuses_the_current_dir_its_ancestors_and_a_run_dir(tmp_path, capfd, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("task_name: train\n")
    (run / "checkpoints").mkdir()
    (run / "continue_thinking_token.safetensors").write_bytes(b"x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("a,b\n")
    before = snapshot(tmp_path / "work"), snapshot(run), snapshot(foreign)
    monkeypatch.chdir(work)
    cases = {".": "the current directory", str(work.parent): "holds the current directory",
             str(run): "is a run dir", str(foreign): "did not write", "/": "holds"}
    for target, needle in cases.items():
        code, _, err = export(tmp_path, capfd, f"export.dir={target}", "export.overwrite=true")
        assert_user_error(code, err, "ConfigError", "export.dir=", needle)
    assert (snapshot(tmp_path / "work"), snapshot(run), snapshot(foreign)) == before


def test_export_replaces_only_its_own_marked_folder_with_the_umask_modes(tmp_path, capfd):
    out = tmp_path / "hf"
    code, _, err = export(tmp_path, capfd, f"export.dir={out}")
    assert code == 0, err[-3000:]
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "export" and "model.safetensors" in marker["files"]
    assert (out / "model.safetensors").stat().st_mode & 0o777 == umask_mode()  # not 0600
    assert out.stat().st_mode & 0o777 == umask_mode(directory=True)
    assert token(tmp_path).stat().st_mode & 0o777 == umask_mode()  # the token file too
    code, _, err = export(tmp_path, capfd, f"export.dir={out}")
    assert_user_error(code, err, "export.overwrite=true")
    code, _, err = export(tmp_path, capfd, f"export.dir={out}", "export.overwrite=true")
    assert code == 0, err[-3000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.") and p.name != ".hf.lock"]  # no temp left
    (out / "my_notes.md").write_text("keep me")
    code, _, err = export(tmp_path, capfd, f"export.dir={out}", "export.overwrite=true")
    assert_user_error(code, err, "my_notes.md", "did not write")
    assert (out / "my_notes.md").read_text() == "keep me"


def test_a_second_export_to_the_same_folder_is_refused(tmp_path, capfd):
    out = tmp_path / "hf"
    fd = os.open(tmp_path / ".hf.lock", os.O_RDWR | os.O_CREAT)  # another process owns the folder
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"4242\n", 0)
    try:
        code, _, err = export(tmp_path, capfd, f"export.dir={out}")
    finally:
        os.close(fd)
    assert_user_error(code, err, "another ctt process (pid 4242)")
    assert not out.exists()


def test_an_export_into_its_own_input_is_refused(tmp_path, capfd):
    folder = token(tmp_path).parent
    code, _, err = export(tmp_path, capfd, f"export.dir={folder}", "export.overwrite=true")
    assert_user_error(code, err, "ConfigError")
    assert token(tmp_path).is_file()
    with pytest.raises(ConfigError, match="is the input"):
        check_not_input(folder, {"token.path": token(tmp_path)})


# --- folders and files, the mechanism ------------------------------------------------------------------------


def test_a_failed_replacement_keeps_the_old_folder_whole_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out"
    with replacing_dir(out, "export", "test", False, "export.dir") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replacing_dir(out, "export", "test", True, "export.dir") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]
    with pytest.raises(ConfigError, match="holds a export output|organism"):
        with replacing_dir(out, "organism", "test", True, "--out"):
            pass


def test_atomic_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_bytes(b"x", tmp_path / "f.bin")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


# --- lock files ----------------------------------------------------------------------------------------------


def test_a_symlinked_or_hard_linked_lock_file_is_never_followed(tmp_path, capfd):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for link in (os.symlink, os.link):
        run = tmp_path / f"run-{link.__name__}"
        run.mkdir()
        link(victim, run / ".ctt.lock")
        code, _, err = run_main("ctt.generate", "experiment=smoke", "generate.prompt=x", f"hydra.run.dir={run}",
                                capfd=capfd)
        assert_user_error(code, err, "ConfigError", "lock file")
        assert victim.read_text() == "precious" and not (run / ".hydra").exists()


# --- generate outputs ----------------------------------------------------------------------------------------


def generate(tmp_path: Path, capfd, *overrides: str):
    return run_main("ctt.generate", "experiment=smoke", f"token.path={token(tmp_path)}",
                    f"hydra.run.dir={tmp_path}/gen-run", *overrides, capfd=capfd)


def test_generate_never_writes_over_its_input_or_a_file_it_did_not_write(tmp_path, capfd):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {i}+1?"}) + "\n" for i in range(20)))
    os.link(prompts, tmp_path / "hard.jsonl")
    (tmp_path / "data.jsonl").write_text('{"question": "mine"}\n')
    before = prompts.read_bytes()
    for output, needle in ((prompts, "is the input"), (tmp_path / "hard.jsonl", "is the input"),
                           (tmp_path / "data.jsonl", "not written by ctt")):
        code, _, err = generate(tmp_path, capfd, f"generate.input={prompts}", f"generate.output={output}")
        assert_user_error(code, err, "ConfigError", needle)
    assert prompts.read_bytes() == before and (tmp_path / "data.jsonl").read_text() == '{"question": "mine"}\n'


def test_generate_replaces_its_own_output_whole_and_refuses_a_second_writer(tmp_path, capfd, monkeypatch):
    out = tmp_path / "o.jsonl"
    code, _, err = generate(tmp_path, capfd, "generate.prompt=x", f"generate.output={out}")
    assert code == 0, err[-3000:]
    first = out.read_bytes()
    assert out.stat().st_mode & 0o777 == umask_mode()
    import ctt.api

    def fail(*args, **kwargs):  # a failure after the run started (e.g. a prompt refused while generating)
        raise ConfigError("refused mid-run")

    monkeypatch.setattr(ctt.api.ContinueThinking, "generate", fail)
    code, _, err = generate(tmp_path, capfd, "generate.prompt=y", f"generate.output={out}")
    assert_user_error(code, err, "refused mid-run")
    assert out.read_bytes() == first  # not truncated
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")) == [".o.jsonl.lock"]
    fd = os.open(tmp_path / ".o.jsonl.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, _, err = generate(tmp_path, capfd, "generate.prompt=y", f"generate.output={out}")
    finally:
        os.close(fd)
    assert_user_error(code, err, "generate.output", "another ctt process")


# --- a run dir holds one kind of run -------------------------------------------------------------------------


def test_eval_in_a_training_run_dir_writes_to_a_subfolder_of_its_own(tmp_path, capfd):
    from ctt.evaluation.runs import discover_runs

    run = tmp_path / "train-run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("task_name: smoke\nseed: 0\n")
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    config_name: train\n")
    (run / "results.csv").write_text("the training run's own results\n")
    before = snapshot(run)
    code, _, err = run_main("ctt.eval", "experiment=smoke", "eval.limit=1", "eval.samples=1",
                            "eval.num_continuations=[1]", "eval.modes=[base]", f"hydra.run.dir={run}", capfd=capfd)
    assert code == 0, err[-3000:]
    assert {k: v for k, v in snapshot(run).items() if k in before} == before  # nothing of the run overwritten
    (own,) = (p.parent for p in run.glob("eval/*/results.csv"))
    assert "config_name: eval" in (own / ".hydra" / "hydra.yaml").read_text()
    assert [p for p, _ in discover_runs([run])] == [run, own]  # ctt-report pairs each config with its results
    code, _, err = run_main("ctt.train", "experiment=smoke", f"hydra.run.dir={own}", capfd=capfd)
    assert_user_error(code, err, "holds a ctt-eval run")


EVAL_ONE = ("experiment=smoke", "eval.limit=1", "eval.samples=1", "eval.num_continuations=[1]", "eval.modes=[base]")


def users_folder(tmp_path: Path) -> Path:
    """A folder of the user's holding files of the names a run writes (no .hydra/, no .ctt.lock)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in (("results.csv", "my paper's numbers\n"), ("samples.jsonl", '{"mine": 1}\n'),
                       ("results.md", "# mine\n"), ("rollouts.jsonl", '{"line": "mine"}\n')):
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("command", ["ctt.eval", "ctt.train", "ctt.generate"])
def test_a_users_folder_is_never_a_run_dir(tmp_path, capfd, command):
    folder = users_folder(tmp_path)
    before = snapshot(folder)
    extra = {"ctt.eval": EVAL_ONE, "ctt.train": ("experiment=smoke", "trainer.max_steps=1"),
             "ctt.generate": ("experiment=smoke", "generate.prompt=x")}[command]
    code, _, err = run_main(command, *extra, f"hydra.run.dir={folder}", capfd=capfd)
    assert_user_error(code, err, f"hydra.run.dir={folder} holds files ctt did not write", "choose a new or empty")
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)


def test_the_current_directory_is_a_run_dir_only_when_empty_or_a_ctt_run(tmp_path, capfd, monkeypatch):
    folder = users_folder(tmp_path)
    before = snapshot(folder)
    monkeypatch.chdir(folder)
    code, _, err = run_main("ctt.eval", *EVAL_ONE, "hydra.run.dir=.", capfd=capfd)
    assert_user_error(code, err, "holds files ctt did not write")
    assert snapshot(folder) == before
    code, _, err = run_main("ctt.eval", *EVAL_ONE, f"hydra.run.dir={tmp_path}", capfd=capfd)  # an ancestor of it
    assert_user_error(code, err, "cannot be a run dir: it holds the current directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code, _, err = run_main("ctt.eval", *EVAL_ONE, "hydra.run.dir=.", capfd=capfd)
    assert code == 0, err[-3000:]
    assert (empty / "results.csv").is_file() and (empty / ".hydra" / "config.yaml").is_file()
    code, _, err = run_main("ctt.eval", *EVAL_ONE, "hydra.run.dir=.", capfd=capfd)  # now a ctt run's
    assert code == 0, err[-3000:]


def test_a_users_folder_is_never_a_sweep_dir(tmp_path, capfd):
    folder = users_folder(tmp_path)
    before = snapshot(folder)
    code, _, err = run_main("ctt.eval", "-m", *EVAL_ONE, "seed=0,1", f"hydra.sweep.dir={folder}", capfd=capfd)
    assert_user_error(code, err, f"hydra.sweep.dir={folder} holds files ctt did not write")
    assert snapshot(folder) == before


@pytest.mark.parametrize("config", ["- a\n- list\n", "key: [unclosed\n", b"\xff\xfe\x00"],
                         ids=["list", "garbled", "not-utf8"])
def test_a_run_dir_whose_config_cannot_be_read_is_refused_not_overwritten(tmp_path, capfd, config):
    """`own_run_dir` took an unreadable .hydra/config.yaml for "no config" and ctt-eval wrote over the run's
    results."""
    run = tmp_path / "train-run"
    (run / ".hydra").mkdir(parents=True)
    path = run / ".hydra" / "config.yaml"
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    (run / "results.csv").write_text("the training run's own results\n")
    before = snapshot(run)
    code, _, err = run_main("ctt.eval", *EVAL_ONE, f"hydra.run.dir={run}", capfd=capfd)
    assert_user_error(code, err, f"hydra.run.dir={run} cannot be told apart from another run", "config.yaml")
    assert {k: v for k, v in snapshot(run).items() if k in before} == before


# --- organism folders and plots ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["garbled-card", "list-card", "unknown-task", "foreign-folder", "huge-seed"])
def test_organism_measure_only_and_seed_errors_are_one_line(tmp_path, capfd, caplog, case):
    """--measure-only read card.json with json.loads (a traceback) and rewrote the card of any folder, unlocked; a
    --seed past 2**32 overflowed in the seeding."""
    import shutil

    from ctt.organism.__main__ import main

    out = tmp_path / "org"
    shutil.copytree(Path(__file__).resolve().parents[1] / "ctt" / "organism" / "model", out)
    card = {"garbled-card": "{not json", "list-card": "[1, 2]", "unknown-task": '{"task": "nope"}'}.get(case)
    if card is not None:
        (out / "card.json").write_text(card)
    if case == "foreign-folder":
        (out / MARKER).unlink()
    before = snapshot(out)
    args = ["--out", str(out), "--seed", str(2**70)] if case == "huge-seed" else ["--out", str(out), "--measure-only"]
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capfd.readouterr().err + caplog.text  # the one line is logged (captured by pytest) or argparse's
    assert exit_.value.code == 2 and "Traceback" not in err, err[-2000:]
    needle = {"garbled-card": "card.json cannot be read", "list-card": "not an organism card",
              "unknown-task": "not an organism card", "foreign-folder": "files ctt did not write",
              "huge-seed": "--seed must be an integer from 0 to"}[case]
    assert needle in err, err[-2000:]
    assert snapshot(out) == before


def test_organism_refuses_a_foreign_folder_and_drops_a_stale_card(tmp_path, capfd):
    from ctt.organism.__main__ import main
    from ctt.organism.card import write_card

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(foreign), "--steps", "1"])
    assert exit_.value.code == 2 and (foreign / "thesis.tex").read_text() == "years of work"
    stale = tmp_path / "org"
    stale.mkdir()
    (stale / "ORGANISM.md").write_text("the shipped model's figures")
    write_card({"figures": None}, stale, markdown=False)
    assert not (stale / "ORGANISM.md").exists()


def test_a_failed_plot_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from ctt.evaluation.plots import scaling_plot

    rows = [{"benchmark": "b", "mode": "base", "num_continuations": 0, "accuracy": 0.5, "ci_low": 0.4,
             "ci_high": 0.6, "mean_thinking_tokens": 10.0}]
    path = scaling_plot(rows, tmp_path / "scaling.png") and tmp_path / "scaling.png"
    before = path.read_bytes()

    def disk_full(self, fname, **kwargs):
        if isinstance(fname, (str, os.PathLike)):
            open(fname, "wb").close()  # what a full disk leaves when writing in place
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError):
        scaling_plot(rows, path)
    assert path.read_bytes() == before and before


# --- report outputs ------------------------------------------------------------------------------------------


def test_report_replaces_only_its_own_files_and_drops_its_stale_ones(tmp_path, capsys):
    """`--out <run dir>/results` would have replaced that run's results.csv; `--out paper/table` a user's table.md.
    Every file a report may write is checked before any run is read; an earlier report's files are replaced, and
    its seeds table and plot are removed when this report has none (they would describe other runs)."""
    from ctt.report import main
    from tests.test_report import make_run

    run = make_run(tmp_path / "runs" / "a", rewards=[0.3], results=[("toy", "base", 0, 0.5), ("toy", "learned", 1, 0.75)])
    results = (run / "results.csv").read_bytes()
    assert main([str(run), "--out", str(run / "results")]) == 2
    assert "results.csv exists and was not written by ctt" in capsys.readouterr().err
    assert (run / "results.csv").read_bytes() == results and not (run / "results.md").exists()

    paper = tmp_path / "paper"
    paper.mkdir()
    for name, mine in (("table.md", "| my | table |\n"), ("table_debate.png", "not a ctt plot"),
                       ("table_seeds.csv", "a,b\n1,2\n")):
        (paper / name).write_text(mine)
        assert main([str(run), "--out", str(paper / "table")]) == 2
        assert f"{name} exists and was not written by ctt" in capsys.readouterr().err
        assert (paper / name).read_text() == mine and not (paper / "table.csv").exists()
        (paper / name).unlink()

    out = tmp_path / "rep" / "r"
    assert main([str(run), "--out", str(out)]) == 0
    written = {p.name for p in out.parent.iterdir()}
    assert {"r.csv", "r.md", "r_debate.png"} <= written
    (out.parent / "r_seeds.md").write_text("## Over training seeds\n\nof an earlier report with seeds\n")
    (tmp_path / "runs" / "a" / "results.csv").unlink()  # this report has no results: no plot
    assert main([str(run), "--out", str(out)]) == 0
    assert {p.name for p in out.parent.iterdir() if not p.name.startswith(".")} == {"r.csv", "r.md"}


def test_report_replaces_an_earlier_reports_plot_and_never_opens_a_fifo_log(tmp_path):
    """A debate plot written before plots carried ctt's Software chunk (matplotlib's own) beside that report's CSV
    is the earlier report's; a run log that is a FIFO is skipped (reading it would wait for ever)."""
    from matplotlib.figure import Figure

    from ctt.evaluation.plots import written_by
    from ctt.report import main
    from tests.test_report import make_run

    run = make_run(tmp_path / "a", rewards=[0.3], results=[("toy", "base", 0, 0.5), ("toy", "learned", 1, 0.75)])
    os.mkfifo(run / "stuck.log")
    assert main([str(run)]) == 0
    old = run / "report_debate.png"
    Figure().savefig(old)  # matplotlib's Software chunk, as before
    assert main([str(run)]) == 0 and written_by(old, "ctt-report")
    (run / "report.csv").write_text("my,own\n1,2\n")  # without the report's CSV beside it: not recognised
    Figure().savefig(old)
    assert main([str(run)]) == 2


def test_a_second_report_to_the_same_out_is_refused(tmp_path, capsys):
    from ctt.report import main
    from tests.test_report import make_run

    run = make_run(tmp_path / "a", rewards=[0.3])
    out = tmp_path / "rep"
    (tmp_path / ".rep.lock").touch()
    fd = os.open(tmp_path / ".rep.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert main([str(run), "--out", str(out)]) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert "ctt-report --out" in err and "another ctt process" in err, err
    assert not (tmp_path / "rep.csv").exists()


def test_cleaning_temp_siblings_matches_their_names_exactly_not_as_a_glob(tmp_path):
    """An output named `a*` (export.dir, generate.output) removes only its own killed writers' temp siblings: a glob
    of its name deleted a user's `.ab.tmp-notes` and another output's temp folder."""
    from ctt.outputs import clean_siblings
    from ctt.writes import temp_sibling

    target = tmp_path / "a*"
    stale_file, stale_dir = temp_sibling(target), temp_sibling(target, "old")
    stale_file.write_text("killed writer")
    stale_dir.mkdir()
    target.mkdir()
    keep = [tmp_path / ".ab.tmp-notes", tmp_path / ".a*.tmp-notes", temp_sibling(tmp_path / "ab")]
    for path in keep:
        path.write_text("not this output's")
    clean_siblings(target)
    assert not stale_file.exists() and not stale_dir.exists()
    assert all(path.read_text() == "not this output's" for path in keep)


@pytest.mark.parametrize("command", ["generate", "export"])
def test_an_output_under_a_file_is_one_line(tmp_path, capfd, command):
    """mkdir's FileExistsError/NotADirectoryError traceback when a parent of the output is a file."""
    (tmp_path / "afile").write_text("mine")
    if command == "generate":
        code, _, err = generate(tmp_path, capfd, "generate.prompt=x", f"generate.output={tmp_path}/afile/sub/o.jsonl")
    else:
        code, _, err = export(tmp_path, capfd, f"export.dir={tmp_path}/afile/sub/hf")
    assert_user_error(code, err, "OutputError", f"{tmp_path}/afile is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "mine"


def test_an_output_ctt_wrote_is_recognised_by_all_of_it_not_its_first_line(tmp_path, capfd):
    """A line a user appended to a ctt-generate output, or a note under a report's table, was replaced with the
    rest: the recognisers read only the first line."""
    out = tmp_path / "o.jsonl"
    assert generate(tmp_path, capfd, "generate.prompt=x", f"generate.output={out}")[0] == 0
    with open(out, "a") as f:
        f.write('{"my": "precious notes"}\n')
    before = out.read_bytes()
    code, _, err = generate(tmp_path, capfd, "generate.prompt=x", f"generate.output={out}")
    assert_user_error(code, err, "was not written by ctt as this kind of output")
    assert out.read_bytes() == before
    from ctt.report import REPORT_FILES

    table = tmp_path / "report.md"
    table.write_text("| run | status | acc |\n|---|---|---|\n| 0 | done | 0.5 |\n")
    assert REPORT_FILES[".md"](table)
    table.write_text(table.read_text() + "\nmy notes on these numbers\n")
    assert not REPORT_FILES[".md"](table)
    sheet = tmp_path / "report.csv"
    sheet.write_text("run,status,acc\n0,done,0.5\n")
    assert REPORT_FILES[".csv"](sheet)
    sheet.write_text(sheet.read_text() + "my notes\n")
    assert not REPORT_FILES[".csv"](sheet)


def test_a_symlink_output_and_an_output_inside_another_are_refused(tmp_path, capfd):
    """A dangling generate.output symlink was replaced by a regular file (its target never written); an export.dir
    inside an earlier export made that export unreplaceable (its marker does not list the new folder)."""
    link = tmp_path / "dangle.jsonl"
    link.symlink_to(tmp_path / "elsewhere.jsonl")
    code, _, err = generate(tmp_path, capfd, "generate.prompt=x", f"generate.output={link}")
    assert_user_error(code, err, "is a symlink")
    assert link.is_symlink() and not (tmp_path / "elsewhere.jsonl").exists()
    assert export(tmp_path, capfd, f"export.dir={tmp_path}/x1")[0] == 0
    before = snapshot(tmp_path / "x1")
    code, _, err = export(tmp_path, capfd, f"export.dir={tmp_path}/x1/sub")
    assert_user_error(code, err, f"is inside {tmp_path / 'x1'}, an output ctt wrote")
    assert snapshot(tmp_path / "x1") == before

