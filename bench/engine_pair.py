"""What the engine benchmarks share: ctt's engine and the vLLM engine on one model in one process, one whole RL
step on either (rollout, `ctt.rl.completion_logprobs`, REINFORCE loss, backward, Adam step on the row, the push
of the row to vLLM), and interleaved timing reported as the median of per-round ratios. Not a test.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ctt.engine import EngineSettings, ForcingConfig, Rollout, SamplingConfig, build_engine
from ctt.rl.reinforce import completion_logprobs, reinforce_loss
from ctt.models.token import get_overlay

ENGINE_KINDS = ("hf", "vllm")


def reset_vllm_cache(engine) -> None:
    """Forget vLLM's prefix cache, so that a repeated round does not reuse the prompts of the round before (an RL
    step sees new prompts; ctt's engine keeps nothing between calls). Resubmission within one call still hits."""
    llm = getattr(engine, "llm", None)
    if llm is not None:
        llm.reset_prefix_cache()


@dataclass
class EnginePair:
    """Both engines on `model` (with the learned row installed), built as tests/test_vllm_engine.py builds them."""

    model: torch.nn.Module
    pad_token_id: int
    batch_size: int
    vllm_settings: EngineSettings = field(default_factory=lambda: EngineSettings(kind="vllm"))
    seed: int = 0

    def __post_init__(self):
        overlay = get_overlay(self.model)
        self.row = overlay.row
        self.new_ids = tuple(overlay.token_ids)
        start = time.perf_counter()
        self.engines = {
            "hf": build_engine(EngineSettings(kind="hf"), model=self.model, pad_token_id=self.pad_token_id,
                               batch_size=self.batch_size),
            "vllm": build_engine(self.vllm_settings, model=self.model, token_ids=self.new_ids,
                                 rows=lambda: overlay.row, seed=self.seed),
        }
        self.vllm_start_s = time.perf_counter() - start

    def rollout(self, kind: str, prompts, forcing: ForcingConfig, sampling: SamplingConfig) -> list[Rollout]:
        return self.engines[kind].generate(prompts, forcing, sampling)

    def push_ms(self, repeats: int = 20) -> dict:
        """The time to write the row into vLLM's table (`sync_rows(force=True)`), in ms."""
        engine = self.engines["vllm"]
        times = []
        for _ in range(repeats):
            times.append(engine.sync_rows(force=True) * 1e3)
        return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), repeats=repeats,
                    floats=int(self.row.numel()))

    def close(self) -> None:
        self.engines["vllm"].close()


def rl_step(pair: EnginePair, kind: str, prompts, forcing: ForcingConfig, sampling: SamplingConfig,
            optimizer: torch.optim.Optimizer, **loss_kw) -> dict:
    """One RL step: rollout with `kind`'s engine, log-probs with grad, REINFORCE (advantages +-1 per row: the
    rewards' cost does not depend on the engine), backward, Adam step on the row, then the push of the new row to
    vLLM (a no-op for ctt's engine, which reads the row live). Returns the seconds of each part."""
    engine = pair.engines[kind]
    t0 = time.perf_counter()
    rollouts = engine.generate(prompts, forcing, sampling)
    t1 = time.perf_counter()
    scored = completion_logprobs(pair.model, rollouts, sampling.temperature, pair.new_ids, pair.pad_token_id,
                                 top_p=sampling.top_p, **loss_kw)
    advantages = torch.tensor([(-1.0) ** i for i in range(len(rollouts))])
    loss = reinforce_loss(scored, advantages, "token_mean") + 0.0 * pair.row.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    t2 = time.perf_counter()
    pushed = engine.sync_rows()
    t3 = time.perf_counter()
    return dict(rollout_s=t1 - t0, loss_s=t2 - t1, push_s=t3 - t2, step_s=t3 - t0, push_reported_s=pushed,
                tokens=sum(len(r.completion_ids) for r in rollouts), scored=int(scored.mask.sum()),
                forced=sum(r.num_forced for r in rollouts), rollouts=rollouts)


def interleave(runs: dict[str, Callable[[], object]], repeats: int, before: Callable[[str], None] | None = None,
               on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Time each callable `repeats` times, interleaved (round r runs them in order, round r+1 in reverse, so drift
    and order effects hit each alike). `before(name)` runs untimed before each call."""
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if before is not None:
                before(name)
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(r)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of time[num] / time[den] (same process, same round)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def first_record_mismatch(ours: list[Rollout], theirs: list[Rollout]) -> str | None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a.record() != b.record():
            j = next((k for k, (x, y) in enumerate(zip(a.completion_ids, b.completion_ids)) if x != y),
                     min(len(a.completion_ids), len(b.completion_ids)))
            return (f"row {i}: first different completion index {j} (lengths {len(a.completion_ids)}/"
                    f"{len(b.completion_ids)}, forced {a.num_forced}/{b.num_forced})")
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"
