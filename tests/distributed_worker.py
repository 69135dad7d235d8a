"""Test-only worker: train the smoke setup under one strategy and record what every rank saw and computed.

    python -m tests.distributed_worker --strategy STRATEGY[,STRATEGY...] --devices N --out DIR

with STRATEGY one of single, ddp, deepspeed_zero2, deepspeed_zero3.

Run as a script (not under pytest): with `strategy=ddp` Lightning re-runs this very command for rank 1. Rollouts
do not depend on the rank: each (problem, sample, step) draws its own seed, generates alone, and gets a
deterministic reward from its own tokens (the random tiny model never answers right). With the per-prompt
group-mean baseline and `sequence_sum` aggregation (or `token_mean`, which divides by the mean token count over
ranks), the mean of the per-rank gradients (what DDP and ZeRO
all-reduce) then equals the single-process gradient on the concatenated batch, so every strategy must end with the
same row up to float rounding. Each rank writes `<strategy>_rank<r>.pt`: its batches' problem ids, rewards, the
logged (rank-reduced) reward, the full gradient and the row after each step, the exported token file's row, and
with --resume the row restored from a checkpoint by a fresh trainer.
"""

from __future__ import annotations

import argparse
import os
import zlib
from pathlib import Path

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ctt" / "torch_extensions"))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from callbacks.token_export import TokenExport  # noqa: E402
from ctt.config.hydra_glue import CONFIG_DIR  # noqa: E402
from ctt.training.distributed import full_grad, full_row, gathered_for_generation, zero3_params  # noqa: E402
from ctt.engine import SamplingConfig
from ctt.engine.hf import generate_forced  # noqa: E402
from ctt.training.module import ContinueThinkingModule  # noqa: E402
from ctt.rewards.grading import Score  # noqa: E402
from ctt.policy.modes import Mode  # noqa: E402
from ctt.rl.reinforce import scored_choices  # noqa: E402
from ctt.reliability.safe_load import read_checkpoint  # noqa: E402
from ctt.models.token import load_token_file  # noqa: E402

PER_RANK_BATCH = 2
WORLD = 2  # the global batch is WORLD * PER_RANK_BATCH problems, whatever the strategy


def length_reward(rollout, problem) -> Score:
    """Deterministic, varied rewards from the rollout alone."""
    return Score(reward=(len(rollout.completion_ids) % 5) / 4.0, correct=False, extracted=None, status="incorrect")


class RankFreeModule(ContinueThinkingModule):
    """Each rollout is seeded by (problem id, sample index, step) and generated alone: the same whatever the rank.

    `nan_step`: at that step, rank 1's rewards (and so its loss) are NaN, the other ranks' finite."""

    def __init__(self, *args, nan_step: int = -1, rank_free: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step = nan_step
        self.reward_fn = self._reward
        if rank_free:  # else the configured engine samples (--engine vllm: one vLLM instance per rank)
            self.policy.rollout = self._rollout
        self.rollout_fully_gathered: list[bool] = []  # ZeRO-3: every weight gathered when a rollout starts

    def _reward(self, rollout, problem) -> Score:
        if self.global_step == self.nan_step and self.global_rank == 1:
            return Score(reward=float("nan"), correct=False, extracted=None, status="incorrect")
        return length_reward(rollout, problem)

    def _rollout(self, problems, forcing, sampling, samples_per_prompt=1):
        params = zero3_params(self)
        if params:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            offload = params[0]._z3_optimizer.parameter_offload
            self.rollout_fully_gathered.append(
                all(p.ds_status == ZeroParamStatus.AVAILABLE for p in params) and not offload.forward_hooks
            )
        out = []
        for p in problems:
            for j in range(samples_per_prompt):
                seed = zlib.crc32(f"{p.id}/{j}/{self.global_step}".encode())
                one = SamplingConfig(sampling.temperature, sampling.top_p, seed)
                out += generate_forced(self.model, [self.policy.prompt_ids(p)], forcing, one, self.policy.pad_id)
        return out


class Recorder(L.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.steps: list[dict] = []
        self._grad = None
        self.restored_row = None

    def on_train_start(self, trainer, module):
        self.restored_row = full_row(module.token_row).cpu().clone()

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grad = full_grad(module.token_row)  # every rank (a collective under DeepSpeed)
        self._grad = None if grad is None else grad.detach().float().cpu().clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append({
            "ids": [p.id for p in batch],
            "rewards": [s.reward for _, _, s in module.last_samples],
            "logged_reward": float(trainer.callback_metrics["train/reward"]),
            "grad": self._grad,
            "row": full_row(module.token_row).cpu().clone(),
            "scored_tokens": sum(len(scored_choices(r)) for _, r, _ in module.last_samples),
            "skipped_steps": module.skipped_steps,
            **self._vllm_rows(module),
        })

    @staticmethod
    def _vllm_rows(module) -> dict:
        """--engine vllm: what this rank's vLLM table holds after the step, read back from vLLM (not pushed here:
        it is the row the step's rollout pushed, i.e. the row before this optimizer step), and that push's time."""
        engine = module.policy.engine
        if engine.kind != "vllm":
            return {}
        return {"vllm_row": engine.table_rows().reshape(module.token_row.shape).clone(),
                "pushed": engine.last_sync_seconds is not None}

    def save(self, trainer, name: str, extra: dict) -> None:
        torch.save({"steps": self.steps, "restored_row": self.restored_row, **extra},
                   self.out / f"{name}_rank{trainer.global_rank}.pt")


def build(args, strategy: str, cfg, max_steps: int, recorder: Recorder, callbacks: list) -> tuple:
    module = RankFreeModule(
        model=cfg.model, token=cfg.token, forcing=cfg.forcing, rl=cfg.rl, prompt=cfg.prompt,
        optimizer=instantiate(cfg.optimizer), seed=cfg.seed, distributed=cfg.distributed, nan_step=args.nan_step,
        rank_free=args.engine == "hf",
    )
    kwargs = dict(accelerator="cpu", devices=args.devices, precision=args.precision, max_steps=max_steps,
                  logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder, *callbacks],
                  default_root_dir=str(args.out))
    if strategy == "ddp":
        kwargs["strategy"] = instantiate(cfg.trainer.strategy)
    elif strategy.startswith("deepspeed"):
        node = cfg.trainer.strategy.copy()  # the real trainer config, only the class swapped for its CPU subclass
        node._target_ = "tests.cpu_deepspeed.CPUDeepSpeedStrategy"
        kwargs["strategy"] = instantiate(node)
    return module, L.Trainer(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, help="one, or several run one after the other (comma-separated)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--zero3-fraction", type=float, default=0.5)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--resume", action="store_true", help="save a checkpoint, reload it in a fresh trainer")
    parser.add_argument("--aggregation", default="sequence_sum", help="rl.aggregation")
    parser.add_argument("--nan-step", type=int, default=-1, help="rank 1's loss is NaN at this step")
    parser.add_argument("--engine", default="hf", help="hf: rank-free rollouts; vllm: the vLLM engine samples")
    args, _ = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # Several strategies in one launch save the start-up of the processes; the process group is set up once and
    # reused (Lightning and DeepSpeed skip an initialised one), every rank running the same sequence of fits.
    for strategy in args.strategy.split(","):
        run(args, strategy)


def run(args, strategy: str) -> None:
    trainer_cfg = {"single": "cpu", "ddp": "ddp_cpu"}.get(strategy, strategy)
    overrides = [
        "experiment=smoke", f"trainer={trainer_cfg}", f"data.batch_size={PER_RANK_BATCH * WORLD // args.devices}",
        f"data.train.size={PER_RANK_BATCH * WORLD}", "rl.samples_per_prompt=2", "rl.baseline=group_mean",
        f"rl.aggregation={args.aggregation}", "optimizer=sgd", "optimizer.lr=0.5",
        f"distributed.zero3_gather_max_memory_fraction={args.zero3_fraction}",
        # engine given explicitly: the DeepSpeed trainer configs inherit trainer=gpu's engine=vllm_gpu
        f"engine={args.engine}",
        *(["+model.tiny.num_heads=2", "+model.tiny.num_kv_heads=1"] if args.engine != "hf" else []),
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    L.seed_everything(cfg.seed)
    recorder = Recorder(args.out)
    export = TokenExport(str(args.out / strategy), every_n_steps=0)
    module, trainer = build(args, strategy, cfg, args.steps, recorder, [export])
    trainer.fit(module, datamodule=instantiate(cfg.data))
    token, _ = load_token_file(export.path) if trainer.is_global_zero else (None, None)
    extra = {"token_file_row": token, "rollout_fully_gathered": module.rollout_fully_gathered}
    # As ctt.train evaluates after training: every rank joins the gather, rank 0 alone generates (no hang).
    with gathered_for_generation(module):
        if trainer.is_global_zero:
            problem = module.last_samples[0][0]
            rollouts = module._rollout([problem], module.policy.forcing(Mode("learned", None, 1)), SamplingConfig(0.0), 2)
            extra["eval_rollouts"] = len(rollouts)
    if args.resume:
        ckpt = args.out / f"{strategy}.ckpt"
        trainer.save_checkpoint(ckpt)  # every rank: DeepSpeed writes a directory of shards
        extra["checkpoint_is_dir"] = ckpt.is_dir()
        # What ctt-train does before a resume: every file read with weights_only=True (DeepSpeed: each shard).
        extra["safe_read_step"] = read_checkpoint(ckpt)["global_step"]
        again = Recorder(args.out)
        module2, trainer2 = build(args, strategy, cfg, args.steps + 1, again, [])
        trainer2.fit(module2, datamodule=instantiate(cfg.data), ckpt_path=str(ckpt))
        extra["restored_row"] = again.restored_row
        extra["resumed_steps"] = again.steps
    recorder.save(trainer, strategy, extra)


if __name__ == "__main__":
    main()
