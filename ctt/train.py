"""`ctt-train`: learn the continue-thinking token (then, by default, evaluate base / fixed / learned).

Resume an interrupted run (killed, preempted) in its own run dir:
    python -m ctt.train <same overrides> hydra.run.dir=<run dir> ckpt_path=last
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from ctt.reliability import resume
from ctt.config.hydra_glue import instantiate_list, ctt_main
from ctt.training.module import build_module
from ctt.reliability.run_dir import check_writable_outputs
from ctt.config.check import validate_config

log = logging.getLogger(__name__)


def _plugins(cfg: DictConfig) -> list:
    # The `plugins` group (dict of named plugins, like callbacks) plus any list under trainer.plugins.
    extra = cfg.trainer.get("plugins") or []
    return instantiate_list(cfg.get("plugins")) + [instantiate(p) if isinstance(p, DictConfig) else p for p in extra]


def train(cfg: DictConfig) -> dict:
    started = time.monotonic()
    L.seed_everything(cfg.seed, workers=True)
    check_writable_outputs(cfg)
    ckpt_path, checkpoint = resume.resolve_ckpt_path(cfg)
    where, allow_base = str(ckpt_path or "hpc_ckpt (SLURM requeue)"), bool(cfg.token.get("allow_base_mismatch"))
    if checkpoint is not None:  # refused before any model is loaded when it belongs to another run
        resume.check_fits(checkpoint, resume.run_identity(cfg.model, cfg.token), where, allow_base)
        resume.check_same_config(cfg, checkpoint, where)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    if checkpoint is not None:  # the hidden size is known once the model is loaded
        resume.check_fits(checkpoint, module.identity(), where, allow_base)
        module.check_saved_row(checkpoint, where)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")), logger=instantiate_list(cfg.get("logger")) or False,
        plugins=_plugins(cfg) or None,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trained = time.monotonic()
    if cfg.get("evaluate"):
        from ctt.training.distributed import gathered_for_generation
        from ctt.eval import evaluate_policy  # eval imports are heavy-ish; only needed here

        # ZeRO-3: every rank takes part in gathering the weights once, then rank 0 evaluates alone (a no-op gather
        # under any other strategy).
        with gathered_for_generation(module, module.zero3_gather_fraction):
            if trainer.is_global_zero:
                evaluate_policy(module.policy, cfg, Path(cfg.paths.output_dir))
    if trainer.is_global_zero:
        done = time.monotonic()
        log.info("wall time %s (training %s, evaluation %s)", _clock(done - started), _clock(trained - started),
                 _clock(done - trained))
    return metrics


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


@ctt_main("train")  # hydra.main, a missing option one line (ctt.config.hydra_glue)
def main(cfg: DictConfig) -> float | None:
    from callbacks.preemption import Preempted
    from ctt.errors import exit_for_user_error

    try:
        validate_config(cfg)  # every group typed and checked before anything is loaded (ctt.config.check)
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
