"""The REINFORCE estimator against the exact gradient, by enumerating every rollout of a tiny model.

Sampling is restricted (every other id banned) to a few tokens: one or two that make the end-of-thinking marker, an
ordinary token and end-of-sequence; rollouts are a handful of tokens long. `_enumerate` walks every sequence of
sampled choices with the forcing rules written out independently of ctt.engine (a marker is replaced while
forced < N and the continuation plus one token still fit; the context then holds the continuation instead of the
marker), and gives each leaf its rollout record and its differentiable log-probability, computed by plain full
forwards. Then:

* the leaves' probabilities sum to 1 (the enumeration is complete), and rollouts sampled from ctt's engine are all
  leaves, with the frequencies the leaves' probabilities predict (the records agree with the engine's);
* sum_leaves P(leaf) * (R(leaf) - b) * grad(log P-hat(leaf)), with grad(log P-hat) what ctt's scorer and loss give
  for that one rollout, equals grad(sum_leaves P(leaf) * R(leaf)), for b = 0 and a constant b: the estimator is
  unbiased exactly when it scores every sampled choice that depends on the row (a missing choice makes the
  constant-baseline term b * E[grad log P-hat] non-zero).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from ctt.engine import ForcingConfig, Rollout, SamplingConfig
from ctt.engine.hf import generate_forced
from ctt.policy.policy import draw_continuations
from ctt.rl.reinforce import completion_logprobs, compute_advantages, reinforce_loss
from ctt.models.token import get_overlay
from tests.conftest import tiny

PROMPT = "ab"


@dataclass
class _State:
    ctx: list[int]  # what the model sees
    ro: Rollout
    thinking: bool = True
    done: bool = False
    suppress: int | None = None
    logp: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


def _distribution(model, ctx, allowed, suppress, temperature, top_p, cache) -> torch.Tensor:
    """log-probs over `allowed` (a plain full forward, with grad): banned ids out, temperature, then the nucleus."""
    key = (tuple(ctx), suppress)
    if key not in cache:
        logits = model(torch.tensor([ctx])).logits[0, -1].float()[allowed]
        if suppress is not None:
            logits = logits.masked_fill(torch.tensor(allowed) == suppress, float("-inf"))
        logits = logits / temperature
        if top_p < 1.0:  # written out here, independently of ctt.engine.sampling.nucleus_mask
            probs = logits.detach().softmax(-1)
            order = probs.argsort(descending=True).tolist()
            kept, mass = [], 0.0
            for i in order:
                if mass >= top_p and kept:
                    break
                kept.append(i)
                mass += probs[i].item()
            logits = logits.masked_fill(~torch.isin(torch.arange(len(allowed)), torch.tensor(kept)), float("-inf"))
        cache[key] = logits.log_softmax(-1)
    return cache[key]


def _force(s: _State, ids: list[int]) -> None:
    s.ro.completion_ids += ids
    s.ro.sampled += [False] * len(ids)
    s.ctx += ids


def _apply(s: _State, tok: int, f: ForcingConfig) -> None:
    """One sampled token through the forcing rules (the state machine of ctt.engine's docstring)."""
    ro, marker, k = s.ro, list(f.end_of_thinking_ids), len(f.end_of_thinking_ids)
    marker_is_eos = marker == [f.eos_token_ids[0]]
    ro.completion_ids.append(tok), ro.sampled.append(True), s.ctx.append(tok)
    if s.thinking:
        ro.thinking_tokens += 1
        if ro.completion_ids[-k:] == marker and all(ro.sampled[-k:]):
            after = len(f.continuation_ids) + 1  # the continuation and one sampled token must fit
            room = len(ro.completion_ids) - k + after <= f.max_new_tokens and (
                f.thinking_budget is None or ro.thinking_tokens - k + after <= f.thinking_budget)
            if ro.num_forced < f.num_continuations and room:
                ro.replaced_markers.append(tuple(marker))
                del ro.completion_ids[-k:], ro.sampled[-k:], s.ctx[-k:]
                ro.continuation_starts.append(len(ro.completion_ids))
                ro.completion_ids += f.continuation_ids
                ro.sampled += [False] * len(f.continuation_ids)
                s.ctx += f.continuation_ids
                ro.thinking_tokens += len(f.continuation_ids) - k
                s.suppress = None if f.continuation_ids else marker[0]
                return
            s.thinking, ro.answer_start = False, len(ro.completion_ids)
            if marker_is_eos:
                s.done, ro.stop_reason = True, "eos"
        elif tok in f.eos_token_ids:
            s.done, ro.stop_reason = True, "eos"
        elif f.thinking_budget is not None and ro.thinking_tokens >= f.thinking_budget:
            s.thinking, ro.answer_start = False, len(ro.completion_ids)
            if f.budget_force_ids is None and marker_is_eos:
                s.done, ro.stop_reason = True, "thinking_budget"
            else:  # the forced end of thinking (or its text): fed, never sampled, not counted as answer
                _force(s, list(f.budget_force_ids or marker))
    elif tok in f.eos_token_ids:
        s.done, ro.stop_reason = True, "eos"
    else:
        ro.answer_tokens += 1
        if ro.answer_tokens >= f.max_answer_tokens:
            s.done, ro.stop_reason = True, "answer_limit"
    if not s.done and len(ro.completion_ids) >= f.max_new_tokens:
        s.done, ro.stop_reason = True, "max_new_tokens"


def _enumerate(model, prompt, f: ForcingConfig, allowed, temperature=1.0, top_p=1.0) -> list[_State]:
    leaves, cache = [], {}
    stack = [_State(list(prompt), Rollout(prompt_ids=list(prompt)))]
    while stack:
        s = stack.pop()
        if s.done:
            leaves.append(s)
            continue
        logp = _distribution(model, s.ctx, allowed, s.suppress, temperature, top_p, cache)
        for j, tok in enumerate(allowed):
            if logp[j].item() == float("-inf"):
                continue
            ro = s.ro
            child = _State(list(s.ctx), Rollout(
                list(ro.prompt_ids), list(ro.completion_ids), list(ro.sampled), list(ro.continuation_starts),
                list(ro.replaced_markers), ro.answer_start, ro.thinking_tokens, ro.answer_tokens,
            ), s.thinking, s.done, None, s.logp + logp[j])
            _apply(child, tok, f)
            stack.append(child)
    return leaves


def _record(r: Rollout) -> tuple:
    return (tuple(r.completion_ids), tuple(r.sampled), tuple(r.continuation_starts), tuple(r.replaced_markers),
            r.answer_start, r.thinking_tokens, r.answer_tokens, r.stop_reason)


def _setup(marker_len: int, n: int, empty: bool = False, eos_marker: bool = False, shape: dict | None = None,
           **limits):
    """shape: `model.tiny` options (tests/test_vllm_sampling.py gives vLLM a head size it has kernels for)."""
    loaded = tiny(boost=0.0, init_range=0.3, seed=1, init={"name": "random", "seed": 3},
                  marker="eos" if eos_marker else "</think>", **(shape or {}))
    model, tok = loaded.model, loaded.tokenizer
    new_id = get_overlay(model).token_id
    marker = tuple(loaded.end_of_thinking_ids) if marker_len == 1 else tuple(tok.encode("xy"))
    allowed = sorted({*marker, tok.encode("a")[0], tok.eos_token_id})
    vocab = model.get_output_embeddings().weight.shape[0]
    banned = tuple(i for i in range(vocab) if i not in allowed) + (new_id,)
    f = ForcingConfig(
        end_of_thinking_ids=marker, eos_token_ids=(tok.eos_token_id,), num_continuations=n,
        continuation_ids=() if empty else (new_id,), max_new_tokens=6 if marker_len == 1 else 5,
        max_answer_tokens=2, banned_ids=banned,
    )
    if "budget_force" in limits:  # ids of text forced at the thinking budget
        limits["budget_force_ids"] = tuple(tok.encode(limits.pop("budget_force")))
    return model, tok, dataclasses.replace(f, **limits), allowed


def _reward(r: Rollout, n: int, a_id: int) -> float:
    """Depends on the forced-continuation count (so on re-emitted markers) and on the tokens after them."""
    return float(r.num_forced == n) + 0.5 * float(r.completion_ids[-1:] == [a_id])


CASES = [(1, 1, {}), (1, 2, {}), (2, 1, {}), (2, 2, {}),
         (1, 2, {"thinking_budget": 4}), (2, 2, {"thinking_budget": 4, "max_new_tokens": 7}),
         (1, 2, {"thinking_budget": 3, "budget_force": "aa", "max_new_tokens": 7}),
         (1, 1, {"eos_marker": True}), (1, 2, {"eos_marker": True, "max_new_tokens": 7})]
IDS = ["1tok-N1", "1tok-N2", "2tok-N1", "2tok-N2", "budget", "2tok-budget", "budget-text", "eos-N1", "eos-N2"]


@pytest.mark.parametrize("marker_len,n,extra", CASES, ids=IDS)
def test_enumeration_is_complete_and_matches_the_engine(marker_len, n, extra, one_thread):
    model, tok, f, allowed = _setup(marker_len, n, **extra)
    prompt = tok.encode(PROMPT)
    leaves = _enumerate(model, prompt, f, allowed)
    probs = {_record(s.ro): s.logp.exp().item() for s in leaves}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert any(len(s.ro.replaced_markers) == n for s in leaves)
    draws = 3000
    sampled = generate_forced(model, [prompt] * draws, f, SamplingConfig(1.0, seed=7), tok.pad_token_id)
    seen = Counter(_record(r) for r in sampled)
    assert set(seen) <= set(probs), "the engine produced a rollout the enumeration does not have"
    for forced in range(n + 1):  # frequency of each forced count within 4.5 standard errors of its probability
        p = sum(v for k, v in probs.items() if len(k[2]) == forced)
        freq = sum(c for k, c in seen.items() if len(k[2]) == forced) / draws
        assert abs(freq - p) <= 4.5 * (p * (1 - p) / draws) ** 0.5 + 1e-9, (forced, freq, p)


def _exact_and_estimated(marker_len, n, baseline, temperature=1.0, top_p=1.0, **extra):
    model, tok, f, allowed = _setup(marker_len, n, **extra)
    row = get_overlay(model).row
    a_id = tok.encode("a")[0]
    leaves = _enumerate(model, tok.encode(PROMPT), f, allowed, temperature, top_p)
    rewards = torch.tensor([_reward(s.ro, n, a_id) for s in leaves])
    probs = torch.stack([s.logp for s in leaves]).exp()
    (exact,) = torch.autograd.grad((probs * rewards).sum(), row)
    # ctt's estimator for each leaf alone, weighted by the leaf's probability: sequence_sum over B leaves is
    # -(1/B) sum_b adv_b * log P-hat_b, so advantages B * P * (R - b) make -grad(loss) the expectation.
    rollouts = [s.ro for s in leaves]
    advantages = len(leaves) * probs.detach() * (rewards - baseline)
    scored = completion_logprobs(model, rollouts, temperature, f.banned_ids, tok.pad_token_id, top_p=top_p)
    (estimated,) = torch.autograd.grad(-reinforce_loss(scored, advantages, "sequence_sum"), row)
    return exact, estimated, scored


@pytest.mark.parametrize("baseline", [0.0, 0.8])
@pytest.mark.parametrize("marker_len,n,extra", CASES, ids=IDS)
def test_expected_gradient_equals_the_gradient_of_the_expected_reward(marker_len, n, extra, baseline, one_thread):
    exact, estimated, _ = _exact_and_estimated(marker_len, n, baseline, **extra)
    assert exact.norm() > 1e-3, "the row must matter for the test to mean anything"
    torch.testing.assert_close(estimated, exact, rtol=2e-3, atol=2e-3 * exact.norm().item())


def _one_token_n2():
    """The one-token-marker, N=2 case enumerated: model, tokenizer, forcing, row, leaves, their rewards and
    probabilities, and the exact gradient of the expected reward."""
    model, tok, f, allowed = _setup(1, 2)
    row = get_overlay(model).row
    leaves = _enumerate(model, tok.encode(PROMPT), f, allowed)
    rewards = torch.tensor([_reward(s.ro, 2, tok.encode("a")[0]) for s in leaves])
    probs = torch.stack([s.logp for s in leaves]).exp()
    (exact,) = torch.autograd.grad((probs * rewards).sum(), row)
    return model, tok, f, row, leaves, rewards, probs, exact


def test_omitting_the_re_emitted_markers_is_biased(one_thread):
    """The check above can fail: forget every replaced marker after the first (what ctt did before: the 2nd marker's
    log-prob never entered the loss) and the expected gradient is off."""
    model, tok, f, row, leaves, rewards, probs, exact = _one_token_n2()
    for s in leaves:
        s.ro.replaced_markers = s.ro.replaced_markers[:1]
    scored = completion_logprobs(model, [s.ro for s in leaves], 1.0, f.banned_ids, tok.pad_token_id)
    advantages = len(leaves) * probs.detach() * (rewards - 0.8)
    (old,) = torch.autograd.grad(-reinforce_loss(scored, advantages, "sequence_sum"), row)
    assert (old - exact).norm() > 0.1 * exact.norm()


def test_top_p_scored_with_the_full_softmax_would_be_biased(one_thread):
    """The nucleus matters: scoring top-p samples under the full softmax misses the gradient by far."""
    exact, _, _ = _exact_and_estimated(1, 2, 0.5, 1.0, 0.9)
    model, tok, f, allowed = _setup(1, 2)
    leaves = _enumerate(model, tok.encode(PROMPT), f, allowed, 1.0, 0.9)
    rewards = torch.tensor([_reward(s.ro, 2, tok.encode("a")[0]) for s in leaves])
    probs = torch.stack([s.logp for s in leaves]).exp().detach()
    scored = completion_logprobs(model, [s.ro for s in leaves], 1.0, f.banned_ids, tok.pad_token_id, top_p=1.0)
    (full,) = torch.autograd.grad(
        -reinforce_loss(scored, len(leaves) * probs * (rewards - 0.5), "sequence_sum"), get_overlay(model).row
    )
    assert (full - exact).norm() > 0.5 * exact.norm()


@pytest.mark.parametrize("top_p", [0.9])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_top_p_and_temperature_are_scored_under_the_sampling_distribution(temperature, top_p, one_thread):
    exact, estimated, _ = _exact_and_estimated(1, 2, 0.5, temperature, top_p)
    assert exact.norm() > 1e-3
    torch.testing.assert_close(estimated, exact, rtol=2e-3, atol=2e-3 * exact.norm().item())


# --- N drawn per prompt from a set (forcing.num_continuations=[...]) ------------------------------------------


def _mixture(marker_len, ns, baseline, drop_later_markers=False):
    """Every leaf of every N in `ns`, weighted P(N) P_N(leaf) with P(N) uniform (as ctt.policy.draw_continuations
    draws it); the reward depends on N through the forced count. (exact, estimated) gradients of the mixture."""
    model, tok, f, allowed = _setup(marker_len, max(ns))
    row, a_id = get_overlay(model).row, tok.encode("a")[0]
    leaves, weights, rewards = [], [], []
    for n in ns:
        for s in _enumerate(model, tok.encode(PROMPT), dataclasses.replace(f, num_continuations=n), allowed):
            leaves.append(s)
            weights.append(s.logp.exp() / len(ns))
            rewards.append(_reward(s.ro, 2, a_id))
    probs, rewards = torch.stack(weights), torch.tensor(rewards)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    (exact,) = torch.autograd.grad((probs * rewards).sum(), row)
    if drop_later_markers:
        for s in leaves:
            s.ro.replaced_markers = s.ro.replaced_markers[:1]
    scored = completion_logprobs(model, [s.ro for s in leaves], 1.0, f.banned_ids, tok.pad_token_id)
    advantages = len(leaves) * probs.detach() * (rewards - baseline)
    (estimated,) = torch.autograd.grad(-reinforce_loss(scored, advantages, "sequence_sum"), row)
    return exact, estimated


MIXTURES = [(1, (1, 2)), (2, (1, 2)), (1, (0, 1, 2))]


@pytest.mark.parametrize("baseline", [0.0, 0.8])
@pytest.mark.parametrize("marker_len,ns", MIXTURES, ids=["1tok-N12", "2tok-N12", "1tok-N012"])
def test_random_n_expected_gradient_equals_the_gradient_of_the_mixture_reward(marker_len, ns, baseline, one_thread):
    exact, estimated = _mixture(marker_len, ns, baseline)
    assert exact.norm() > 1e-3
    torch.testing.assert_close(estimated, exact, rtol=2e-3, atol=2e-3 * exact.norm().item())


def test_random_n_without_the_later_replaced_markers_is_biased(one_thread):
    exact, estimated = _mixture(1, (1, 2), 0.8, drop_later_markers=True)
    assert (estimated - exact).norm() > 0.1 * exact.norm()


def test_n_is_drawn_uniformly_and_replayed_from_the_seed():
    draws = draw_continuations((1, 2, 4), 30000, seed=11)
    for n in (1, 2, 4):  # each N within 4.5 standard errors of 1/3
        assert abs(draws.count(n) / len(draws) - 1 / 3) <= 4.5 * (2 / 9 / len(draws)) ** 0.5
    assert draw_continuations((1, 2, 4), 50, seed=11) == draws[:50]  # a resume (same seed) draws the same
    assert draw_continuations((1, 2, 4), 50, seed=12) != draws[:50]
    assert draw_continuations((3,), 4, seed=11) == [3, 3, 3, 3]


# --- group baselines: K samples of one prompt, every K-tuple of leaves enumerated ----------------------------


def _group_estimate(baseline: str, k: int):
    """E over K i.i.d. leaves of ctt's gradient for the first sample of the group, advantage from compute_advantages
    with the group's K rewards (by symmetry every sample of the group has the same expectation)."""
    model, tok, f, row, leaves, rewards, probs, exact = _one_token_n2()
    p, m = probs.detach().double(), len(leaves)
    tuples = torch.cartesian_prod(*[torch.arange(m)] * k).view(-1, k)  # every group of k leaves, leaf i first
    adv = compute_advantages(rewards[tuples].reshape(-1), k, baseline).view(-1, k)[:, 0].double()
    weight = p[tuples].prod(1) * adv  # P(group) * advantage of its first sample
    per_leaf = torch.zeros(m, dtype=torch.double).index_add_(0, tuples[:, 0], weight)
    scored = completion_logprobs(model, [s.ro for s in leaves], 1.0, f.banned_ids, tok.pad_token_id)
    (estimated,) = torch.autograd.grad(-reinforce_loss(scored, m * per_leaf.float(), "sequence_sum"), row)
    return exact, estimated


@pytest.mark.parametrize("k", [2, 3])
def test_rloo_is_unbiased_and_the_group_mean_is_scaled_by_k_minus_1_over_k(k, one_thread):
    exact, rloo = _group_estimate("rloo", k)
    assert exact.norm() > 1e-3
    torch.testing.assert_close(rloo, exact, rtol=2e-3, atol=2e-3 * exact.norm().item())
    _, group_mean = _group_estimate("group_mean", k)
    torch.testing.assert_close(group_mean, (k - 1) / k * exact, rtol=2e-3, atol=2e-3 * exact.norm().item())
    assert (group_mean - exact).norm() > 0.2 * exact.norm()
