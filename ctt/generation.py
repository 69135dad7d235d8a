"""Budget-forced batched sampling with a KV cache.

Written by hand because `model.generate` cannot *replace* a token inside the loop: a logits processor can only
change what is sampled, not feed a different (multi-token, or learned) continuation and mask out an already-cached
multi-token marker. Here every sequence carries a small state machine:

    THINKING --marker, forced < N, room left--> (marker removed, continuation fed) --> THINKING
    THINKING --marker, forced == N or no room--> ANSWER (or DONE when the marker is end-of-sequence)
    THINKING --thinking budget spent--> budget tokens forced --> ANSWER
    ANSWER   --eos / answer limit--> DONE

Removed marker tokens that were already fed (multi-token markers) are masked out of attention and their positions
reused, which is exactly the computation of a sequence that never contained them. Every replaced marker is recorded
(`Rollout.replaced_markers`): it was sampled, so its probability is part of the rollout's likelihood (ctt.rl scores
it). An empty continuation ("no string", s1) suppresses the marker: the next token is sampled at the same context
with the marker's first token banned. A continuation is inserted only when it and at least one more token fit in
`max_new_tokens` (and the thinking budget); otherwise the marker ends thinking. Finished sequences leave the batch
(their cache rows are dropped), so no compute is spent on them.

Engine (`EngineConfig`, speed only): the KV cache lives in preallocated per-layer buffers written in place (`cache="buffer"`, the
default; HF's `DynamicCache` re-allocates and copies every layer's K/V on every step), the attention mask is one
preallocated buffer too, and finished rows are compacted away (`drop_finished`). `cache="static"` (HF `StaticCache`,
fixed shapes) with `compile=True` is the torch.compile route; it keeps finished rows in the batch (fixed shapes).
The prefill feeds a prefix common to all prompts once, and each distinct prompt once (`share_prefix`).
The cache machinery lives in ctt.kv_cache. See bench/README.md for measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from ctt.batching import banned_in_vocab, mask_banned
from ctt.errors import ConfigError
from ctt.kv_cache import compiled_forward, new_cache, prefill
from ctt.settings import Settings, one_of

THINKING, ANSWER, DONE = "thinking", "answer", "done"


@dataclass(frozen=True)
class ForcingConfig:
    end_of_thinking_ids: tuple[int, ...]  # the marker, one or several token ids
    eos_token_ids: tuple[int, ...]
    num_continuations: int = 0  # N: how many times the marker is replaced
    continuation_ids: tuple[int, ...] = ()  # what replaces it: (new_id,), ids of "Wait", or () to just drop it
    thinking_budget: int | None = None  # force the end of thinking after this many thinking tokens
    budget_force_ids: tuple[int, ...] | None = None  # what is forced then (default: the marker)
    max_answer_tokens: int = 256  # tokens allowed after thinking ends
    max_new_tokens: int = 512
    banned_ids: tuple[int, ...] = ()  # never sampled (the new token: the model must not emit it itself)

    def __post_init__(self):
        if not self.end_of_thinking_ids:
            raise ValueError("end_of_thinking_ids must not be empty")
        if self.num_continuations < 0:
            raise ValueError(f"num_continuations must be >= 0, got {self.num_continuations}")

    @property
    def marker_is_eos(self) -> bool:
        return len(self.end_of_thinking_ids) == 1 and self.end_of_thinking_ids[0] in self.eos_token_ids


def mix_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (run seed, step, rank, chunk...), without the collisions of adding
    them (rank r + chunk offset b == rank r + b + chunk offset 0)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)  # what was fed after the prompt, markers replaced
    sampled: list[bool] = field(default_factory=list)  # per completion token: sampled by the model (not forced)
    continuation_starts: list[int] = field(default_factory=list)  # completion index of each inserted continuation
    # The sampled marker ids each continuation replaced (parallel to continuation_starts; they were sampled, then
    # removed: the marker stood at continuation_starts[i], its first k-1 tokens were fed, then masked out).
    replaced_markers: list[tuple[int, ...]] = field(default_factory=list)
    answer_start: int | None = None  # completion index where the answer begins (after the kept end of thinking)
    thinking_tokens: int = 0
    answer_tokens: int = 0
    stop_reason: str = ""  # eos | answer_limit | max_new_tokens | thinking_budget
    text: str = ""  # the completion as text, each inserted continuation marked (filled by ctt.policy)
    answer_text: str = ""  # what is graded (filled by ctt.policy)

    @property
    def num_forced(self) -> int:
        return len(self.continuation_starts)

    @property
    def total_tokens(self) -> int:
        return len(self.completion_ids)


CACHES = ("buffer", "dynamic", "static")


@dataclass(frozen=True)
class EngineConfig(Settings):
    """How `generate_forced` runs, never what it computes. Greedy decoding gives the same tokens with every setting
    (up to float rounding at near-ties); with sampling, the settings that change the batch layout (drop_finished,
    share_prefix, the cache kind) change the rounding of the logits and so, rarely, which token a seed draws: the
    distribution sampled from is the same.

    cache: "buffer" (default) preallocated per-layer K/V buffers written in place; "dynamic" HF `DynamicCache`
        (torch.cat of every layer's K/V at every step); "static" HF `StaticCache` (fixed shapes: attends over the
        whole preallocated length, for torch.compile).
    compile: torch.compile the decode step (only sensible with cache="static": other caches change shapes every step).
    drop_finished: compact finished rows out of the batch (and their cache rows). Forced off with cache="static".
    share_prefix: feed a prefix common to all prompts once, and each distinct prompt once, then copy their cache
        rows (prefix caching). Off with cache="static" (its batch size is fixed at the first call).
    """

    section: ClassVar[str] = "forcing.engine"

    cache: str = "buffer"
    compile: bool = False
    drop_finished: bool = True
    share_prefix: bool = True

    def check(self) -> None:
        one_of("forcing.engine.cache", self.cache, CACHES)
        if self.compile and self.cache != "static":
            raise ConfigError(
                "forcing.engine.compile=true needs forcing.engine.cache=static (fixed shapes); got cache=" + repr(self.cache)
            )


@dataclass
class _Row:
    rollout: Rollout
    phase: str = THINKING
    queue: list[int] = field(default_factory=list)  # forced tokens still to feed
    suppress: int | None = None  # a token banned at the next sample (the marker, after an empty continuation)


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`[..., V]` bool, True for the tokens top-p sampling keeps: the smallest most-probable set reaching `top_p`.

    `logits` are already divided by the temperature. Shared by sampling and by ctt.rl, which must score a token
    under the same truncated, renormalised distribution it was drawn from.
    """
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    keep_sorted = probs.cumsum(-1) - probs <= top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Temperature / nucleus sampling over `[B, V]` logits (fp32)."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_p < 1.0:
        logits = logits.masked_fill(~nucleus_mask(logits, cfg.top_p), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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


def _start(model, prompts, forcing: ForcingConfig, engine: EngineConfig, pad_token_id: int):
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
    engine: EngineConfig = EngineConfig(),
    on_token: Callable[[int, Rollout], None] | None = None,
) -> list[Rollout]:
    """Sample one completion per prompt with budget forcing; returns rollouts in prompt order.

    `engine` changes how fast, not what is computed (see `EngineConfig`). `on_token(i, rollout)`, if given, is
    called each time prompt i's rollout took one more token (for streaming, `ctt.streaming`; None costs nothing).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(sampling.seed)
    rows = [_Row(Rollout(prompt_ids=list(p))) for p in prompts]
    batch, logits = _start(model, prompts, forcing, engine, pad_token_id)
    step_fn = compiled_forward(model) if engine.compile else model
    banned = banned_in_vocab(forcing.banned_ids, logits.shape[-1])
    while True:
        feed = _choose(rows, batch, logits, forcing, sampling, generator, banned, pad_token_id, on_token)
        if feed is None:
            break
        logits = _step(step_fn, batch, feed)
    return [r.rollout for r in rows]


def _choose(
    rows, batch: _Batch, logits, forcing, sampling, generator, banned, pad_token_id, on_token=None
) -> list[int] | None:
    """Sample, apply every row's state machine, drop finished rows. The ids to feed next; None when all are done."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    mask_banned(logits, banned)
    for b, orig in enumerate(batch.active):
        if rows[orig].suppress is not None:  # "no string": the marker may not be sampled right after its removal
            logits[b, rows[orig].suppress] = float("-inf")
            rows[orig].suppress = None
    sampled = sample_next(logits, sampling, generator).tolist()
    feed: list[int] = []
    for b, orig in enumerate(batch.active):
        row = rows[orig]
        if row.phase == DONE:  # kept in the batch (drop_finished off): feed padding, ignore its output
            feed.append(pad_token_id)
            continue
        token, was_sampled = (row.queue.pop(0), False) if row.queue else (sampled[b], True)
        rewind, next_token = _advance(row, token, was_sampled, forcing)
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


def _advance(row: _Row, token: int, was_sampled: bool, forcing: ForcingConfig) -> tuple[int, int]:
    """Apply one chosen token to a row's state.

    Returns (how many already-fed trailing tokens to mask out, the token to feed next; -1 when the row is done).
    """
    ro = row.rollout
    ro.completion_ids.append(token)
    ro.sampled.append(was_sampled)
    if row.phase == THINKING:
        ro.thinking_tokens += 1
        marker = list(forcing.end_of_thinking_ids)
        k = len(marker)
        if was_sampled and ro.completion_ids[-k:] == marker and all(ro.sampled[-k:]):
            if ro.num_forced < forcing.num_continuations and _room_for_continuation(ro, k, forcing):
                return _replace_marker(row, k, forcing)
            row.phase = DONE if forcing.marker_is_eos else ANSWER
            ro.stop_reason = "eos" if row.phase == DONE else ""
            ro.answer_start = len(ro.completion_ids)
        elif was_sampled and token in forcing.eos_token_ids:
            row.phase, ro.stop_reason = DONE, "eos"  # ended without closing its thinking
        elif forcing.thinking_budget is not None and ro.thinking_tokens >= forcing.thinking_budget and not row.queue:
            if forcing.budget_force_ids is None and forcing.marker_is_eos:
                row.phase, ro.stop_reason = DONE, "thinking_budget"  # nothing to force but the end
                ro.answer_start = len(ro.completion_ids)
            else:
                row.queue = list(forcing.budget_force_ids if forcing.budget_force_ids is not None else marker)
                row.phase = ANSWER
                ro.answer_start = len(ro.completion_ids)  # the forced end of thinking (and its text) comes first
    elif was_sampled:
        if token in forcing.eos_token_ids:
            row.phase, ro.stop_reason = DONE, "eos"
        else:
            ro.answer_tokens += 1
            if ro.answer_tokens >= forcing.max_answer_tokens and not row.queue:
                row.phase, ro.stop_reason = DONE, "answer_limit"
    if row.phase != DONE and len(ro.completion_ids) >= forcing.max_new_tokens and not row.queue:
        row.phase, ro.stop_reason = DONE, "max_new_tokens"
    return 0, (-1 if row.phase == DONE else token)


def _room_for_continuation(ro: Rollout, k: int, forcing: ForcingConfig) -> bool:
    """Whether the continuation and at least one sampled token after it fit into the token limits once the k marker
    tokens are removed: otherwise forcing would overrun `max_new_tokens` or only feed text that is never read."""
    after = len(forcing.continuation_ids) + 1
    if len(ro.completion_ids) - k + after > forcing.max_new_tokens:
        return False
    return forcing.thinking_budget is None or ro.thinking_tokens - k + after <= forcing.thinking_budget


def _replace_marker(row: _Row, k: int, forcing: ForcingConfig) -> tuple[int, int]:
    """Move the just-completed marker from the completion to `replaced_markers`; start feeding the continuation.

    Its first k-1 tokens were already fed to the model: they get masked out of attention.
    """
    ro = row.rollout
    ro.replaced_markers.append(tuple(ro.completion_ids[-k:]))
    del ro.completion_ids[-k:], ro.sampled[-k:]
    ro.thinking_tokens -= k
    ro.continuation_starts.append(len(ro.completion_ids))
    row.queue = list(forcing.continuation_ids)
    if not row.queue:
        # Empty continuation ("no string"): suppress the marker. Mask the last kept token's cached position too and
        # feed it once more at the same position: the same context, sampled again with the marker's first token
        # banned (s1's "no string" ignores the end of thinking; re-sampling it unbanned would just repeat it).
        row.suppress = forcing.end_of_thinking_ids[0]
        last = ro.completion_ids[-1] if ro.completion_ids else ro.prompt_ids[-1]
        return k, last
    nxt = row.queue.pop(0)
    ro.completion_ids.append(nxt)
    ro.sampled.append(False)
    ro.thinking_tokens += 1
    return k - 1, nxt
