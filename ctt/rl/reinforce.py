"""REINFORCE for the continue-thinking row: advantages, log-probs of the scored choices, the loss.

A rollout's probability is the product of pi(choice | context) over every token the model *sampled*, including
each end-of-thinking marker that was sampled and then replaced by a continuation (all k tokens of a multi-token
marker). Only choices whose context holds the learned row depend on it: those after the first inserted
continuation, so the first replaced marker is not scored, the 2nd..Nth are. Forced tokens (the continuation,
budget-forced text) are not the policy's choices and are never scored. Each choice is scored under the
distribution it was drawn from (temperature, banned ids, the top-p nucleus). tests/test_estimator.py checks the
resulting gradient against the exact gradient of the expected reward by enumerating every rollout of a tiny model.
Each variant is a name in a registry, so an ablation is a config override (`rl.baseline=group_mean`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from ctt.errors import ConfigError
from ctt.engine.batching import banned_in_vocab, mask_banned, pad_batch
from ctt.engine import Rollout
from ctt.engine.sampling import nucleus_mask
from ctt.rewards.registry import reward_from_config
from ctt.settings import MAX_SAMPLES, Settings, one_of, require, require_size, require_temperature


class ScoredTokens(NamedTuple):
    logprobs: torch.Tensor  # [B, S] log-prob of each rollout's scored choices, in sampling order (0 past the end)
    mask: torch.Tensor  # [B, S] bool, True for the scored choices


class Choice(NamedTuple):
    """One sampled token whose probability depends on the learned row.

    context: the ids the model saw (prompt + completion[:position], then marker[:offset] for a replaced marker);
    token: what it sampled there.
    """

    position: int  # completion index: where the token stands, or where the replaced marker stood
    offset: int  # -1 for a kept completion token; t for token t of a replaced marker
    token: int


# --- advantages ----------------------------------------------------------------------------------------------


def _group_view(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of rl.samples_per_prompt={group_size}")
    return rewards.view(-1, group_size)


def _leave_one_out(groups: torch.Tensor) -> torch.Tensor:
    k = groups.shape[1]
    if k < 2:
        raise ConfigError("rl.baseline=rloo needs rl.samples_per_prompt >= 2 (the mean of the other samples)")
    return (groups.sum(1, keepdim=True) - groups) / (k - 1)


BASELINES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "none": lambda r, k: torch.zeros_like(r),
    "batch_mean": lambda r, k: r.mean().expand_as(r),
    "group_mean": lambda r, k: _group_view(r, k).mean(1, keepdim=True).expand(-1, k).reshape(-1),
    # leave-one-out (RLOO): the mean of the OTHER k-1 samples of the group, independent of the sample, so unbiased
    "rloo": lambda r, k: _leave_one_out(_group_view(r, k)).reshape(-1),
}
SCALES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "none": lambda r, k: torch.ones_like(r),
    "batch": lambda r, k: r.std(unbiased=False).expand_as(r),
    "group": lambda r, k: _group_view(r, k).std(1, unbiased=False, keepdim=True).expand(-1, k).reshape(-1),
}


def compute_advantages(
    rewards: torch.Tensor, group_size: int, baseline: str = "group_mean", scale: str = "none", eps: float = 1e-4
) -> torch.Tensor:
    """`(R - b) / (s + eps)` per sample. With a std scale, samples whose group (or batch) has zero reward variance get
    advantage 0 whatever the baseline: dividing their non-zero `R - b` by eps would give 1e4-sized advantages."""
    one_of("rl.baseline", baseline, BASELINES)
    one_of("rl.scale", scale, SCALES)
    rewards = rewards.float()
    centred = rewards - BASELINES[baseline](rewards, group_size)
    if scale == "none":
        return centred
    std = SCALES[scale](rewards, group_size)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def uniform_group_share(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal: with a group baseline they carry no learning signal."""
    groups = _group_view(rewards.float(), group_size)
    return (groups.max(1).values == groups.min(1).values).float().mean().item()


# --- log-probs with grad -------------------------------------------------------------------------------------


def scored_choices(rollout: Rollout) -> list[Choice]:
    """Every sampled choice that depends on the learned row, in sampling order: the sampled tokens after the first
    continuation, and every token of each replaced marker after the first."""
    if not rollout.continuation_starts:
        return []
    first = rollout.continuation_starts[0]
    markers = list(zip(rollout.continuation_starts, rollout.replaced_markers))[1:]
    out = [Choice(start, t, tok) for start, marker in markers for t, tok in enumerate(marker)]
    ids, sampled = rollout.completion_ids, rollout.sampled
    out += [Choice(i, -1, ids[i]) for i in range(first, len(ids)) if sampled[i]]
    # A replaced marker came before the token standing at its position (the continuation, or the re-sample).
    return sorted(out, key=lambda c: (c.position, 0 if c.offset >= 0 else 1, c.offset))


def _token_logprobs(hidden, targets, lm_head, temperature: float, banned: list[int], top_p: float) -> torch.Tensor:
    """log pi(target) under the distribution the rollout sampled from: banned ids removed, temperature, and the top-p
    nucleus (recomputed from detached logits, always holding the target) renormalised."""
    logits = mask_banned(lm_head(hidden).float(), banned)
    logits = logits / temperature
    if top_p < 1.0:
        with torch.no_grad():
            keep = nucleus_mask(logits.detach(), top_p)
            keep[torch.arange(len(targets), device=keep.device), targets] = True  # float noise at the nucleus edge
        logits = logits.masked_fill(~keep, float("-inf"))
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


def _holds_learned_token(model: PreTrainedModel, seqs: list[list[int]]) -> bool:
    ids = set(getattr(model.get_input_embeddings(), "token_ids", ()))
    return bool(ids) and any(ids.intersection(s) for s in seqs)


class _Plan(NamedTuple):
    """The loss pass's input sequences and, per scored choice, where its prediction is read."""

    seqs: list[list[int]]  # one main sequence per scored rollout, plus one per replaced multi-token marker
    cuts: list[int]  # per sequence: tokens before this index cannot depend on the row
    seq_of: list[int]  # per choice: its sequence
    pred_at: list[int]  # per choice: the index whose hidden state predicts it
    targets: list[int]
    out: list[tuple[int, int]]  # per choice: (rollout, column) in ScoredTokens


def _plan(rollouts: list[Rollout], choices: list[list[Choice]]) -> _Plan:
    plan = _Plan([], [], [], [], [], [])
    for i, (r, cs) in enumerate(zip(rollouts, choices)):
        if not cs:
            continue
        full, n = r.prompt_ids + r.completion_ids, len(r.prompt_ids)
        # A prediction for completion index p is read at n + p - 1; a marker's later tokens from a branch that
        # appends marker[:t] to the context the marker was sampled in.
        main_end = max(n + c.position for c in cs if c.offset <= 0)
        cut = min(n + r.continuation_starts[0], min(n + c.position - 1 for c in cs))
        main = len(plan.seqs)
        plan.seqs.append(full[:main_end])
        plan.cuts.append(cut)
        branches: dict[int, int] = {}
        for col, c in enumerate(cs):
            seq = main
            if c.offset > 0:
                if c.position not in branches:
                    marker = r.replaced_markers[r.continuation_starts.index(c.position)]
                    branches[c.position] = len(plan.seqs)
                    plan.seqs.append(full[: n + c.position] + list(marker[:-1]))
                    plan.cuts.append(cut)
                seq = branches[c.position]
            plan.seq_of.append(seq)
            plan.pred_at.append(n + c.position + max(c.offset, 0) - 1)
            plan.targets.append(c.token)
            plan.out.append((i, col))
    return plan


def completion_logprobs(
    model: PreTrainedModel,
    rollouts: list[Rollout],
    temperature: float = 1.0,
    banned_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    chunk_size: int = 1024,
    prefix_reuse: bool = True,
    gradient_checkpointing: bool = False,
    top_p: float = 1.0,
) -> ScoredTokens:
    """Recompute, with grad, the log-prob of every scored choice (see `scored_choices`).

    prefix_reuse: the tokens before the first inserted continuation cannot depend on the learned row, so they run
        once under no_grad into a KV cache (left-padded so that every row's prefix ends at the same column) and only
        the rest runs with grad, attending to that cache (right-padded). The same numbers as the full recompute (up
        to float rounding), with activations kept for the suffixes only. Falls back to the full pass when a prefix
        holds the learned token (a prompt that contains it).
    gradient_checkpointing: keep only each decoder layer's input for the backward pass and recompute the layer then.
    """
    if temperature <= 0:
        raise ConfigError("log-probs of sampled tokens need a temperature > 0 (greedy choices have no gradient)")
    choices = [scored_choices(r) for r in rollouts]
    width = max((len(c) for c in choices), default=0)
    device = next(model.parameters()).device
    logprobs = torch.zeros(len(rollouts), width, device=device)
    mask = torch.zeros(len(rollouts), width, dtype=torch.bool, device=device)
    plan = _plan(rollouts, choices)
    if not plan.seqs:
        return ScoredTokens(logprobs, mask)
    cuts = plan.cuts
    if not prefix_reuse or _holds_learned_token(model, [s[:c] for s, c in zip(plan.seqs, cuts)]):
        cuts = [0] * len(plan.seqs)
    with _checkpointed_layers(model, gradient_checkpointing):
        hidden = _suffix_hidden(model, plan.seqs, cuts, pad_token_id, device)
    rows = torch.tensor(plan.seq_of, device=device)
    preds = torch.tensor([p - cuts[s] for p, s in zip(plan.pred_at, plan.seq_of)], device=device)
    selected = hidden[rows, preds]
    targets = torch.tensor(plan.targets, device=device)
    lm_head = model.get_output_embeddings()
    banned = banned_in_vocab(banned_ids, lm_head.weight.shape[0])
    # Chunked + checkpointed: never holds [tokens, vocab] logits for the backward pass.
    pieces = [
        checkpoint(_token_logprobs, h, t, lm_head, temperature, banned, top_p, use_reentrant=False)
        for h, t in zip(selected.split(chunk_size), targets.split(chunk_size))
    ]
    index = tuple(torch.tensor(x, device=device) for x in zip(*plan.out))
    logprobs = logprobs.index_put(index, torch.cat(pieces))
    mask[index] = True
    return ScoredTokens(logprobs, mask)


def _suffix_hidden(model, seqs: list[list[int]], cuts: list[int], pad_token_id: int, device) -> torch.Tensor:
    """Last hidden states `[rows, suffix width]` of `seq[cut:]` per row, with grad; `seq[:cut]` runs without grad."""
    base = model.base_model
    suffix_ids, suffix_mask = pad_batch([s[c:] for s, c in zip(seqs, cuts)], pad_token_id, device, side="right")
    if not any(cuts):
        return base(input_ids=suffix_ids, attention_mask=suffix_mask, use_cache=False).last_hidden_state
    # Left-pad the prefixes so that they all end at one column and the suffixes all start there.
    prefix_ids, prefix_mask = pad_batch([s[:c] for s, c in zip(seqs, cuts)], pad_token_id, device)
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
    one_of("rl.aggregation", aggregation, AGGREGATIONS)
    logp = scored.logprobs
    return AGGREGATIONS[aggregation](logp, scored.mask, advantages.to(logp.device), token_count)


# --- the `rl` config group -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLSettings(Settings):
    """The `rl` config group, typed and checked once at start-up (conf/rl/reinforce.yaml documents each key)."""

    section: ClassVar[str] = "rl"

    samples_per_prompt: int = 4
    baseline: str = "group_mean"
    scale: str = "none"
    aggregation: str = "token_mean"
    temperature: float = 1.0
    top_p: float = 1.0
    reward: str | dict = "math_verify"  # a reward name, or {name: ..., <its parameters>} (ctt.rewards.registry)
    max_bad_steps: int = 5
    prefix_reuse: bool = True
    gradient_checkpointing: bool = False

    def check(self) -> None:
        require_size(self.samples_per_prompt, "rl.samples_per_prompt", 1, MAX_SAMPLES)
        require(self.max_bad_steps >= 1, "rl.max_bad_steps", "an integer >= 1", self.max_bad_steps)
        # Training samples: at T=0 (greedy) no choice has a gradient, and scoring at T=1e-5 would scale it by 1e5.
        require_temperature(self.temperature, "rl.temperature", greedy_ok=False)  # training samples
        require(0 < self.top_p <= 1, "rl.top_p", "a number in (0, 1]", self.top_p)
        one_of("rl.baseline", self.baseline, BASELINES)
        one_of("rl.scale", self.scale, SCALES)
        one_of("rl.aggregation", self.aggregation, AGGREGATIONS)
        reward_from_config(self.reward, "rl.reward")
        if self.samples_per_prompt == 1 and (self.baseline in ("group_mean", "rloo") or self.scale == "group"):
            raise ConfigError(
                "rl.samples_per_prompt=1 with a per-group baseline or scale makes every advantage 0 (nothing is "
                "learned): use rl.samples_per_prompt >= 2, or rl.baseline=batch_mean|none with rl.scale=none|batch"
            )
