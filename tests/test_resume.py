"""Resume after a kill or a preemption: atomic checkpoints, safe loading, the data position, bit-exact results.

The end-to-end tests (slow) run `python -m ctt.train experiment=smoke` three ways — uninterrupted, SIGKILLed at a
random step then resumed with `ckpt_path=last`, SIGTERMed (preemption) then resumed — and require the final token
row, Adam's state and the token file to be bit-identical. Same process count, same thread count, same CPU: the
computation is the same sequence of float operations, so no tolerance is needed.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ctt.reliability.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from ctt.data.datamodule import ProblemDataModule, ResumableSampler, PromptDataset
from ctt.data.problems import Problem
from ctt.errors import ConfigError
from ctt.reliability.loggers import ResumableCSVLogger
from ctt.models.token import TOKEN_FILE, load_token_file

ROOT = Path(__file__).resolve().parents[1]
ROW = "model.model.embed_tokens.row"
STEPS = 8  # experiment=smoke: 8 problems, batch 2 -> 4 steps per epoch, so runs cross an epoch boundary
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- atomic checkpoint files ----------------------------------------------------------------------------------------


def test_atomic_save_never_leaves_a_broken_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "row": torch.ones(4)}, path)
    assert io.load_checkpoint(path)["step"] == 1

    # A crash half-way through the write (here: fsync fails after part of the bytes are out) leaves the old file.
    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        io.save_checkpoint({"step": 2, "row": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the temp file was removed

    # A SIGKILL during a save leaves a stray temp file but an intact last.ckpt; a later save cleans old ones up.
    stray = path.parent / ".last.ckpt.abc123.tmp"
    stray.write_bytes(b"half a checkpoint")
    os.utime(stray, (time.time() - 7200, time.time() - 7200))
    io.save_checkpoint({"step": 3, "row": torch.zeros(4)}, path)
    assert io.load_checkpoint(path)["step"] == 3 and not stray.exists()
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_checkpoints_load_with_weights_only(tmp_path):
    io = AtomicCheckpointIO()
    unsafe = tmp_path / "unsafe.ckpt"
    atomic_torch_save({"hyper_parameters": OmegaConf.create({"lr": 1.0})}, unsafe)
    with pytest.raises(Exception, match="Weights only load failed"):
        io.load_checkpoint(unsafe)
    assert AtomicCheckpointIO(weights_only=False).load_checkpoint(unsafe)["hyper_parameters"]["lr"] == 1.0


def test_module_hparams_are_plain_containers(compose_cfg):
    from ctt.training.module import ContinueThinkingModule

    cfg = compose_cfg("train", ["experiment=smoke", "paths.output_dir=/tmp/unused"])
    module = ContinueThinkingModule(model=cfg.model, token=cfg.token, forcing=cfg.forcing, rl=cfg.rl,
                                    prompt=cfg.prompt, seed=0)
    hp = dict(module.hparams)
    assert all(isinstance(v, (dict, int, str, type(None))) for v in hp.values()), {k: type(v) for k, v in hp.items()}
    assert "${" not in json.dumps(hp)  # interpolations resolved


# --- the data position ------------------------------------------------------------------------------------------


def _problems(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", question=f"q{i}", answer=str(i)) for i in range(n)]


def test_sampler_order_depends_on_seed_and_epoch_only():
    data = PromptDataset(_problems(10))
    a, b = ResumableSampler(data, seed=3), ResumableSampler(data, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    first = list(a)
    torch.manual_seed(456)
    assert list(b) == first and sorted(first) == list(range(10))
    a.set_epoch(1)
    assert list(a) != first
    b.resume_at(1, 4)
    assert list(b) == list(a)[4:]
    assert list(b) == list(a)  # the skip applies once


@pytest.mark.parametrize("epoch, done", [(0, 1), (1, 2), (2, 0), (0, 3)])
def test_datamodule_resumes_at_the_saved_batch(tmp_path, epoch, done):
    rows = "".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(6))
    (tmp_path / "d.jsonl").write_text(rows)
    train = {"source": "jsonl", "path": str(tmp_path / "d.jsonl")}

    def epoch_batches(e: int) -> list[list[str]]:
        dm = ProblemDataModule(train=train, batch_size=2, seed=7)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(e)
        return [[p.id for p in batch] for batch in loader]

    resumed = ProblemDataModule(train=train, batch_size=2, seed=7)
    resumed.load_state_dict({"epoch": epoch, "batches_in_epoch": done, "batches_per_epoch": 3,
                             "num_problems": 6, "batch_size": 2, "seed": 7})
    got = [[p.id for p in batch] for batch in resumed.train_dataloader()]
    expected = epoch_batches(epoch + 1)[0:] if done == 3 else epoch_batches(epoch)[done:]
    assert got == expected


def test_csv_metrics_survive_a_resume(tmp_path):
    first = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    # The resumed run restarts at step 4 (its checkpoint) and logs a new key too.
    second = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in (4, 5, 6):
        second.log_metrics({"train/loss": 10.0 + step, "train/new": 1.0}, step=step)
    second.save()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert [float(r["train/loss"]) for r in rows] == [0, 1, 2, 3, 14, 15, 16]
    assert rows[0]["train/new"] == "" and rows[-1]["train/new"] == "1.0"


def test_a_kill_while_a_new_metric_rewrites_the_csv_loses_no_rows(tmp_path, monkeypatch):
    """A new metric name makes the writer rewrite metrics.csv with a new header. Lightning truncates the file and
    writes it again: a kill in between lost every earlier row (a resumed run then had no step 0). The rewrite is
    atomic: a crash at the rename leaves the old, complete file."""
    import ctt.reliability.checkpoint_io

    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(3):
        logger.log_metrics({"train/loss": float(step)}, step=step)
        logger.save()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while replacing the file")

    monkeypatch.setattr(ctt.reliability.checkpoint_io.os, "replace", crash)
    logger.log_metrics({"train/loss": 3.0, "train/token_grad_norm": 0.5}, step=3)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]


def test_ckpt_path_last_picks_the_newest_checkpoint_of_the_run_dir(compose_cfg, tmp_path):
    """`last` is the newest of last*.ckpt (Lightning writes last-v1.ckpt next to an older last.ckpt) and Lightning's
    SLURM hpc_ckpt_<n>.ckpt: the highest saved step, then the latest written."""
    from ctt.reliability.resume import resolve_ckpt_path

    cfg = compose_cfg("train", ["experiment=smoke", f"paths.output_dir={tmp_path}", "ckpt_path=last"])
    with pytest.raises(ConfigError, match="ckpt_path=last: no checkpoint in"):
        resolve_ckpt_path(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 1, "state_dict": {}}, last)
    assert resolve_ckpt_path(cfg)[0] == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # written by Lightning's SLURM requeue handler
    atomic_torch_save({"global_step": 2, "state_dict": {}}, hpc)
    os.utime(last, (time.time() - 60, time.time() - 60))
    assert resolve_ckpt_path(cfg)[0] == str(hpc)
    newer = tmp_path / "checkpoints" / "last-v1.ckpt"  # a second run's, further on
    atomic_torch_save({"global_step": 5, "state_dict": {}}, newer)
    os.utime(newer, (time.time() - 120, time.time() - 120))  # the step decides before the time
    assert resolve_ckpt_path(cfg)[0] == str(newer)
    atomic_torch_save({"global_step": 5, "state_dict": {}}, last)  # the same step: the latest written
    assert resolve_ckpt_path(cfg)[0] == str(last)


# --- end to end: kill / preempt, then resume ------------------------------------------------------------------------


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ctt.train", "experiment=smoke", "evaluate=false", f"hydra.run.dir={run_dir}",
            f"trainer.max_steps={STEPS}", "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.rollout_samples.every_n_steps=1", *extra]


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_args(run_dir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _latest_step(run_dir: Path) -> int:
    """The last step the rollout logger wrote (it writes after every step in these runs)."""
    try:
        lines = (run_dir / "rollouts.jsonl").read_text().splitlines()
        return max(json.loads(line)["step"] for line in lines if line.strip())
    except (FileNotFoundError, ValueError):
        return -1


def _start_and_wait(run_dir: Path, step: int) -> subprocess.Popen:
    proc = subprocess.Popen(_args(run_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ONE_THREAD)
    deadline = time.monotonic() + 300
    while not ((run_dir / "checkpoints" / "last.ckpt").exists() and _latest_step(run_dir) >= step):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run to reach step {step}")
        time.sleep(0.01)
    return proc


def _final(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "csv" / "metrics.csv"
    return [int(r["step"]) for r in csv.DictReader(open(path)) if r.get("train/loss")] if path.is_file() else []


def _assert_same_result(run_dir: Path, reference: Path) -> None:
    got, want = _final(run_dir), _final(reference)
    assert got["global_step"] == want["global_step"] == STEPS
    assert torch.equal(got["state_dict"][ROW], want["state_dict"][ROW]), (
        (got["state_dict"][ROW] - want["state_dict"][ROW]).abs().max()
    )
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(got["optimizer_states"][0]["state"][0][key], want["optimizer_states"][0]["state"][0][key])
    token, meta = load_token_file(run_dir / TOKEN_FILE)
    assert torch.equal(token, load_token_file(reference / TOKEN_FILE)[0]) and meta["step"] == str(STEPS)
    # One metrics history, every step once, also when the kill came between a step's checkpoint and Lightning's
    # logging of that step (the checkpoint carries that row: ctt.reliability.loggers).
    assert _metric_steps(run_dir) == list(range(STEPS)), _metric_steps(run_dir)
    rows, reference_rows = _metric_rows(run_dir), _metric_rows(reference)
    assert [r["train/reward"] for r in rows] == [r["train/reward"] for r in reference_rows]
    # rollouts.jsonl too: the steps replayed after the checkpoint are logged once, not twice
    assert _rollout_steps(run_dir) == _rollout_steps(reference) == [s for s in range(1, STEPS + 1) for _ in range(2)]


def _metric_rows(run_dir: Path) -> list[dict]:
    return [r for r in csv.DictReader(open(run_dir / "csv" / "metrics.csv")) if r.get("train/loss")]


def _rollout_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _run(run_dir)
    return run_dir


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(uninterrupted, tmp_path):
    kill_at = random.Random().randint(1, STEPS - 3)  # after at least one checkpoint, before the end
    run_dir = tmp_path / "run"
    proc = _start_and_wait(run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # never a broken file
    assert 1 <= saved["global_step"] < STEPS, f"killed at step {kill_at}, checkpoint at {saved['global_step']}"
    resumed = _run(run_dir, "ckpt_path=last")
    assert "resuming from" in resumed.stderr
    assert "dataloader is not resumable" not in resumed.stderr
    _assert_same_result(run_dir, uninterrupted)


@pytest.mark.slow
def test_sigkill_right_after_a_checkpoint_loses_no_metrics_row(uninterrupted, tmp_path):
    """The narrow window, hit on purpose: killed after step 3's checkpoint is on disk, before its row is logged."""
    run_dir = tmp_path / "run"
    killer = ("callbacks.model_checkpoint._target_=tests.kill_after_save.KillAfterSave",)
    proc = subprocess.run(_args(run_dir, *killer, "+callbacks.model_checkpoint.kill_at_step=3"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert _metric_steps(run_dir) == [0, 1]  # step 2's row never reached the file
    _run(run_dir, "ckpt_path=last", *killer, "+callbacks.model_checkpoint.kill_at_step=-1")  # the same callback
    _assert_same_result(run_dir, uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_and_resumes_bit_exact(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_and_wait(run_dir, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "preempted by SIGTERM" in line)
    step = int(line.split("at step ")[1].split(":")[0])
    assert f"checkpoint saved to {run_dir / 'checkpoints' / 'last.ckpt'}" in line and "ckpt_path=last" in line
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == step and step < STEPS
    _run(run_dir, "ckpt_path=last")
    _assert_same_result(run_dir, uninterrupted)
