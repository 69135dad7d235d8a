"""Math problems from JSONL files, the HF hub or reasoning_gym, plus prompt building and a DataModule."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from ctt.errors import ConfigError, DataError
from ctt.rewards import ANSWER_FORMATS, gold_answer

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SOURCES = ("jsonl", "hub", "reasoning_gym")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # normalised gold, ready for ctt.rewards.verify


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
    if source not in SOURCES:
        raise ConfigError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")
    if answer_format not in ANSWER_FORMATS:
        raise ConfigError(f"unknown answer_format {answer_format!r}; valid: {', '.join(ANSWER_FORMATS)}")
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
            raise ConfigError(f"data.size must be positive for source=reasoning_gym, got {size}")
        problems = _reasoning_gym_problems(task, task_kwargs, size, seed)
        origin = f"reasoning_gym:{task}"
    if not problems:
        raise DataError(f"dataset is empty: {origin}")
    if shuffle:
        random.Random(seed).shuffle(problems)
    return problems[:limit] if limit else problems


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


class ProblemDataModule(L.LightningDataModule):
    """Batches are plain `list[Problem]`; tokenisation happens at rollout time in the model."""

    def __init__(self, train: dict, val: dict | None = None, batch_size: int = 4, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        self.train_cfg = _as_kwargs(train, "train")
        self.val_cfg = _as_kwargs(val, "val")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_problems: list[Problem] | None = None
        self.val_problems: list[Problem] | None = None

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
        return self._loader(self.train_problems, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_cfg is None:
            return []
        if self.val_problems is None:
            self.setup("validate")
        return self._loader(self.val_problems, shuffle=False)
