"""REINFORCE pieces: advantages by hand, loss aggregation, and a toy reward that training must raise."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ctt.errors import ConfigError
from ctt.engine import ForcingConfig, Rollout, SamplingConfig
from ctt.engine.hf import generate_forced
from ctt.rl.reinforce import Choice, ScoredTokens, completion_logprobs, compute_advantages, reinforce_loss, scored_choices
from ctt.models.token import get_overlay
from tests.conftest import tiny


def test_advantages_match_hand_computed_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    assert torch.allclose(compute_advantages(r, 3, "none"), r)
    assert torch.allclose(compute_advantages(r, 3, "batch_mean"), r - 0.5)
    group = torch.tensor([1 - 1 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    assert torch.allclose(compute_advantages(r, 3, "group_mean"), group)
    std = torch.tensor(2 ** 0.5 / 3)  # population std of {1, 0, 0}
    assert torch.allclose(compute_advantages(r, 3, "group_mean", "group", eps=0.0), group / std)
    assert torch.allclose(compute_advantages(r, 3, "batch_mean", "batch", eps=0.0), (r - 0.5) / 0.5)


def test_equal_rewards_give_zero_advantage_not_nan():
    adv = compute_advantages(torch.ones(8), 4, "group_mean", "group")
    assert torch.equal(adv, torch.zeros(8))


def test_bad_names_and_group_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="rl.baseline"):
        compute_advantages(torch.ones(4), 2, "median")
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        compute_advantages(torch.ones(5), 2, "group_mean")
    with pytest.raises(ConfigError, match="rl.aggregation"):
        reinforce_loss(ScoredTokens(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)), torch.ones(1), "max")


def test_loss_aggregations():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    scored = ScoredTokens(logp, mask)
    # sequence_sum: -mean_b(adv_b * sum_t logp) = -((1 * -3) + (-2 * -3)) / 2
    assert reinforce_loss(scored, adv, "sequence_sum").item() == pytest.approx(-1.5)
    # token_mean: -sum(adv * logp) / tokens = -((-1 - 2) + 6) / 3
    assert reinforce_loss(scored, adv, "token_mean").item() == pytest.approx(-1.0)


def test_token_mean_with_the_mean_rank_count_makes_averaged_rank_gradients_equal_the_global_gradient():
    """What DDP does: each rank's gradient, then their mean. With each rank dividing by its own token count (3 and
    1 here) the mean is not the global token mean's gradient; with the mean count over ranks it is."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])

    def grad(loss):
        (g,) = torch.autograd.grad(loss, logp)
        return g

    global_grad = grad(reinforce_loss(ScoredTokens(logp, mask), adv, "token_mean"))
    ranks = [(logp[:1], mask[:1], adv[:1]), (logp[1:], mask[1:], adv[1:])]
    mean_count = mask.sum() / 2

    def averaged(count):
        return sum(grad(reinforce_loss(ScoredTokens(lp, m), a, "token_mean", count)) for lp, m, a in ranks) / 2

    assert torch.allclose(averaged(mean_count), global_grad)
    assert not torch.allclose(averaged(None), global_grad)


def test_scored_choices_are_the_sampled_tokens_after_the_first_continuation_and_the_later_replaced_markers():
    # Marker (40, 41) sampled at 2 and at 5, replaced by 99 both times; only the second replacement is scored.
    r = Rollout(prompt_ids=[1, 2], completion_ids=[5, 6, 99, 7, 8, 99, 9], sampled=[True, True, False, True, True, False, True],
                continuation_starts=[2, 5], replaced_markers=[(40, 41), (40, 41)])
    assert scored_choices(r) == [Choice(3, -1, 7), Choice(4, -1, 8), Choice(5, 0, 40), Choice(5, 1, 41), Choice(6, -1, 9)]
    assert scored_choices(Rollout(prompt_ids=[1], completion_ids=[5, 6], sampled=[True, True])) == []


def test_logprobs_match_a_plain_forward():
    loaded = tiny(boost=4.0)
    model, tok = loaded.model, loaded.tokenizer
    new_id = get_overlay(model).token_id
    cfg = ForcingConfig(end_of_thinking_ids=tuple(loaded.end_of_thinking_ids), eos_token_ids=(tok.eos_token_id,),
                        num_continuations=2, continuation_ids=(new_id,), max_new_tokens=20, banned_ids=(new_id,))
    rollouts = generate_forced(model, [tok.encode(p) for p in ("abc", "de", "fgh", "ij")], cfg, SamplingConfig(1.0, seed=1))
    scored = completion_logprobs(model, rollouts, temperature=0.7, banned_ids=(new_id,))
    assert any(len(r.replaced_markers) > 1 for r in rollouts), "a second replaced marker must be scored too"
    for i, r in enumerate(rollouts):
        for col, c in enumerate(scored_choices(r)):
            context = r.prompt_ids + r.completion_ids[: c.position]
            if c.offset >= 0:  # a replaced marker: the context it was sampled in, then its first tokens
                context += list(r.replaced_markers[r.continuation_starts.index(c.position)][: c.offset])
            with torch.no_grad():
                logits = model(torch.tensor([context])).logits[0, -1].float() / 0.7
            logits[new_id:] = float("-inf")  # the new id is outside the tiny vocab; nothing to ban there
            expected = logits.log_softmax(-1)[c.token]
            assert scored.mask[i, col] and scored.logprobs[i, col].item() == pytest.approx(expected.item(), abs=1e-4)
        assert scored.mask[i].sum() == len(scored_choices(r))


def test_reinforce_raises_a_toy_reward():
    """Reward: 1 when some inserted continuation is followed by a chosen token id. Only the row can learn it.

    (Not the *fraction* of continuations so followed: its exact gradient also pays for emitting fewer second markers,
    a term the pre-fix estimator missed, and at this learning rate that reward does not rise within 30 steps.)"""
    # A wider init than the default makes the tiny model's next token react to its input embedding.
    loaded = tiny(boost=4.0, init_range=0.2)
    model, tok = loaded.model, loaded.tokenizer
    overlay = get_overlay(model)
    cfg = ForcingConfig(end_of_thinking_ids=tuple(loaded.end_of_thinking_ids), eos_token_ids=(tok.eos_token_id,),
                        num_continuations=2, continuation_ids=(overlay.token_id,), max_new_tokens=16,
                        banned_ids=(overlay.token_id,))
    prompts = [tok.encode(p) for p in ["one", "two", "three", "four"] for _ in range(8)]
    optimizer = torch.optim.Adam([overlay.row], lr=0.3)
    # Target: an ordinary token that already follows the continuation now and then (else there is no signal).
    probe = generate_forced(model, prompts, cfg, SamplingConfig(1.0, seed=999))
    followers = Counter(r.completion_ids[s + 1] for r in probe for s in r.continuation_starts
                        if s + 1 < len(r.completion_ids))
    target = next(t for t, _ in followers.most_common() if t < 256)

    def reward(r: Rollout) -> float:
        return float(any(r.completion_ids[s + 1] == target for s in r.continuation_starts if s + 1 < len(r.completion_ids)))

    history = []
    for step in range(30):
        rollouts = generate_forced(model, prompts, cfg, SamplingConfig(1.0, seed=step))
        rewards = torch.tensor([reward(r) for r in rollouts])
        history.append(rewards.mean().item())
        scored = completion_logprobs(model, rollouts, banned_ids=(overlay.token_id,))
        loss = reinforce_loss(scored, compute_advantages(rewards, 8, "group_mean"), "sequence_sum")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    start, end = sum(history[:3]) / 3, sum(history[-5:]) / 5
    assert end > start + 0.25 and end > 3 * start, f"reward did not rise: {history}"


@pytest.mark.parametrize("baseline", ["none", "batch_mean", "group_mean"])
@pytest.mark.parametrize("scale", ["none", "batch", "group"])
def test_zero_variance_groups_never_explode(baseline, scale):
    """An all-correct group next to a mixed one: with std scaling its advantage is 0 whatever the baseline (it was
    (1 - b) / 1e-4 with baseline none or batch_mean); no advantage is larger than the rewards' own scale."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    adv = compute_advantages(rewards, 4, baseline, scale)
    assert torch.isfinite(adv).all() and adv.abs().max() <= 3.0, adv
    if scale == "group":
        assert torch.equal(adv[:4], torch.zeros(4))
    everything_equal = compute_advantages(torch.ones(8), 4, baseline, scale)
    assert torch.equal(everything_equal, torch.zeros(8) if scale != "none" or baseline != "none" else torch.ones(8))


def test_uniform_group_share():
    from ctt.rl.reinforce import uniform_group_share

    assert uniform_group_share(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2) == pytest.approx(2 / 3)


def test_rollout_per_n_forces_each_prompt_at_its_own_n():
    """forcing.num_continuations=[...]: problem i is forced up to ns[i] times, its k samples together, in order."""
    from dataclasses import replace

    from ctt.data.problems import Problem
    from ctt.engine import mix_seed
    from ctt.policy.modes import Mode
    from ctt.policy.policy import ForcingSettings, Policy

    policy = Policy(tiny(boost=6.0), ForcingSettings(max_new_tokens=24, num_continuations=[1, 3]), "Answer.")
    problems = [Problem(f"p{i}", q, "1") for i, q in enumerate(["one", "two", "three", "four"])]
    ns, sampling, k = [1, 3, 3, 1], SamplingConfig(1.0, seed=5), 2
    out = policy.rollout_per_n(problems, ns, sampling, samples_per_prompt=k)
    assert len(out) == len(problems) * k
    for i, r in enumerate(out):
        assert r.prompt_ids == policy.prompt_ids(problems[i // k]) and r.num_forced <= ns[i // k]
    assert max(r.num_forced for r in out) == 3
    for n, idx in ((1, [0, 3]), (3, [1, 2])):  # each N generated once, seeded by (seed, N)
        alone = policy.rollout([problems[i] for i in idx], policy.forcing(Mode("learned", None, n)),
                               replace(sampling, seed=mix_seed(5, n)), k)
        assert [r.completion_ids for r in alone] == [out[i * k + s].completion_ids for i in idx for s in range(k)]
    same = policy.rollout_per_n(problems, [3] * 4, sampling, k)  # one N: exactly rollout at that N
    ref = policy.rollout(problems, policy.forcing(Mode("learned", None, 3)), sampling, k)
    assert [r.completion_ids for r in same] == [r.completion_ids for r in ref]


def test_rloo_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    expected = torch.tensor([1 - 0.0, 0 - 0.5, 0 - 0.5, 1 - 1.0, 1 - 1.0, 1 - 1.0])
    assert torch.allclose(compute_advantages(r, 3, "rloo"), expected)
    with pytest.raises(ConfigError):
        compute_advantages(r, 1, "rloo")
