"""The whole composed config checked at start-up, before any model or data is loaded.

Every group is typed (ctt.settings): `rl` (RLSettings), `forcing` with `forcing.engine` (ForcingSettings,
EngineSettings), `model` (the keyword arguments of `load_model`, `model.tiny` as TinyOptions), `token` with `token.init`
(TokenSettings), `prompt`, `eval` (EvalSettings, modes parsed and expanded), `distributed`, the data module's keyword
arguments with its `train` problem set, and every `benchmarks` entry (the keyword arguments of
`load_problems`); the top-level `seed` (in Lightning's range), `ckpt_path`, `evaluate`, `resume_mismatch`, and every
`trainer` key against the annotations of Lightning's Trainer. An
unknown key or a wrong type anywhere is one ConfigError line naming it, at start-up instead of mid-run.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from ctt.errors import ConfigError
from ctt.settings import check_kwargs, check_value, one_of, reject_unknown, require, to_plain


# Top-level keys of conf/train.yaml and conf/eval.yaml (the groups are checked by their own settings).
TOP_LEVEL: dict[str, Any] = {
    "seed": int, "task_name": str, "ckpt_path": str | None, "evaluate": bool,
    "resume_mismatch": Literal["refuse", "allow"],
}

DATA_MODULE = "ctt.data.datamodule.ProblemDataModule"
CHECKED_PACKAGES = ("ctt.", "callbacks.", "torch.optim.")  # classes whose constructors' annotations are checked
HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_")


def _entries(node: Any) -> dict:
    """A dict-of-configs group as plain dicts; unresolved when it needs Hydra's runtime (a config composed in a
    test): `${paths.output_dir}` stays a text, which is what those keys hold."""
    if not isinstance(node, DictConfig):
        return {}
    try:
        return to_plain(node)
    except Exception:
        return OmegaConf.to_container(node, resolve=False)


def check_problem_set(spec: Any, key: str, benchmark: bool = False) -> dict:
    """One `load_problems` keyword set (`data.train`, a `benchmarks` entry): a complete entry of known keys. A
    benchmark entry may also hold `validation`, a problem set of its own (ctt.data.splits)."""
    from ctt.data.sources import MAX_GENERATED, SOURCES, load_problems
    from ctt.data.answers import check_answer_format

    if not isinstance(spec, dict):
        raise ConfigError(f"{key} must be a mapping of load_problems settings, got {spec!r}")
    if benchmark and "validation" in spec:
        spec = dict(spec)
        validation = spec.pop("validation")
        if validation is not None:
            check_problem_set(validation, f"{key}.validation")
    if "source" not in spec:
        given = ", ".join(spec) or "nothing"
        raise ConfigError(
            f"{key} has no source (it sets only {given}): a config sets keys of a problem set that is not selected, "
            "or the entry is incomplete"
        )
    checked = check_kwargs(load_problems, spec, key)
    one_of(f"{key}.source", checked["source"], SOURCES)
    require(1 <= checked.get("size", 1) <= MAX_GENERATED, f"{key}.size", f"an integer in [1, {MAX_GENERATED}]",
            checked.get("size"))
    check_answer_format(checked.get("answer_format", "plain"), f"{key}.answer_format")
    return checked


def _check_data(data: Any) -> None:
    if not isinstance(data, dict) or data.get("_target_") != DATA_MODULE:
        return  # another data module: its own constructor checks its arguments
    from ctt.data.datamodule import ProblemDataModule

    kwargs = {k: v for k, v in data.items() if k not in HYDRA_KEYS}
    check_kwargs(ProblemDataModule, kwargs, "data")
    require(kwargs.get("num_workers", 0) >= 0, "data.num_workers", "an integer >= 0", kwargs.get("num_workers"))
    for part in ("train",):
        if kwargs.get(part) is not None:
            check_problem_set(kwargs[part], f"data.{part}")


def _check_target(node: Any, key: str, skip: tuple[str, ...] = ()) -> None:
    """A `_target_` node whose class is ctt's own or torch.optim's: its keys checked against the constructor
    (other classes: Hydra's instantiation reports their errors, in one line)."""
    from hydra.utils import get_class

    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str) or not target.startswith(CHECKED_PACKAGES):
        return
    try:
        cls = get_class(target)
    except Exception:  # Hydra reports a target it cannot import when it instantiates it
        return
    if cls.__init__.__module__.startswith(CHECKED_PACKAGES):  # not a subclass keeping a third party's __init__
        check_kwargs(cls, {k: v for k, v in node.items() if k not in HYDRA_KEYS}, key, skip=skip)


def _check_targets(cfg: DictConfig) -> None:
    for group in ("callbacks", "logger", "plugins"):  # dicts of named entries
        for name, node in _entries(cfg.get(group)).items():
            _check_target(node, f"{group}.{name}")
    # Partial targets completed in the module: the row's optimizer, then the scheduler of that optimizer.
    for group, completed in (("optimizer", ("params",)), ("scheduler", ("optimizer",))):
        if isinstance(cfg.get(group), DictConfig):
            _check_target(to_plain(cfg[group]), group, skip=completed)


def _check_model(model: Any) -> None:
    """The keyword arguments of `load_model` (`model.tiny` as TinyOptions), and the values it would refuse late."""
    from ctt.models.loading import SOURCES, model_spec, resolve_dtype

    model = check_kwargs(model_spec, model, "model")
    one_of("model.source", model["source"], SOURCES)
    require(bool(model["name"].strip()), "model.name", "a non-blank text", model["name"])
    _check_attention(model.get("attn_implementation"))
    resolve_dtype(model.get("dtype", "float32"))


def _check_attention(name: str | None) -> None:
    """transformers' registry of attention implementations (plus `eager`); a hub kernel (`org/repo`) is its own."""
    if name is None or "/" in name:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    one_of("model.attn_implementation", name, ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()])


MAX_SEED = 2**32 - 1  # Lightning's seed_everything takes [0, 2**32 - 1]; outside it, it warns and draws a random seed
MAX_TRAIN_STEPS = 10**9  # far above any run: a step generates rollouts
TRAINERS = ("lightning.Trainer", "lightning.pytorch.Trainer", "pytorch_lightning.Trainer")


def _check_trainer(cfg: DictConfig) -> None:
    """Every `trainer` key against the annotation of Lightning's Trainer argument (`trainer.max_steps=1.5` is not an
    integer: Lightning would train 2 steps), then the values it accepts but that train nothing."""
    trainer = _entries(cfg.get("trainer"))
    if trainer.get("_target_") in TRAINERS:
        import typing

        from lightning import Trainer

        hints = typing.get_type_hints(Trainer.__init__)
        for key, value in trainer.items():
            nested = isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))
            unresolved = isinstance(value, str) and "${" in value  # a test's config composed without Hydra's runtime
            if key in hints and not nested and not unresolved:  # a `_target_` node is instantiated and checked there
                check_value(f"trainer.{key}", hints[key], value)
    steps = OmegaConf.select(cfg, "trainer.max_steps", default=None)
    if isinstance(steps, int) and steps > MAX_TRAIN_STEPS:  # 1e20 steps trained until killed
        raise ConfigError(f"trainer.max_steps must be -1 (use trainer.max_epochs) or at most {MAX_TRAIN_STEPS}, got "
                          f"{steps}")
    if steps == 0 and not isinstance(steps, bool):
        raise ConfigError("trainer.max_steps=0 trains nothing; set a number of steps >= 1 (or -1 with trainer.max_epochs)")


@lru_cache(maxsize=1)
def known_top_level_keys() -> frozenset[str]:
    """What a composed config may hold at its top level: a config group (a folder of conf/), a key of a primary
    config (train.yaml, eval.yaml, ...) or of a `# @package _global_` file (an experiment, a local config)."""
    from ctt.config.hydra_glue import CONFIG_DIR
    from ctt.text import read_yaml

    conf = Path(CONFIG_DIR)
    keys = {p.name for p in conf.iterdir() if p.is_dir()} | set(TOP_LEVEL) | {"hydra"}
    for path in conf.rglob("*.yaml"):
        if path.parent == conf or "@package _global_" in path.read_text(encoding="utf-8", errors="replace")[:4096]:
            keys |= set(read_yaml(path))
    return frozenset(keys - {"defaults"})


def _check_resolvable(cfg: DictConfig) -> None:
    """Every interpolation resolves (`seed=${oops}`, `${oc.env:UNSET}` were OmegaConf's traceback mid-check): one
    line naming the key. A config composed without Hydra's runtime (a test's) leaves `${hydra:...}` to its users."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        if "HydraConfig was not set" in str(err):
            return
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{key or 'the config'}: {message}") from None


def validate_config(cfg: DictConfig) -> None:
    """Check every group of a composed train or eval config; ConfigError (one line) on the first problem."""
    _check_resolvable(cfg)
    reject_unknown("", [k for k in cfg if k not in known_top_level_keys()], known_top_level_keys())  # +foo=1
    from ctt.data.problems import PromptSettings
    from ctt.evaluation.settings import EvalSettings
    from ctt.models.token import TokenSettings
    from ctt.policy.policy import ForcingSettings
    from ctt.rl.reinforce import RLSettings
    from ctt.training.distributed import DistributedSettings

    for key, tp in TOP_LEVEL.items():
        if key in cfg:
            check_value(key, tp, cfg[key])
    if "seed" in cfg:
        require(0 <= cfg.seed <= MAX_SEED, "seed", f"an integer in [0, {MAX_SEED}]", cfg.seed)
    groups = {"rl": RLSettings, "forcing": ForcingSettings, "token": TokenSettings, "eval": EvalSettings,
              "prompt": PromptSettings, "distributed": DistributedSettings}
    for key, settings in groups.items():
        if key in cfg:
            settings.from_config(to_plain(cfg[key]))
    if "model" in cfg:
        _check_model(to_plain(cfg.model))
    if "data" in cfg:
        _check_data(to_plain(cfg.data))
    benchmarks = to_plain(cfg.get("benchmarks")) or {}
    if not isinstance(benchmarks, dict):
        raise ConfigError(f"benchmarks must be a mapping of named problem sets, got {benchmarks!r}")
    if not benchmarks and cfg.get("evaluate", True):  # ctt-eval, or ctt-train evaluating after training
        raise ConfigError("benchmarks is empty: nothing to evaluate (choose some, e.g. benchmarks=[gsm8k_local], or "
                          "train without evaluating: evaluate=false)")
    for name, spec in benchmarks.items():
        check_problem_set(spec, f"benchmarks.{name}", benchmark=True)
    _check_targets(cfg)
    _check_trainer(cfg)
