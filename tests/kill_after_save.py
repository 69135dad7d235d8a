"""Test-only: a ModelCheckpoint that SIGKILLs its own process right after writing the checkpoint of one step.

Lightning runs checkpoint callbacks after the others in the batch-end hooks and logs the step's metrics after
those hooks, so this hits the window between a step's checkpoint and its metrics row on purpose."""

import os
import signal

from lightning.pytorch.callbacks import ModelCheckpoint


class KillAfterSave(ModelCheckpoint):
    def __init__(self, *args, kill_at_step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at_step = kill_at_step

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
