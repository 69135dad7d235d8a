"""The KV-cache machinery of `ctt.engine.hf.generate_forced` (speed only, see `EngineSettings`): preallocated
per-layer buffers written in place (`BufferCache`), the choice of cache kind, the compiled decode step, and the
prefill that feeds a prefix common to all prompts once."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import Cache, DynamicLayer

from ctt.engine.batching import pad_batch


class _BufferLayer(DynamicLayer):
    """A DynamicLayer whose K/V live in a preallocated `[B, H, capacity, D]` buffer, written in place.

    `keys`/`values` are views of the filled part, so everything that reads a DynamicLayer (mask sizes, sequence
    length) sees the same thing; only the per-step `torch.cat` (a copy of the whole layer cache) is gone. The buffer
    doubles when full, so a wrong capacity estimate costs a copy, never an error.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, _ = key_states.shape
        self._k = key_states.new_empty(b, h, self.capacity, key_states.shape[-1])
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self._k.shape[2])
        k, v = self._k, self._v
        self._k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
        self._v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
        self._k[:, :, : self.length] = k[:, :, : self.length]
        self._v[:, :, : self.length] = v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:
            self._grow(end)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def crop(self, tokens_to_remove: int) -> None:  # pragma: no cover - not used by ctt
        raise NotImplementedError("_BufferLayer does not support crop")


class BufferCache(DynamicCache):
    """DynamicCache made of `_BufferLayer`s (one per decoder layer)."""

    def __init__(self, num_layers: int, capacity: int):
        Cache.__init__(self, layers=[_BufferLayer(capacity) for _ in range(num_layers)])


def new_cache(model: PreTrainedModel, kind: str, capacity: int) -> Cache:
    """An empty cache of `kind` (see `EngineSettings.cache`) for `capacity` positions."""
    if kind == "buffer":
        return BufferCache(model.config.get_text_config(decoder=True).num_hidden_layers, capacity)
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=capacity)
    return DynamicCache()


def compiled_forward(model: PreTrainedModel):
    fn = getattr(model, "_ctt_compiled_forward", None)
    if fn is None:
        fn = torch.compile(model.forward, dynamic=False)
        model._ctt_compiled_forward = fn
    return fn


def prefill(model, prompts, cache, attn, pad_token_id: int, static: bool, share: bool):
    """Feed the prompts into `cache`; fills `attn[:, :width]`. Returns the next-token logits `[B, V]` and the
    position id of each row's next token.

    share: run the prefix common to all prompts once (batch 1) and each distinct prompt once, then copy their cache
    rows to the rows that need them, as vLLM's prefix caching does. RL samples K completions per prompt and chat
    templates start every prompt with the same system text, so otherwise most of the prefill is repeated work.
    Layout `[shared prefix | left-padded rest]`: the padding in between is masked out and the position ids skip
    it, so every row computes what its unpadded prompt would. Without sharing it is the plain left-padded batch.
    """
    device, width = attn.device, max(len(p) for p in prompts)
    distinct = list(dict.fromkeys(tuple(p) for p in prompts)) if share else [tuple(p) for p in prompts]
    shared = min(_common_prefix_len(distinct), min(len(p) for p in distinct) - 1) if share else 0  # keep >= 1 each
    if shared:
        prefix = torch.tensor([distinct[0][:shared]], device=device)
        model(input_ids=prefix, position_ids=torch.arange(shared, device=device)[None], past_key_values=cache,
              logits_to_keep=1)
        cache.batch_select_indices(torch.zeros(len(distinct), dtype=torch.long, device=device))
    ids, rest_mask = pad_batch([list(d[shared:]) for d in distinct], pad_token_id, device)
    mask = torch.cat([rest_mask.new_ones(len(distinct), shared), rest_mask], dim=-1)
    if static:  # static: never shared, so `mask` already has a row per prompt; the cache attends over the whole buffer
        attn[:, :width] = mask
    logits = model(
        input_ids=ids,
        attention_mask=attn if static else mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, shared:],
        past_key_values=cache,
        logits_to_keep=1,
        **({"cache_position": torch.arange(width, device=device)} if static else {}),
    ).logits[:, -1, :]
    if len(distinct) < len(prompts):
        which = {d: i for i, d in enumerate(distinct)}
        index = torch.tensor([which[tuple(p)] for p in prompts], device=device)
        cache.batch_select_indices(index)
        logits, mask = logits[index], mask[index]
    attn[:, :width] = mask
    return logits, mask.sum(-1)


def _common_prefix_len(seqs: list[tuple[int, ...]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    return next((i for i in range(n) if any(s[i] != first[i] for s in seqs)), n)
