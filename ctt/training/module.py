"""The LightningModule: frozen model + one trainable row, REINFORCE with budget-forced generation in the loop."""

from __future__ import annotations

import logging
from typing import Any, Callable

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ctt.data.problems import Problem
from ctt.errors import ConfigError, TrainingError
from ctt.engine import Rollout, SamplingConfig, mix_seed
from ctt.policy.build import build_policy
from ctt.policy.policy import draw_continuations
from ctt.reliability.loggers import ResumableCSVLogger, pending_metrics_row
from ctt.reliability.resume import check_fits, check_saved_row, run_identity
from ctt.rewards.grading import Score
from ctt.rewards.registry import reward_from_config
from ctt.rl.reinforce import RLSettings, completion_logprobs, compute_advantages, reinforce_loss, uniform_group_share
from ctt.settings import to_plain
from ctt.models.token import check_row
from ctt.training.distributed import DistributedSettings, full_grad, full_row, gather_zero3

log = logging.getLogger(__name__)

WARN_NORM_GROWTH = 100  # a row this many times its starting norm is probably diverging: warned about


def build_module(cfg: DictConfig) -> "ContinueThinkingModule":
    """The module a composed train config describes (its optimizer and scheduler partial, completed on the row)."""
    return ContinueThinkingModule(
        model=cfg.model,
        token=cfg.token,
        forcing=cfg.forcing,
        rl=cfg.rl,
        prompt=cfg.prompt,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        seed=cfg.seed,
        distributed=cfg.get("distributed"),
    )


class ContinueThinkingModule(L.LightningModule):
    def __init__(
        self,
        model: dict,
        token: dict,
        forcing: dict,
        rl: dict,
        prompt: dict | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
        distributed: dict | None = None,
    ):
        super().__init__()
        # Plain containers first: the hparams saved in checkpoints then load with torch.load(weights_only=True).
        model, token, forcing, rl, prompt = map(to_plain, (model, token, forcing, rl, prompt or {}))
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        for key, value in self.hparams.items():  # any other config argument too (e.g. `distributed`)
            self.hparams[key] = to_plain(value)
        self.policy, _ = build_policy(model, token, forcing, prompt, trainable=True)
        self.model = self.policy.model  # registered: Lightning moves it; only the overlay row requires grad
        self.rl = RLSettings.from_config(rl)
        self.reward_fn = reward_from_config(self.rl.reward, "rl.reward")
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self.scheduler_factory = scheduler
        self.seed = seed
        # conf/distributed: ZeRO-3 gathers every weight once per step when they fit in this fraction of free memory
        self.zero3_gather_fraction = DistributedSettings.from_config(distributed).zero3_gather_max_memory_fraction
        self._step_gather = None  # ZeRO-3: the weights gathered for the current step, released after backward
        self.last_samples: list[tuple[Problem, Rollout, Score]] = []  # read by the rollout-logging callback
        self.skipped_steps = 0  # steps whose loss was not finite (see _skip_if_not_finite)
        self._bad_in_a_row = 0
        self._drop_grad = False
        self._warn_norm = float("inf")  # the row norm above which the next divergence warning is logged
        self.logged_names: set[str] = set()  # metrics sent to loggers (a checkpoint keeps its step's row)
        # Checkpoints hold only the row (see on_save_checkpoint), so loading must not demand the frozen weights.
        self.strict_loading = False

    # --- the trainable row --------------------------------------------------------------------------------

    @property
    def token_row(self) -> torch.nn.Parameter:
        return self.policy.row

    def configure_optimizers(self):
        # weight_decay on the row is the user's choice; frozen weights are not in the optimizer at all.
        try:
            optimizer = self.optimizer_factory([self.token_row])
        except (TypeError, ValueError) as err:  # e.g. optimizer.lr=abc or a negative lr
            texts = {k: v for k, v in getattr(self.optimizer_factory, "keywords", {}).items() if isinstance(v, str)}
            if texts:
                key, value = next(iter(texts.items()))
                raise ConfigError(f"optimizer.{key} must be a number, got {value!r}") from None
            raise ConfigError(f"optimizer: {err}") from None
        if self.scheduler_factory is None:
            return optimizer
        try:
            scheduler = self.scheduler_factory(optimizer)
        except (TypeError, ValueError) as err:  # e.g. scheduler.T_max=abc
            raise ConfigError(f"scheduler: {err}") from None
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def identity(self) -> dict:
        """What this run trains (ctt.reliability.resume.run_identity), saved in checkpoints."""
        return run_identity(self.hparams.model, self.hparams.token, self.token_row, self.policy.base_fingerprint)

    def check_saved_row(self, checkpoint: dict, where: str) -> None:
        """ctt.reliability.resume.check_saved_row against this run's row and frozen table."""
        check_saved_row(checkpoint, self.token_row, self.policy.model.get_input_embeddings().base.weight, where)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen model is reloaded from its source; a checkpoint of a 1.5B model needs only one row.
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["ctt"] = self.identity()  # like a token file's metadata: checked before a resume
        if self._trainer is not None:  # this step's metrics row, which Lightning logs only after the batch-end save
            checkpoint["ctt_metrics_row"] = pending_metrics_row(self.trainer, self.logged_names)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # ctt-train checked this already (ctt.reliability.resume); this covers `trainer.fit(ckpt_path=...)` from Python.
        check_fits(checkpoint, self.identity(), "being loaded", bool(self.hparams.token.get("allow_base_mismatch")))
        self.check_saved_row(checkpoint, "being loaded")  # before Lightning copies it into the row
        if self._trainer is not None:
            for logger in self.loggers:
                if isinstance(logger, ResumableCSVLogger):
                    logger.restore_row(checkpoint.get("ctt_metrics_row"))

    def setup(self, stage: str) -> None:
        # The data module is set up first: every training prompt is checked before the first step (token text,
        # context length), not when its batch comes up.
        problems = getattr(self.trainer.datamodule, "train_problems", None) if self._trainer is not None else None
        if stage == "fit" and problems:
            self.policy.check_problems(problems)

    def on_train_start(self) -> None:
        # Resumed: the row as the strategy restored it (DeepSpeed: its fp32 master copy, from the optimizer states,
        # which the checkpoint's module row checked before need not be).
        if self._trainer is not None and self.trainer.ckpt_path:
            check_row(full_row(self.token_row), self.policy.model.get_input_embeddings().base.weight,
                      f"checkpoint {self.trainer.ckpt_path}", error=ConfigError)
        start = self._row_norm()
        self._warn_norm = WARN_NORM_GROWTH * start if start > 0 else float("inf")

    def _row_norm(self) -> float:
        return self.token_row.detach().double().norm().item()  # float64: a diverging fp32 row's norm overflows

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._check_row()

    def _check_row(self) -> None:
        """After each optimizer step, before the callbacks export or checkpoint the row: a non-finite row stops the
        run (the saved files keep the last finite one); a row whose norm grew WARN_NORM_GROWTH-fold since the start
        is warned about (then again at each further 10x)."""
        row = self.token_row.detach()
        if row.numel() and not torch.isfinite(row).all():
            raise TrainingError(
                f"step {self.global_step}: the token row is not finite (NaN/inf) after the optimizer step; lower "
                "optimizer.lr (the token file and checkpoints keep the last finite row)"
            )
        norm = self._row_norm()
        if norm > self._warn_norm:
            log.warning("step %d: the token row's norm is %.3g, over %dx its norm at the start of training; the "
                        "optimizer may be diverging (optimizer.lr)", self.global_step, norm, WARN_NORM_GROWTH)
            self._warn_norm = 10 * norm

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a batch is a list of text problems: nothing to move

    def on_train_epoch_start(self) -> None:
        self.model.eval()  # Lightning calls .train(); frozen weights must not run dropout

    # --- one RL step ----------------------------------------------------------------------------------------

    def sampling(self, batch_idx: int = 0) -> SamplingConfig:
        # Seeded by (seed, step, micro-batch, rank): reproducible, independent across ranks and across the micro-batches
        # of one accumulated step, and stable across a resume (batch_idx restarts with the epoch it resumes in).
        micro = batch_idx % max(1, self._accumulation())
        seed = mix_seed(self.seed, self.global_step, micro, self.global_rank)
        return SamplingConfig(
            temperature=self.rl.temperature,
            top_p=self.rl.top_p,
            seed=seed,
        )

    def _accumulation(self) -> int:
        return self.trainer.accumulate_grad_batches if self._trainer is not None else 1

    def training_step(self, batch: list[Problem], batch_idx: int) -> torch.Tensor:
        k = self.rl.samples_per_prompt
        sampling = self.sampling(batch_idx)
        # N per prompt: forcing.num_continuations, or drawn from its list (seeded like the sampling: a resume replays it)
        ns = draw_continuations(self.policy.settings.choices, len(batch), sampling.seed)
        # ZeRO-3: every weight gathered ONCE for the rollout, the scoring forward and its backward (released in
        # on_after_backward), not per layer per token; a no-op under any other strategy. See ctt/training/distributed.py.
        self._step_gather = gather_zero3(self, self.zero3_gather_fraction)
        rollouts = self.policy.rollout_per_n(batch, ns, sampling, samples_per_prompt=k)
        self.policy.engine.release_memory()  # vLLM's sleep (engine.sleep_between_rollouts): the loss pass's memory
        problems = [p for p in batch for _ in range(k)]
        scores = [self.reward_fn(r, p) for r, p in zip(rollouts, problems)]
        rewards = torch.tensor([s.reward for s in scores], device=self.device)
        advantages = compute_advantages(rewards, k, self.rl.baseline, self.rl.scale)
        scored = completion_logprobs(
            self.model, rollouts, sampling.temperature, self.policy.token_ids, self.policy.pad_id,
            prefix_reuse=self.rl.prefix_reuse,
            gradient_checkpointing=self.rl.gradient_checkpointing,
            top_p=sampling.top_p,
        )
        count = self._mean_token_count(scored) if self.rl.aggregation == "token_mean" else None
        loss = reinforce_loss(scored, advantages, self.rl.aggregation, count)
        # Keeps the row in the graph when no rollout inserted a continuation (DDP expects every rank's grad).
        loss = loss + 0.0 * self.token_row.sum()
        step_loss = self._skip_if_not_finite(loss)
        self.last_samples = list(zip(problems, rollouts, scores))
        self._log_step(loss, rewards, scores, rollouts, scored.mask.sum(), uniform_group_share(rewards, k))
        if len(self.policy.settings.choices) > 1:  # N drawn per prompt: its mean this step
            drawn = torch.tensor(sum(ns) / len(ns), device=self.device)
            self.log("train/drawn_continuations", drawn, on_step=True, on_epoch=False, sync_dist=True, batch_size=len(batch))
            self.logged_names.add("train/drawn_continuations")
        return step_loss

    def _mean_token_count(self, scored) -> torch.Tensor | None:
        """The scored-token count averaged over ranks (None on one process): the `token_mean` divisor that makes
        DDP's / DeepSpeed's gradient averaging give the gradient of the global batch's token mean."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        total = self.trainer.strategy.reduce(scored.mask.sum().float(), reduce_op="sum")
        return total / self.trainer.world_size

    def _skip_if_not_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """A NaN/inf loss skips the optimizer step; `rl.max_bad_steps` such steps in a row stop the run.

        Not `return None` (Lightning's skip): under DDP/DeepSpeed a rank that skips backward hangs the others. Every
        rank decides together (max over ranks), back-propagates `0 * row` so the collectives still line up, and
        `on_before_optimizer_step` then drops the gradient: Adam skips a parameter without grad, so neither the row
        nor its moments move. (DeepSpeed keeps grads in its own buffers: there the zero grad still takes a step
        on Adam's momentum.) With gradient accumulation, one bad micro-batch skips the whole accumulated step.
        """
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if not bad.item():
            self._bad_in_a_row = 0
            return loss
        self.skipped_steps += 1
        self._bad_in_a_row += 1
        self._drop_grad = True
        limit = self.rl.max_bad_steps
        log.warning(
            "step %d: loss is %s; optimizer step skipped (%d in a row, rl.max_bad_steps=%d)",
            self.global_step, loss.detach().item(), self._bad_in_a_row, limit,
        )
        if self._bad_in_a_row >= limit:
            raise TrainingError(
                f"the loss was not finite for {self._bad_in_a_row} consecutive steps (rl.max_bad_steps={limit}), "
                f"last at step {self.global_step}; lower optimizer.lr or check the model's dtype"
            )
        return 0.0 * self.token_row.sum()

    def _log_step(self, loss, rewards, scores: list[Score], rollouts: list[Rollout], scored_tokens, uniform) -> None:
        """Logs the raw loss (NaN included) and what the step's rollouts did."""
        as_t = lambda xs: torch.tensor(xs, dtype=torch.float32, device=self.device).mean()  # noqa: E731
        metrics = {
            "train/loss": loss.detach(),
            "train/reward": rewards.float().mean(),
            "train/accuracy": as_t([s.correct for s in scores]),
            "train/missing_answer": as_t([s.status == "missing" for s in scores]),
            "train/forced_continuations": as_t([r.num_forced for r in rollouts]),
            "train/thinking_tokens": as_t([r.thinking_tokens for r in rollouts]),
            "train/answer_tokens": as_t([r.answer_tokens for r in rollouts]),
            "train/scored_tokens": scored_tokens.float(),
            "train/uniform_groups": torch.tensor(uniform, device=self.device),  # groups with no signal
            "train/embedding_norm": self.token_row.detach().double().norm().float(),
            "train/skipped_steps": torch.tensor(float(self.skipped_steps), device=self.device),
            # vLLM engine: the push of the learned row(s) into vLLM's table before this step's rollout (0: none)
            "train/row_push_ms": torch.tensor(1e3 * (self.policy.engine.last_sync_seconds or 0.0), device=self.device),
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=True, batch_size=len(rollouts))
        self.logged_names.update(metrics)
        self.log("train/reward_bar", metrics["train/reward"], prog_bar=True, logger=False, batch_size=len(rollouts))

    def on_after_backward(self) -> None:
        if self._step_gather is not None:
            self._step_gather.release()
            self._step_gather = None

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._drop_grad:  # a non-finite loss in this step: the optimizer must not touch the row
            self.token_row.grad = None
            self._drop_grad = False
        grad = full_grad(self.token_row)  # DeepSpeed keeps it in its own buffers (a collective: every rank)
        norm = grad.detach().norm() if grad is not None else torch.zeros((), device=self.device)
        self.log("train/token_grad_norm", norm, on_step=True, on_epoch=False, sync_dist=True)
        self.logged_names.add("train/token_grad_norm")
