"""The rollout-engine interface: token-id prompts in, budget-forced `Rollout`s out.

Two engines implement it (`ENGINES`): ctt's own on transformers' forward (`hf`, ctt.engine.hf) and vLLM
(`vllm`, ctt.engine.vllm). Both run the same per-row state machine (ctt.engine.forcing) and the same sampling
rules (temperature, top-p, banned ids, a seed per row), so they return the same records: token for token when
greedy, the same distribution when sampled (tests/test_vllm_engine.py). The loss pass and everything after it read
`Rollout`s and never know which engine ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

from ctt.engine.records import ForcingConfig, Rollout, SamplingConfig
from ctt.engine.settings import EngineSettings

OnToken = Callable[[int, Rollout], None]


class RolloutEngine(ABC):
    kind: ClassVar[str]

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.last_sync_seconds: float | None = None  # the time the last push of the learned rows took

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], forcing: ForcingConfig, sampling: SamplingConfig,
        seeds: list[int] | None = None, on_token: OnToken | None = None,
    ) -> list[Rollout]:
        """One rollout per prompt, in prompt order. `seeds`: one per prompt (None: `row_seeds(sampling.seed, n)`);
        a row's draws depend on its own seed alone. `on_token(i, rollout)`: called when rollout i took a token."""

    def sync_rows(self) -> float | None:
        """Push the learned rows to where generation reads them (after an optimizer step); the seconds it took,
        or None when the engine reads the trainer's row directly (nothing to push)."""
        return None

    def release_memory(self) -> None:
        """Free what generation holds while the loss pass runs (vLLM's sleep); no-op by default."""

    def close(self) -> None:
        """Free the engine (vLLM's instance and its memory)."""


ENGINES: dict[str, type[RolloutEngine]] = {}


def register_engine(cls: type[RolloutEngine]) -> type[RolloutEngine]:
    ENGINES[cls.kind] = cls
    return cls
