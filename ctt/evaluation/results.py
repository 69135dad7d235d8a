"""Evaluation of every mode (ctt.policy.modes: base, fixed words, no string, filler, learned) for each number of forced
continuations N: one record per sample, the results table computed from the records. The library; its command
line is `ctt-eval` (ctt/eval.py)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ctt.evaluation.comparisons import comparisons_markdown, write_comparisons
from ctt.evaluation.stats import pass_at_1_ci
from ctt.text import jsonl_rows
from ctt.outputs import atomic_open, atomic_write_text

if TYPE_CHECKING:  # annotations only: keeps `ctt.evaluation.results` light (no torch) for `ctt-report` and notebooks
    from ctt.data.problems import Problem
    from ctt.engine import SamplingConfig
    from ctt.policy.modes import Mode
    from ctt.policy.policy import Policy
    from ctt.rewards.registry import RewardFn

# The first seven columns are the original table; the rest were appended (readers may rely on the order).
# accuracy is pass@1; ci_low / ci_high its 95% interval (method in ci_method, see ctt.evaluation.stats); samples is k.
RESULT_COLUMNS = [
    "benchmark", "mode", "num_continuations", "accuracy", "n", "mean_thinking_tokens", "mean_total_tokens",
    "ci_low", "ci_high", "samples", "ci_method",
]


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
    completion: str = ""  # the completion as text, every inserted continuation wrapped in [[ ]]


def evaluate(
    policy: Policy,
    benchmarks: dict[str, list[Problem]],
    modes: list[Mode],
    samples: int,
    sampling: SamplingConfig,
    reward_fn: RewardFn,
) -> tuple[list[dict], list[SampleRecord]]:
    """pass@1 averaged over `samples` per problem, for every benchmark x run; plus one record per sample.

    The results table is computed from the records by `summarize_samples`, the same code `results_from_samples`
    runs on `samples.jsonl`, so every number in results.csv can be recomputed from that file.
    """
    records: list[SampleRecord] = []
    for bench, problems in benchmarks.items():
        for mode in modes:
            rollouts = policy.rollout(problems, policy.forcing(mode), sampling, samples_per_prompt=samples)
            for i, rollout in enumerate(rollouts):
                problem = problems[i // samples]
                score = reward_fn(rollout, problem)
                records.append(
                    SampleRecord(
                        bench, problem.id, mode.label, mode.num_continuations, i % samples, score.extracted,
                        score.correct, score.status, rollout.thinking_tokens, rollout.total_tokens, rollout.num_forced,
                        list(rollout.continuation_starts), rollout.stop_reason, rollout.text,
                    )
                )
    return summarize_samples(asdict(r) for r in records), records


def summarize_samples(records: Iterable[dict]) -> list[dict]:
    """One results row per (benchmark, mode, num_continuations), in order of first appearance.

    accuracy = pass@1 = mean over problems of (correct samples / k); samples are grouped into problems by
    `problem_id`. The token means are over all samples. ci_low / ci_high: 95% interval of pass@1 -- the Wilson
    score interval when k == 1, else a seeded percentile bootstrap over problems (2000 resamples, seed 0), with a
    Wilson fallback when every problem scores 0 or every problem 1 (see `ctt.evaluation.stats`); ci_method names which.
    """
    groups: dict[tuple[str, str, int], dict[str, list[dict]]] = {}
    for rec in records:
        key = (rec["benchmark"], rec["mode"], int(rec["num_continuations"]))
        groups.setdefault(key, {}).setdefault(str(rec["problem_id"]), []).append(rec)
    results = []
    for (bench, mode, n), problems in groups.items():
        correct = [[bool(r["correct"]) for r in recs] for recs in problems.values()]
        flat = [r for recs in problems.values() for r in recs]
        point, lo, hi, method = pass_at_1_ci(correct)
        ks = {len(c) for c in correct}
        results.append(
            {
                "benchmark": bench,
                "mode": mode,
                "num_continuations": n,
                "accuracy": round(point, 4),
                "n": len(problems),
                "mean_thinking_tokens": round(sum(float(r["thinking_tokens"]) for r in flat) / len(flat), 1),
                "mean_total_tokens": round(sum(float(r["total_tokens"]) for r in flat) / len(flat), 1),
                "ci_low": round(lo, 4),
                "ci_high": round(hi, 4),
                "samples": ks.pop() if len(ks) == 1 else round(len(flat) / len(problems), 2),
                "ci_method": method,
            }
        )
    return results


def read_samples(path: str | Path) -> list[dict]:
    return [row for _, row in jsonl_rows(path)]  # file:line on a garbled line (ctt.text)


def results_from_samples(path: str | Path) -> list[dict]:
    """Recompute the results table (the rows of results.csv) from a run's `samples.jsonl`."""
    return summarize_samples(read_samples(path))


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    out_dir: str | Path, results: list[dict], records: list[SampleRecord], notes: list[str] = (),
    comparisons: list[dict] = (),
) -> Path:
    """results.csv, comparisons.csv, results.md (the table, `notes` such as what the held-out check dropped, then
    the paired comparisons) and samples.jsonl."""
    out_dir = Path(out_dir)
    with atomic_open(out_dir / "results.csv") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    text = markdown_table(results, RESULT_COLUMNS) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if comparisons:
        write_comparisons(out_dir, list(comparisons))
        text += "\n" + comparisons_markdown(list(comparisons))
    atomic_write_text(text, out_dir / "results.md")
    with atomic_open(out_dir / "samples.jsonl") as f:
        for rec in records:
            f.write(json.dumps(asdict(rec)) + "\n")
    return out_dir / "results.csv"
