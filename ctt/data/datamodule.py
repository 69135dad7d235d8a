"""The training data as a LightningDataModule: batches of problems in a seeded order that a resume replays."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ctt.data.problems import Problem
from ctt.data.sources import load_problems
from ctt.errors import ConfigError

log = logging.getLogger(__name__)


class PromptDataset(Dataset):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Problem:
        return self.problems[index]


def _as_kwargs(cfg: Mapping | DictConfig | None, name: str) -> dict | None:
    if cfg is None:
        return None
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"data.{name} must be a mapping of load_problems arguments, got {type(cfg).__name__}")
    return dict(cfg)


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (an epoch's order is a function of `seed + epoch` alone) that can start an epoch part-way.

    A plain `DataLoader(shuffle=True)` draws each epoch's order from the global RNG and, after a resume, restarts the
    epoch from its first batch while Lightning's restored counters say it is mid-way: the resumed run would see
    other problems than an uninterrupted one. `ProblemDataModule` saves its position in the checkpoint and
    `resume_at` replays it. Subclassing DistributedSampler also stops Lightning from swapping in its own sampler
    under DDP (this one already shards by rank).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0  # samples (of this rank) to leave out at the start of the next epoch, once

    def resume_at(self, epoch: int, skip_samples: int) -> None:
        self.set_epoch(epoch)
        self.skip = skip_samples

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class _ResumableLoader(DataLoader):
    """A DataLoader Lightning counts as resumable (it has `state_dict`/`load_state_dict`), which it is: the position
    is saved by `ProblemDataModule.state_dict` and replayed through `ResumableSampler`, so there is nothing to add."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class ProblemDataModule(L.LightningDataModule):
    """Batches are plain `list[Problem]`; tokenisation happens at rollout time in the model.

    The training order is seeded (`seed`, and the epoch) and the position within it is saved in checkpoints
    (`state_dict`), so a resumed run trains on exactly the batches the uninterrupted run would have.
    """

    def __init__(self, train: dict, batch_size: int = 4, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        _positive_int(batch_size, "data.batch_size")
        self.train_cfg = _as_kwargs(train, "train")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_problems: list[Problem] | None = None
        self._resume: dict | None = None  # the position loaded from a checkpoint, applied by train_dataloader

    def _load(self, cfg: dict, name: str) -> list[Problem]:
        try:
            return load_problems(**cfg)
        except TypeError as e:  # unknown / missing keyword in the config
            raise ConfigError(f"data.{name}: {e}") from None

    def setup(self, stage: str | None = None) -> None:
        if self.train_problems is None:
            self.train_problems = self._load(self.train_cfg, "train")
            if self.batch_size > len(self.train_problems):
                raise ConfigError(
                    f"data.batch_size={self.batch_size} exceeds the {len(self.train_problems)} training problems"
                )

    def train_dataloader(self) -> DataLoader:
        if self.train_problems is None:
            self.setup("fit")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        dataset = PromptDataset(self.train_problems)
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        if self._resume is not None:
            epoch, batches = self._resume["epoch"], self._resume["batches_in_epoch"]
            if batches >= self._resume["batches_per_epoch"]:  # saved at the end of an epoch: the next one starts
                epoch, batches = epoch + 1, 0
            sampler.resume_at(epoch, batches * self.batch_size)
            self._resume = None
        return _ResumableLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, collate_fn=list
        )

    # --- the position in the training data, saved in Lightning checkpoints ----------------------------------

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or self.train_problems is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {
            "epoch": int(trainer.current_epoch),
            "batches_in_epoch": int(progress.processed),  # trained on; the next batch is this index
            "batches_per_epoch": int(trainer.num_training_batches),
            "num_problems": len(self.train_problems),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "train": self.train_cfg,  # compared with the current config before a resume (ctt.reliability.resume)
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.train_problems is None:
            self.setup("fit")
        now = {"num_problems": len(self.train_problems), "batch_size": self.batch_size, "seed": self.seed}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if changed:
            log.warning(
                "resuming with other training data than the checkpoint (%s): the data order will differ from an "
                "uninterrupted run", ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()),
            )
        self._resume = dict(state)
