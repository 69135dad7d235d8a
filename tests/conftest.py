"""Shared fixtures: a tiny random Qwen2 with the token installed, paths to the shared benchmark files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from ctt.models import load_model
from ctt.token import install_token

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny(boost: float = 4.0, marker: str = "</think>", tie: bool = True, seed: int = 0, init: dict | None = None,
         init_range: float = 0.02, count: int = 1):
    """A LoadedModel (tiny random Qwen2) with the continue-thinking token installed."""
    loaded = load_model(
        name="tiny_random",
        source="tiny_random",
        end_of_thinking=marker,
        tiny={"end_of_thinking_boost": boost, "tie_word_embeddings": tie, "seed": seed, "initializer_range": init_range},
    )
    install_token(loaded.model, loaded.tokenizer, init or {"name": "word", "word": "Wait"}, count=count)
    return loaded


@pytest.fixture
def tiny_loaded():
    return tiny()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark files not found at {SHARED_DATA}")
    return SHARED_DATA


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
