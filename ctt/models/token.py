"""The continue-thinking token: one new special token whose input embedding is the only trainable tensor.

Why an overlay instead of `resize_token_embeddings` plus a gradient mask: the optimizer then holds a single
`[hidden]` tensor (not a copy of the vocab x hidden table), weight decay cannot move frozen rows, there are
no gradient hooks to break under DeepSpeed ZeRO-3, and tied input/output embeddings stay untouched.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from transformers import AddedToken, PreTrainedModel, PreTrainedTokenizerBase

from ctt.errors import ConfigError, ModelError, TokenFileError
from ctt.outputs import atomic_write_bytes
from ctt.inputs import check_input
from ctt.settings import Settings, check_kwargs, one_of, reject_unknown, require

log = logging.getLogger(__name__)

CONTINUE_THINKING = "<|continue-thinking|>"
TOKEN_FILE = "continue_thinking_token.safetensors"
MAX_TOKEN_COUNT = 64  # token.count: at most this many learned rows, in a run, a token file or a checkpoint
# A row brought in from a file may have a norm up to this many times the largest row norm of the model's frozen
# table. Trained rows stay within a few times it (training warns at 100x its starting norm); a row far beyond it (a
# tampered 1e30) makes every completion degenerate, and in fp16/bf16 or fp32 norms it overflows to inf.
MAX_ROW_NORM_RATIO = 1000.0


class ContinueThinkingEmbedding(nn.Module):
    """Frozen input embedding table, except that positions holding one of `token_ids` read the trainable `row`.

    One token: `row` is `[hidden]`. k tokens (`token.count=k`, consecutive ids): `row` is `[k, hidden]`, row i for
    `token_ids[i]`; still one tensor for the optimizer."""

    def __init__(self, base: nn.Embedding, token_ids: int | list[int], init: torch.Tensor):
        super().__init__()
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ModelError(f"the continue-thinking tokens must have consecutive ids, got {ids}")
        if (init.ndim == 1) != (len(ids) == 1) or (init.ndim == 2 and init.shape[0] != len(ids)):
            raise ModelError(f"{len(ids)} token id(s) need a row of shape [hidden] or [k, hidden], got "
                             f"{list(init.shape)}")
        self.base = base
        self.token_ids = tuple(ids)
        self.token_id = ids[0]
        self.row = nn.Parameter(init.detach().clone().float())  # [hidden] or [k, hidden], fp32 master copy

    @property
    def count(self) -> int:
        return len(self.token_ids)

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `get_input_embeddings().weight` (weight tying, resizing) sees the frozen table.
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        offset = input_ids - self.token_id
        is_new = (offset >= 0) & (offset < self.count)
        # The new ids may lie outside the base table: look up a valid id there, then overwrite.
        embeds = self.base(input_ids.masked_fill(is_new, 0))
        rows = self.row if self.row.ndim == 1 else self.row[offset.clamp(0, self.count - 1)]
        return torch.where(is_new.unsqueeze(-1), rows.to(embeds.dtype), embeds)


def token_texts(text: str, count: int) -> list[str]:
    """The texts of `count` learned tokens: `text` itself for one, else `<|continue-thinking-1|>` .. `-k|>`."""
    if count == 1:
        return [text]
    stem, close = (text[:-2], "|>") if text.endswith("|>") else (text, "")
    return [f"{stem}-{i}{close}" for i in range(1, count + 1)]


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


def init_settings(init: Mapping | None) -> dict:
    """The `token/init` group checked: `name` one of INIT_STRATEGIES, every other key a keyword argument of that
    strategy (`word` for word, `seed` for random), of the annotated type."""
    init = dict(init or {})
    name = one_of("token.init.name", init.pop("name", None), INIT_STRATEGIES)
    strategy = INIT_STRATEGIES[name]
    params = inspect.signature(strategy).parameters.values()
    reject_unknown("token.init", [*init, "name"], ["name", *(p.name for p in params if p.kind == p.KEYWORD_ONLY)])
    return {"name": name, **check_kwargs(strategy, init, "token.init", skip=("base", "tokenizer"))}


@dataclass(frozen=True)
class TokenSettings(Settings):
    """The `token` config group."""

    section: ClassVar[str] = "token"

    text: str = CONTINUE_THINKING
    init: dict = field(default_factory=lambda: {"name": "word", "word": "Wait"})
    count: int = 1  # k learned tokens, all inserted in place of the marker (token_texts names them)
    path: str | None = None  # ctt-eval: the learned token file to load
    allow_base_mismatch: bool = False  # load a token file (or resume a checkpoint) of another base model

    def check(self) -> None:
        require(bool(self.text.strip()), "token.text", "a non-blank text", self.text)
        require(1 <= self.count <= MAX_TOKEN_COUNT, "token.count", f"an integer in [1, {MAX_TOKEN_COUNT}]", self.count)
        object.__setattr__(self, "init", init_settings(self.init))


def check_token_text(tokenizer: PreTrainedTokenizerBase, token: str) -> None:
    """The token text must be new to the vocabulary however it is tokenised: not a vocabulary entry, and not a text
    the tokenizer already encodes as one token (`" Wait"` is SmolLM2's `ĠWait`). Decided by a round trip: one id
    that decodes back to the text itself; a lossy tokenizer that drops unknown characters (a WordLevel vocabulary
    turning `<|continue-thinking|>` into "-") encodes it to one id of another text, which is not the token."""
    if not token.strip():
        raise ConfigError(f"token.text must be a non-blank text, got {token!r}")
    ids = tokenizer.encode(token, add_special_tokens=False)
    one_token = len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=False,
                                                   clean_up_tokenization_spaces=False) == token
    if token in tokenizer.get_vocab() or one_token:
        raise ModelError(
            f"token {token!r} is already in the vocabulary of this tokenizer"
            + (f" (as {tokenizer.convert_ids_to_tokens(ids[0])!r})" if one_token else "")
            + "; choose another token.text"
        )


def install_token(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    init: dict,
    token: str = CONTINUE_THINKING,
    count: int = 1,
) -> ContinueThinkingEmbedding:
    """Add `token` (or its `count` numbered texts) to the tokenizer, freeze every model weight and overlay the
    trainable row(s) on the input table; k rows all start from the same initialisation."""
    texts = token_texts(token, count)
    for text in texts:
        check_token_text(tokenizer, text)
    init = init_settings(init)
    strategy = init["name"]
    model.requires_grad_(False)
    base = model.get_input_embeddings()
    if isinstance(base, ContinueThinkingEmbedding):
        raise ModelError("this model already carries a continue-thinking token")
    vector = INIT_STRATEGIES[strategy](base, tokenizer, **{k: v for k, v in init.items() if k != "name"})
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in texts], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(texts)
    rows = vector if count == 1 else vector.expand(count, -1)
    overlay = ContinueThinkingEmbedding(base, ids, rows.to(base.weight.device))
    model.set_input_embeddings(overlay)
    return overlay


def get_overlay(model: PreTrainedModel) -> ContinueThinkingEmbedding:
    overlay = model.get_input_embeddings()
    if not isinstance(overlay, ContinueThinkingEmbedding):
        raise ModelError("model has no continue-thinking token installed (call ctt.models.token.install_token first)")
    return overlay


# --- which base weights a token belongs to ------------------------------------------------------------------

# The config fields hashed with the table: the architecture, not the name (an export is named otherwise).
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def base_fingerprint(model: PreTrainedModel, rows: int) -> str | None:
    """sha256 of what a token is trained against: the first `rows` rows of the frozen input-embedding table (the base
    vocabulary: padding rows and an exported folder's learned rows are left out) plus the architecture fields of the
    config. The table is hashed as bfloat16: a float32 table rounds to it exactly as a bfloat16 load does, so one
    base loaded as float32 or bfloat16 (model.dtype) has one fingerprint (a float16 load rounds otherwise and differs).
    None when the table is not held here (a ZeRO-3 partition)."""
    emb = model.get_input_embeddings()
    table = (emb.base if isinstance(emb, ContinueThinkingEmbedding) else emb).weight[:rows].detach()
    if table.numel() == 0:
        return None
    config = {k: getattr(model.config, k, None) for k in FINGERPRINT_FIELDS} | {"rows": list(table.shape)}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for chunk in table.split(1 << 14):  # in chunks: never a second copy of a whole 151k-row table in memory
        digest.update(chunk.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy())
    return digest.hexdigest()


def check_base_fingerprint(saved: str | None, current: str | None, what: str, allow: bool,
                           error: type[Exception] = TokenFileError) -> None:
    """A token (file, checkpoint, exported folder) belongs to the base weights it was trained on: `error` naming both
    fingerprints when `saved` is not `current`, unless `allow` (token.allow_base_mismatch=true: a warning). One
    written before ctt recorded fingerprints (`saved` empty) loads with a warning."""
    if not current or saved == current:
        return
    if not saved:
        log.warning("%s records no fingerprint of its base weights (written before ctt recorded them): not checked "
                    "that it belongs to these weights", what)
        return
    message = (f"{what} was trained on other base weights (fingerprint {str(saved)[:12]}, these weights have "
               f"{current[:12]})")
    if allow:
        log.warning("%s; loading it anyway (token.allow_base_mismatch=true)", message)
        return
    raise error(f"{message}; set token.allow_base_mismatch=true to load it anyway")


# --- the token file -----------------------------------------------------------------------------------------


def save_token_file(path: str | os.PathLike, embedding: torch.Tensor, metadata: dict[str, object]) -> Path:
    """Write `{embedding: [hidden] or [k, hidden]}` with string metadata (`count` = k) atomically (temp file in the
    same dir, then rename)."""
    path = Path(path)
    tensor = embedding.detach().float().cpu().contiguous()
    count = 1 if tensor.ndim == 1 else tensor.shape[0]
    meta = {k: str(v) for k, v in metadata.items()} | {"hidden_size": str(tensor.shape[-1]), "count": str(count)}
    return atomic_write_bytes(save({"embedding": tensor}, metadata=meta), path)  # mode per umask, not 0600


def token_count(embedding: torch.Tensor) -> int:
    """How many learned tokens a token file's `embedding` holds: [hidden] is one, [k, hidden] is k."""
    return 1 if embedding.ndim == 1 else embedding.shape[0]


def check_token_fits(
    embedding: torch.Tensor, path: str | os.PathLike, hidden_size: int | None = None, count: int | None = None
) -> None:
    """The rows of a token file fit a model of `hidden_size` with `count` learned tokens (None: not checked)."""
    rows = token_count(embedding)
    if count is not None and rows != count:
        raise TokenFileError(f"token file {path} holds {rows} learned token(s) but token.count={count}; set "
                             f"token.count={rows}")
    if hidden_size is not None and embedding.shape[-1] != hidden_size:
        raise TokenFileError(
            f"token file {path} has hidden size {embedding.shape[-1]} but the model has {hidden_size}"
        )


def load_token_file(
    path: str | os.PathLike, hidden_size: int | None = None, base_model: str | None = None, count: int | None = None
) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a token file, checking it fits the model it will be loaded into: finite floating-point row(s) of the
    model's hidden size (`count` of them when given: [hidden] for one, [k, hidden] for k), trained on `base_model`
    (when given; a file without that metadata is refused too)."""
    path = check_input(path, "token file", error=TokenFileError)  # a device or FIFO is never opened
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
    if embedding.ndim not in (1, 2) or (embedding.ndim == 2 and not 2 <= embedding.shape[0] <= MAX_TOKEN_COUNT):
        raise TokenFileError(f"token file {path}: 'embedding' must have shape [hidden] or [k, hidden] (2 <= k <= "
                             f"{MAX_TOKEN_COUNT}), got {list(embedding.shape)}")
    # An integer vector is not a learned row cast badly but a different file: refuse rather than guess a scale.
    if not embedding.is_floating_point():
        raise TokenFileError(f"token file {path}: 'embedding' holds {embedding.dtype} values, not floating point")
    if embedding.dtype != torch.float32:  # a bf16/fp16 export: widening to fp32 is exact
        log.warning("token file %s holds %s values; using them as float32", path, embedding.dtype)
        embedding = embedding.float()
    bad = (~torch.isfinite(embedding)).sum().item()
    if bad:
        raise TokenFileError(f"token file {path}: 'embedding' has {bad} non-finite values (NaN or inf)")
    check_token_fits(embedding, path, hidden_size, count)
    if base_model is not None and meta.get("base_model") != base_model:
        trained = f"was trained on base model {meta['base_model']!r}" if "base_model" in meta else \
            "has no base_model metadata (not written by ctt?)"
        raise TokenFileError(
            f"token file {path} {trained}, not {base_model!r} (set token.allow_base_mismatch=true to load it anyway)"
        )
    return embedding, meta


def check_row(row: torch.Tensor, table: torch.Tensor, where: str, shape: tuple | None = None,
              error: type[Exception] = TokenFileError) -> None:
    """A row brought in from a file (a token file, a checkpoint) is plausible for the frozen embedding `table` it
    joins: floating point, finite, of `shape` (when given), and no row's norm over MAX_ROW_NORM_RATIO times the
    table's largest row norm. One `error` line naming `where` otherwise. Every path that loads a row checks it here."""
    if shape is not None and tuple(row.shape) != tuple(shape):
        raise error(f"{where}: the token row has shape {list(row.shape)}, but this run's row is {list(shape)}")
    if not row.is_floating_point():
        raise error(f"{where}: the token row holds {row.dtype} values, not floating point")
    bad = (~torch.isfinite(row)).sum().item()
    if bad:
        raise error(f"{where}: the token row has {bad} non-finite values (NaN or inf)")
    if table.numel() == 0:  # a ZeRO-3 partition: no table here to compare with
        return
    largest = torch.linalg.vector_norm(table.detach(), dim=-1, dtype=torch.float32).max().item()
    norm = torch.linalg.vector_norm(row.detach().double(), dim=-1).max().item()
    if norm > MAX_ROW_NORM_RATIO * largest:
        raise error(f"{where}: a token row has norm {norm:.3g}, over {MAX_ROW_NORM_RATIO:g}x the largest row norm of "
                    f"the model's embedding table ({largest:.3g}); not a row trained for this model")
