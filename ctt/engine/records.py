"""What a rollout engine is given and what it returns: the forcing rules (`ForcingConfig`), the sampling settings
(`SamplingConfig`), and one budget-forced completion (`Rollout`). Every engine (ctt.engine.ENGINES) reads and
writes exactly these, so the loss pass, the estimator and everything downstream never know which engine ran."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ForcingConfig:
    end_of_thinking_ids: tuple[int, ...]  # the marker, one or several token ids
    eos_token_ids: tuple[int, ...]
    num_continuations: int = 0  # N: how many times the marker is replaced
    continuation_ids: tuple[int, ...] = ()  # what replaces it: (new_id,), ids of "Wait", or () to just drop it
    thinking_budget: int | None = None  # force the end of thinking after this many thinking tokens
    budget_force_ids: tuple[int, ...] | None = None  # what is forced then (default: the marker)
    max_answer_tokens: int = 256  # tokens allowed after thinking ends
    max_new_tokens: int = 512
    banned_ids: tuple[int, ...] = ()  # never sampled (the new token: the model must not emit it itself)

    def __post_init__(self):
        if not self.end_of_thinking_ids:
            raise ValueError("end_of_thinking_ids must not be empty")
        if self.num_continuations < 0:
            raise ValueError(f"num_continuations must be >= 0, got {self.num_continuations}")

    @property
    def marker_is_eos(self) -> bool:
        return marker_is_eos(self.end_of_thinking_ids, self.eos_token_ids)


def marker_is_eos(marker: tuple[int, ...], eos_ids: tuple[int, ...]) -> bool:
    """Whether the end of thinking is the end of sequence (SmolLM2: no `</think>`; thinking ends with the text)."""
    return len(marker) == 1 and marker[0] in eos_ids


def mix_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (run seed, step, rank, chunk...), without the collisions of adding
    them (rank r + chunk offset b == rank r + b + chunk offset 0)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def row_seeds(seed: int | None, count: int) -> list[int] | None:
    """The seed of each of `count` rows of one rollout call: row i's draws depend on (seed, i) alone, so the batch
    size, finished rows leaving the batch, prefix sharing and the engine that runs it change none of them."""
    return None if seed is None else [mix_seed(seed, i) for i in range(count)]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # the call's seed; each row draws from its own stream (row_seeds)


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)  # what was fed after the prompt, markers replaced
    sampled: list[bool] = field(default_factory=list)  # per completion token: sampled by the model (not forced)
    continuation_starts: list[int] = field(default_factory=list)  # completion index of each inserted continuation
    # The sampled marker ids each continuation replaced (parallel to continuation_starts; they were sampled, then
    # removed: the marker stood at continuation_starts[i], its first k-1 tokens were fed, then masked out).
    replaced_markers: list[tuple[int, ...]] = field(default_factory=list)
    answer_start: int | None = None  # completion index where the answer begins (after the kept end of thinking)
    thinking_tokens: int = 0
    answer_tokens: int = 0
    stop_reason: str = ""  # eos | answer_limit | max_new_tokens | thinking_budget
    text: str = ""  # the completion as text, each inserted continuation marked (filled by ctt.policy)
    answer_text: str = ""  # what is graded (filled by ctt.policy)

    @property
    def num_forced(self) -> int:
        return len(self.continuation_starts)

    @property
    def total_tokens(self) -> int:
        return len(self.completion_ids)

    def record(self) -> tuple:
        """Everything an engine decides, as one comparable value (two engines must agree on it exactly)."""
        return (tuple(self.prompt_ids), tuple(self.completion_ids), tuple(self.sampled),
                tuple(self.continuation_starts), tuple(self.replaced_markers), self.answer_start,
                self.thinking_tokens, self.answer_tokens, self.stop_reason)
