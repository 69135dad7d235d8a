"""Type and range checks for config groups that are passed around as plain dicts (one clear ConfigError each)."""

from __future__ import annotations

from typing import Any

from ctt.errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_rl(rl: dict) -> dict:
    """Check the `rl` group's numbers (names are checked where they are looked up); returns `rl` unchanged."""
    checks = {
        "samples_per_prompt": (_is_int, lambda v: v >= 1, "an integer >= 1"),
        "max_bad_steps": (_is_int, lambda v: v >= 1, "an integer >= 1"),
        "temperature": (_is_number, lambda v: v >= 0, "a number >= 0"),
        "top_p": (_is_number, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "prefix_reuse": (lambda v: isinstance(v, bool), lambda v: True, "true or false"),
        "gradient_checkpointing": (lambda v: isinstance(v, bool), lambda v: True, "true or false"),
    }
    for key, (type_ok, range_ok, expected) in checks.items():
        if key in rl and not (type_ok(rl[key]) and range_ok(rl[key])):
            raise ConfigError(f"rl.{key} must be {expected}, got {rl[key]!r}")
    return rl
