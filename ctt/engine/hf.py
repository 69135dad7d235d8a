"""ctt's own engine: budget-forced batched sampling on transformers' forward, with a KV cache.

Written by hand because `model.generate` cannot *replace* a token inside the loop: a logits processor can only
change what is sampled, not feed a different (multi-token, or learned) continuation and mask out an already-cached
multi-token marker. Every row runs the state machine of ctt.engine.forcing. Removed marker tokens that were already
fed (multi-token markers) are masked out of attention and their positions reused, which is exactly the computation
of a sequence that never contained them. Finished sequences leave the batch (their cache rows are dropped).

Speed only (`EngineSettings`): the KV cache lives in preallocated per-layer buffers written in place
(`cache="buffer"`, the default; HF's `DynamicCache` re-allocates and copies every layer's K/V on every step), the
attention mask is one preallocated buffer too, and finished rows are compacted away (`drop_finished`).
`cache="static"` (HF `StaticCache`, fixed shapes) with `compile=True` is the torch.compile route; it keeps finished
rows in the batch. The prefill feeds a prefix common to all prompts once, and each distinct prompt once
(`share_prefix`). The cache machinery lives in ctt.engine.kv_cache. See bench/README.md for measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from ctt.engine.base import RolloutEngine, register_engine
from ctt.engine.batching import banned_in_vocab, mask_banned
from ctt.engine.forcing import DONE, RowState, advance
from ctt.engine.kv_cache import compiled_forward, new_cache, prefill
from ctt.engine.records import ForcingConfig, Rollout, SamplingConfig, row_seeds
from ctt.engine.sampling import row_generators, sample_next
from ctt.engine.settings import EngineSettings


def _step_bound(forcing: ForcingConfig) -> int:
    """An upper bound (give or take) on the decode steps: buffers start this large and grow if it is exceeded."""
    k = len(forcing.end_of_thinking_ids)
    per_insert = k + max(len(forcing.continuation_ids), 1)
    budget = len(forcing.budget_force_ids if forcing.budget_force_ids is not None else forcing.end_of_thinking_ids)
    return forcing.max_new_tokens + forcing.num_continuations * per_insert + budget + 2


@dataclass
class _Batch:
    """Decoding state of the rows still in the batch (row b of every tensor is `rows[active[b]]`)."""

    cache: Cache
    attn: torch.Tensor  # [B, capacity] long: 1 where a real token sits (one preallocated buffer, viewed per step)
    next_pos: torch.Tensor  # [B] position id of each row's next token
    active: list[int]  # original index of each batch row
    cur: int  # mask columns in use
    static: bool
    drop_finished: bool


def _start(model, prompts, forcing: ForcingConfig, engine: EngineSettings, pad_token_id: int):
    """Allocate the cache and the mask, prefill the prompts. Returns the batch and the first next-token logits."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    capacity = width + _step_bound(forcing)
    static = engine.cache == "static"
    cache = new_cache(model, engine.cache, capacity)
    # One preallocated mask: column j is 1 once a real token sits there; step t passes the view [:, :width + t]
    # (static: the whole buffer, as the cache attends over its full length).
    attn = torch.zeros(len(prompts), capacity, dtype=torch.long, device=device)
    logits, next_pos = prefill(model, prompts, cache, attn, pad_token_id, static, engine.share_prefix and not static)
    batch = _Batch(cache, attn, next_pos, list(range(len(prompts))), width, static, engine.drop_finished and not static)
    return batch, logits


@torch.inference_mode()
def generate_forced(
    model: PreTrainedModel,
    prompts: list[list[int]],
    forcing: ForcingConfig,
    sampling: SamplingConfig = SamplingConfig(),
    pad_token_id: int = 0,
    engine: EngineSettings = EngineSettings(),
    on_token: Callable[[int, Rollout], None] | None = None,
    seeds: list[int] | None = None,
) -> list[Rollout]:
    """Sample one completion per prompt with budget forcing; returns rollouts in prompt order.

    `seeds`: one per prompt (default: `row_seeds(sampling.seed, len(prompts))`); row i draws from its own stream,
    so its rollout does not depend on the other rows. `engine` changes how fast, not what is computed. `on_token(i,
    rollout)`, if given, is called each time prompt i's rollout took one more token (ctt.engine.streaming).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    seeds = row_seeds(sampling.seed, len(prompts)) if seeds is None else seeds
    generators = row_generators(seeds, len(prompts), device)
    rows = [RowState(Rollout(prompt_ids=list(p))) for p in prompts]
    batch, logits = _start(model, prompts, forcing, engine, pad_token_id)
    step_fn = compiled_forward(model) if engine.compile else model
    banned = banned_in_vocab(forcing.banned_ids, logits.shape[-1])
    while True:
        feed = _choose(rows, batch, logits, forcing, sampling, generators, banned, pad_token_id, on_token)
        if feed is None:
            break
        logits = _step(step_fn, batch, feed)
    return [r.rollout for r in rows]


def _sample(rows, batch: _Batch, logits, sampling: SamplingConfig, generators) -> dict[int, int]:
    """The sampled token of every batch row that samples at this step (not done, nothing forced queued): only
    those rows draw from their streams."""
    need = [b for b, orig in enumerate(batch.active) if rows[orig].phase != DONE and not rows[orig].queue]
    if not need:
        return {}
    if sampling.temperature <= 0:
        picks = logits[need].argmax(-1)
    else:
        picks = sample_next(logits[need], sampling, [generators[batch.active[b]] for b in need])
    return dict(zip(need, picks.tolist()))


def _choose(
    rows, batch: _Batch, logits, forcing, sampling, generators, banned, pad_token_id, on_token=None
) -> list[int] | None:
    """Sample, apply every row's state machine, drop finished rows. The ids to feed next; None when all are done."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    mask_banned(logits, banned)
    for b, orig in enumerate(batch.active):
        if rows[orig].suppress is not None:  # "no string": the marker may not be sampled right after its removal
            logits[b, rows[orig].suppress] = float("-inf")
            rows[orig].suppress = None
    sampled = _sample(rows, batch, logits, sampling, generators)
    feed: list[int] = []
    for b, orig in enumerate(batch.active):
        row = rows[orig]
        if row.phase == DONE:  # kept in the batch (drop_finished off): feed padding, ignore its output
            feed.append(pad_token_id)
            continue
        token, was_sampled = (row.queue.pop(0), False) if row.queue else (sampled[b], True)
        rewind, next_token = advance(row, token, was_sampled, forcing)
        if on_token is not None:
            on_token(orig, row.rollout)
        if rewind:  # mask the already-fed part of a replaced marker and reuse its positions
            cols = batch.attn[b, : batch.cur].nonzero().squeeze(-1)[-rewind:]
            batch.attn[b, cols] = 0
            batch.next_pos[b] -= rewind
        feed.append(next_token if next_token >= 0 else pad_token_id)
    keep = [b for b, orig in enumerate(batch.active) if rows[orig].phase != DONE]
    if not keep:
        return None
    if batch.drop_finished and len(keep) < len(batch.active):
        index = torch.tensor(keep, device=batch.attn.device)
        batch.cache.batch_select_indices(index)
        batch.attn, batch.next_pos = batch.attn[index], batch.next_pos[index]
        batch.active = [batch.active[b] for b in keep]
        feed = [feed[b] for b in keep]
    return feed


def _step(step_fn, batch: _Batch, feed: list[int]) -> torch.Tensor:
    """Feed one token per row; the next-token logits `[B, V]`."""
    if batch.cur == batch.attn.shape[1]:
        if batch.static:
            raise RuntimeError("static cache full: the step bound was wrong")  # pragma: no cover
        batch.attn = torch.cat([batch.attn, torch.zeros_like(batch.attn)], dim=-1)
    batch.attn[:, batch.cur] = 1
    batch.cur += 1
    device = batch.attn.device
    logits = step_fn(
        input_ids=torch.tensor(feed, device=device).unsqueeze(-1),
        attention_mask=batch.attn if batch.static else batch.attn[:, : batch.cur],
        position_ids=batch.next_pos.unsqueeze(-1),
        past_key_values=batch.cache,
        logits_to_keep=1,
        **({"cache_position": torch.tensor([batch.cur - 1], device=device)} if batch.static else {}),
    ).logits[:, -1, :]
    batch.next_pos = batch.next_pos + 1
    return logits


@register_engine
class HFEngine(RolloutEngine):
    """ctt's engine: `generate_forced` on the model ctt trains (it reads the learned row live from the overlay, so
    there is nothing to push), in micro-batches of `batch_size` rollouts."""

    kind = "hf"

    def __init__(self, settings: EngineSettings, model: PreTrainedModel, pad_token_id: int, batch_size: int, **_):
        super().__init__(settings)
        self.model, self.pad_token_id, self.batch_size = model, pad_token_id, batch_size

    def generate(self, prompts, forcing, sampling, seeds=None, on_token=None) -> list[Rollout]:
        seeds = row_seeds(sampling.seed, len(prompts)) if seeds is None else seeds
        out: list[Rollout] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            shifted = None if on_token is None else (lambda i, r, s=start: on_token(s + i, r))
            out += generate_forced(self.model, prompts[chunk], forcing, sampling, self.pad_token_id, self.settings,
                                   on_token=shifted, seeds=None if seeds is None else seeds[chunk])
        return out
