"""Python API: a frozen model with its continue-thinking token, answering prompts with budget forcing.

    from ctt import ContinueThinking
    ct = ContinueThinking.from_token_file("smollm2_135m", "<run dir>/continue_thinking_token.safetensors")
    ct.generate(["What is 2+3?"], mode="learned", num_continuations=2)   # [Completion(completion=..., answer="5", ...)]

`ContinueThinking.from_exported(DIR)` loads a folder written by `ctt-export` instead. `model` is a config name of
conf/model (`smollm2_135m`, `tiny_random`, ...), a model config dict (the keys of conf/model/*.yaml), or a local Hugging
Face folder. `overrides` are Hydra overrides of the `generate` entry config (`forcing.max_new_tokens=512`,
`prompt.instruction=...`). `ctt-generate` is built on this class.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from ctt.config.hydra_glue import CONFIG_DIR
from ctt.data.answers import extract_answer
from ctt.data.problems import Problem
from ctt.errors import ConfigError
from ctt.engine import Rollout, SamplingConfig
from ctt.policy.build import policy_from_config
from ctt.policy.modes import KINDS, Mode, parse_mode
from ctt.policy.policy import Policy
from ctt.settings import one_of

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """One answered prompt (one line of ctt-generate's JSONL output)."""

    prompt: str
    completion: str  # the completion as text, special tokens kept, each inserted continuation wrapped in [[ ]]
    answer_text: str  # what a reader grades: the text after the end of thinking
    answer: str | None  # extracted from answer_text (last \boxed{}, "####", "answer is", last number)
    mode: str
    num_continuations: int  # N asked for
    forced: int  # continuations actually inserted
    thinking_tokens: int
    answer_tokens: int
    total_tokens: int
    stop_reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def compose_config(model: str | dict | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """The `generate` entry config with `model` (a conf/model name, a config dict or a local folder) and overrides."""
    from hydra import compose, initialize_config_dir

    model = str(model) if isinstance(model, Path) else model
    options = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
    folder = isinstance(model, str) and Path(model).expanduser().is_dir()
    if isinstance(model, str) and not folder and model not in options:
        one_of("model (not a local folder, so a conf/model name)", model, options)
    group = "exported" if folder else model if isinstance(model, str) else None
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="ctt_api"):
        cfg = compose("generate", overrides=([f"model={group}"] if group else []) + list(overrides))
    with open_dict(cfg):
        if folder:
            cfg.model.path = str(Path(model).expanduser().resolve())
        elif isinstance(model, dict):
            cfg.model = OmegaConf.create({"cache_dir": cfg.paths.cache_dir, **model})
    return cfg


class ContinueThinking:
    """A `Policy` (model, tokenizer, marker, token) plus how ctt-generate answers prompts with it."""

    def __init__(self, policy: Policy, meta: dict | None = None, marks: tuple[str, str] = ("[[", "]]")):
        self.policy, self.meta, self.marks = policy, meta, tuple(marks)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "ContinueThinking":
        policy, meta = policy_from_config(cfg)
        marks = tuple(cfg.generate.marks) if cfg.get("generate") and cfg.generate.get("marks") else ("[[", "]]")
        return cls(policy, meta, marks)

    @classmethod
    def from_token_file(cls, model: str | dict, token: str | None = None, overrides: Iterable[str] = ()):
        """A base model (conf/model name, config dict or local folder) with the token file `token` (None: the
        untrained initialisation)."""
        cfg = compose_config(model, overrides)
        with open_dict(cfg):
            cfg.token.path = str(token) if token is not None else None
        return cls.from_config(cfg)

    @classmethod
    def from_exported(cls, path: str, overrides: Iterable[str] = ()):
        """A folder written by `ctt-export` (format hf)."""
        if not Path(path).expanduser().is_dir():
            raise ConfigError(f"no exported folder at {path}")
        return cls.from_config(compose_config(str(path), overrides))

    def mode(self, mode: str = "learned", num_continuations: int = 2, key: str = "mode") -> Mode:
        kind, arg = parse_mode(mode, key)
        if KINDS[kind].takes_arg and arg is None:
            raise ConfigError(f"mode {mode!r} needs its argument, e.g. 'fixed:Wait'")
        if not isinstance(num_continuations, int) or isinstance(num_continuations, bool) or num_continuations < 0:
            raise ConfigError(f"num_continuations must be an integer >= 0, got {num_continuations!r}")
        return Mode(kind, arg, num_continuations if KINDS[kind].forced else 0)  # the base model is never forced

    def check(self, prompts: Sequence[tuple[str, str]]) -> None:
        """Refuse any of the (name, prompt) pairs that cannot be answered (too long for the context, the token text
        in it, not valid Unicode) with a DataError naming it, before anything is generated."""
        self.policy.check_problems([Problem(name, p, "") for name, p in prompts])

    def generate(self, prompts: list[str], mode: str = "learned", num_continuations: int = 2,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0) -> list[Completion]:
        """Answer every prompt (batched by `forcing.batch_size`); greedy by default."""
        m = self.mode(mode, num_continuations)
        problems = [Problem(f"prompt {i + 1}", p, "") for i, p in enumerate(prompts)]
        self.policy.check_problems(problems)  # all of them before the first is generated
        rollouts = self.policy.rollout(problems, self.policy.forcing(m), SamplingConfig(temperature, top_p, seed))
        return [self._completion(p, r, m) for p, r in zip(prompts, rollouts)]

    def stream(self, prompt: str, write: Callable[[str], object], mode: str = "learned", num_continuations: int = 2,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0) -> Completion:
        """Answer one prompt, writing its text (continuations marked) as it is generated."""
        from ctt.engine.streaming import RolloutStreamer

        m = self.mode(mode, num_continuations)
        forcing = self.policy.forcing(m)
        streamer = RolloutStreamer(self.policy.tokenizer, forcing, write, self.marks)
        self.policy.check_problems([Problem("prompt", prompt, "")])
        (rollout,) = self.policy.rollout([Problem("prompt", prompt, "")], forcing, SamplingConfig(temperature, top_p, seed),
                                         on_token=streamer)
        streamer.finish(rollout)
        return self._completion(prompt, rollout, m)

    def _completion(self, prompt: str, r: Rollout, m: Mode) -> Completion:
        width = len(self.policy.forcing(m).continuation_ids)
        return Completion(
            prompt=prompt, completion=self.policy.render(r, width, *self.marks), answer_text=r.answer_text,
            answer=extract_answer(r.answer_text), mode=m.label, num_continuations=m.num_continuations,
            forced=r.num_forced, thinking_tokens=r.thinking_tokens, answer_tokens=r.answer_tokens,
            total_tokens=r.total_tokens, stop_reason=r.stop_reason,
        )
