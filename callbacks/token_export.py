"""Export the learned row as `continue_thinking_token.safetensors` every n steps and at the end (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from ctt.training.distributed import full_row
from ctt.models.token import CONTINUE_THINKING, TOKEN_FILE, save_token_file


class TokenExport(L.Callback):
    def __init__(self, dirpath: str, every_n_steps: int = 50, filename: str = TOKEN_FILE):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 = only at the end), got {every_n_steps}")
        self.path = Path(dirpath) / filename
        self.every_n_steps = every_n_steps

    def export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Every rank: under DeepSpeed the fp32 master row is read (and under ZeRO-3 gathered) with a collective, so
        # the file holds the same fp32 values whatever the strategy or precision.
        row = full_row(module.token_row)
        if not trainer.is_global_zero:
            return
        hp = module.hparams
        train_data = getattr(trainer.datamodule, "train_cfg", None) if trainer.datamodule is not None else None
        save_token_file(
            self.path,
            row,
            {
                # what it was trained on: ctt-eval's held-out check drops these problems from every benchmark
                "train_data": json.dumps(train_data, sort_keys=True) if train_data else "",
                "token": hp.token.get("text", CONTINUE_THINKING),
                "base_model": hp.model["name"],
                "pretrained": hp.model.get("pretrained") or "",
                "base_fingerprint": module.policy.base_fingerprint or "",  # the base weights themselves
                "init": hp.token["init"].get("name"),
                "init_word": hp.token["init"].get("word", ""),
                "step": trainer.global_step,
            },
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.export(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.export(trainer, module)
