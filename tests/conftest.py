"""Shared fixtures: a tiny random Qwen2 with the token installed, a composed Hydra config (`compose_cfg`), one
torch thread."""

from __future__ import annotations

import os
from typing import Sequence

import lightning  # noqa: F401  imported before any test captures stderr: its loggers keep the stream they start with
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ctt.config.hydra_glue import CONFIG_DIR
from ctt.models.loading import load_model
from ctt.models.token import install_token


def tiny(boost: float = 4.0, marker: str = "</think>", tie: bool = True, seed: int = 0, init: dict | None = None,
         init_range: float = 0.02, spare_rows: int = 0, count: int = 1, **shape):
    """A LoadedModel (tiny random Qwen2) with the continue-thinking token (`count` of them) installed. spare_rows:
    embedding rows beyond the tokenizer (as Qwen2 checkpoints have), so that the new token's id has a row of the
    table. shape: any other `model.tiny` option (num_heads=2 gives vLLM's CPU attention a head size it has)."""
    loaded = load_model(
        name="tiny_random",
        source="tiny_random",
        end_of_thinking=marker,
        tiny={"end_of_thinking_boost": boost, "tie_word_embeddings": tie, "seed": seed, "initializer_range": init_range,
              "spare_rows": spare_rows, **shape},
    )
    install_token(loaded.model, loaded.tokenizer, init or {"name": "word", "word": "Wait"}, count=count)
    return loaded


@pytest.fixture
def tiny_loaded():
    return tiny()


def compose_config(config_name: str = "train", overrides: Sequence[str] = (),
                   return_hydra_config: bool = False) -> DictConfig:
    """`conf/<config_name>.yaml` composed with `overrides`, as the entry points compose it (unresolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


@pytest.fixture
def compose_cfg():
    """`compose_cfg(config_name, overrides)`: a composed config (see `compose_config`); Hydra is cleared after."""
    return compose_config


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP oversubscription makes them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


# Lightning sets these for an in-process run (even DeepSpeed on one CPU), and its process group (listening on
# MASTER_PORT) lives until the process exits.
_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_rendezvous_leaks():
    """A test that runs a strategy in-process leaves MASTER_PORT in os.environ, still bound by its process group:
    every later subprocess (the 2-process DDP/DeepSpeed tests) would inherit it and fail with EADDRINUSE. Restore
    the variables after each test; the group itself stays (vLLM's in-process engine shares torch.distributed's
    world group, so destroying it would break the engines that module fixtures keep)."""
    before = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def need_vllm() -> None:
    """Skip the calling test without vLLM on a developer's machine; in CI (CI=true), where install.sh installed it,
    its absence is a failure: the vLLM tests must run there."""
    from ctt.engine.settings import vllm_available

    if vllm_available():
        return
    if os.environ.get("CI"):
        pytest.fail("vLLM is not installed: install.sh installs it, and CI must run the vLLM tests")
    pytest.skip("vLLM is not installed (bash install.sh installs it)")
