"""Rollout engines: prompts in, budget-forced `Rollout`s out (ctt.engine.base). `build_engine` picks one by
`forcing.engine.kind`: "hf" (ctt's engine, ctt.engine.hf) or "vllm" (ctt.engine.vllm; imported only when used)."""

from __future__ import annotations

import importlib

from ctt.engine.base import ENGINES, RolloutEngine
from ctt.engine.records import ForcingConfig, Rollout, SamplingConfig, marker_is_eos, mix_seed, row_seeds
from ctt.engine.settings import EngineSettings

_MODULES = {"hf": "ctt.engine.hf", "vllm": "ctt.engine.vllm"}  # each module registers its engine on import


def build_engine(settings: EngineSettings, **parts) -> RolloutEngine:
    """The engine of `settings.kind`, given what any engine may need (model, pad_token_id, batch_size, token_ids,
    rows, seed, cache_dir); each takes the parts it uses."""
    importlib.import_module(_MODULES[settings.kind])
    return ENGINES[settings.kind](settings, **parts)


__all__ = ["ENGINES", "EngineSettings", "ForcingConfig", "Rollout", "RolloutEngine", "SamplingConfig",
           "build_engine", "marker_is_eos", "mix_seed", "row_seeds"]
