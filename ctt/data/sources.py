"""Math problems from JSONL files, the HF hub, reasoning_gym or the model organism's task, plus prompt building and a
DataModule."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ctt.errors import ConfigError, DataError
from ctt.data.answers import UnusableGold, check_answer_format, gold_answer, gold_parses
from ctt.settings import one_of

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SOURCES = ("jsonl", "hub", "reasoning_gym", "organism")


class Problem(NamedTuple):
    # A NamedTuple, not a frozen dataclass: Lightning's precision plugins (DeepSpeed, *-true) rebuild every batch
    # with `apply_to_collection`, which rejects frozen dataclasses and passes named tuples through.
    id: str
    question: str
    answer: str  # normalised gold, ready for ctt.data.answers.verify


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line`, parsed row), skipping blank lines; every failure names the file and line."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: line is not valid UTF-8 (byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"data path is a directory, expected a .jsonl file: {path}") from None
    except OSError as e:  # permissions, a path through a file, I/O errors
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None


def _to_problems(
    rows: Iterable[tuple[str, Any]], prefix: str, question_key: str, answer_key: str, answer_format: str, id_key: str | None
) -> list[Problem]:
    problems = []
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in (question_key, answer_key) + ((id_key,) if id_key else ()):
            if key not in row:
                raise DataError(f"{where}: row has no key {key!r} (keys: {', '.join(map(str, row))})")
        question = row[question_key]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: {question_key!r} is empty or not a string")
        try:
            answer = gold_answer(row[answer_key], answer_format)
        except UnusableGold:
            answer = None  # skipped and counted with the unparseable golds (_drop_unverifiable)
        except DataError as e:
            raise DataError(f"{where}: {e} (answer_format={answer_format})") from None
        pid = str(row[id_key]) if id_key else f"{prefix}-{index}"
        problems.append(Problem(id=pid, question=question, answer=answer))
    return problems


def _hub_rows(hub_name: str | None, hub_config: str | None, split: str) -> Iterator[tuple[str, Any]]:
    if not hub_name:
        raise ConfigError("data.hub_name is required for source=hub")
    try:
        import datasets  # optional extra: only hub users pay for it
    except ImportError:
        raise ConfigError("source=hub needs the 'datasets' package: pip install datasets (or use data.path=)") from None
    try:
        ds = datasets.load_dataset(hub_name, hub_config, split=split)
    except Exception as e:  # network, unknown name, bad split: one line is enough
        raise DataError(f"cannot load hub dataset {hub_name!r} (config={hub_config}, split={split}): {e}") from e
    for i, row in enumerate(ds):
        yield f"{hub_name}[{split}] row {i}", row


def _reasoning_gym_problems(task: str | None, task_kwargs: dict | None, size: int, seed: int) -> list[Problem]:
    import reasoning_gym  # slow import (~2 s), only needed for this source
    from reasoning_gym.factory import DATASETS

    if not task or task not in DATASETS:
        few = ", ".join(sorted(DATASETS)[:12])
        raise ConfigError(f"unknown reasoning_gym task {task!r}; available include: {few}, ... ({len(DATASETS)} in all)")
    try:
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **(task_kwargs or {}))
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"bad reasoning_gym settings for task {task!r}: {e}") from None
    return [
        Problem(id=f"{task}-{seed}-{i}", question=entry["question"], answer=gold_answer(entry["answer"], "plain"))
        for i, entry in enumerate(ds)
    ]


def _organism_problems(task_kwargs: dict | None, size: int, seed: int) -> list[Problem]:
    """Sums of single-digit terms in the organism's question format (ctt/organism/task.py); gold = the sum."""
    from ctt.organism.task import draw_problems, question_text

    opts = {"min_terms": 2, "max_terms": 8} | dict(task_kwargs or {})
    unknown = sorted(set(opts) - {"min_terms", "max_terms"})
    if unknown or not 2 <= opts["min_terms"] <= opts["max_terms"]:
        raise ConfigError(f"source=organism takes task_kwargs min_terms <= max_terms (>= 2), got {opts}")
    return [
        Problem(id=f"organism-{seed}-{i}", question=question_text(terms), answer=str(sum(terms)))
        for i, terms in enumerate(draw_problems(size, seed, opts["min_terms"], opts["max_terms"]))
    ]


def load_problems(
    source: str,
    *,
    path: str | None = None,
    hub_name: str | None = None,
    hub_config: str | None = None,
    split: str = "test",
    question_key: str = "question",
    answer_key: str = "answer",
    answer_format: str = "plain",
    id_key: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
    task: str | None = None,
    task_kwargs: dict | None = None,
    size: int = 100,
) -> list[Problem]:
    """Load problems with normalised gold answers; `limit` keeps the first rows after the optional shuffle."""
    one_of("data source", source, SOURCES)
    check_answer_format(answer_format)
    if limit is not None and limit < 1:
        raise ConfigError(f"data.limit must be a positive integer or null, got {limit}")
    keys = dict(question_key=question_key, answer_key=answer_key, answer_format=answer_format, id_key=id_key)
    if source == "jsonl":
        if not path:
            raise ConfigError("data.path is required for source=jsonl")
        p = Path(path)
        problems = _to_problems(_jsonl_rows(str(path)), f"{p.parent.name}/{p.stem}", **keys)
        origin = str(path)
    elif source == "hub":
        problems = _to_problems(_hub_rows(hub_name, hub_config, split), f"{hub_name}/{split}", **keys)
        origin = f"{hub_name} ({split})"
    else:
        if size < 1:
            raise ConfigError(f"data.size must be positive for source={source}, got {size}")
        if source == "organism":
            problems, origin = _organism_problems(task_kwargs, size, seed), "organism"
        else:
            problems = _reasoning_gym_problems(task, task_kwargs, size, seed)
            origin = f"reasoning_gym:{task}"
    if not problems:
        raise DataError(f"dataset is empty: {origin}")
    problems = _drop_unverifiable(problems, origin)
    if shuffle:
        random.Random(seed).shuffle(problems)
    return problems[:limit] if limit else problems


def _drop_unverifiable(problems: list[Problem], origin: str) -> list[Problem]:
    """Skip rows whose gold answer is missing (None: null, a list) or math-verify cannot parse it (every completion
    would score 0), with one warning that counts them."""
    ok = [p.answer is not None and gold_parses(p.answer) for p in problems]
    kept = [p for p, good in zip(problems, ok) if good]
    skipped = len(problems) - len(kept)
    if skipped:
        first = problems[ok.index(False)]
        log.warning(
            "%s: skipped %d of %d rows whose gold answer is null, not one answer, or not parseable by math-verify "
            "(first: %s, answer %r)",
            origin, skipped, len(problems), first.id, first.answer,
        )
    if not kept:
        raise DataError(f"dataset is empty: no gold answer of {origin} can be parsed by math-verify")
    return kept


def normalise_question(text: str) -> str:
    """Question text as compared for overlap: case and whitespace ignored."""
    return " ".join(text.lower().split())


def drop_training_overlap(problems: list[Problem], training: list[Problem], name: str) -> tuple[list[Problem], int]:
    """The evaluation problems whose question is not among the training questions (normalised), and how many were
    dropped; one warning that counts them. A problem trained on is not held out."""
    seen = {normalise_question(p.question) for p in training}
    kept = [p for p in problems if normalise_question(p.question) not in seen]
    dropped = len(problems) - len(kept)
    if dropped:
        log.warning("%s: dropped %d of %d evaluation problems that are also training problems", name, dropped, len(problems))
    if not kept:
        raise DataError(f"benchmark {name}: every evaluation problem is also a training problem")
    return kept, dropped


def format_user_message(question: str, instruction: str) -> str:
    # str.replace, not str.format: the default instruction contains "\boxed{}" which format() chokes on.
    if "{question}" in instruction:
        return instruction.replace("{question}", question)
    return f"{question}\n\n{instruction}"


def build_prompt_ids(tokenizer: Any, question: str, instruction: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    user = format_user_message(question, instruction)
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    else:
        text = (f"{system_prompt}\n\n" if system_prompt else "") + f"{user}\n"
        ids = tokenizer.encode(text)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # batched form of a single conversation
        ids = ids[0]
    return [int(i) for i in ids]


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

    def __init__(
        self, train: dict, val: dict | None = None, batch_size: int = 4, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        _positive_int(batch_size, "data.batch_size")
        self.train_cfg = _as_kwargs(train, "train")
        self.val_cfg = _as_kwargs(val, "val")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_problems: list[Problem] | None = None
        self.val_problems: list[Problem] | None = None
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
        if self.val_cfg is not None and self.val_problems is None:
            self.val_problems = self._load(self.val_cfg, "val")

    def _loader(self, problems: list[Problem], shuffle: bool) -> DataLoader:
        # collate_fn=list keeps Problems intact; Lightning swaps in a DistributedSampler under DDP.
        return DataLoader(
            PromptDataset(problems), batch_size=self.batch_size, shuffle=shuffle,
            num_workers=self.num_workers, collate_fn=list,
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

    def val_dataloader(self) -> DataLoader | list:
        if self.val_cfg is None:
            return []
        if self.val_problems is None:
            self.setup("validate")
        return self._loader(self.val_problems, shuffle=False)
