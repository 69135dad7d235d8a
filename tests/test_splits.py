"""Validation / test splits (ctt.data.splits): disjoint from each other and from training, stable, config-driven."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ctt.data.sources import load_benchmarks
from ctt.data.problems import Problem
from ctt.data.splits import normalise_question
from ctt.errors import ConfigError, DataError
from ctt.config.check import check_problem_set
from ctt.evaluation.settings import EvalSettings
from ctt.data.splits import check_disjoint, in_validation, select_part, split_parts


def _problems(n, start=0):
    return [Problem(f"q{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(start, start + n)]


def _questions(problems):
    return {normalise_question(p.question) for p in problems}


def test_hash_split_is_a_stable_partition():
    problems = _problems(2000)
    val, test, _ = split_parts("b", problems, None, 0.3, seed=0)
    assert not _questions(val) & _questions(test) and len(val) + len(test) == len(problems)
    assert abs(len(val) / len(problems) - 0.3) < 0.04
    # a question's part depends on nothing else: reversed, subset, and the case/space-normalised question agree
    again, _, _ = split_parts("b", problems[::-1][:500], None, 0.3, seed=0)
    assert _questions(again) == _questions(val) & _questions(problems[::-1][:500])
    assert in_validation("What is 3 +  3?", 0.3) == in_validation("what is 3 + 3?", 0.3)
    other, _, _ = split_parts("b", problems, None, 0.3, seed=1)
    assert _questions(other) != _questions(val)


def test_validation_set_of_its_own_loses_test_and_training_questions():
    test, training = _problems(10), _problems(3, start=20)
    dev = _problems(5, start=8) + _problems(2, start=20)  # q8, q9 are test questions; q20, q21 training ones
    val, kept, notes = split_parts("b", test, dev, 0.5, training=training)
    assert [p.id for p in val] == ["q10", "q11", "q12"] and kept == test
    assert any("also test problems" in n for n in notes) and any("also training" in n for n in notes)


def test_check_disjoint_and_empty_parts():
    check_disjoint(_problems(3), _problems(3, start=3), "b")
    with pytest.raises(DataError, match="both the validation and the test split"):
        check_disjoint(_problems(3), _problems(3, start=2), "b")
    with pytest.raises(DataError, match="validation split is empty"):
        select_part("b", _problems(1), "validation", _problems(1), 0.5)
    assert select_part("b", _problems(4), "all") == (_problems(4), [])


def test_load_benchmarks_validation_and_test_are_disjoint_and_held_out():
    spec = OmegaConf.create({"sums": {"source": "organism", "size": 200, "seed": 1234,
                                      "task_kwargs": {"min_terms": 2, "max_terms": 4}}})
    training = load_benchmarks(OmegaConf.create({"t": {**spec.sums, "seed": 0, "size": 300}}))[0]["t"]
    parts = {part: load_benchmarks(spec, training=training, part=part)[0]["sums"] for part in ("all", "validation", "test")}
    val, test = _questions(parts["validation"]), _questions(parts["test"])
    assert val and test and not val & test and val | test == _questions(parts["all"])
    assert not (val | test) & _questions(training)
    _, notes = load_benchmarks(spec, training=training, part="test", val_fraction=0.25)
    assert any("test split" in n and "val_fraction=0.25" in n for n in notes)


def test_split_config_is_typed():
    assert EvalSettings.from_config({"split": "test"}).split == "test"
    with pytest.raises(ConfigError, match="eval.split"):
        EvalSettings.from_config({"split": "dev"})
    with pytest.raises(ConfigError, match="eval.val_fraction"):
        EvalSettings.from_config({"val_fraction": 1.0})
    entry = {"source": "jsonl", "path": "t.jsonl", "validation": {"source": "jsonl", "path": "dev.jsonl"}}
    assert "validation" not in check_problem_set(entry, "benchmarks.b", benchmark=True)
    with pytest.raises(ConfigError, match="benchmarks.b.validation"):
        check_problem_set({**entry, "validation": {"source": "jsonl", "pth": "x"}}, "benchmarks.b", benchmark=True)
