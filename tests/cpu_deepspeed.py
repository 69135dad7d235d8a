"""Test-only: Lightning's DeepSpeedStrategy on CPU (gloo), so the ZeRO code paths run without a GPU.

Lightning refuses DeepSpeed on anything but CUDA; DeepSpeed itself runs ZeRO-1/2/3 on its CPU accelerator. Only
the three CUDA-specific pieces are replaced: the accelerator check, the device-index check and the root device.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.fabric.utilities.seed import reset_seed


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "only supported on CUDA GPUs" check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # gloo: the backend for a CPU root device

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed reads the index (args.device_rank >= 0); every rank is "cpu:0", DeepSpeed's CPU accelerator.
        return torch.device("cpu", 0)
