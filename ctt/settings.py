"""Typed config groups: one checker for every group, driven by type annotations.

Each config group is a frozen dataclass deriving from `Settings` (verl's pattern: `RLSettings`, `ForcingSettings`,
`EngineSettings`, `TinyOptions`, `TokenSettings`, `EvalSettings`, ...). `Settings.from_config` rejects unknown keys,
naming the valid ones; `Settings.__post_init__` checks every value against its field's annotation (int, float,
bool, str, None, unions, Literal, list/tuple/dict of those, nested Settings built from mappings) and then runs the
class's own range checks (`check`). A group whose keys are the keyword arguments of a function (`load_model`,
`load_problems`, the `token/init` strategies) is checked the same way from the function's signature
(`check_kwargs`), so a new keyword argument is a new valid key without a second list to keep in step.

Every error is ONE line naming the key, what it must be and the value (`forcing.max_new_tokens must be an integer,
got 'abc'`); `one_of` gives every "must be one of ..." message.

Why by hand and not Hydra structured configs (OmegaConf dataclass schemas): those would need every YAML group to name
its schema in a defaults list, cannot express a registry filled at import time (`rl.baseline`, `eval.modes`), ranges
(`>= 1`) or a function's keyword arguments as a schema, and fail inside Hydra's composition with multi-line
`full_key:`/`object_type=` reports and exit status 1 instead of ctt's one-line errors (exit status 2). So the
schemas stay plain dataclasses and this module checks a composed config against them.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any, ClassVar, Literal, Union

from omegaconf import DictConfig, OmegaConf

from ctt.errors import ConfigError


def one_of(key: str, value: Any, valid: Iterable[Any]) -> Any:
    """`value` when it is one of `valid`, else the ConfigError every "must be one of" message in ctt comes from."""
    valid = list(valid)
    if value not in valid:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, valid))}; got {value!r}")
    return value


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """A range check: `key must be <expected>, got <value>` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


# Sampling divides the logits by the temperature: below about 1e-38 that overflows to inf and every id, the masked
# learned token included, becomes drawable; far above 1 it is uniform noise. Outside these bounds nothing is learned.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


# Sizes a user types. Past these a command allocates or loops for hours before it does anything (eval.samples=1e9
# hung, a 1e12-wide tiny model was killed for memory); each bound is far above any run on record.
MAX_CONTINUATIONS = 1024  # N: continuations forced into one rollout
MAX_SAMPLES = 1 << 16  # rollouts drawn per problem (eval.samples, rl.samples_per_prompt)
MAX_TOKENS = 1 << 20  # a generation length (max_new_tokens, thinking_budget, ...) or a context
MAX_BATCH = 1 << 16  # rollouts generated together


def require_size(value: int, key: str, low: int, high: int) -> None:
    """An integer count in [low, high] (the bounds above): `key must be an integer from low to high, got value`."""
    require(low <= value <= high, key, f"an integer from {low} to {high}", value)


def require_temperature(value: float, key: str, greedy_ok: bool) -> None:
    """0 (greedy, where `greedy_ok`) or a sampling temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    sampling = MIN_TEMPERATURE <= value <= MAX_TEMPERATURE
    if greedy_ok:
        require(value == 0 or sampling, key, f"a number >= 0 (0: greedy), else from {MIN_TEMPERATURE} to "
                f"{MAX_TEMPERATURE:g}", value)
    else:
        require(sampling, key, f"a number > 0 from {MIN_TEMPERATURE} to {MAX_TEMPERATURE:g}", value)


def reject_unknown(key: str, given: Iterable[str], valid: Iterable[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        names = ", ".join(f"{key}.{k}" if key else str(k) for k in unknown)
        valid_text = ", ".join(sorted(valid)) or "none"
        raise ConfigError(f"unknown key(s) {names}; valid keys{' of ' + key if key else ''}: {valid_text}")


# --- values against annotations ----------------------------------------------------------------------------------


def _is_settings(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Settings)


def describe(tp: Any) -> str:
    """What a value of annotation `tp` is, in words: `an integer or null`, `a list of texts`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple) or tp in (list, tuple):
        inner = args[0] if args else Any
        return "a list" if inner is Any else f"a list of {_plural(describe(inner))}"
    if _is_settings(tp):
        return "a mapping of settings"
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a text", type(None): "null"}
    return names.get(tp, f"a {tp.__name__}" if isinstance(tp, type) else "a value")


def _plural(text: str) -> str:
    """`an integer` -> `integers`, `a text or null` -> `texts or null` (the nouns `describe` uses)."""
    nouns = {"integer": "integers", "number": "numbers", "text": "texts", "mapping": "mappings", "list": "lists"}
    return " ".join(nouns.get(w, w) for w in text.split() if w not in ("a", "an"))


def check_value(key: str, tp: Any, value: Any) -> Any:
    """`value` checked against annotation `tp` (ConfigError naming `key` if it does not fit); mappings given for a
    Settings annotation are built into it, integers given for a float become floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            if _is_settings(option) and isinstance(value, Mapping | option):
                return check_value(key, option, value)  # a nested group: its own, more precise message
            try:
                return check_value(key, option, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {describe(tp)}, got {value!r}")
    if origin is Literal:
        return one_of(key, value, args)
    if _is_settings(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return tp.from_config(value)
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, list | tuple):
            inner = args[0] if args else Any
            return type(value)(check_value(f"{key}[{i}]", inner, v) for i, v in enumerate(value))
    elif origin in (dict, Mapping) or tp in (dict, Mapping):
        if isinstance(value, Mapping):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:  # an annotation this checker does not know (a torch.dtype, a forward reference): anything goes
        return value
    raise ConfigError(f"{key} must be {describe(tp)}, got {value!r}")


def to_plain(cfg: Any) -> Any:
    """A config node as plain containers, resolved (anything else as it is): what a group is checked and kept as."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists (and empty dicts) stay single values."""
    if isinstance(node, dict) and (node or not prefix):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


# --- groups that are dataclasses ----------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(obj)


class Settings:
    """Base of the typed config groups (frozen dataclasses). `section` is the group's key in the config."""

    section: ClassVar[str] = ""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None):
        """The group from a config mapping (None: every default); unknown and missing keys are ConfigErrors."""
        key = cls.section
        cfg = to_plain(cfg)
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{key} must be a mapping of settings, got {cfg!r}")
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        reject_unknown(key, cfg, names)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.init and f.name not in cfg and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{key}.{missing[0]} is required")
        return cls(**dict(cfg))

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = check_value(self.key(f.name), hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # frozen: checked values (nested groups built) replace the given
        self.check()

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def check(self) -> None:
        """Range and consistency checks of the group (after the type checks)."""


# --- groups that are a function's keyword arguments -----------------------------------------------------------------


def check_kwargs(func: Callable, kwargs: Mapping[str, Any] | None, key: str, skip: Iterable[str] = ()) -> dict:
    """`kwargs` checked against `func`'s keyword parameters (a class: its constructor's; minus `skip`) and their
    annotations: unknown keys and missing required ones are ConfigErrors naming `key`. `**kwargs` catch-alls are not
    valid keys."""
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{key} must be a mapping of settings, got {kwargs!r}")
    if isinstance(func, type):  # a class: its constructor's arguments
        func, skip = func.__init__, {*skip, "self"}
    skip = set(skip)
    params = {
        name: p for name, p in inspect.signature(func).parameters.items()
        if name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    reject_unknown(key, kwargs, params)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"{key}.{missing[0]} is required")
    hints = _hints(func)
    return {name: check_value(f"{key}.{name}", hints.get(name, Any), value) for name, value in kwargs.items()}
