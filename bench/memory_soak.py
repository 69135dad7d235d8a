"""Memory soak: run many training steps of experiment=smoke and check the process RSS does not grow per step.

    python bench/memory_soak.py --steps 300 --every 50            # prints the RSS series and the slope
    python bench/memory_soak.py --steps 300 --json out.json trainer.max_epochs=-1 rl.samples_per_prompt=4

The loop is the real one (Lightning Trainer, the module, the default callbacks and the CSV logger, checkpoints
every 50 steps), so a leak anywhere in a step — KV caches or autograd graphs kept across steps, the rollout
history, logged tensors, prompt caches — shows as a positive slope. RSS is sampled after `gc.collect()` every
`--every` steps; the first samples include one-off allocations (allocator pools, lazily built caches), so the
slope is fitted from `--warmup` on. Extra arguments are Hydra overrides.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import psutil  # noqa: E402


class RSSSampler(L.Callback):
    """Record (global step, RSS in MB) every `every` steps, after a garbage collection."""

    def __init__(self, every: int = 50):
        self.every = every
        self.series: list[tuple[int, float]] = []
        self._process = psutil.Process(os.getpid())

    def sample(self, step: int) -> None:
        gc.collect()
        self.series.append((step, self._process.memory_info().rss / 2**20))

    def on_train_start(self, trainer, module) -> None:
        self.sample(trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.sample(trainer.global_step)


def slope_mb_per_100_steps(series: list[tuple[int, float]], warmup: int) -> float:
    """Least-squares slope of RSS against step over the samples at or after `warmup`, in MB per 100 steps."""
    points = [(s, r) for s, r in series if s >= warmup]
    if len({s for s, _ in points}) < 2:
        return 0.0
    steps, rss = zip(*points)
    return 100.0 * statistics.linear_regression(steps, rss).slope


def soak(steps: int = 300, every: int = 50, warmup: int = 50, overrides: list[str] | None = None,
         output_dir: str | None = None) -> dict:
    """Train `steps` steps of experiment=smoke in this process; returns the RSS series and its growth."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from ctt.config.hydra_glue import CONFIG_DIR, instantiate_list
    from ctt.train import _plugins
    from ctt.training.module import build_module

    output_dir = output_dir or tempfile.mkdtemp(prefix="ctt-soak-")
    base = [
        "experiment=smoke", f"paths.output_dir={output_dir}", f"trainer.max_steps={steps}",
        "callbacks.model_checkpoint.every_n_train_steps=50", "callbacks.token_export.every_n_steps=50",
        "callbacks.rollout_samples.every_n_steps=10", "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=base + list(overrides or []))
    L.seed_everything(cfg.seed, workers=True)
    sampler = RSSSampler(every)
    trainer = instantiate(
        cfg.trainer, callbacks=instantiate_list(cfg.callbacks) + [sampler],
        logger=instantiate_list(cfg.get("logger")) or False, plugins=_plugins(cfg) or None,
    )
    module = build_module(cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=instantiate(cfg.data))
    elapsed = time.perf_counter() - start
    if not sampler.series or sampler.series[-1][0] != trainer.global_step:
        sampler.sample(trainer.global_step)
    at_warmup = next((r for s, r in sampler.series if s >= warmup), sampler.series[-1][1])
    return {
        "steps": trainer.global_step,
        "seconds": round(elapsed, 1),
        "rss_mb": [[s, round(r, 1)] for s, r in sampler.series],
        "growth_after_warmup_mb": round(sampler.series[-1][1] - at_warmup, 1),
        "slope_mb_per_100_steps": round(slope_mb_per_100_steps(sampler.series, warmup), 2),
        "warmup": warmup,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. rl.samples_per_prompt=4")
    args = parser.parse_args()
    result = soak(args.steps, args.every, args.warmup, args.overrides)
    for step, rss in result["rss_mb"]:
        print(f"step {step:5d}  rss {rss:8.1f} MB")
    print(f"{result['steps']} steps in {result['seconds']} s; growth after step {args.warmup}: "
          f"{result['growth_after_warmup_mb']} MB; slope {result['slope_mb_per_100_steps']} MB / 100 steps")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
