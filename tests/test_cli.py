"""Hydra configs compose; the train and eval entry points run end to end on experiment=smoke."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ctt.config.hydra_glue import CONFIG_DIR, instantiate_list
from ctt.evaluation.results import RESULT_COLUMNS
from ctt.models.token import TOKEN_FILE, load_token_file

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["model", "data", "token/init", "optimizer", "scheduler", "trainer", "logger", "callbacks", "plugins",
          "experiment"]
# Built for real below. Not built: trainers other than cpu (gpu and ddp need CUDA or several processes, deepspeed its
# launcher; tests/test_distributed.py builds and runs them), logger=wandb (the optional wandb package, and the network
# when online), and the model (every source but tiny_random downloads or reads a large file; tests/test_models.py).
BUILT_TRAINERS = ("cpu",)
NOT_BUILT = {("logger", "wandb")}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def _build(cfg, group: str, option: str) -> None:
    """Instantiate what the entry points instantiate from `cfg`: a broken `_target_` or argument fails here."""
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = [] if (group, option) in NOT_BUILT else instantiate_list(cfg.get("logger"))
    plugins = instantiate_list(cfg.get("plugins"))
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])  # a partial: needs the parameters
    assert isinstance(optimizer, torch.optim.Optimizer)
    if cfg.get("scheduler"):
        assert isinstance(instantiate(cfg.scheduler)(optimizer), torch.optim.lr_scheduler.LRScheduler)
    assert isinstance(instantiate(cfg.data), L.LightningDataModule)  # problems are loaded in setup(), not here
    if group == "trainer" and option in BUILT_TRAINERS:
        instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins or None)


@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_every_group_option_composes_resolves_and_instantiates(config_name, compose_cfg, tmp_path):
    for group in GROUPS:
        options = _options(group)
        assert options, f"config group {group} is empty"
        for option in options:
            cfg = compose_cfg(config_name, [f"{group}={option}", f"paths.output_dir={tmp_path}"])
            OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
            assert cfg.model.name and cfg.forcing.max_new_tokens > 0
            _build(cfg, group, option)
    cfg = compose_cfg(config_name, ["benchmarks=[gsm8k_local,math500_local,aime24_local,amc23_local]"])
    assert set(cfg.benchmarks) == {"gsm8k", "math500", "aime24", "amc23"}


def test_default_experiment_is_the_offline_demo(compose_cfg):
    cfg = compose_cfg("train")
    assert cfg.model.source == "local" and cfg.model.name == "organism_r1" and cfg.task_name == "demo"
    assert len(cfg.eval.fixed_words) >= 3 and "\n" in cfg.eval.fixed_words and 4 in cfg.eval.num_continuations


def _run(module: str, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_smoke_trains_evaluates_and_the_token_round_trips(tmp_path):
    run_dir = tmp_path / "train"
    _run("ctt.train", "experiment=smoke", f"hydra.run.dir={run_dir}")
    token_file = run_dir / TOKEN_FILE
    embedding, meta = load_token_file(token_file)
    assert meta["base_model"] == "tiny_random" and meta["step"] == "3" and meta["init"] == "word"
    assert json.loads(meta["train_data"])["task"] == "basic_arithmetic"  # for ctt-eval's held-out check
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    assert list(rows[0]) [: len(RESULT_COLUMNS)] == RESULT_COLUMNS
    assert {r["mode"] for r in rows} == {"base", "fixed:Wait", "learned"}
    assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    comparisons = list(csv.DictReader(open(run_dir / "comparisons.csv")))
    assert {(c["mode"], c["versus"]) for c in comparisons} == {
        ("fixed:Wait", "base"), ("learned", "base"), ("learned", "fixed:Wait")}
    assert (run_dir / "deltas.png").stat().st_size > 0 and "## Paired comparisons" in (run_dir / "results.md").read_text()
    samples = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    forced = [s for s in samples if s["forced"]]
    assert forced and all(s["completion"].count("[[") == s["forced"] for s in forced)

    # The learned token, loaded by ctt-eval into a fresh copy of the base model, reproduces the learned rows.
    eval_dir = tmp_path / "eval"
    proc = _run("ctt.eval", "experiment=smoke", f"token.path={token_file}", f"hydra.run.dir={eval_dir}")
    assert "| learned |" in proc.stdout
    again = list(csv.DictReader(open(eval_dir / "results.csv")))
    key = lambda r: (r["benchmark"], r["mode"], r["num_continuations"])  # noqa: E731
    assert {key(r): r["accuracy"] for r in again} == {key(r): r["accuracy"] for r in rows}
    assert {key(r): r["mean_total_tokens"] for r in again} == {key(r): r["mean_total_tokens"] for r in rows}


def test_user_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ctt.eval", "experiment=smoke", f"token.path={tmp_path}/missing.safetensors",
         f"hydra.run.dir={tmp_path}/e"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "token file not found" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
