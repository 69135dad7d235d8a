"""Evaluation of the three modes (base, fixed word, learned token) for each number of forced continuations N."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from torchmetrics.aggregation import MeanMetric

from ctt.data import Problem
from ctt.generation import SamplingConfig
from ctt.policy import Policy
from ctt.rewards import Score

RESULT_COLUMNS = ["benchmark", "mode", "num_continuations", "accuracy", "n", "mean_thinking_tokens", "mean_total_tokens"]


@dataclass
class SampleRecord:
    benchmark: str
    problem_id: str
    mode: str
    num_continuations: int
    sample: int
    answer: str | None
    correct: bool
    status: str
    thinking_tokens: int
    total_tokens: int
    forced: int
    continuation_starts: list[int]
    stop_reason: str


def mode_runs(modes: list[str], num_continuations: list[int], fixed_words: list[str]) -> list[tuple[str, str | None, int]]:
    """(label, word, N) for every evaluation run. The base model is N-independent: it runs once, as N=0."""
    runs: list[tuple[str, str | None, int]] = []
    if "base" in modes:
        runs.append(("base", None, 0))
    for n in sorted(set(num_continuations)):
        if n == 0 and "base" in modes:
            continue  # forcing nothing is the base run
        if "fixed" in modes:
            runs += [(f"fixed:{w}", w, n) for w in fixed_words]
        if "learned" in modes:
            runs.append(("learned", None, n))
    return runs


def evaluate(
    policy: Policy,
    benchmarks: dict[str, list[Problem]],
    runs: list[tuple[str, str | None, int]],
    samples: int,
    sampling: SamplingConfig,
    reward_fn: Callable[[str, str], Score],
) -> tuple[list[dict], list[SampleRecord]]:
    """pass@1 averaged over `samples` per problem, for every benchmark x run; plus one record per sample."""
    results: list[dict] = []
    records: list[SampleRecord] = []
    for bench, problems in benchmarks.items():
        for label, word, n in runs:
            mode = label.split(":")[0]
            forcing = policy.forcing(mode, n, word)
            rollouts = policy.rollout(problems, forcing, sampling, samples_per_prompt=samples)
            accuracy, thinking, total = MeanMetric(), MeanMetric(), MeanMetric()
            for i, rollout in enumerate(rollouts):
                problem = problems[i // samples]
                score = reward_fn(rollout.text, problem.answer)
                accuracy.update(float(score.correct))
                thinking.update(float(rollout.thinking_tokens))
                total.update(float(rollout.total_tokens))
                records.append(
                    SampleRecord(
                        bench, problem.id, label, n, i % samples, score.extracted, score.correct, score.status,
                        rollout.thinking_tokens, rollout.total_tokens, rollout.num_forced,
                        list(rollout.continuation_starts), rollout.stop_reason,
                    )
                )
            results.append(
                {
                    "benchmark": bench,
                    "mode": label,
                    "num_continuations": n,
                    "accuracy": round(float(accuracy.compute()), 4),
                    "n": len(problems),
                    "mean_thinking_tokens": round(float(thinking.compute()), 1),
                    "mean_total_tokens": round(float(total.compute()), 1),
                }
            )
    return results, records


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, results: list[dict], records: list[SampleRecord]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    (out_dir / "results.md").write_text(markdown_table(results, RESULT_COLUMNS) + "\n")
    with open(out_dir / "samples.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(asdict(rec)) + "\n")
    return out_dir / "results.csv"
