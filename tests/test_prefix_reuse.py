"""Prefix reuse in the loss: the same log-probs and the same gradient on the token row as the full recompute."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import pytest
import torch

from ctt.engine import ForcingConfig, SamplingConfig
from ctt.engine.hf import generate_forced
from ctt.rl.reinforce import completion_logprobs
from ctt.models.token import get_overlay
from tests.conftest import tiny

PROMPTS = ["hello there", "what is 2+2?", "x", "a much longer prompt about sums and products", "Janet has 3 ducks"]
TEMPERATURE = 0.9


pytestmark = pytest.mark.usefixtures("one_thread")


@lru_cache(maxsize=1)
def _rollouts():
    loaded = tiny(boost=2.0)
    tok = loaded.tokenizer
    new_id = tok.convert_tokens_to_ids("<|continue-thinking|>")
    cfg = ForcingConfig(
        end_of_thinking_ids=tuple(loaded.end_of_thinking_ids), eos_token_ids=(tok.eos_token_id,), num_continuations=2,
        continuation_ids=(new_id,), max_new_tokens=40, max_answer_tokens=6, banned_ids=(new_id,),
    )
    prompts = [tok.encode(p) for p in PROMPTS * 2]
    rollouts = generate_forced(loaded.model, prompts, cfg, SamplingConfig(TEMPERATURE, seed=5), tok.pad_token_id)
    return loaded, rollouts, new_id


def _grad(loaded, rollouts, new_id, **kw):
    row = get_overlay(loaded.model).row
    row.grad = None
    scored = completion_logprobs(loaded.model, rollouts, TEMPERATURE, (new_id,), loaded.tokenizer.pad_token_id, **kw)
    weights = torch.linspace(-1.0, 1.0, scored.logprobs.numel()).view_as(scored.logprobs)  # any fixed loss
    (scored.logprobs * weights).sum().backward()
    return scored, row.grad.clone()


@lru_cache(maxsize=1)
def _full():
    loaded, rollouts, new_id = _rollouts()
    return _grad(loaded, rollouts, new_id, prefix_reuse=False)


def test_rollouts_exercise_the_cases():
    _, rollouts, _ = _rollouts()
    firsts = [r.continuation_starts[0] for r in rollouts if r.continuation_starts]
    assert len(set(firsts)) >= 3, f"prefix lengths should differ between rows: {firsts}"
    assert any(not r.continuation_starts for r in rollouts), "some row should have no continuation"
    assert len({len(r.prompt_ids) for r in rollouts}) > 1


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_prefix_reuse_matches_full_recompute(checkpointing):
    loaded, rollouts, new_id = _rollouts()
    full, g_full = _full()
    reuse, g_reuse = _grad(loaded, rollouts, new_id, prefix_reuse=True, gradient_checkpointing=checkpointing)
    assert full.mask.any() and torch.equal(full.mask, reuse.mask)
    torch.testing.assert_close(reuse.logprobs, full.logprobs, rtol=1e-4, atol=1e-6)
    assert g_full.abs().sum() > 0
    torch.testing.assert_close(g_reuse, g_full, rtol=1e-4, atol=1e-6)
    # The checkpointed full recompute too.
    _, g_full_ckpt = _grad(loaded, rollouts, new_id, prefix_reuse=False, gradient_checkpointing=checkpointing)
    torch.testing.assert_close(g_full_ckpt, g_full, rtol=1e-4, atol=1e-6)
    # The checkpointing patch is undone.
    assert all("forward" not in vars(layer) for layer in loaded.model.base_model.layers)


def test_only_the_suffix_runs_with_grad():
    loaded, rollouts, new_id = _rollouts()
    seen = {True: 0, False: 0}
    overlay = get_overlay(loaded.model)
    handle = overlay.register_forward_hook(lambda m, args, out: seen.__setitem__(
        torch.is_grad_enabled(), seen[torch.is_grad_enabled()] + args[0].numel()))
    try:
        completion_logprobs(loaded.model, rollouts, TEMPERATURE, (new_id,), prefix_reuse=False)
        full_grad_tokens, seen[True], seen[False] = seen[True], 0, 0
        completion_logprobs(loaded.model, rollouts, TEMPERATURE, (new_id,), prefix_reuse=True)
    finally:
        handle.remove()
    assert seen[False] > 0, "the prefix pass should run without grad"
    assert seen[True] < full_grad_tokens


def test_no_scored_rows_gives_an_empty_mask():
    loaded, rollouts, new_id = _rollouts()
    plain = [r for r in rollouts if not r.continuation_starts]
    scored = completion_logprobs(loaded.model, plain, TEMPERATURE, (new_id,))
    assert not scored.mask.any() and not scored.logprobs.any()


def test_prefix_reuse_matches_full_recompute_with_a_two_token_marker():
    """Replaced two-token markers are scored from branch sequences (context + the marker's first token); with prefix
    reuse those branches attend to the same cached prefix."""
    loaded = tiny(boost=4.0)  # </think> is frequent: so is the pair "</think></think>", re-emitted after continuations
    tok = loaded.tokenizer
    new_id = tok.convert_tokens_to_ids("<|continue-thinking|>")
    free = ForcingConfig(end_of_thinking_ids=(tok.eos_token_id,), eos_token_ids=(tok.eos_token_id,), max_new_tokens=30)
    prompts = [tok.encode(p) for p in PROMPTS * 2]
    outs = [r.completion_ids for r in generate_forced(loaded.model, prompts, free, SamplingConfig(TEMPERATURE, seed=1))]
    pairs = Counter(tuple(o[i : i + 2]) for o in outs for i in range(len(o) - 1))
    marker = pairs.most_common(1)[0][0]  # the pair the model emits most: forcing has work to do
    cfg = ForcingConfig(end_of_thinking_ids=marker, eos_token_ids=(tok.eos_token_id,), num_continuations=3,
                        continuation_ids=(new_id,), max_new_tokens=40, max_answer_tokens=6, banned_ids=(new_id,))
    rollouts = generate_forced(loaded.model, prompts, cfg, SamplingConfig(TEMPERATURE, seed=2), tok.pad_token_id)
    assert any(len(r.replaced_markers) >= 2 for r in rollouts), "no second replaced marker: no branch to check"
    full, g_full = _grad(loaded, rollouts, new_id, prefix_reuse=False)
    reuse, g_reuse = _grad(loaded, rollouts, new_id, prefix_reuse=True)
    assert torch.equal(full.mask, reuse.mask)
    torch.testing.assert_close(reuse.logprobs, full.logprobs, rtol=1e-4, atol=1e-6)
    assert g_full.abs().sum() > 0
    torch.testing.assert_close(g_reuse, g_full, rtol=1e-4, atol=1e-6)
