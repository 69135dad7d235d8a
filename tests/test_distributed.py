"""Multi-process training on CPU: DDP (gloo, 2 processes) and DeepSpeed ZeRO-2/3 (DeepSpeed's CPU accelerator), the
trainer configs, the SLURM launcher config, and one run dir per DDP run from the CLI.

The equivalence tests run `tests/distributed_worker.py` in subprocesses (under pytest, strategy=ddp would re-run the
pytest command as rank 1): rank-independent rollouts, per-prompt group-mean baseline, `sequence_sum`, SGD. Then the
mean of the per-rank gradients is the single-process gradient on the concatenated batch, and every strategy must end
with the row a single process computes, within ATOL (float summation order differs; about 5e-9 was measured).
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ctt.training import distributed
from ctt.config.hydra_glue import CONFIG_DIR
from ctt.reliability.run_dir import launch_rank
from ctt.errors import ConfigError
from ctt.models.token import TOKEN_FILE, load_token_file
from tests.conftest import compose_config, need_vllm

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-6  # rows and gradients, any strategy vs one process
STEPS = 2
TRAINER_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "trainer").glob("*.yaml"))
DEEPSPEED_CONFIGS = [t for t in TRAINER_CONFIGS if t.startswith("deepspeed")]

try:
    import deepspeed  # noqa: F401

    HAVE_DEEPSPEED = True
except ImportError:  # the `test` extra installs it
    HAVE_DEEPSPEED = False
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed not installed (pip install -e '.[test]')")


def _compose(*overrides: str, hydra_config: bool = False):
    return compose_config("train", ["experiment=smoke", *overrides], return_hydra_config=hydra_config)


# --- configs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINER_CONFIGS)
def test_every_trainer_config_instantiates(name, tmp_path):
    cfg = _compose(f"trainer={name}", f"paths.output_dir={tmp_path}", "trainer.precision=bf16-mixed",
                   "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=1.0")
    node = cfg.trainer
    if name.startswith("deepspeed") and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed not installed")
    if node.accelerator == "gpu" and not torch.cuda.is_available():
        # Lightning refuses a GPU trainer without a GPU; everything but the accelerator is checked on CPU.
        with pytest.raises(Exception, match="No supported gpu backend"):
            instantiate(node)
        node = node.copy()
        node.accelerator = "cpu"
    trainer = instantiate(node)
    assert trainer.accumulate_grad_batches == 2 and trainer.gradient_clip_val == 1.0
    assert trainer.num_nodes == 1
    strategy = type(trainer.strategy).__name__
    if name.startswith("ddp"):
        assert strategy == "DDPStrategy" and trainer.strategy._ddp_kwargs == {"find_unused_parameters": False}
    if name.startswith("deepspeed"):
        assert strategy == "DeepSpeedStrategy" and trainer.strategy.exclude_frozen_parameters
    if node.accelerator == "gpu" or name == "cpu":
        return
    if name == "ddp_cpu":
        assert trainer.world_size == 2 and trainer.strategy._process_group_backend == "gloo"


@needs_deepspeed
@pytest.mark.parametrize("name", DEEPSPEED_CONFIGS)
def test_deepspeed_configs_are_valid_deepspeed_json(name):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = OmegaConf.to_container(_compose(f"trainer={name}").trainer.strategy.config, resolve=True)
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])  # pydantic: a misspelt key is an error
    assert zero.stage == (3 if "zero3" in name else 2)
    assert (zero.offload_optimizer is not None) == name.endswith("offload")
    assert (zero.offload_param is not None) == (name == "deepspeed_zero3_offload")
    if zero.stage == 3:  # small tensors (the row) stay gathered between steps; no consolidated 16-bit model
        assert zero.param_persistence_threshold >= 4096 and not zero.gather_16bit_weights_on_model_save
    assert "gradient_accumulation_steps" not in config  # Lightning sets it from trainer.accumulate_grad_batches


def test_slurm_launcher_config_composes_into_an_sbatch_script(tmp_path, monkeypatch):
    cfg = _compose("hydra/launcher=slurm", "trainer=deepspeed_zero2", "trainer.devices=4", "trainer.num_nodes=2",
                   "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}", hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    # What submitit would submit (sbatch is not called): a fake `srun` on PATH satisfies its cluster check.
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    params.pop("_target_"), params.pop("submitit_folder")
    timeouts = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path, slurm_max_num_timeout=timeouts)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m ctt.train", "uid")
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--signal=USR1@90"):
        assert f"#SBATCH {flag}" in sbatch


def test_ranks_started_by_srun_or_torchrun_write_one_hydra_dir_and_their_own_log(monkeypatch):
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert launch_rank() == 0
    cfg = OmegaConf.create({"sub": "${ctt_rank_zero:.hydra}", "log": "train${ctt_rank_suffix:}.log"})
    assert (cfg.sub, cfg.log) == (".hydra", "train.log")
    monkeypatch.setenv("SLURM_PROCID", "3")
    cfg = OmegaConf.create({"sub": "${ctt_rank_zero:.hydra}", "log": "train${ctt_rank_suffix:}.log"})
    assert (cfg.sub, cfg.log) == (None, "train_rank3.log")
    hydra_cfg = _compose(hydra_config=True).hydra
    assert OmegaConf.to_container(hydra_cfg, resolve=False)["output_subdir"] == "${ctt_rank_zero:.hydra}"


# --- the ZeRO-3 gather decision (no processes needed) -----------------------------------------------------------


def _fake_zero3_module() -> torch.nn.Module:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    module = torch.nn.Linear(256, 256)
    for i, p in enumerate(module.parameters()):
        p.ds_id, p.ds_numel, p.ds_status = i, p.numel(), ZeroParamStatus.NOT_AVAILABLE
    return module


def test_helpers_are_no_ops_without_deepspeed():
    module = torch.nn.Linear(4, 4)
    module.weight.grad = torch.ones(4, 4)
    assert distributed.zero3_params(module) == [] and distributed.gather_zero3(module) is None
    assert torch.equal(distributed.full_row(module.weight), module.weight.detach())
    assert distributed.full_grad(module.weight) is module.weight.grad and distributed.full_grad(module.bias) is None
    with distributed.gathered_for_generation(module):
        pass


@needs_deepspeed
def test_zero3_model_too_large_to_gather(monkeypatch, caplog):
    module = _fake_zero3_module()
    monkeypatch.setattr(distributed, "free_device_memory", lambda device: 1000)  # bytes: nothing fits
    monkeypatch.setattr(distributed, "_warned", [])
    with caplog.at_level(logging.WARNING, logger="ctt.training.distributed"):  # one process: per-layer fetching, warned once
        assert distributed.gather_zero3(module, 0.5) is None
        assert distributed.gather_zero3(module, 0.5) is None
    assert sum("falling back to ZeRO-3's layer-by-layer" in r.message for r in caplog.records) == 1
    monkeypatch.setattr(distributed, "_world_size", lambda: 2)  # several: a clear error instead of a hang
    with pytest.raises(ConfigError, match="zero3_gather_max_memory_fraction=0.5.*lockstep"):
        distributed.gather_zero3(module, 0.5)


# --- training under each strategy, 2 CPU processes --------------------------------------------------------------


def _run_worker(out: Path, strategies: str, devices: int, *extra: str) -> None:
    # DeepSpeed compiles a communication op on first use (~40 s, once): cached here, not in /tmp.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "ctt" / "torch_extensions")}
    cmd = [sys.executable, "-m", "tests.distributed_worker", "--strategy", strategies, "--devices", str(devices),
           "--out", str(out), "--steps", str(STEPS), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The reference: one process, the whole global batch."""
    out = tmp_path_factory.mktemp("single")
    _run_worker(out, "single", 1)
    return torch.load(out / "single_rank0.pt", weights_only=True)


def _assert_matches_single(ranks: list[dict], single: dict) -> None:
    assert all(len(r["steps"]) == STEPS for r in ranks)
    for i, ref in enumerate(single["steps"]):
        steps = [r["steps"][i] for r in ranks]
        ids = [s["ids"] for s in steps]
        # Every rank rolls out its own prompts: disjoint shards that together are the global batch.
        assert len(set().union(*map(set, ids))) == sum(map(len, ids)) and set().union(*map(set, ids)) == set(ref["ids"])
        # Rewards are averaged over ranks before logging (sync_dist=True): every rank logs the global mean.
        local_means = [sum(s["rewards"]) / len(s["rewards"]) for s in steps]
        for s in steps:
            assert s["logged_reward"] == pytest.approx(sum(local_means) / len(local_means), abs=1e-6)
            assert s["logged_reward"] == pytest.approx(ref["logged_reward"], abs=1e-6)
        # The row's gradient is all-reduced (identical on every rank) and is the single-process gradient.
        for s in steps:
            assert torch.equal(s["grad"], steps[0]["grad"]) and torch.equal(s["row"], steps[0]["row"])
        torch.testing.assert_close(steps[0]["grad"], ref["grad"], atol=ATOL, rtol=0)
        torch.testing.assert_close(steps[0]["row"], ref["row"], atol=ATOL, rtol=0)
    assert not torch.equal(single["steps"][-1]["row"], single["restored_row"])  # training did move the row
    # The exported token file holds exactly the final row (DeepSpeed: the fp32 master, gathered under ZeRO-3).
    assert torch.equal(ranks[0]["token_file_row"], ranks[0]["steps"][-1]["row"])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """DDP, then ZeRO-2, then ZeRO-3, each trained, checkpointed and resumed, in ONE launch of 2 CPU processes (the
    process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("two_processes")
    strategies = ["ddp"] + (["deepspeed_zero2", "deepspeed_zero3"] if HAVE_DEEPSPEED else [])
    _run_worker(out, ",".join(strategies), 2, "--resume")
    return out, {s: [torch.load(out / f"{s}_rank{r}.pt", weights_only=True) for r in range(2)] for s in strategies}


def _assert_resumes(ranks: list[dict]) -> None:
    for r in ranks:  # the checkpoint (frozen weights left out) restores the row, and training goes on
        assert torch.equal(r["restored_row"], r["steps"][-1]["row"]) and len(r["resumed_steps"]) == 1
        assert r["safe_read_step"] == STEPS  # every file of it loads with weights_only=True (ctt.reliability.safe_load)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(single, two_processes):
    _, runs = two_processes
    _assert_matches_single(runs["ddp"], single)
    _assert_resumes(runs["ddp"])


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_two_processes_equal_one_process_and_resume(stage, single, two_processes):
    """ZeRO-2/3 on DeepSpeed's CPU accelerator (tests/cpu_deepspeed.py). ZeRO-3 ranks generate different lengths: this
    finishes only because the weights are gathered once per step (per-layer gathers would hang or desynchronise)."""
    out, runs = two_processes
    _assert_matches_single(runs[stage], single)
    _assert_resumes(runs[stage])
    assert all(r["checkpoint_is_dir"] for r in runs[stage])  # DeepSpeed's format: a directory of shards
    shards = list((out / f"{stage}.ckpt").rglob("*model_states.pt"))  # ZeRO-3: one per rank
    assert shards and all(p.stat().st_size < 200_000 for p in shards)  # the row, not the 91k frozen weights
    # ZeRO-3: every weight was gathered (and ZeRO-3's hooks off) at the start of each rollout, the evaluation's too.
    gathered = [r["rollout_fully_gathered"] for r in runs[stage]]
    assert gathered == ([[True] * STEPS + [True], [True] * STEPS] if stage.endswith("zero3") else [[], []])
    assert runs[stage][0]["eval_rollouts"] == 2  # rank 0 generated alone after training, inside the gather
    # The same token file whatever the strategy (up to float summation order).
    embedding, _ = load_token_file(out / stage / TOKEN_FILE)
    ddp_embedding, _ = load_token_file(out / "ddp" / TOKEN_FILE)
    torch.testing.assert_close(embedding, ddp_embedding, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_ddp_token_mean_equals_one_process_although_ranks_score_different_token_counts(tmp_path):
    """`token_mean` divides by the scored-token count. Each rank divides by the mean count over ranks, so the
    averaged rank gradients are the global batch's token-mean gradient even when the ranks' counts differ."""
    _run_worker(tmp_path / "single", "single", 1, "--aggregation", "token_mean")
    _run_worker(tmp_path / "ddp", "ddp", 2, "--aggregation", "token_mean")
    single = torch.load(tmp_path / "single" / "single_rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "ddp" / f"ddp_rank{r}.pt", weights_only=True) for r in range(2)]
    counts = [[s["scored_tokens"] for s in r["steps"]] for r in ranks]
    assert counts[0] != counts[1]  # otherwise dividing by each rank's own count would pass too
    for i, ref in enumerate(single["steps"]):
        assert ref["scored_tokens"] == counts[0][i] + counts[1][i]
        torch.testing.assert_close(ranks[0]["steps"][i]["grad"], ref["grad"], atol=ATOL, rtol=0)
        torch.testing.assert_close(ranks[0]["steps"][i]["row"], ref["row"], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_ddp_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Rank 1's loss is NaN at step 1 (0-based), rank 0's is finite. Both ranks skip that optimizer step together (a
    rank that skipped alone would desynchronise the rows or hang the all-reduce), and training goes on after it."""
    _run_worker(tmp_path, "ddp", 2, "--nan-step", "1", "--steps", "3")  # the last --steps wins
    ranks = [torch.load(tmp_path / f"ddp_rank{r}.pt", weights_only=True) for r in range(2)]
    rows = [[s["row"] for s in r["steps"]] for r in ranks]
    assert len(rows[0]) == len(rows[1]) == 3
    for i in range(3):
        assert torch.equal(rows[0][i], rows[1][i])
    assert not torch.equal(rows[0][0], ranks[0]["restored_row"])  # step 0 moved the row
    assert torch.equal(rows[0][1], rows[0][0])  # step 1 was skipped on both ranks
    assert not torch.equal(rows[0][2], rows[0][1])  # step 2 trained again
    for r in ranks:
        assert [s["skipped_steps"] for s in r["steps"]] == [0, 1, 1]


@pytest.mark.slow
def test_ddp_with_the_vllm_engine_keeps_every_rank_and_its_vllm_table_on_one_row(tmp_path):
    """2 gloo processes, each with its own vLLM instance sampling its rollouts: after every optimizer step the two
    ranks' rows are equal, and before every rollout each rank pushed the current row into its vLLM table (read back
    after the step: bit for bit the row before that step's optimizer update)."""
    need_vllm()
    _run_worker(tmp_path, "ddp", 2, "--engine", "vllm", "--steps", "3")
    ranks = [torch.load(tmp_path / f"ddp_rank{r}.pt", weights_only=True) for r in range(2)]
    assert [len(r["steps"]) for r in ranks] == [3, 3]
    for i in range(3):
        a, b = ranks[0]["steps"][i], ranks[1]["steps"][i]
        assert torch.equal(a["row"], b["row"])
        for r in ranks:
            before = r["restored_row"] if i == 0 else r["steps"][i - 1]["row"]
            assert r["steps"][i]["pushed"] and torch.equal(r["steps"][i]["vllm_row"], before)
        assert a["ids"] != b["ids"]  # each rank rolled out its own prompts
    assert not torch.equal(ranks[0]["steps"][-1]["row"], ranks[0]["restored_row"])  # training moved the row


@pytest.mark.slow
def test_ddp_cpu_from_the_cli_makes_one_run_dir(tmp_path):
    """Lightning re-runs `python -m ctt.train ...` for rank 1 with the same hydra.run.dir and hydra.output_subdir=null:
    one run dir, rank-0-only outputs, rank 1's log in a file of its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "ctt.train", "experiment=smoke", "trainer=ddp_cpu", f"paths.log_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["smoke"]
    runs = list((tmp_path / "smoke" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "results.csv").is_file()
    metrics = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    assert [int(m["step"]) for m in metrics if m.get("train/reward")] == [0, 1, 2]  # logged once, not per rank
    assert len((run / "rollouts.jsonl").read_text().splitlines()) == 3 * 2  # 3 steps x 2 samples, rank 0 only
    logs = {p.name: p.read_text() for p in run.glob("*.log")}
    assert set(logs) == {"train.log", "train_ddp_process_1.log"}
    assert sum(text.count("results written to") for text in logs.values()) == 1
    embedding, meta = load_token_file(run / TOKEN_FILE)
    assert meta["step"] == "3" and embedding.shape == (64,)
