"""Sampled rollouts of the vLLM engine follow the exact distribution ctt's loss assumes.

The tiny model of tests/test_estimator.py (sampling restricted to four tokens; its every rollout enumerated with
its probability under temperature and top-p) is sampled by the vLLM engine. Every sampled record must be a leaf of
the enumeration, and the counts must fit the leaves' probabilities (chi-square goodness of fit). The same check
rejects vLLM rollouts drawn without top-p or at another temperature (the test can fail). Then the REINFORCE
estimate from vLLM's rollouts alone (ctt's scorer and loss) matches the exact gradient of the expected reward
within its Monte-Carlo error: the estimator test holds on vLLM-engine rollouts.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from ctt.engine import EngineSettings, SamplingConfig, build_engine, row_seeds
from ctt.rl.reinforce import completion_logprobs, reinforce_loss
from ctt.models.token import get_overlay
from tests import test_vllm_engine  # noqa: F401  (skips this module too when vLLM is missing, fails in CI)
from tests.test_estimator import _enumerate, _record, _reward, _setup

SHAPE = {"num_heads": 2, "num_kv_heads": 1}
DRAWS = 4000
CASES = {"1tok-N2-T0.7-p0.9": (1, 2, 0.7, 0.9), "2tok-N2-T1.5-p0.95": (2, 2, 1.5, 0.95)}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request):
    torch.set_num_threads(1)
    marker_len, n, temperature, top_p = CASES[request.param]
    model, tok, forcing, allowed = _setup(marker_len, n, shape=SHAPE)
    overlay = get_overlay(model)
    engine = build_engine(EngineSettings(kind="vllm"), model=model, token_ids=overlay.token_ids,
                          rows=lambda: overlay.row, seed=0)
    prompt = tok.encode("ab")
    yield model, tok, forcing, allowed, prompt, engine, n, temperature, top_p
    engine.close()


def _leaves(model, prompt, forcing, allowed, temperature, top_p):
    leaves = _enumerate(model, prompt, forcing, allowed, temperature, top_p)
    return leaves, {_record(s.ro): s.logp.exp().item() for s in leaves}


def _draw(engine, prompt, forcing, temperature, top_p, seed=11):
    sampling = SamplingConfig(temperature, top_p, seed)
    return engine.generate([prompt] * DRAWS, forcing, sampling, seeds=row_seeds(seed, DRAWS))


def _fit(rollouts, probs) -> float:
    """Chi-square p-value of the sampled records against the leaf probabilities (leaves expected fewer than 5
    times pooled); 0.0 when a record is not a leaf at all."""
    seen = Counter(_record(r) for r in rollouts)
    if not set(seen) <= set(probs):
        return 0.0
    big = [k for k, p in probs.items() if p * DRAWS >= 5]
    rest = [k for k in probs if k not in big]
    observed = [seen[k] for k in big] + ([sum(seen[k] for k in rest)] if rest else [])
    expected = [probs[k] * DRAWS for k in big] + ([sum(probs[k] for k in rest) * DRAWS] if rest else [])
    scale = sum(observed) / sum(expected)
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


def test_vllm_samples_the_exact_distribution(case):
    model, tok, forcing, allowed, prompt, engine, n, temperature, top_p = case
    _, probs = _leaves(model, prompt, forcing, allowed, temperature, top_p)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    rollouts = _draw(engine, prompt, forcing, temperature, top_p)
    assert any(r.num_forced == n for r in rollouts), "no rollout was forced N times: the test would prove nothing"
    assert _fit(rollouts, probs) > 1e-3


def test_the_fit_rejects_sampling_without_top_p_or_at_another_temperature(case):
    model, tok, forcing, allowed, prompt, engine, n, temperature, top_p = case
    _, probs = _leaves(model, prompt, forcing, allowed, temperature, top_p)
    assert _fit(_draw(engine, prompt, forcing, temperature, 1.0), probs) < 1e-6  # top-p ignored
    assert _fit(_draw(engine, prompt, forcing, 1.0 if temperature != 1.0 else 0.5, top_p), probs) < 1e-6


def test_the_estimator_on_vllm_rollouts_matches_the_exact_gradient(case):
    model, tok, forcing, allowed, prompt, engine, n, temperature, top_p = case
    row, a_id = get_overlay(model).row, tok.encode("a")[0]
    leaves, _ = _leaves(model, prompt, forcing, allowed, temperature, top_p)
    probs = torch.stack([s.logp for s in leaves]).exp()
    rewards = torch.tensor([_reward(s.ro, n, a_id) for s in leaves])
    (exact,) = torch.autograd.grad((probs * rewards).sum(), row)
    rollouts, baseline, parts = _draw(engine, prompt, forcing, temperature, top_p), 0.5, 20
    estimates = []
    for chunk in [rollouts[i::parts] for i in range(parts)]:
        advantages = torch.tensor([_reward(r, n, a_id) - baseline for r in chunk])
        scored = completion_logprobs(model, chunk, temperature, forcing.banned_ids, tok.pad_token_id, top_p=top_p)
        (g,) = torch.autograd.grad(-reinforce_loss(scored, advantages, "sequence_sum"), row)
        estimates.append(g)
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / parts ** 0.5
    assert exact.norm() > 1e-3
    z = ((mean - exact) / se.clamp(min=1e-12)).abs()
    assert (z < 5).all(), f"max z = {z.max():.1f}"  # every coordinate within 5 Monte-Carlo standard errors
