"""REINFORCE for the continue-thinking row: advantages, log-probs of the scored tokens, the loss.

Only tokens sampled *after* the first inserted continuation depend on the learned row, so only those are scored.
Forced tokens (the continuation itself, budget-forced text) are not the policy's choices and are never scored.
Each variant is a name in a registry, so an ablation is a config override (`rl.baseline=group_mean`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from ctt.errors import ConfigError
from ctt.generation import Rollout


class ScoredTokens(NamedTuple):
    logprobs: torch.Tensor  # [B, T] log-prob of each completion token (0 where not scored)
    mask: torch.Tensor  # [B, T] bool, True where the token is scored


# --- advantages ----------------------------------------------------------------------------------------------


def _group_view(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of rl.samples_per_prompt={group_size}")
    return rewards.view(-1, group_size)


BASELINES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "none": lambda r, k: torch.zeros_like(r),
    "batch_mean": lambda r, k: r.mean().expand_as(r),
    "group_mean": lambda r, k: _group_view(r, k).mean(1, keepdim=True).expand(-1, k).reshape(-1),
}
SCALES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "none": lambda r, k: torch.ones_like(r),
    "batch": lambda r, k: r.std(unbiased=False).expand_as(r),
    "group": lambda r, k: _group_view(r, k).std(1, unbiased=False, keepdim=True).expand(-1, k).reshape(-1),
}


def compute_advantages(
    rewards: torch.Tensor, group_size: int, baseline: str = "group_mean", scale: str = "none", eps: float = 1e-4
) -> torch.Tensor:
    """`(R - b) / s` per sample. Zero-variance groups get advantage 0 (a no-op, never NaN)."""
    if baseline not in BASELINES:
        raise ConfigError(f"rl.baseline={baseline!r} is not one of {sorted(BASELINES)}")
    if scale not in SCALES:
        raise ConfigError(f"rl.scale={scale!r} is not one of {sorted(SCALES)}")
    rewards = rewards.float()
    centred = rewards - BASELINES[baseline](rewards, group_size)
    return centred / (SCALES[scale](rewards, group_size) + eps) if scale != "none" else centred


# --- log-probs with grad -------------------------------------------------------------------------------------


def scored_positions(rollout: Rollout) -> list[int]:
    """Completion indices whose token depends on the learned row: sampled, after the first continuation."""
    if not rollout.continuation_starts:
        return []
    first = rollout.continuation_starts[0]
    return [i for i in range(first, len(rollout.completion_ids)) if rollout.sampled[i]]


def _token_logprobs(hidden, targets, lm_head, temperature: float, banned: list[int]) -> torch.Tensor:
    logits = lm_head(hidden).float() / temperature
    if banned:
        logits[:, banned] = float("-inf")  # the same distribution the rollout sampled from
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def completion_logprobs(
    model: PreTrainedModel,
    rollouts: list[Rollout],
    temperature: float = 1.0,
    banned_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    chunk_size: int = 1024,
) -> ScoredTokens:
    """Recompute, with grad, the log-probs of every scored token (see `scored_positions`)."""
    width = max((len(r.completion_ids) for r in rollouts), default=0)
    device = next(model.parameters()).device
    logprobs = torch.zeros(len(rollouts), width, device=device)
    mask = torch.zeros(len(rollouts), width, dtype=torch.bool, device=device)
    positions = [scored_positions(r) for r in rollouts]
    rows = [i for i, p in enumerate(positions) if p]
    if not rows:
        return ScoredTokens(logprobs, mask)
    # Right-padded batch, cut after the last scored token: nothing later can influence the scores.
    seqs = [rollouts[i].prompt_ids + rollouts[i].completion_ids[: positions[i][-1] + 1] for i in rows]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s, device=device)
        attn[j, : len(s)] = 1
    hidden = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    # Flat (row, sequence index) pairs: the hidden state at t-1 predicts the token at t.
    flat_row, flat_pred, flat_target, out_row, out_col = [], [], [], [], []
    for j, i in enumerate(rows):
        prompt_len = len(rollouts[i].prompt_ids)
        for c in positions[i]:
            flat_row.append(j)
            flat_pred.append(prompt_len + c - 1)
            flat_target.append(rollouts[i].completion_ids[c])
            out_row.append(i)
            out_col.append(c)
    selected = hidden[torch.tensor(flat_row, device=device), torch.tensor(flat_pred, device=device)]
    targets = torch.tensor(flat_target, device=device)
    lm_head = model.get_output_embeddings()
    banned = [b for b in banned_ids if b < lm_head.weight.shape[0]]
    # Chunked + checkpointed: never holds [tokens, vocab] logits for the backward pass.
    pieces = [
        checkpoint(_token_logprobs, h, t, lm_head, temperature, banned, use_reentrant=False)
        for h, t in zip(selected.split(chunk_size), targets.split(chunk_size))
    ]
    index = (torch.tensor(out_row, device=device), torch.tensor(out_col, device=device))
    logprobs = logprobs.index_put(index, torch.cat(pieces))
    mask[index] = True
    return ScoredTokens(logprobs, mask)


# --- the loss --------------------------------------------------------------------------------------------------


def _sequence_sum(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    return -(adv * (logp * mask).sum(-1)).mean()


def _token_mean(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    return -(adv.unsqueeze(-1) * logp * mask).sum() / mask.sum().clamp(min=1)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sequence_sum": _sequence_sum,
    "token_mean": _token_mean,
}


def reinforce_loss(scored: ScoredTokens, advantages: torch.Tensor, aggregation: str = "token_mean") -> torch.Tensor:
    """-(R - b) * log pi(scored tokens), aggregated per sequence or per token."""
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"rl.aggregation={aggregation!r} is not one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[aggregation](scored.logprobs, scored.mask, advantages.to(scored.logprobs.device))
