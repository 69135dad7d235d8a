"""The `eval` config group, typed: which modes and N are evaluated, how they are sampled and graded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ctt.policy.modes import Mode, expand_modes
from ctt.rewards.registry import RewardFn, reward_from_config
from ctt.data.splits import PARTS
from ctt.settings import MAX_SAMPLES, Settings, one_of, require, require_size, require_temperature


@dataclass(frozen=True)
class EvalSettings(Settings):
    """The `eval` config group (conf/eval/default.yaml documents each key)."""

    section: ClassVar[str] = "eval"

    modes: list[str] = field(default_factory=lambda: ["base", "fixed", "learned"])
    num_continuations: list[int] = field(default_factory=lambda: [0, 1, 2])
    fixed_words: list[str] = field(default_factory=lambda: ["Wait"])
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    limit: int | None = None
    reward: str | dict = "math_verify"  # a reward name, or {name: ..., <its parameters>} (ctt.rewards.registry)
    exclude_training_problems: bool = True
    split: str = "all"  # all | validation | test (ctt.data.splits)
    val_fraction: float = 0.5
    split_seed: int = 0
    also_temperature: float | None = None  # evaluate a second time at this temperature (e.g. ${rl.temperature})
    also_samples: int = 4  # ... with this many samples per problem (pass@1 over them), into <run dir>/sampled/

    def check(self) -> None:
        require_size(self.samples, "eval.samples", 1, MAX_SAMPLES)
        require_temperature(self.temperature, "eval.temperature", greedy_ok=True)
        require(0 < self.top_p <= 1, "eval.top_p", "a number in (0, 1]", self.top_p)
        if self.limit is not None:
            require(self.limit >= 1, "eval.limit", "an integer >= 1 or null", self.limit)
        reward_from_config(self.reward, "eval.reward")
        one_of("eval.split", self.split, PARTS)
        if self.also_temperature is not None:
            require_temperature(self.also_temperature, "eval.also_temperature", greedy_ok=False)
        require_size(self.also_samples, "eval.also_samples", 1, MAX_SAMPLES)
        require(0 < self.val_fraction < 1, "eval.val_fraction", "a number in (0, 1)", self.val_fraction)
        expand_modes(self.modes, self.num_continuations, self.fixed_words)  # every spec parsed, every N >= 0

    @property
    def runs(self) -> list[Mode]:
        """Every evaluation run, in order (ctt.policy.modes.expand_modes)."""
        return expand_modes(self.modes, self.num_continuations, self.fixed_words)

    @property
    def reward_fn(self) -> RewardFn:
        return reward_from_config(self.reward, "eval.reward")
