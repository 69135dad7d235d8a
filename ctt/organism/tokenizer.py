"""The organism's tokenizer: a real `PreTrainedTokenizerFast`, byte-level BPE like Qwen2's but without merges (so one
token per character of the task's ASCII text), with the special tokens of DeepSeek-R1-Distill.

Ids 0..255 are the bytes (id == byte value, in GPT-2's byte-to-unicode spelling), then the added tokens. Every text
encodes, so no unk token is needed (Qwen2 has none either). The model's embedding table is padded beyond
``len(tokenizer)`` to a multiple of 64, as Qwen2's is (151,936 rows for 151,665 tokens), so there are spare rows.

Why byte-level and not a plain character vocabulary: transformers 5's `AutoTokenizer` loads every folder whose
config says ``model_type: qwen2`` as `Qwen2Tokenizer`, which rebuilds the pipeline as Qwen's (NFC, Qwen's split
regex, ByteLevel) around the saved vocabulary. A byte-level vocabulary without merges tokenizes identically under
both, so `build_tokenizer()` and `AutoTokenizer.from_pretrained(folder)` agree token for token.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ctt.models.tiny import bytes_to_unicode

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, THINK_END = "<think>", "</think>"

# Dropped by decode(skip_special_tokens=True).
SPECIAL = (BOS, EOS, PAD, USER, ASSISTANT)
# Added as single tokens but NOT special, as in DeepSeek-R1-Distill-Qwen's tokenizer (added_tokens_decoder lists
# <think>/</think> with "special": false): decode(skip_special_tokens=True) keeps them, so text-level code sees the
# same thing with the organism as with the real model (e.g. an answer grader that splits on </think>).
THINKING = (THINK, THINK_END)

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer); with no merges it changes nothing, kept for fidelity.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# R1-distill style: bos, the system text, <｜User｜>content, <｜Assistant｜>content<eos>; the generation prompt opens
# the thinking block. As in R1's template, a past assistant turn keeps only what follows its last </think>.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges, Qwen2's normalizer and pre-tokenizer, R1-distill added tokens."""
    from tokenizers.models import BPE

    symbol = bytes_to_unicode()
    tok = Tokenizer(BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINKING])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def padded_vocab_size(tokenizer_len: int, multiple: int = 64) -> int:
    """Rows of the embedding table: the tokenizer size rounded up to `multiple` (spare rows, as in Qwen2)."""
    return -(-tokenizer_len // multiple) * multiple
