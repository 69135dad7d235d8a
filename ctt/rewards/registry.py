"""Rewards as registered, typed groups: `rl.reward` and `eval.reward` name one (`math_verify`) or give it with its
parameters (`{name: math_verify, timeout_s: 10}`), as `token.init` does for its strategies.

A reward is a frozen `Settings` dataclass whose fields are its parameters and whose call grades a rollout against its
problem. Adding a reward is one class and one entry in `REWARDS` (a new file under ctt/rewards/ when it is long).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ctt.errors import ConfigError
from ctt.rewards.grading import Score, score_completion
from ctt.settings import Settings, one_of

if TYPE_CHECKING:
    from ctt.data.problems import Problem
    from ctt.engine.records import Rollout

# A reward sees the whole rollout (lengths, forced continuations, the graded text) and the problem.
RewardFn = Callable[["Rollout", "Problem"], Score]


@dataclass(frozen=True)
class MathVerify(Settings):
    """1.0 when the rollout's graded text (`Rollout.answer_text`: what follows the end of thinking) is correct."""

    section: ClassVar[str] = "reward"

    timeout_s: float | None = 5.0  # per math_verify parse / comparison step; null: none (thread-safe, unbounded)

    def __call__(self, rollout: "Rollout", problem: "Problem") -> Score:
        return score_completion(rollout.answer_text, problem.answer, timeout_s=self.timeout_s)


REWARDS: dict[str, type[Settings]] = {"math_verify": MathVerify}


def reward_from_config(spec: str | Mapping[str, Any] | None, key: str = "reward") -> RewardFn:
    """The reward a config names: a registered name, or a mapping of `name` plus that reward's parameters."""
    if isinstance(spec, str):
        return REWARDS[one_of(key, spec, REWARDS)].from_config({})
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key} must be a reward name or a mapping with its name, got {spec!r}")
    params = dict(spec)
    return REWARDS[one_of(f"{key}.name", params.pop("name", None), REWARDS)].from_config(params)
