"""Hydra glue shared by the entry points: the conf dir, the resolvers, instantiating lists of configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctt.reliability.run_dir import launch_rank

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "conf")

# `${ctt_root:}` lets configs point at files next to the checkout (e.g. ../shared/data) whatever the cwd.
if not OmegaConf.has_resolver("ctt_root"):
    OmegaConf.register_new_resolver("ctt_root", lambda: str(PROJECT_ROOT))

# Every process of a launch with one process per device (launch_rank) runs the Hydra job in the same run dir: only rank 0 writes `.hydra/`
# (`${ctt_rank_zero:.hydra}` is null elsewhere) and each other rank logs to `<job>_rank<r>.log`.
if not OmegaConf.has_resolver("ctt_rank_zero"):
    OmegaConf.register_new_resolver("ctt_rank_zero", lambda value: value if launch_rank() == 0 else None)
if not OmegaConf.has_resolver("ctt_rank_suffix"):
    OmegaConf.register_new_resolver("ctt_rank_suffix", lambda: f"_rank{launch_rank()}" if launch_rank() else "")


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` node of a dict-of-configs group (callbacks, loggers); null entries are off."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


# --- a config option no group has ---------------------------------------------------------------------------------


def missing_option(argv: list[str]) -> str | None:
    """The first override of `argv` choosing an option that no group of conf/ has (`model=nope`, a typo in a sweep
    `model=tiny_random,nope`), as one line naming the valid options; None when every choice exists. Hydra would say
    so in a multi-line report with exit status 1. Choices Hydra resolves from elsewhere are left to it: its own groups
    (`hydra/launcher=...`), a glob sweep, another config dir or search path, and a command line it cannot parse."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        args = get_args_parser().parse_args(argv)
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (SystemExit, HydraException):
        return None
    if args.config_dir or args.config_path or any(o.key_or_group.startswith("hydra.searchpath") for o in overrides):
        return None
    conf = Path(CONFIG_DIR)
    for override in overrides:
        group = override.key_or_group
        if override.is_delete() or group.startswith("hydra") or not (conf / group).is_dir():
            continue
        if override.is_sweep_override():
            if override.value_type is not None and override.value_type.name == "GLOB_CHOICE_SWEEP":
                continue
            values = list(override.sweep_string_iterator())
        else:
            value = override.value()
            values = [] if value is None else value if isinstance(value, list) else [value]
        for value in map(str, values):
            if not (conf / group / f"{value}.yaml").is_file():
                options = ", ".join(sorted(p.stem for p in (conf / group).glob("*.yaml")))
                return f"{override.input_line}: the config group {group} has no option {value!r}; options: {options}"
    return None


def ctt_main(config_name: str):
    """`hydra.main` for a ctt command (conf/<config_name>.yaml), with a chosen option that does not exist reported
    as one ConfigError line, exit status 2, before Hydra composes anything (`missing_option`), and a log line to a
    closed stdout dropped (`ctt.errors.guard_closed_stdout`) from the start, Hydra's own logging included."""
    import functools
    import sys

    import hydra

    def wrap(task):
        hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(task)

        @functools.wraps(task)
        def main(cfg_passthrough: DictConfig | None = None) -> Any:
            from ctt.errors import guard_closed_stdout

            guard_closed_stdout()
            if cfg_passthrough is None:
                problem = missing_option(sys.argv[1:])
                if problem is not None:
                    from ctt.errors import ConfigError
                    from ctt.reliability.run_dir import one_line_exit

                    one_line_exit(ConfigError(problem))
            return hydra_main(cfg_passthrough)

        return main

    return wrap
