"""The continue-thinking token: one new special token whose input embedding is the only trainable tensor.

Why an overlay instead of `resize_token_embeddings` plus a gradient mask: the optimizer then holds a single
`[hidden]` tensor (not a copy of the vocab x hidden table), weight decay cannot move frozen rows, there are
no gradient hooks to break under DeepSpeed ZeRO-3, and tied input/output embeddings stay untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AddedToken, PreTrainedModel, PreTrainedTokenizerBase

from ctt.errors import ConfigError, ModelError, TokenFileError

CONTINUE_THINKING = "<|continue-thinking|>"
TOKEN_FILE = "continue_thinking_token.safetensors"


class ContinueThinkingEmbedding(nn.Module):
    """Frozen input embedding table, except that positions holding `token_id` read the trainable `row`."""

    def __init__(self, base: nn.Embedding, token_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.token_id = token_id
        self.row = nn.Parameter(init.detach().clone().float())  # [hidden], fp32 master copy

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `get_input_embeddings().weight` (weight tying, resizing) sees the frozen table.
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = (input_ids == self.token_id).unsqueeze(-1)
        # The new id may lie outside the base table: look up a valid id there, then overwrite.
        embeds = self.base(input_ids.masked_fill(is_new.squeeze(-1), 0))
        return torch.where(is_new, self.row.to(embeds.dtype), embeds)


# --- initialisation strategies (config group `token/init`) -------------------------------------------------


def _vocab_rows(base: nn.Embedding, tokenizer_size: int) -> torch.Tensor:
    # Some checkpoints pad the table beyond the tokenizer (Qwen: 151936 rows for 151665 tokens); skip padding rows.
    return base.weight[: min(tokenizer_size, base.weight.shape[0])].detach().float()


def init_word(base: nn.Embedding, tokenizer: PreTrainedTokenizerBase, *, word: str = "Wait", **_) -> torch.Tensor:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise ConfigError(f"token.init.word={word!r} encodes to no tokens")
    # A word of several tokens starts from the mean of its pieces.
    return base.weight[ids].detach().float().mean(0)


def init_mean(base: nn.Embedding, tokenizer: PreTrainedTokenizerBase, **_) -> torch.Tensor:
    return _vocab_rows(base, len(tokenizer)).mean(0)


def init_random(base: nn.Embedding, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, **_) -> torch.Tensor:
    rows = _vocab_rows(base, len(tokenizer))
    gen = torch.Generator().manual_seed(seed)
    vec = torch.randn(rows.shape[1], generator=gen)
    return vec / vec.norm() * rows.norm(dim=1).mean()  # same scale as a typical row


INIT_STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {"word": init_word, "mean": init_mean, "random": init_random}


def install_token(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    init: dict,
    token: str = CONTINUE_THINKING,
) -> ContinueThinkingEmbedding:
    """Add `token` to the tokenizer, freeze every model weight and overlay the trainable row on the input table."""
    if token in tokenizer.get_vocab():
        raise ModelError(f"token {token!r} is already in the vocabulary of this tokenizer; choose another token.text")
    strategy = init.get("name")
    if strategy not in INIT_STRATEGIES:
        raise ConfigError(f"token.init.name={strategy!r} is not one of {sorted(INIT_STRATEGIES)}")
    model.requires_grad_(False)
    base = model.get_input_embeddings()
    if isinstance(base, ContinueThinkingEmbedding):
        raise ModelError("this model already carries a continue-thinking token")
    vector = INIT_STRATEGIES[strategy](base, tokenizer, **{k: v for k, v in init.items() if k != "name"})
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    overlay = ContinueThinkingEmbedding(base, token_id, vector.to(base.weight.device))
    model.set_input_embeddings(overlay)
    return overlay


def get_overlay(model: PreTrainedModel) -> ContinueThinkingEmbedding:
    overlay = model.get_input_embeddings()
    if not isinstance(overlay, ContinueThinkingEmbedding):
        raise ModelError("model has no continue-thinking token installed (call ctt.token.install_token first)")
    return overlay


# --- the token file -----------------------------------------------------------------------------------------


def save_token_file(path: str | os.PathLike, embedding: torch.Tensor, metadata: dict[str, object]) -> Path:
    """Write `{embedding: [hidden]}` with string metadata atomically (temp file in the same dir, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor = embedding.detach().float().cpu().contiguous()
    meta = {k: str(v) for k, v in metadata.items()} | {"hidden_size": str(tensor.shape[0])}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"embedding": tensor}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_token_file(
    path: str | os.PathLike, hidden_size: int | None = None, base_model: str | None = None
) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a token file, checking it fits the model it will be loaded into."""
    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"token file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "embedding" not in f.keys():
                raise TokenFileError(f"token file {path} has no tensor 'embedding' (has {list(f.keys())})")
            embedding = f.get_tensor("embedding")
    except TokenFileError:
        raise
    except Exception as exc:  # safetensors raises several error types for corrupt headers
        raise TokenFileError(f"token file {path} is not a readable safetensors file: {exc}") from None
    if embedding.ndim != 1:
        raise TokenFileError(f"token file {path}: 'embedding' must have shape [hidden], got {list(embedding.shape)}")
    if hidden_size is not None and embedding.shape[0] != hidden_size:
        raise TokenFileError(
            f"token file {path} has hidden size {embedding.shape[0]} but the model has {hidden_size}"
        )
    if base_model is not None and meta.get("base_model") not in (None, base_model):
        raise TokenFileError(
            f"token file {path} was trained on base model {meta['base_model']!r}, not {base_model!r} "
            "(set token.allow_base_mismatch=true to load it anyway)"
        )
    return embedding, meta
