"""Hostile input, round two (issue 11): one run per run dir, unusable run dirs, token files and token texts, gold
answers that are not one answer, extraction cost, a diverging row, prompts that do not fit, rollouts after a resume.
Checkpoints are in tests/test_checkpoints.py, config keys and types in tests/test_settings.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ctt.errors import ConfigError, DataError, ModelError, TokenFileError
from tests.test_cli_errors import ONE_THREAD, ROOT, assert_user_error, jsonl, jsonl_data, run_main, smoke

pytestmark = pytest.mark.usefixtures("one_thread")


# --- item 2: one live process per run dir ----------------------------------------------------------------------------


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the first run"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_process_in_a_run_dir_is_refused_and_a_killed_owner_leaves_no_lock(tmp_path, capfd, monkeypatch):
    """Two real processes: a training run owns its dir; another ctt-train or ctt-eval there stops with the owner's
    pid, while a rank the launcher started (Lightning's DDP re-launch sets LOCAL_RANK) shares it. Killing the owner
    (SIGKILL) leaves no lock behind."""
    import ctt.train
    from ctt.reliability.run_dir import lock_run_dir, unlock_run_dir

    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "ctt.train", *smoke(tmp_path, "trainer.max_steps=100000")],
                             cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = run / ".ctt.lock"
        _wait_for(lambda: (run / ".hydra" / "overrides.yaml").is_file() and lock.read_text().strip(), first)
        assert lock.read_text().strip() == str(first.pid)
        config = (run / ".hydra" / "config.yaml").read_text()
        code, _, err = run_main("ctt.train", *smoke(tmp_path, "seed=5"), capfd=capfd)
        assert_user_error(code, err, "ConfigError", f"hydra.run.dir={run} is in use", f"(pid {first.pid})")
        assert (run / ".hydra" / "config.yaml").read_text() == config  # the owner's config, untouched
        code, _, err = run_main("ctt.eval", "experiment=smoke", f"hydra.run.dir={run}", capfd=capfd)
        assert_user_error(code, err, f"(pid {first.pid})")
        with monkeypatch.context() as patch:
            patch.setattr(ctt.train, "train", lambda cfg: {})
            patch.setenv("LOCAL_RANK", "1")
            code, _, err = run_main("ctt.train", *smoke(tmp_path, "hydra.output_subdir=null"), capfd=capfd)
            assert code == 0, err[-2000:]
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    lock_run_dir(run)  # the OS released the killed owner's lock
    assert lock.read_text().strip() == str(os.getpid())
    unlock_run_dir(run)


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda p: p.write_text("x"), ["is a file, not a directory"]),
        (lambda p: (p.parent / "afile").write_text("x"), ["cannot create hydra.run.dir", "Not a directory"]),
    ],
    ids=["run-dir-is-a-file", "run-dir-under-a-file"],
)
def test_an_unusable_run_dir_is_one_line(tmp_path, capfd, make, needles):
    target = tmp_path / "run"
    make(target)
    run_dir = target if target.exists() else tmp_path / "afile" / "run"
    code, _, err = run_main("ctt.train", *smoke(tmp_path, f"hydra.run.dir={run_dir}"), capfd=capfd)
    assert_user_error(code, err, "ConfigError", *needles)


@pytest.mark.parametrize("name", ["checkpoints", "csv", ""])
def test_an_unwritable_output_dir_is_refused_before_training(tmp_path, capfd, monkeypatch, name):
    """A read-only checkpoints/ used to fail at the first save, after training. (As root permissions are not
    enforced: the probe's failure is simulated here; the real chmod case is below.)"""
    import ctt.reliability.run_dir

    target = tmp_path / "run" / name
    target.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / ".ctt.lock").touch()  # an earlier ctt run's dir (a folder of the user's is refused anyway)
    real = ctt.reliability.run_dir._probe

    def probe(directory: Path) -> None:
        if Path(directory) == target:
            raise PermissionError(13, "Permission denied")
        real(directory)

    monkeypatch.setattr(ctt.reliability.run_dir, "_probe", probe)
    code, _, err = run_main("ctt.train", *smoke(tmp_path), capfd=capfd)
    assert_user_error(code, err, "ConfigError", str(target), "is not writable: Permission denied")


def test_an_unwritable_logger_dir_is_refused_before_training(tmp_path, capfd, monkeypatch):
    """TensorBoard's (or W&B's) folder is written by the logger, outside ctt.writes: checked at start-up too."""
    import ctt.reliability.run_dir

    target = tmp_path / "run" / "tensorboard"
    target.mkdir(parents=True)
    (tmp_path / "run" / ".ctt.lock").touch()
    real = ctt.reliability.run_dir._probe
    monkeypatch.setattr(ctt.reliability.run_dir, "_probe", lambda d: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if Path(d) == target else real(d))
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "logger=tensorboard"), capfd=capfd)
    assert_user_error(code, err, "ConfigError", f"the tensorboard logger's dir {target} is not writable")


def test_a_run_dir_without_write_permission_is_one_line(tmp_path, capfd, monkeypatch):
    """The lock file cannot be created (a read-only run dir; simulated, as root ignores permissions)."""
    import ctt.reliability.run_dir

    real_open = os.open

    def no_lock_file(path, *args, **kwargs):
        if str(path).endswith(ctt.reliability.run_dir.LOCK_FILE):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(ctt.reliability.run_dir.os, "open", no_lock_file)
    code, _, err = run_main("ctt.train", *smoke(tmp_path), capfd=capfd)
    assert_user_error(code, err, "ConfigError", f"hydra.run.dir={tmp_path / 'run'} is not writable: Permission denied")
    assert not (tmp_path / "run" / ".hydra").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
@pytest.mark.parametrize("name, needle", [("checkpoints", "the checkpoint dir"), ("", "is not writable")])
def test_a_read_only_output_dir_is_refused(tmp_path, capfd, name, needle):
    target = tmp_path / "run" / name
    target.mkdir(parents=True)
    target.chmod(0o555)
    try:
        code, _, err = run_main("ctt.train", *smoke(tmp_path), capfd=capfd)
    finally:
        target.chmod(0o755)
    assert_user_error(code, err, "ConfigError", needle, "Permission denied")


def test_checkpoints_that_is_a_file_is_refused(tmp_path, capfd):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    code, _, err = run_main("ctt.train", *smoke(tmp_path), capfd=capfd)
    assert_user_error(code, err, "ConfigError", "checkpoints is a file, not a directory")


# --- item 5: token files --------------------------------------------------------------------------------------------


def _token(path: Path, tensor: torch.Tensor, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({"embedding": tensor}, str(path), metadata=meta if meta is not None else {"base_model": "tiny_random"})
    return path


@pytest.mark.parametrize(
    "tensor, meta, message",
    [
        (torch.full((64,), float("nan")), None, "64 non-finite values"),
        (torch.tensor([float("inf")] + [0.0] * 63), None, "1 non-finite values"),
        (torch.arange(64), None, "holds torch.int64 values, not floating point"),
        (torch.zeros(64), {}, "has no base_model metadata"),
    ],
    ids=["nan", "inf", "integer", "no-metadata"],
)
def test_unusable_token_files_are_refused(tmp_path, tensor, meta, message):
    from ctt.models.token import load_token_file

    path = _token(tmp_path / "t.safetensors", tensor, meta)
    with pytest.raises(TokenFileError, match=message):
        load_token_file(path, 64, "tiny_random")


def test_a_half_precision_token_file_is_widened_with_a_warning(tmp_path, caplog):
    from ctt.models.token import load_token_file

    path = _token(tmp_path / "t.safetensors", torch.full((64,), 0.5, dtype=torch.float16))
    with caplog.at_level(logging.WARNING, logger="ctt.models.token"):
        embedding, _ = load_token_file(path, 64, "tiny_random")
    assert embedding.dtype == torch.float32 and torch.equal(embedding, torch.full((64,), 0.5))
    assert "holds torch.float16 values" in caplog.text


def test_a_non_finite_token_file_from_the_cli(tmp_path, capfd):
    path = _token(tmp_path / "t.safetensors", torch.full((64,), float("nan")))
    code, _, err = run_main("ctt.eval", "experiment=smoke", f"token.path={path}", f"hydra.run.dir={tmp_path}/e",
                            capfd=capfd)
    assert_user_error(code, err, "TokenFileError", "non-finite values")


# --- item 6: the token text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["\x7f", "a", "</think>"], ids=["one-byte-token", "vocab-entry", "added-token"])
def test_a_token_text_that_is_already_one_token_is_refused(tiny_loaded, text):
    from ctt.models.token import check_token_text

    with pytest.raises(ModelError, match="already in the vocabulary"):
        check_token_text(tiny_loaded.tokenizer, text)


@pytest.mark.slow
def test_smollm2_refuses_a_leading_space_word():
    """`" Wait"` is not a key of SmolLM2's vocabulary but encodes to its one token `ĠWait`."""
    folder = Path(os.environ.get("CTT_CACHE_DIR", Path.home() / ".cache" / "ctt")) / "smollm2_135m-hf"
    if not folder.is_dir():
        pytest.skip(f"converted SmolLM2 folder not found at {folder}")
    from transformers import AutoTokenizer

    from ctt.models.token import check_token_text

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with pytest.raises(ModelError, match="'ĠWait'"):
        check_token_text(tokenizer, " Wait")
    check_token_text(tokenizer, "<|continue-thinking|>")


def test_a_token_text_found_in_a_training_prompt_stops_before_the_first_step(tmp_path, capfd):
    """Every "Calculate ..." question would hold the learned token: refused before any rollout."""
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "token.text=Calc"), capfd=capfd)
    assert_user_error(code, err, "DataError", "the question contains the token text 'Calc'", "problem basic_arithmetic")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, needle",
    [(["token.text=Zq9", "prompt.instruction='Say Zq9.'"], "prompt.instruction contains the token text 'Zq9'"),
     (["token.text=assistant"], "the chat template contains the token text 'assistant'")],
    ids=["instruction", "chat-template"],
)
def test_a_token_text_in_every_prompt_is_refused(tmp_path, capfd, overrides, needle):
    code, _, err = run_main("ctt.train", *smoke(tmp_path, *overrides), capfd=capfd)
    assert_user_error(code, err, "ConfigError", needle)
    assert not (tmp_path / "run" / "rollouts.jsonl").exists()


# --- prompts longer than the context ----------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_one_line(tmp_path, capfd):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    rows.append({"question": "What is 1 + 1? " + "blah " * 20_000, "answer": "2"})  # 100k characters
    path = jsonl(tmp_path / "long.jsonl", rows)
    code, _, err = run_main("ctt.train", *smoke(tmp_path, *jsonl_data(path)), capfd=capfd)
    assert_user_error(code, err, "DataError", "long-4: its prompt is", "the model's context of 4096",
                      "forcing.max_new_tokens=24")


def test_evaluation_problems_are_checked_before_generating(tiny_loaded):
    from ctt.data.problems import Problem
    from ctt.policy.policy import ForcingSettings, Policy

    policy = Policy(tiny_loaded, ForcingSettings(max_new_tokens=96), "Answer.")
    short = [Problem(f"b{i}", f"What is {i}+1?", str(i + 1)) for i in range(100)]
    policy.check_problems(short)
    assert not policy._prompt_cache  # short prompts are not tokenised by the check
    with pytest.raises(DataError, match="problem b-long: its prompt is .* the model's context of 4096"):
        policy.check_problems(short + [Problem("b-long", "x" * 5000, "1")])


# --- item 7: gold answers that are not one answer ---------------------------------------------------------------------


def test_null_and_list_golds_are_skipped_and_counted(tmp_path, caplog):
    from ctt.data.sources import load_problems

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(3)] + [
        {"question": "null", "answer": None}, {"question": "list", "answer": ["1", "2"]},
        {"question": "map", "answer": {"a": 1}}, {"question": "bool", "answer": True},
    ]
    with caplog.at_level(logging.WARNING, logger="ctt.data.sources"):
        problems = load_problems("jsonl", path=str(jsonl(tmp_path / "g.jsonl", rows)))
    assert [p.question for p in problems] == ["q0", "q1", "q2"]
    assert "skipped 4 of 7 rows whose gold answer is null, not one answer" in caplog.text
    with pytest.raises(DataError, match="no gold answer"):
        load_problems("jsonl", path=str(jsonl(tmp_path / "bad.jsonl", rows[3:])))


# --- item 8: answer extraction is linear ----------------------------------------------------------------------------


def _extract_seconds(text: str) -> float:
    from ctt.rewards.grading import score_completion

    start = time.perf_counter()
    score_completion(text, "2")
    return time.perf_counter() - start


def test_answer_extraction_is_linear_and_bounded():
    """`\\boxed{` 10,000 times took 20-25 s (a scan per box). Linear: 10x the text takes about 10x the time, not
    100x (a ratio of two timings on the same machine; the absolute bound, a 1 MB completion in well under a second,
    is bench/bench_grading.py: a wall-clock limit fails at random on a loaded machine)."""
    for unit in ("\\boxed{", "\\boxed{" * 7 + "x} ", "\\boxed{1} and {{ 3 ", "word 12 "):
        small, large = unit * (100_000 // len(unit)), unit * (1_000_000 // len(unit))
        t_small = min(_extract_seconds(small) for _ in range(3))
        t_large = min(_extract_seconds(large) for _ in range(2))
        assert t_large < 30 * t_small + 0.05, (unit, t_small, t_large)  # 10x the text: ~10x the time, not 100x


# --- item 9: a diverging row ------------------------------------------------------------------------------------------


def test_a_non_finite_row_stops_the_run_before_it_is_saved(tmp_path, capfd):
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "optimizer=sgd", "optimizer.lr=inf",
                                                "callbacks.token_export.every_n_steps=1",
                                                "callbacks.model_checkpoint.every_n_train_steps=1"), capfd=capfd)
    assert_user_error(code, err, "TrainingError", "the token row is not finite (NaN/inf) after the optimizer step",
                      "optimizer.lr")
    assert not (tmp_path / "run" / "continue_thinking_token.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_an_exploding_row_norm_is_warned_about_once_per_tenfold(compose_cfg, tmp_path, caplog):

    from ctt.training.module import build_module

    cfg = compose_cfg("train", ["experiment=smoke", f"paths.output_dir={tmp_path}"])
    module = build_module(cfg)
    module.on_train_start()
    with caplog.at_level(logging.WARNING, logger="ctt.training.module"), torch.no_grad():
        for scale in (50.0, 200.0, 1.5, 1.5, 10.0, 1e30):
            module.token_row.mul_(scale)
            module._check_row()
    warnings = [r.getMessage() for r in caplog.records if "norm" in r.getMessage()]
    # 50x: quiet; 1e4x: warned (next above 1e5x); 1.5e4x, 2.25e4x: quiet; 2.25e5x: warned; 2.25e35x: warned (a
    # finite fp32 row whose fp32 norm would overflow to inf).
    assert len(warnings) == 3, warnings
    assert torch.isfinite(module.token_row).all() and "inf" not in warnings[-1]


# --- rollouts.jsonl after a resume --------------------------------------------------------------------------------------


def test_rollouts_of_replayed_steps_are_dropped_when_a_run_resumes(tmp_path):
    from callbacks.rollout_logger import RolloutSampleLogger

    path = tmp_path / "rollouts.jsonl"
    lines = [json.dumps({"step": s, "completion": "x"}) + "\n" for s in (1, 1, 2, 2, 3, 3)]
    path.write_text("".join(lines) + '{"step": 4, "compl')  # the kill cut the last line
    logger = RolloutSampleLogger(str(tmp_path), every_n_steps=1)
    logger.on_train_start(SimpleNamespace(global_step=2, is_global_zero=True), None)
    assert path.read_text() == "".join(lines[:4])
    logger.on_train_start(SimpleNamespace(global_step=0, is_global_zero=True), None)  # a new run from step 0
    assert path.read_text() == ""
