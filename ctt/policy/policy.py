"""The frozen model plus its continue-thinking token: problems in, budget-forced rollouts out.

Shared by training (mode `learned`) and evaluation (every mode of ctt.policy.modes). Renders rollouts as text and says
which text is graded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Sequence

import numpy as np

import torch

from ctt.data.problems import Problem, build_prompt_ids
from ctt.errors import ConfigError, DataError
from ctt.engine import (
    EngineSettings, ForcingConfig, Rollout, RolloutEngine, SamplingConfig, build_engine, mix_seed,
)
from ctt.engine.records import row_seeds
from ctt.models.loading import LoadedModel
from ctt.models.token import get_overlay
from ctt.policy.modes import Mode
from ctt.text import check_text
from ctt.settings import MAX_BATCH, MAX_CONTINUATIONS, MAX_TOKENS, Settings, require, require_size


@dataclass(frozen=True)
class ForcingSettings(Settings):
    """The `forcing` config group (model-independent part of ForcingConfig)."""

    section: ClassVar[str] = "forcing"

    num_continuations: int | list[int] = 2  # a list: training draws N per prompt from it (uniformly)
    thinking_budget: int | None = None
    budget_force_text: str | None = None  # null: force the end-of-thinking marker itself
    max_answer_tokens: int = 64
    max_new_tokens: int = 256
    batch_size: int = 16  # rollouts generated together (micro-batch)
    engine: EngineSettings | None = None  # which engine samples the rollouts, and how (engine=hf|vllm)

    def check(self) -> None:
        for name in ("max_answer_tokens", "max_new_tokens"):
            require_size(getattr(self, name), f"forcing.{name}", 1, MAX_TOKENS)
        require_size(self.batch_size, "forcing.batch_size", 1, MAX_BATCH)
        ns = self.num_continuations
        if isinstance(ns, int):
            require_size(ns, "forcing.num_continuations", 0, MAX_CONTINUATIONS)
        else:
            require(len(ns) >= 1 and len(set(ns)) == len(ns) and 0 <= min(ns) and max(ns) <= MAX_CONTINUATIONS,
                    "forcing.num_continuations", f"an integer from 0 to {MAX_CONTINUATIONS} or a non-empty list of "
                    "distinct ones", list(ns))
        if self.thinking_budget is not None:
            require(1 <= self.thinking_budget <= MAX_TOKENS, "forcing.thinking_budget",
                    f"an integer from 1 to {MAX_TOKENS} or null", self.thinking_budget)

    @property
    def choices(self) -> tuple[int, ...]:
        """The N training draws from (one value for an integer `num_continuations`)."""
        ns = self.num_continuations
        return (ns,) if isinstance(ns, int) else tuple(ns)

    @property
    def engine_config(self) -> EngineSettings:
        return self.engine or EngineSettings()


def draw_continuations(choices: Sequence[int], count: int, seed: int | None) -> list[int]:
    """N for each of `count` prompts, uniformly from `choices`, from the step's sampling seed (a stream of its own:
    the seed of (seed, step, micro-batch, rank), so a resumed run draws the same N). One choice: always it."""
    if len(choices) == 1:
        return [int(choices[0])] * count
    rng = np.random.default_rng(mix_seed(0 if seed is None else seed, 0x4E))
    return [int(choices[i]) for i in rng.integers(0, len(choices), size=count)]


class Policy:
    def __init__(
        self, loaded: LoadedModel, forcing: ForcingSettings, instruction: str, system_prompt: str | None = None,
        token_ids: tuple[int, ...] | None = None, seed: int = 0, cache_dir: str | None = None,
    ):
        """`token_ids`: the learned tokens' ids when they are real rows of the model (a folder written by
        ctt-export); by default the ids of the installed overlay (ctt.models.token). k learned tokens are inserted
        together, in order, in place of the marker."""
        self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, loaded.name
        self.base_fingerprint = loaded.fingerprint  # what its token files and checkpoints record
        self.marker = tuple(loaded.end_of_thinking_ids)
        self.settings = forcing
        self.instruction, self.system_prompt = instruction, system_prompt
        self.token_ids = tuple(get_overlay(self.model).token_ids if token_ids is None else token_ids)
        self._learned_rows = (lambda: get_overlay(self.model).row) if token_ids is None else None
        self._engine: RolloutEngine | None = None
        self._engine_parts = {"seed": seed, "cache_dir": cache_dir}
        eos = self.tokenizer.eos_token_id
        self.eos_ids = tuple(eos if isinstance(eos, list) else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self._prompt_cache: dict[str, list[int]] = {}  # keyed by question text: ids collide across benchmarks
        self.token_texts = self.tokenizer.convert_ids_to_tokens(list(self.token_ids))
        self.token_text = "".join(self.token_texts)
        for key, text in (("prompt.instruction", instruction), ("prompt.system_prompt", system_prompt)):
            if text and any(t in text for t in self.token_texts):
                raise ConfigError(f"{key} contains the token text {self.token_text!r}: every prompt would hold the "
                                  "learned token")
        template = build_prompt_ids(self.tokenizer, "", instruction, system_prompt)  # a prompt around no question
        if set(self.token_ids).intersection(template):
            raise ConfigError(f"the chat template contains the token text {self.token_text!r}: every prompt would "
                              "hold the learned token; choose another token.text")
        self._template_tokens = len(template)
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        # A prompt may take what the completion (forcing.max_new_tokens) leaves of the model's context.
        self.max_prompt_tokens = None if self.context is None else self.context - forcing.max_new_tokens
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"forcing.max_new_tokens={forcing.max_new_tokens} leaves no room for a prompt in the "
                              f"model's context of {self.context} tokens")

    @property
    def row(self) -> torch.nn.Parameter:
        return get_overlay(self.model).row

    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine of `forcing.engine` (built at first use: a vLLM instance takes seconds to start)."""
        if self._engine is None:
            self._engine = build_engine(
                self.settings.engine_config, model=self.model, pad_token_id=self.pad_id,
                batch_size=self.settings.batch_size, token_ids=self.token_ids, rows=self._learned_rows,
                **self._engine_parts,
            )
        return self._engine

    def prompt_ids(self, problem: Problem) -> list[int]:
        if problem.question not in self._prompt_cache:
            self._check_question(problem)
            ids = build_prompt_ids(self.tokenizer, problem.question, self.instruction, self.system_prompt)
            if set(self.token_ids).intersection(ids):
                # The row would then shape tokens before the first continuation, which are never scored.
                raise DataError(f"problem {problem.id}: the prompt contains the learned token itself")
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                raise DataError(
                    f"problem {problem.id}: its prompt is {len(ids)} tokens, more than the "
                    f"{self.max_prompt_tokens} the model's context of {self.context} leaves beside "
                    f"forcing.max_new_tokens={self.settings.max_new_tokens}"
                )
            self._prompt_cache[problem.question] = ids
        return self._prompt_cache[problem.question]

    def _check_question(self, problem: Problem) -> None:
        check_text(problem.question, f"problem {problem.id}")  # a lone surrogate can be neither tokenised nor written
        if self.token_text in problem.question:
            raise DataError(f"problem {problem.id}: the question contains the token text {self.token_text!r} "
                            "(it would become the learned token); choose another token.text")

    def check_problems(self, problems: list[Problem]) -> None:
        """Before training or evaluating: no question holds the token text and every prompt fits the context
        (DataError naming the problem). Tokenises only prompts whose UTF-8 length could exceed the limit."""
        for problem in problems:
            self._check_question(problem)
            # A token covers at least one byte (byte-level BPE, byte fallback), plus a little merging slack.
            bound = len(problem.question.encode()) + self._template_tokens + 8
            if self.max_prompt_tokens is not None and bound > self.max_prompt_tokens:
                self.prompt_ids(problem)

    def encode_text(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def forcing(self, mode: Mode) -> ForcingConfig:
        s = self.settings
        return ForcingConfig(
            end_of_thinking_ids=self.marker,
            eos_token_ids=self.eos_ids,
            # The base model is never forced: N is a property of forcing modes only.
            num_continuations=mode.num_continuations if mode.spec.forced else 0,
            continuation_ids=mode.continuation(self.encode_text, self.token_ids),
            thinking_budget=s.thinking_budget,
            budget_force_ids=self.encode_text(s.budget_force_text) if s.budget_force_text else None,
            max_answer_tokens=s.max_answer_tokens,
            max_new_tokens=s.max_new_tokens,
            banned_ids=self.token_ids,
        )

    def rollout_per_n(
        self, problems: list[Problem], ns: Sequence[int], sampling: SamplingConfig, samples_per_prompt: int = 1,
        kind: str = "learned",
    ) -> list[Rollout]:
        """Like `rollout` for mode `kind`, with problem i forced up to ns[i] times (its k samples share it): one
        generation per distinct N (seeded by (seed, N) when there are several), the groups put back in problem
        order. Every N the same: exactly `rollout` at that N."""
        if len(set(ns)) == 1:
            return self.rollout(problems, self.forcing(Mode(kind, None, ns[0])), sampling, samples_per_prompt)
        k, groups = samples_per_prompt, [[] for _ in problems]
        for n in sorted(set(ns)):
            idx = [i for i, m in enumerate(ns) if m == n]
            sub = sampling if sampling.seed is None else replace(sampling, seed=mix_seed(sampling.seed, n))
            got = self.rollout([problems[i] for i in idx], self.forcing(Mode(kind, None, n)), sub, k)
            for j, i in enumerate(idx):
                groups[i] = got[j * k:(j + 1) * k]
        return [r for group in groups for r in group]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def rollout(
        self,
        problems: list[Problem],
        forcing: ForcingConfig,
        sampling: SamplingConfig,
        samples_per_prompt: int = 1,
        on_token: Callable[[int, Rollout], None] | None = None,
    ) -> list[Rollout]:
        """`samples_per_prompt` rollouts per problem, grouped: [p0 s0, p0 s1, ..., p1 s0, ...]; text filled in.
        `on_token(i, rollout)`: called each time rollout i took a token (ctt.engine.base)."""
        prompts = [self.prompt_ids(p) for p in problems for _ in range(samples_per_prompt)]
        # Row i's draws come from (seed, i) alone: the engine, its batch size and finished rows change nothing.
        out = self.engine.generate(prompts, forcing, sampling, seeds=row_seeds(sampling.seed, len(prompts)),
                                   on_token=on_token)
        width = len(forcing.continuation_ids)
        for r in out:
            r.text = self.render(r, width)
            r.answer_text = self.answer_text(r, forcing)
        return out

    def _segments(self, rollout: Rollout, width: int) -> list[tuple[list[int], bool]]:
        """The completion cut at the inserted continuations: (ids, is a continuation) pieces, in order. (Starts are
        sorted: with "no string" and a multi-token marker, a marker can be completed across an earlier removal.)"""
        ids, pieces, last = rollout.completion_ids, [], 0
        for start in sorted(set(rollout.continuation_starts)):
            pieces += [(ids[last:start], False), (ids[start : start + width], True)]
            last = start + width
        return pieces + [(ids[last:], False)]

    def render(self, rollout: Rollout, width: int, open_mark: str = "[[", close_mark: str = "]]") -> str:
        """The completion as text, special tokens kept, every inserted continuation wrapped in marks."""
        return "".join(
            open_mark + self.decode(seg) + close_mark if inserted else self.decode(seg)
            for seg, inserted in self._segments(rollout, width)
        )

    def answer_text(self, rollout: Rollout, forcing: ForcingConfig) -> str:
        """What a reader grades. With a real end-of-thinking marker (`</think>`): the text after the kept one (empty
        when thinking never ended). When the marker is end-of-sequence, the whole completion, with a line break at
        every inserted continuation, so an answer followed by a continuation ("... is 9." + "Wait") is not read as
        "9.Wait"; special tokens (the learned token) are dropped. "No string" inserts nothing: no boundary there."""
        width = len(forcing.continuation_ids)
        if not forcing.marker_is_eos:
            if rollout.answer_start is None:
                return ""
            return self.tokenizer.decode(rollout.completion_ids[rollout.answer_start :], skip_special_tokens=True)
        if not width:
            return self.tokenizer.decode(rollout.completion_ids, skip_special_tokens=True)
        return "\n".join(
            self.tokenizer.decode(seg, skip_special_tokens=True) for seg, _ in self._segments(rollout, width)
        )
