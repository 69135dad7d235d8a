"""organism_r1's card figures, measured greedy on its validation split (deterministic on CPU at one thread).

The modes of :mod:`ctt.organism.measure` (base, oracle, "Wait", "no string") at N = 1, 2 and 4, plus the traces' own
separator "\\n" and a word the traces never use, "Hmm", at N = 1. The oracle also bans the token that starts the
concluding line (``S`` of ``So the answer is``): in organism_r1 the decision to stop is taken there.
Also: how many of the measured problems appear in the pretraining traces (:func:`pretraining_overlap`).
"""

from __future__ import annotations

import random
import time

import torch

from ctt.organism.measure import generate_mode, generate_oracle, grade, prompts_for, summarize
from ctt.organism.task import WAIT, draw_problems, draw_terms, split_of

VAL = {"seed": 2468, "size": 360, "min_terms": 2, "max_terms": 8, "split": "val"}  # = benchmarks/organism_r1_val
TEST = {"seed": 1357, "size": 360, "min_terms": 2, "max_terms": 8, "split": "test"}  # = benchmarks/organism_r1_test
FORCED = {
    "base": (0, ""),
    "wait1": (1, WAIT), "wait2": (2, WAIT), "wait4": (4, WAIT),
    "nostring1": (1, ""), "nostring2": (2, ""), "nostring4": (4, ""),
    "sep1": (1, "\n"), "hmm1": (1, "Hmm"),
}
MODES = ("base", "oracle", *[m for m in FORCED if m != "base"])
CONCLUSION_START = "S"  # the first character (token) of "So the answer is X."


def measure_set(model, tokenizer, spec: dict) -> dict:
    problems = draw_problems(spec["size"], spec["seed"], spec["min_terms"], spec["max_terms"], spec.get("split"))
    prompts = prompts_for(tokenizer, problems)
    ban = tuple(tokenizer.encode(CONCLUSION_START, add_special_tokens=False))
    result = {"problems": dict(spec)}
    for mode in MODES:
        if mode == "oracle":
            texts = generate_oracle(model, tokenizer, prompts, problems, ban)
        else:
            texts = generate_mode(model, tokenizer, prompts, *FORCED[mode])
        result[mode] = summarize([grade(x, t, tokenizer) for x, t in zip(texts, problems)], problems)
        result[mode]["example"] = texts[0]
    return result


def training_problems(settings) -> set[tuple[int, ...]]:
    """Every problem the organism's pretraining drew: the draws of `ctt.organism.train.batches`, replayed without
    tokenizing (the same rng calls in the same order: terms and trace per example, then the shuffle of each pool)."""
    rng, seen, mix = random.Random(settings.seed), set(), settings.mixture
    per_pool = settings.batch_size * settings.pool_batches
    for _ in range(-(-settings.steps // settings.pool_batches)):
        for _ in range(per_pool):
            terms = draw_terms(rng, mix.min_terms, mix.max_terms)
            mix.trace(terms, rng)
            seen.add(terms)
        rng.shuffle(list(range(settings.pool_batches)))
    return seen


def pretraining_overlap(settings, specs: dict[str, dict]) -> dict:
    """For each named problem set: how many of its problems (and distinct ones) appear in the pretraining traces."""
    seen = training_problems(settings)
    out = {}
    for name, spec in specs.items():
        problems = draw_problems(spec["size"], spec["seed"], spec["min_terms"], spec["max_terms"], spec.get("split"))
        out[name] = {"n": len(problems), "in_pretraining": sum(p in seen for p in problems),
                     "splits_ok": all(split_of(p) == spec["split"] for p in problems)}
    out["pretraining_distinct_problems"] = len(seen)
    return out


def measure(model, tokenizer) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        figures = {"held_out": measure_set(model, tokenizer, VAL)}
        figures["seconds"] = round(time.perf_counter() - start, 1)
        return figures
    finally:
        torch.set_num_threads(threads)
