"""`ctt-train`: learn the continue-thinking token (then, by default, evaluate base / fixed / learned)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from ctt.config import CONFIG_DIR, instantiate_list
from ctt.module import ContinueThinkingModule

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> ContinueThinkingModule:
    return ContinueThinkingModule(
        model=cfg.model,
        token=cfg.token,
        forcing=cfg.forcing,
        rl=cfg.rl,
        prompt=cfg.prompt,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        seed=cfg.seed,
    )


def train(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")), logger=instantiate_list(cfg.get("logger")) or False
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("evaluate") and trainer.is_global_zero:
        from ctt.eval import evaluate_policy  # eval imports are heavy-ish; only needed here

        evaluate_policy(module.policy, cfg, Path(cfg.paths.output_dir))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from ctt.errors import CttError

    try:
        metrics = train(cfg)
    except CttError as err:  # a user error: one clear line, no traceback
        log.error("%s: %s", type(err).__name__, err)
        raise SystemExit(2) from None
    return metrics.get("train/reward")  # for Hydra sweepers that optimise a value


if __name__ == "__main__":
    main()
