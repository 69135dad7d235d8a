"""`ctt-train`: learn the continue-thinking token (then, by default, evaluate base / fixed / learned).

Resume an interrupted run (killed, preempted) in its own run dir:
    python -m ctt.train <same overrides> hydra.run.dir=<run dir> ckpt_path=last
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctt.config import CONFIG_DIR, instantiate_list
from ctt.module import ContinueThinkingModule
from ctt.schema import validate_config

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
        distributed=cfg.get("distributed"),
    )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path`, with `last` meaning this run dir's newest of `checkpoints/last.ckpt` (ModelCheckpoint, the
    preemption callback) and Lightning's SLURM `hpc_ckpt_<n>.ckpt`; a missing or unloadable file is a ConfigError."""
    from ctt.errors import ConfigError

    path = cfg.get("ckpt_path")
    if path is None or path in ("best", "hpc", "registry") or "://" in str(path):
        return path  # Lightning's own keywords and remote URLs: Lightning resolves and reports them
    if path == "last":
        out = Path(cfg.paths.output_dir)
        dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
        ckpt_dir = Path(dirpath or out / "checkpoints")
        # exists(), not is_file(): a DeepSpeed checkpoint is a directory
        candidates = [p for p in [ckpt_dir / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")] if p.exists()]
        if not candidates:
            raise ConfigError(
                f"ckpt_path=last: no checkpoint in {ckpt_dir}; to resume, pass the interrupted run's directory "
                "(hydra.run.dir=<run dir> ckpt_path=last)"
            )
        path = str(max(candidates, key=lambda p: p.stat().st_mtime))
    elif not Path(path).exists():
        raise ConfigError(f"ckpt_path={path}: no such checkpoint")
    if Path(path).is_file():  # (a DeepSpeed checkpoint is a directory)
        import torch

        try:  # the same safe load Lightning will do; fails here with one line instead of an unpickling traceback
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            text = str(err).strip()
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            reason = (f"it holds a {unsafe.group(1)} object, which could run code when unpickled" if unsafe
                      else text.splitlines()[0] if text else type(err).__name__)
            raise ConfigError(f"ckpt_path={path} cannot be loaded with weights_only=True: {reason}") from None
    log.info("resuming from %s", path)
    return path


def _plugins(cfg: DictConfig) -> list:
    # The `plugins` group (dict of named plugins, like callbacks) plus any list under trainer.plugins.
    extra = cfg.trainer.get("plugins") or []
    return instantiate_list(cfg.get("plugins")) + [instantiate(p) if isinstance(p, DictConfig) else p for p in extra]


def train(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")), logger=instantiate_list(cfg.get("logger")) or False,
        plugins=_plugins(cfg) or None,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("evaluate"):
        from ctt.distributed import gathered_for_generation
        from ctt.eval import evaluate_policy  # eval imports are heavy-ish; only needed here

        # ZeRO-3: every rank takes part in gathering the weights once, then rank 0 evaluates alone (a no-op gather
        # under any other strategy).
        with gathered_for_generation(module, module.zero3_gather_fraction):
            if trainer.is_global_zero:
                evaluate_policy(module.policy, cfg, Path(cfg.paths.output_dir))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from callbacks.preemption import Preempted
    from ctt.errors import exit_for_user_error

    try:
        validate_config(cfg)  # every group typed and checked before anything is loaded (ctt.schema)
        metrics = train(cfg)
    except Preempted as stop:  # SIGTERM: the checkpoint is written; the job can be requeued
        log.warning("%s; resume with the same overrides plus hydra.run.dir=%s ckpt_path=last (exit status %d)",
                    stop, cfg.paths.output_dir, stop.exit_code)
        raise SystemExit(stop.exit_code) from None
    except Exception as err:
        exit_for_user_error(err, log, "training")
    return metrics.get("train/reward")  # for Hydra sweepers that optimise a value


if __name__ == "__main__":
    main()
