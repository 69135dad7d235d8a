"""Hydra glue shared by the entry points: resolvers, instantiating lists, loading benchmarks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctt.data.sources import Problem, drop_training_overlap, load_problems

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "conf")

# `${ctt_root:}` lets configs point at files next to the checkout (e.g. ../shared/data) whatever the cwd.
if not OmegaConf.has_resolver("ctt_root"):
    OmegaConf.register_new_resolver("ctt_root", lambda: str(PROJECT_ROOT))


def launch_rank() -> int:
    """This process's global rank when an outside launcher started one process per device (SLURM's srun, e.g.
    through hydra/launcher=slurm, or torchrun), else 0. Read from the environment as the job starts."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


# Every process of such a launch runs the Hydra job in the same run dir: only rank 0 writes `.hydra/`
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


def load_benchmarks(
    benchmarks: DictConfig, limit: int | None = None, training: list[Problem] | None = None
) -> tuple[dict[str, list[Problem]], list[str]]:
    """`benchmarks` maps a name to `load_problems` keyword arguments. Problems that are also `training` problems are
    dropped first, then the first `limit` are kept. Returns the problems and one note per benchmark that lost some."""
    out, notes = {}, []
    for name, spec in benchmarks.items():
        kwargs = OmegaConf.to_container(spec, resolve=True)
        own_limit = kwargs.pop("limit", None)  # applied after the check, like `limit`
        problems = load_problems(**kwargs)
        if training is not None:
            problems, dropped = drop_training_overlap(problems, training, name)
            if dropped:
                notes.append(
                    f"{name}: {dropped} problems that are also training problems were dropped before evaluation"
                )
        for cap in (own_limit, limit):
            problems = problems[:cap] if cap is not None else problems
        out[name] = problems
    return out, notes


def to_plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
