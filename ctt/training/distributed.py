"""Multi-process training: what ctt does differently under DDP and DeepSpeed ZeRO-1/2/3.

DDP and ZeRO-1/2 keep a full copy of every (frozen) weight on each rank: generation just runs. ZeRO-3 partitions
the weights too, and its module hooks gather each layer's weights when the layer runs and free them afterwards:
one all-gather per layer per *token* during generation, and a hang when ranks generate different lengths (a rank
that has finished stops calling forward while the others wait in the all-gather).

`gathered_for_generation` gathers every weight ONCE (`deepspeed.zero.GatheredParameters`, `modifier_rank=None`:
nothing is modified, nothing is broadcast back) and stops the ZeRO-3 hooks from freeing them until it exits. The
training step holds that gather from the rollout through the scoring forward *and its backward* (`StepGather`,
released in `on_after_backward`): the scoring pass chunks the LM head by the number of scored tokens and skips the
forward when a rank scored nothing, so its per-layer all-gathers would differ between ranks too. Peak memory is
then the whole model plus the rollout's KV cache or the scoring activations, as with ZeRO-2.

When the whole model is larger than `max_memory_fraction` of a rank's free device memory, nothing is gathered: on
one process (e.g. ZeRO-3 with parameters offloaded to CPU on a single GPU) ZeRO-3 then fetches layer by layer, which
is slow but correct, and a warning says so; on several processes that would need every rank to step in lockstep
(`synced_gpus`) through generation and scoring, which ctt does not implement, so it raises a clear error instead.

The row itself: under DeepSpeed its gradient and its fp32 master copy live in DeepSpeed's buffers (`param.grad` is
None; under bf16 the parameter is a bf16 copy), so `full_row` / `full_grad` read them through DeepSpeed. Both are
collectives under DeepSpeed: call them on every rank.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import nn

from ctt.errors import ConfigError
from ctt.settings import Settings, require

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_FRACTION = 0.5
_HOLD = "ctt-gather"  # a marker in ZeRO-3's per-parameter set of active modules: "in use, do not free"


@dataclass(frozen=True)
class DistributedSettings(Settings):
    """The `distributed` config group: what the module does differently on several processes."""

    section: ClassVar[str] = "distributed"

    zero3_gather_max_memory_fraction: float = DEFAULT_MAX_MEMORY_FRACTION  # conf/distributed/default.yaml

    def check(self) -> None:
        fraction = self.zero3_gather_max_memory_fraction
        require(0 < fraction <= 1, "distributed.zero3_gather_max_memory_fraction", "a number in (0, 1]", fraction)


def zero3_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters DeepSpeed ZeRO-3 has partitioned (empty list for any other strategy)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def _uses_deepspeed(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")  # ZeRO-3 / ZeRO-1, 2 and bf16 optimizer


def full_row(param: nn.Parameter) -> torch.Tensor:
    """The parameter's full fp32 value (DeepSpeed: the fp32 master copy, gathered). A collective under DeepSpeed."""
    if _uses_deepspeed(param):
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is not None:
            return value.detach().float()
    return param.detach().float()


def full_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The parameter's full (all-reduced) gradient, or None. A collective under DeepSpeed: call it on every rank."""
    if param.grad is None and _uses_deepspeed(param):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)
    return param.grad


def free_device_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (CUDA: free plus cached-but-unused; CPU: available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank (every rank must call this)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class StepGather:
    """Every ZeRO-3 parameter of a module gathered once, held until `release()` (idempotent). Every rank must open
    and release it at the same point: the gather is an all-gather."""

    def __init__(self, params: list[nn.Parameter]):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.params = params
        missing = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
        self._gathered = deepspeed.zero.GatheredParameters(missing, modifier_rank=None)
        self._gathered.__enter__()  # one all-gather of everything that is partitioned
        for p in params:  # ZeRO-3's hooks free a parameter only when no module is using it: mark all as in use
            p.ds_active_sub_modules.add(_HOLD)
        # ZeRO-3's module hooks also record every module call into a trace that must be identical on all ranks
        # (DeepSpeed checks it); generation makes it differ. Take the hooks off while gathered, as TRL does.
        self._offload = getattr(getattr(params[0], "_z3_optimizer", None), "parameter_offload", None)
        if self._offload is not None:
            for hook in self._offload.forward_hooks + self._offload.backward_hooks:
                hook.remove()
            self._offload.forward_hooks, self._offload.backward_hooks = [], []
        self._open = True

    def release(self) -> None:
        if not self._open:
            return
        self._open = False
        if self._offload is not None:
            from deepspeed.runtime.zero.parameter_offload import FWD_MODULE_STACK

            root = self._offload.module
            # Opened inside the root module's forward (the training step): its post-forward hook, which pops this
            # stack, was taken off with the others.
            if len(FWD_MODULE_STACK) > 1 and FWD_MODULE_STACK[-1] is root:
                FWD_MODULE_STACK.pop()
            register = getattr(self._offload, "_register_deepspeed_module", None)  # DeepSpeed >= 0.16.4
            (register or self._offload._register_hooks_recursively)(root)  # the hooks back on
        for p in self.params:
            p.ds_active_sub_modules.discard(_HOLD)
        self._gathered.__exit__(None, None, None)  # re-partition what was gathered (local, no communication)


def gather_zero3(module: nn.Module, max_memory_fraction: float = DEFAULT_MAX_MEMORY_FRACTION) -> StepGather | None:
    """Gather every ZeRO-3 weight of `module` once (see the module docstring); None when there is nothing to gather
    or when it does not fit (one process: a warning, layer-by-layer fetching; several: ConfigError)."""
    params = zero3_params(module)
    if not params:
        return None
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    device = next((p.device for p in params), torch.device("cpu"))
    if hasattr(module, "device") and isinstance(module.device, torch.device):
        device = module.device
    needed = sum(p.ds_numel * p.element_size() for p in params if p.ds_status != ZeroParamStatus.AVAILABLE)
    free = free_device_memory(device)
    fits = _all_ranks_agree(needed <= max_memory_fraction * free, device)
    if fits:
        return StepGather(params)
    what = (
        f"the ZeRO-3 partitioned weights need {_size(needed)} when gathered, more than "
        f"distributed.zero3_gather_max_memory_fraction={max_memory_fraction} of the free device memory "
        f"({_size(free)} on this rank)"
    )
    if _world_size() > 1:
        raise ConfigError(
            f"{what}. Generating with per-layer gathering on several ranks needs every rank to step in lockstep, "
            "which ctt does not implement. Use devices with more memory or a smaller model, one process "
            "(trainer.devices=1 with trainer=deepspeed_zero3_offload: per-layer fetching from CPU, slow), or raise "
            "the fraction if that memory really is free."
        )
    if not _warned:
        _warned.append(True)
        log.warning("%s: falling back to ZeRO-3's layer-by-layer fetching (slow: one fetch per layer per token)", what)
    return None


_warned: list[bool] = []  # the fallback warning is given once per process


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@contextmanager
def gathered_for_generation(
    module: nn.Module, max_memory_fraction: float = DEFAULT_MAX_MEMORY_FRACTION
) -> Iterator[None]:
    """Run the enclosed generation with every ZeRO-3 weight gathered once; a no-op for any other strategy.

    Every rank must enter it (the gather is a collective). The training step uses `StepGather` directly, because
    it must hold the weights until after the backward pass.
    """
    gather = gather_zero3(module, max_memory_fraction)
    try:
        yield
    finally:
        if gather is not None:
            gather.release()
