"""Where problems come from: a registry of data sources (JSONL files, the HF hub, reasoning_gym, the model
organism's task), gold answers checked on load, and the held-out check against training problems."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ctt.data.answers import UnusableGold, check_answer_format, gold_answer, gold_parses
from ctt.data.problems import Problem
from ctt.data.splits import drop_training_overlap, select_part
from ctt.errors import ConfigError, DataError
from ctt.text import jsonl_rows
from ctt.settings import one_of

log = logging.getLogger(__name__)


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

    opts = {"min_terms": 2, "max_terms": 8, "split": None} | dict(task_kwargs or {})
    unknown = sorted(set(opts) - {"min_terms", "max_terms", "split"})
    if unknown or not 2 <= opts["min_terms"] <= opts["max_terms"] or opts["split"] not in (None, "val", "test"):
        raise ConfigError(f"source=organism takes task_kwargs min_terms <= max_terms (>= 2) and split "
                          f"(null, val or test), got {opts}")
    split = opts["split"]  # val / test: questions of one hash bucket only, so the two splits never share a problem
    return [Problem(id=f"organism-{split + '-' if split else ''}{seed}-{i}", question=question_text(t), answer=str(sum(t)))
            for i, t in enumerate(draw_problems(size, seed, opts["min_terms"], opts["max_terms"], split))]


@dataclass(frozen=True)
class ProblemSet:
    """One problem set's settings (the keyword arguments of `load_problems`); each source reads the keys it needs."""

    source: str
    path: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    split: str = "test"
    question_key: str = "question"
    answer_key: str = "answer"
    answer_format: str = "plain"
    id_key: str | None = None
    seed: int = 0
    task: str | None = None
    task_kwargs: dict | None = None
    size: int = 100

    @property
    def keys(self) -> dict:
        return dict(question_key=self.question_key, answer_key=self.answer_key, answer_format=self.answer_format,
                    id_key=self.id_key)


def _from_jsonl(s: ProblemSet) -> tuple[list[Problem], str]:
    if not s.path:
        raise ConfigError("data.path is required for source=jsonl")
    p = Path(s.path)
    return _to_problems(jsonl_rows(str(s.path)), f"{p.parent.name}/{p.stem}", **s.keys), str(s.path)


def _from_hub(s: ProblemSet) -> tuple[list[Problem], str]:
    rows = _hub_rows(s.hub_name, s.hub_config, s.split)
    return _to_problems(rows, f"{s.hub_name}/{s.split}", **s.keys), f"{s.hub_name} ({s.split})"


MAX_GENERATED = 1_000_000  # problems a generated source draws: far above any run's, far below a hang (10**9)


def _generated_size(s: ProblemSet) -> int:
    if not 1 <= s.size <= MAX_GENERATED:
        raise ConfigError(f"data.size must be in [1, {MAX_GENERATED}] for source={s.source}, got {s.size}")
    return s.size


def _from_reasoning_gym(s: ProblemSet) -> tuple[list[Problem], str]:
    return _reasoning_gym_problems(s.task, s.task_kwargs, _generated_size(s), s.seed), f"reasoning_gym:{s.task}"


def _from_organism(s: ProblemSet) -> tuple[list[Problem], str]:
    return _organism_problems(s.task_kwargs, _generated_size(s), s.seed), "organism"


# A data source: a problem set's settings -> (its problems, where they came from, for messages). Adding a source is
# one function and one entry here, plus its conf/data and conf/benchmarks YAML.
SOURCES: dict[str, Callable[[ProblemSet], tuple[list[Problem], str]]] = {
    "jsonl": _from_jsonl, "hub": _from_hub, "reasoning_gym": _from_reasoning_gym, "organism": _from_organism,
}


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
    spec = ProblemSet(source, path, hub_name, hub_config, split, question_key, answer_key, answer_format, id_key,
                      seed, task, task_kwargs, size)
    problems, origin = SOURCES[source](spec)
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


def load_benchmarks(
    benchmarks: DictConfig, limit: int | None = None, training: list[Problem] | None = None, part: str = "all",
    val_fraction: float = 0.5, split_seed: int = 0,
) -> tuple[dict[str, list[Problem]], list[str]]:
    """`benchmarks` maps a name to `load_problems` keyword arguments (plus an optional `validation` problem set).
    Problems that are also `training` problems are dropped first, then the `part` split is taken (ctt.data.splits: "all",
    "validation" or "test"), then the first `limit` are kept. Returns the problems and the notes for results.md."""
    out, notes = {}, []
    for name, spec in benchmarks.items():
        kwargs = OmegaConf.to_container(spec, resolve=True)
        own_limit = kwargs.pop("limit", None)  # applied after the check, like `limit`
        val_spec = kwargs.pop("validation", None)
        problems = load_problems(**kwargs)
        if training is not None:
            problems, dropped = drop_training_overlap(problems, training, name)
            if dropped:
                notes.append(
                    f"{name}: {dropped} problems that are also training problems were dropped before evaluation"
                )
        validation = load_problems(**val_spec) if val_spec is not None and part != "all" else None
        problems, split_notes = select_part(name, problems, part, validation, val_fraction, split_seed, training)
        notes += split_notes
        for cap in (own_limit, limit):
            problems = problems[:cap] if cap is not None else problems
        out[name] = problems
    return out, notes

