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

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from omegaconf import DictConfig, OmegaConf, open_dict

from ctt.config.hydra_glue import CONFIG_DIR, to_plain
from ctt.data.sources import DEFAULT_INSTRUCTION, Problem
from ctt.errors import ConfigError
from ctt.generation import Rollout, SamplingConfig
from ctt.models.loading import load_model
from ctt.policy.modes import KINDS, Mode, parse_mode
from ctt.policy.policy import ForcingSettings, Policy
from ctt.data.answers import extract_answer
from ctt.settings import one_of
from ctt.models.token import check_token_fits, install_token, load_token_file, token_count, token_texts

log = logging.getLogger(__name__)

EXPORT_INFO = "ctt_export.json"  # written by ctt.export


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


def _export_info(model_cfg: dict) -> dict:
    """The ctt_export.json of a local folder written by ctt-export ({} for any other model)."""
    info = Path(str(model_cfg.get("path") or "")) / EXPORT_INFO
    return json.loads(info.read_text()) if model_cfg.get("source") == "local" and info.is_file() else {}


def _model_config(model_cfg: dict, exported: dict) -> dict:
    """A folder written by ctt-export records its end-of-thinking marker: `end_of_thinking: null` reads it there."""
    if model_cfg.get("end_of_thinking") is None:
        if "end_of_thinking" not in exported:
            raise ConfigError("model.end_of_thinking is not set (and model.path has no ctt_export.json to read)")
        model_cfg = {**model_cfg, "end_of_thinking": exported["end_of_thinking"]}
    return model_cfg


def policy_from_config(cfg: DictConfig) -> tuple[Policy, dict | None]:
    """The model with its token, from the model/token/forcing/prompt config groups, and the token's metadata:
    a base model gets ctt's overlay (the row from `token.path`, else the untrained initialisation; metadata None
    without a file); a model whose tokenizer already holds the token (a ctt-export folder) is used as it is."""
    exported = _export_info(to_plain(cfg.model))
    model_cfg = _model_config(to_plain(cfg.model), exported)
    loaded = load_model(**model_cfg)
    text, token_ids, meta = cfg.token.text, None, None
    # an exported folder says how many tokens it holds
    texts = exported.get("tokens") or token_texts(text, cfg.token.get("count", 1))
    if texts[0] in loaded.tokenizer.get_vocab():
        if cfg.token.get("path"):
            raise ConfigError(f"model {cfg.model.name} already holds the token {text!r} (an exported folder?); "
                              "drop token.path")
        token_ids = tuple(loaded.tokenizer.convert_tokens_to_ids(texts))
        # the token file's metadata (training data for ctt-eval's held-out check, step, init), as with a token file
        meta = {**(exported.get("token_metadata") or {}), "exported_from": str(Path(model_cfg.get("path") or "."))}
    else:
        embedding = None
        if cfg.token.get("path"):  # a file of k rows installs k tokens, whatever token.count says
            base = None if cfg.token.get("allow_base_mismatch") else cfg.model.name
            embedding, meta = load_token_file(cfg.token.path, None, base)
        count = len(texts) if embedding is None else token_count(embedding)
        overlay = install_token(loaded.model, loaded.tokenizer, to_plain(cfg.token.init), text, count)
        if embedding is not None:
            check_token_fits(embedding, cfg.token.path, overlay.row.shape[-1])
            overlay.row.data.copy_(embedding)
            log.info("loaded token %s (step %s) from %s", meta.get("token"), meta.get("step"), cfg.token.path)
    forcing = ForcingSettings(**to_plain(cfg.forcing))
    prompt = to_plain(cfg.prompt)
    instruction = prompt.get("instruction")
    policy = Policy(loaded, forcing, instruction or DEFAULT_INSTRUCTION,
                    prompt.get("system_prompt"), token_ids=token_ids)
    return policy, meta


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

    def generate(self, prompts: list[str], mode: str = "learned", num_continuations: int = 2,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0) -> list[Completion]:
        """Answer every prompt (batched by `forcing.batch_size`); greedy by default."""
        m = self.mode(mode, num_continuations)
        problems = [Problem(str(i), p, "") for i, p in enumerate(prompts)]
        rollouts = self.policy.rollout(problems, self.policy.forcing(m), SamplingConfig(temperature, top_p, seed))
        return [self._completion(p, r, m) for p, r in zip(prompts, rollouts)]

    def stream(self, prompt: str, write: Callable[[str], object], mode: str = "learned", num_continuations: int = 2,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0) -> Completion:
        """Answer one prompt, writing its text (continuations marked) as it is generated."""
        from ctt.streaming import RolloutStreamer

        m = self.mode(mode, num_continuations)
        forcing = self.policy.forcing(m)
        streamer = RolloutStreamer(self.policy.tokenizer, forcing, write, self.marks)
        (rollout,) = self.policy.rollout([Problem("0", prompt, "")], forcing, SamplingConfig(temperature, top_p, seed),
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
