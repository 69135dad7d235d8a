"""The LightningModule: frozen model + one trainable row, REINFORCE with budget-forced generation in the loop."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ctt.data import DEFAULT_INSTRUCTION, Problem
from ctt.generation import Rollout, SamplingConfig
from ctt.models import load_model
from ctt.policy import ForcingSettings, Policy
from ctt.rewards import Score, get_reward_fn
from ctt.rl import completion_logprobs, compute_advantages, reinforce_loss
from ctt.token import install_token


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


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
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        model, token, forcing, rl, prompt = map(_plain, (model, token, forcing, rl, prompt or {}))
        loaded = load_model(**model)
        install_token(loaded.model, loaded.tokenizer, token["init"], token.get("text", "<|continue-thinking|>"))
        self.model = loaded.model  # registered: Lightning moves it; only the overlay row requires grad
        self.policy = Policy(
            loaded,
            ForcingSettings(**forcing),
            prompt.get("instruction") or DEFAULT_INSTRUCTION,
            prompt.get("system_prompt"),
        )
        self.rl = rl
        self.reward_fn = get_reward_fn(rl.get("reward", "math_verify"))
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self.scheduler_factory = scheduler
        self.seed = seed
        self.last_samples: list[tuple[Problem, Rollout, Score]] = []  # read by the rollout-logging callback
        # Checkpoints hold only the row (see on_save_checkpoint), so loading must not demand the frozen weights.
        self.strict_loading = False

    # --- the trainable row --------------------------------------------------------------------------------

    @property
    def token_row(self) -> torch.nn.Parameter:
        return self.policy.row

    def configure_optimizers(self):
        # weight_decay on the row is the user's choice; frozen weights are not in the optimizer at all.
        optimizer = self.optimizer_factory([self.token_row])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen model is reloaded from its source; a checkpoint of a 1.5B model needs only one row.
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a batch is a list of text problems: nothing to move

    def on_train_epoch_start(self) -> None:
        self.model.eval()  # Lightning calls .train(); frozen weights must not run dropout

    # --- one RL step ----------------------------------------------------------------------------------------

    def sampling(self, temperature: float | None = None) -> SamplingConfig:
        # Seeded by (seed, step, rank): reproducible, independent across ranks, and stable across a resume.
        seed = self.seed * 1_000_003 + self.global_step * 7919 + self.global_rank
        return SamplingConfig(
            temperature=self.rl.get("temperature", 1.0) if temperature is None else temperature,
            top_p=self.rl.get("top_p", 1.0),
            seed=seed,
        )

    def training_step(self, batch: list[Problem], batch_idx: int) -> torch.Tensor:
        k = int(self.rl.get("samples_per_prompt", 4))
        forcing = self.policy.forcing("learned", self.policy.settings.num_continuations)
        sampling = self.sampling()
        rollouts = self.policy.rollout(batch, forcing, sampling, samples_per_prompt=k)
        problems = [p for p in batch for _ in range(k)]
        scores = [self.reward_fn(r.text, p.answer) for r, p in zip(rollouts, problems)]
        rewards = torch.tensor([s.reward for s in scores], device=self.device)
        advantages = compute_advantages(
            rewards, k, self.rl.get("baseline", "group_mean"), self.rl.get("scale", "none")
        )
        scored = completion_logprobs(
            self.model, rollouts, max(sampling.temperature, 1e-5), (self.policy.token_id,), self.policy.pad_id
        )
        loss = reinforce_loss(scored, advantages, self.rl.get("aggregation", "token_mean"))
        # Keeps the row in the graph when no rollout inserted a continuation (DDP expects every rank's grad).
        loss = loss + 0.0 * self.token_row.sum()
        self.last_samples = list(zip(problems, rollouts, scores))
        self._log_step(loss, rewards, scores, rollouts, scored.mask.sum())
        return loss

    def _log_step(self, loss, rewards, scores: list[Score], rollouts: list[Rollout], scored_tokens) -> None:
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
            "train/embedding_norm": self.token_row.detach().norm(),
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=True, batch_size=len(rollouts))
        self.log("train/reward_bar", metrics["train/reward"], prog_bar=True, logger=False, batch_size=len(rollouts))

    def on_before_optimizer_step(self, optimizer) -> None:
        grad = self.token_row.grad
        norm = grad.detach().norm() if grad is not None else torch.zeros((), device=self.device)
        self.log("train/token_grad_norm", norm, on_step=True, on_epoch=False, sync_dist=True)
