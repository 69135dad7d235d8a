"""Hydra glue shared by the entry points: the conf dir, the resolvers, instantiating lists of configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctt.reliability.run_dir import launch_rank

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "conf")

# `${ctt_root:}` lets configs point at files next to the checkout (e.g. ../shared/data) whatever the cwd.
if not OmegaConf.has_resolver("ctt_root"):
    OmegaConf.register_new_resolver("ctt_root", lambda: str(PROJECT_ROOT))

# Every process of a launch with one process per device (launch_rank) runs the Hydra job in the same run dir: only rank 0 writes `.hydra/`
# (`${ctt_rank_zero:.hydra}` is null elsewhere) and each other rank logs to `<job>_rank<r>.log`.
if not OmegaConf.has_resolver("ctt_rank_zero"):
    OmegaConf.register_new_resolver("ctt_rank_zero", lambda value: value if launch_rank() == 0 else None)
if not OmegaConf.has_resolver("ctt_rank_suffix"):
    OmegaConf.register_new_resolver("ctt_rank_suffix", lambda: f"_rank{launch_rank()}" if launch_rank() else "")


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` node of a dict-of-configs group (callbacks, loggers); null entries are off."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]
