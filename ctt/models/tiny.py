"""The ``tiny_random`` model source: a small randomly initialised ``Qwen2ForCausalLM`` with a byte-level
tokenizer built in code, fully offline and deterministic, for tests and smoke runs (`ctt.models.loading.load_model` with
``source=tiny_random``). `TinyOptions` is the ``model.tiny`` config group; ``end_of_thinking_boost`` calibrates
the random model so that it emits the end-of-thinking marker often (`_boost_marker`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctt.errors import ConfigError, ModelError
from ctt.settings import MAX_TOKENS, Settings, require, require_size

# ChatML template of the tiny_random tokenizer. The generation prompt opens the thinking
# block, like Qwen3/DeepSeek-R1 style reasoning models do.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}{%- endif %}"
)

TINY_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|pad|>")
TINY_THINK_TOKENS = ("<think>", "</think>")


TINY_VOCAB = 512  # an upper bound of build_tiny_tokenizer's vocabulary (bytes + specials), for the size check
MAX_TINY_PARAMS = 10**9


@dataclass(frozen=True)
class TinyOptions(Settings):
    """The `model.tiny` group: the shape of the tiny random Qwen2."""

    section: ClassVar[str] = "model.tiny"

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    seed: int = 0
    end_of_thinking_boost: float = 0.0
    initializer_range: float = 0.02  # larger values make logits react more to the input embeddings (toy RL tests)
    spare_rows: int = 0  # embedding rows beyond the tokenizer, as Qwen2 checkpoints have (151,936 rows, ~151,665 tokens)

    def check(self) -> None:
        for key, high in (("hidden_size", 1 << 14), ("num_layers", 256), ("num_heads", 1 << 10),
                          ("num_kv_heads", 1 << 10), ("intermediate_size", 1 << 16),
                          ("max_position_embeddings", MAX_TOKENS)):
            require_size(getattr(self, key), f"model.tiny.{key}", 1, high)
        require_size(self.spare_rows, "model.tiny.spare_rows", 0, 1 << 20)
        require(0 <= self.seed < 2**63, "model.tiny.seed", "an integer from 0 to 2**63 - 1", self.seed)
        # a "tiny" model that would not fit in memory (each dimension in range, their product not)
        h, layers = self.hidden_size, self.num_layers
        params = (TINY_VOCAB + self.spare_rows) * h * 2 + layers * (4 * h * h + 3 * h * self.intermediate_size)
        require(params <= MAX_TINY_PARAMS, "model.tiny", f"a shape of at most {MAX_TINY_PARAMS:.0e} parameters",
                f"hidden_size={h}, num_layers={layers}, intermediate_size={self.intermediate_size}: {params:.2e}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "model.tiny: hidden_size must be divisible by num_heads and num_heads by num_kv_heads, got "
                f"{self.hidden_size}/{self.num_heads}/{self.num_kv_heads}"
            )


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """An offline byte-level BPE tokenizer (256 byte symbols, no merges) + ChatML specials.

    Ids 0..255 are the bytes (in GPT-2's byte-to-unicode order), then ``<|im_start|>``,
    ``<|im_end|>`` (eos), ``<|pad|>`` (pad), ``<think>`` and ``</think>``.
    ``<think>``/``</think>`` are added as non-special tokens (as in Qwen3) so that they
    survive ``decode(..., skip_special_tokens=True)``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the symbols by the byte they stand for, so id == byte value.
    byte_to_symbol = bytes_to_unicode()
    vocab = {byte_to_symbol[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    bpe = models.BPE(vocab=vocab, merges=[])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_THINK_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        name_or_path="tiny_random",
    )
    hf_tok.chat_template = TINY_CHAT_TEMPLATE
    return hf_tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode symbol map (used by ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _tiny_options(tiny: dict | TinyOptions | None) -> dict[str, Any]:
    if isinstance(tiny, TinyOptions):
        return dataclasses.asdict(tiny)
    given = {k: v for k, v in dict(tiny or {}).items() if v is not None}  # null: the default
    return dataclasses.asdict(TinyOptions.from_config(given))


# ctt's shape names of a Qwen2 (the tiny model's `model.tiny` keys, the organism's Architecture fields)
QWEN2_SHAPE = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
               "max_position_embeddings", "tie_word_embeddings")


def qwen2_config(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, *, hidden_size: int, num_layers: int, num_heads: int,
    num_kv_heads: int, intermediate_size: int, max_position_embeddings: int, tie_word_embeddings: bool, **extra,
):
    """A Qwen2Config from ctt's shape names, with the tokenizer's eos/pad ids (and bos unless `extra` sets it);
    `extra`: any other Qwen2Config argument."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=bool(tie_word_embeddings),
        **{"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "use_cache": True, **extra},
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase, tiny: dict | TinyOptions | None, end_of_thinking_ids: list[int],
    end_of_thinking: str | None, attn_implementation: str | None,
) -> PreTrainedModel:
    """The random Qwen2 (float32) for `build_tiny_tokenizer()`'s vocabulary plus `spare_rows`, the marker
    `end_of_thinking_ids` boosted by `end_of_thinking_boost` nats (see `_boost_marker`)."""
    from transformers import Qwen2ForCausalLM

    opts = _tiny_options(tiny)
    config = qwen2_config(
        tokenizer, len(tokenizer) + opts["spare_rows"], **{k: opts[k] for k in QWEN2_SHAPE},
        initializer_range=float(opts["initializer_range"]), bos_token_id=None,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation

    # Seed only inside this block so that building a model never moves the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(opts["seed"]))
        model = Qwen2ForCausalLM(config)

    boost = float(opts["end_of_thinking_boost"])
    if boost:
        if len(end_of_thinking_ids) != 1:
            raise ConfigError(
                "model.tiny.end_of_thinking_boost needs a single-token end-of-thinking marker, "
                f"got {end_of_thinking!r} -> {end_of_thinking_ids}"
            )
        _boost_marker(model, end_of_thinking_ids[0], boost)
    return model


@torch.no_grad()
def _boost_marker(model: PreTrainedModel, marker_id: int, boost: float) -> None:
    """Make a random model emit ``marker_id`` often: its logit gets about ``+boost`` nats.

    Mechanism (deterministic, no extra parameters):

    1. Feature 0 of EVERY input-embedding row is set to 1.0 (the other features are
       ~N(0, 0.02)). The residual stream therefore carries a large, position- and
       token-independent component on feature 0, and after the final RMSNorm the hidden
       state has ``h[0] ~= c`` (about 7-8 for hidden_size 64) at every position.
    2. ``c`` is measured with one forward pass over the whole vocabulary, and the marker's
       output (lm_head) row gets ``+boost / c`` on feature 0, so its logit is raised by
       ``~boost`` relative to the other tokens at every step.

    With tied embeddings, step 1 also adds ``c`` to every logit (a uniform shift, which the
    softmax ignores) and step 2 also changes the marker's input row (harmless). With
    ``boost`` around 4 the marker has probability ~0.15-0.2 per sampled step (the rest of a
    random model's distribution is nearly uniform), and ``boost`` >~ 6 makes it the greedy
    choice.
    """
    emb = model.get_input_embeddings().weight
    emb[:, 0] = 1.0
    vocab = emb.shape[0]
    probe = torch.arange(vocab, dtype=torch.long).unsqueeze(0)
    was_training = model.training
    model.eval()
    hidden = model.model(input_ids=probe, use_cache=False).last_hidden_state  # after the final norm
    model.train(was_training)
    c = float(hidden[..., 0].mean())
    if not c > 0:  # pragma: no cover - cannot happen with the construction above
        raise ModelError("end_of_thinking_boost: calibration failed (non-positive hidden feature)")
    model.get_output_embeddings().weight[marker_id, 0] += boost / c
