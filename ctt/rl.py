"""REINFORCE for the continue-thinking row: advantages, log-probs of the scored tokens, the loss.

Only tokens sampled *after* the first inserted continuation depend on the learned row, so only those are scored.
Forced tokens (the continuation itself, budget-forced text) are not the policy's choices and are never scored.
Each variant is a name in a registry, so an ablation is a config override (`rl.baseline=group_mean`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from ctt.errors import ConfigError
from ctt.generation import Rollout, left_pad


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


class _FrozenPrefixLayer(DynamicLayer):
    """Holds a detached prefix's K/V; `update` returns prefix + new states without storing them.

    Stateless, so a layer recomputed by gradient checkpointing sees exactly what the first pass saw.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class _FrozenPrefixCache(DynamicCache):
    def __init__(self, filled: DynamicCache):
        Cache.__init__(self, layers=[_FrozenPrefixLayer(layer.keys, layer.values) for layer in filled.layers])


@contextmanager
def _checkpointed_layers(model: PreTrainedModel, enabled: bool):
    """Activation checkpointing per decoder layer, whatever the model's train/eval mode (HF's own only acts in
    train mode, and then drops the KV cache the prefix-reuse pass needs)."""
    if not enabled:
        yield
        return
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"gradient_checkpointing: {type(model.base_model).__name__} has no `layers` ModuleList")
    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)  # instance attribute shadows the method
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _right_padded(seqs: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[j, : len(s)] = 1
    return ids.to(device), attn.to(device)


def _holds_learned_token(model: PreTrainedModel, seqs: list[list[int]]) -> bool:
    token_id = getattr(model.get_input_embeddings(), "token_id", None)
    return token_id is not None and any(token_id in s for s in seqs)


def completion_logprobs(
    model: PreTrainedModel,
    rollouts: list[Rollout],
    temperature: float = 1.0,
    banned_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    chunk_size: int = 1024,
    prefix_reuse: bool = True,
    gradient_checkpointing: bool = False,
) -> ScoredTokens:
    """Recompute, with grad, the log-probs of every scored token (see `scored_positions`).

    prefix_reuse: the tokens before the first inserted continuation cannot depend on the learned row, so they run
        once under no_grad into a KV cache (left-padded so that every row's prefix ends at the same column) and only
        the rest runs with grad, attending to that cache (right-padded). The same numbers as the full recompute (up
        to float rounding), with activations kept for the suffixes only. Falls back to the full pass when a prefix
        holds the learned token (a prompt that contains it).
    gradient_checkpointing: keep only each decoder layer's input for the backward pass and recompute the layer then.
    """
    width = max((len(r.completion_ids) for r in rollouts), default=0)
    device = next(model.parameters()).device
    logprobs = torch.zeros(len(rollouts), width, device=device)
    mask = torch.zeros(len(rollouts), width, dtype=torch.bool, device=device)
    positions = [scored_positions(r) for r in rollouts]
    rows = [i for i, p in enumerate(positions) if p]
    if not rows:
        return ScoredTokens(logprobs, mask)
    prompt_lens = [len(rollouts[i].prompt_ids) for i in rows]
    # Each input sequence stops before the last scored token: the hidden state at t-1 predicts the token at t.
    seqs = [rollouts[i].prompt_ids + rollouts[i].completion_ids[: positions[i][-1]] for i in rows]
    # Prefix: everything before the first continuation (and before the first scored prediction).
    cuts = [n + min(rollouts[i].continuation_starts[0], positions[i][0] - 1) for n, i in zip(prompt_lens, rows)]
    if prefix_reuse and _holds_learned_token(model, [s[:c] for s, c in zip(seqs, cuts)]):
        prefix_reuse = False
    if not prefix_reuse:
        cuts = [0] * len(rows)
    with _checkpointed_layers(model, gradient_checkpointing):
        hidden = _suffix_hidden(model, seqs, cuts, pad_token_id, device)
    # Flat (row, suffix index) pairs.
    flat_row, flat_pred, flat_target, out_row, out_col = [], [], [], [], []
    for j, i in enumerate(rows):
        for c in positions[i]:
            flat_row.append(j)
            flat_pred.append(prompt_lens[j] + c - 1 - cuts[j])
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


def _suffix_hidden(model, seqs: list[list[int]], cuts: list[int], pad_token_id: int, device) -> torch.Tensor:
    """Last hidden states `[rows, suffix width]` of `seq[cut:]` per row, with grad; `seq[:cut]` runs without grad."""
    base = model.base_model
    suffix_ids, suffix_mask = _right_padded([s[c:] for s, c in zip(seqs, cuts)], pad_token_id, device)
    if not any(cuts):
        return base(input_ids=suffix_ids, attention_mask=suffix_mask, use_cache=False).last_hidden_state
    # Left-pad the prefixes so that they all end at one column and the suffixes all start there.
    prefix_ids, prefix_mask = left_pad([s[:c] for s, c in zip(seqs, cuts)], pad_token_id, device)
    filled = DynamicCache()
    with torch.no_grad():
        base(
            input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
            past_key_values=filled, use_cache=True,
        )
    cut = torch.tensor(cuts, device=device).unsqueeze(-1)
    positions = cut + torch.arange(suffix_ids.shape[1], device=device)
    return base(
        input_ids=suffix_ids,
        attention_mask=torch.cat([prefix_mask, suffix_mask], dim=-1),
        position_ids=positions,
        past_key_values=_FrozenPrefixCache(filled),
        use_cache=True,
    ).last_hidden_state


# --- the loss --------------------------------------------------------------------------------------------------


def _sequence_sum(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, token_count) -> torch.Tensor:
    return -(adv * (logp * mask).sum(-1)).mean()


def _token_mean(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, token_count) -> torch.Tensor:
    count = mask.sum() if token_count is None else token_count
    return -(adv.unsqueeze(-1) * logp * mask).sum() / torch.as_tensor(count, dtype=logp.dtype).clamp(min=1)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sequence_sum": _sequence_sum,
    "token_mean": _token_mean,
}


def reinforce_loss(
    scored: ScoredTokens, advantages: torch.Tensor, aggregation: str = "token_mean", token_count=None
) -> torch.Tensor:
    """-(R - b) * log pi(scored tokens), aggregated per sequence or per token.

    `token_count` replaces this batch's scored-token count as the `token_mean` divisor. Data-parallel training
    passes the mean count over ranks: the all-reduced mean of the rank gradients is then the gradient of the
    global-batch token mean, whatever each rank's own count.
    """
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"rl.aggregation={aggregation!r} is not one of {sorted(AGGREGATIONS)}")
    logp = scored.logprobs
    return AGGREGATIONS[aggregation](logp, scored.mask, advantages.to(logp.device), token_count)


# --- the `rl` config group -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLSettings:
    """The `rl` config group, typed and checked once at start-up (conf/rl/reinforce.yaml documents each key)."""

    samples_per_prompt: int = 4
    baseline: str = "group_mean"
    scale: str = "none"
    aggregation: str = "token_mean"
    temperature: float = 1.0
    top_p: float = 1.0
    reward: str = "math_verify"
    max_bad_steps: int = 5
    prefix_reuse: bool = True
    gradient_checkpointing: bool = False

    @classmethod
    def from_config(cls, rl: Mapping[str, Any] | None) -> "RLSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(rl or {}) - known)
        if unknown:
            raise ConfigError(f"unknown rl key(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**(rl or {}))

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        checks = {
            "samples_per_prompt": (is_int(self.samples_per_prompt) and self.samples_per_prompt >= 1, "an integer >= 1"),
            "max_bad_steps": (is_int(self.max_bad_steps) and self.max_bad_steps >= 1, "an integer >= 1"),
            "temperature": (is_number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            "top_p": (is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            "prefix_reuse": (isinstance(self.prefix_reuse, bool), "true or false"),
            "gradient_checkpointing": (isinstance(self.gradient_checkpointing, bool), "true or false"),
            "baseline": (self.baseline in BASELINES, f"one of {sorted(BASELINES)}"),
            "scale": (self.scale in SCALES, f"one of {sorted(SCALES)}"),
            "aggregation": (self.aggregation in AGGREGATIONS, f"one of {sorted(AGGREGATIONS)}"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"rl.{key} must be {expected}, got {getattr(self, key)!r}")
