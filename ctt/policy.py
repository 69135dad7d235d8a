"""The frozen model plus its continue-thinking token: problems in, budget-forced rollouts out.

Shared by training (mode `learned`) and evaluation (modes `base`, `fixed`, `learned`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctt.data import Problem, build_prompt_ids
from ctt.errors import ConfigError
from ctt.generation import EngineConfig, ForcingConfig, Rollout, SamplingConfig, generate_forced
from ctt.models import LoadedModel
from ctt.token import get_overlay

MODES = ("base", "fixed", "learned")


@dataclass(frozen=True)
class ForcingSettings:
    """The `forcing` config group (model-independent part of ForcingConfig)."""

    num_continuations: int = 2
    thinking_budget: int | None = None
    budget_force_text: str | None = None  # null: force the end-of-thinking marker itself
    max_answer_tokens: int = 64
    max_new_tokens: int = 256
    batch_size: int = 16  # rollouts generated together (micro-batch)
    engine: dict | None = None  # EngineConfig fields: cache, compile, drop_finished, share_prefix

    def __post_init__(self):
        for name in ("num_continuations", "max_answer_tokens", "max_new_tokens", "batch_size", "thinking_budget"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)) and not (
                value is None and name == "thinking_budget"
            ):
                raise ConfigError(f"forcing.{name} must be an integer, got {value!r}")
        if self.budget_force_text is not None and not isinstance(self.budget_force_text, str):
            raise ConfigError(f"forcing.budget_force_text must be a text or null, got {self.budget_force_text!r}")
        for name in ("max_answer_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"forcing.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_continuations < 0:
            raise ConfigError(f"forcing.num_continuations must be >= 0, got {self.num_continuations}")
        if self.thinking_budget is not None and self.thinking_budget < 1:
            raise ConfigError(f"forcing.thinking_budget must be >= 1 or null, got {self.thinking_budget}")
        self.engine_config  # noqa: B018 - validates forcing.engine now, not at the first rollout

    @property
    def engine_config(self) -> EngineConfig:
        try:
            return EngineConfig(**(self.engine or {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"forcing.engine: {err}") from None


class Policy:
    def __init__(self, loaded: LoadedModel, forcing: ForcingSettings, instruction: str, system_prompt: str | None = None):
        self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, loaded.name
        self.marker = tuple(loaded.end_of_thinking_ids)
        self.settings = forcing
        self.instruction, self.system_prompt = instruction, system_prompt
        self.token_id = get_overlay(self.model).token_id
        eos = self.tokenizer.eos_token_id
        self.eos_ids = tuple(eos if isinstance(eos, list) else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self._prompt_cache: dict[str, list[int]] = {}

    @property
    def row(self) -> torch.nn.Parameter:
        return get_overlay(self.model).row

    def prompt_ids(self, problem: Problem) -> list[int]:
        if problem.id not in self._prompt_cache:
            self._prompt_cache[problem.id] = build_prompt_ids(
                self.tokenizer, problem.question, self.instruction, self.system_prompt
            )
        return self._prompt_cache[problem.id]

    def encode_text(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def forcing(self, mode: str, num_continuations: int, word: str | None = None) -> ForcingConfig:
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not one of {MODES}")
        if mode == "fixed" and not word:
            raise ConfigError("mode 'fixed' needs a word (eval.fixed_words)")
        continuation = {"base": (), "fixed": self.encode_text(word or ""), "learned": (self.token_id,)}[mode]
        s = self.settings
        return ForcingConfig(
            end_of_thinking_ids=self.marker,
            eos_token_ids=self.eos_ids,
            # The base model is never forced: N is a property of forcing modes only.
            num_continuations=0 if mode == "base" else num_continuations,
            continuation_ids=continuation,
            thinking_budget=s.thinking_budget,
            budget_force_ids=self.encode_text(s.budget_force_text) if s.budget_force_text else None,
            max_answer_tokens=s.max_answer_tokens,
            max_new_tokens=s.max_new_tokens,
            banned_ids=(self.token_id,),
        )

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def rollout(
        self,
        problems: list[Problem],
        forcing: ForcingConfig,
        sampling: SamplingConfig,
        samples_per_prompt: int = 1,
    ) -> list[Rollout]:
        """`samples_per_prompt` rollouts per problem, grouped: [p0 s0, p0 s1, ..., p1 s0, ...]."""
        prompts = [self.prompt_ids(p) for p in problems for _ in range(samples_per_prompt)]
        out: list[Rollout] = []
        size = self.settings.batch_size
        for start in range(0, len(prompts), size):
            seed = None if sampling.seed is None else sampling.seed + start
            chunk_sampling = SamplingConfig(sampling.temperature, sampling.top_p, seed)
            out += generate_forced(
                self.model, prompts[start : start + size], forcing, chunk_sampling, self.pad_id, self.answer_text,
                engine=self.settings.engine_config,
            )
        return out

    def answer_text(self, ids: list[int]) -> str:
        """The completion as text for grading: special tokens (the learned token, markers) dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)
