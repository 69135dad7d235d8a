"""Log a few training rollouts as text, inserted continuations marked, to the run's loggers and a JSONL file.

The file is appended to; when a run starts (a resume included) it first drops the lines of steps after the step it
starts from, which the run is about to log again, as ctt.reliability.loggers does for metrics.csv.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from ctt.writes import append_bytes, atomic_write_text


class RolloutSampleLogger(L.Callback):
    def __init__(self, dirpath: str, every_n_steps: int = 10, num_samples: int = 2, filename: str = "rollouts.jsonl"):
        self.path = Path(dirpath) / filename
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples

    def on_train_start(self, trainer, module) -> None:
        if trainer.is_global_zero and self.path.is_file():
            keep_until(self.path, trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self.every_n_steps <= 0 or step % self.every_n_steps:
            return
        samples = module.last_samples[: self.num_samples]
        lines = []
        for i, (problem, rollout, score) in enumerate(samples):
            text = rollout.text  # rendered by the policy: every inserted continuation wrapped in [[ ]]
            row = {"step": step, "problem_id": problem.id, "gold": problem.answer, "answer": score.extracted,
                   "reward": score.reward, "forced": rollout.num_forced, "completion": text}
            lines.append(json.dumps(row) + "\n")
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text(f"rollouts/{i}", f"**{problem.question}**\n\n{text}", step)
                elif isinstance(logger, WandbLogger):
                    logger.log_text(key="rollouts", columns=list(row), data=[list(row.values())], step=step)
        if lines:  # the step's lines whole or none (a full disk cuts the file back: ctt.writes.append_bytes)
            append_bytes("".join(lines).encode(), self.path)


def _step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut by a kill: dropped with the steps to be replayed


def keep_until(path: Path, step: int) -> None:
    """Rewrite `path` (atomically) keeping the lines logged at steps <= `step`."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and _step(line) <= step]
    if len(kept) == len(lines):
        return
    atomic_write_text("".join(kept), path)
