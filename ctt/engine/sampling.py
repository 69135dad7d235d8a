"""Temperature / nucleus sampling where each row draws from its own random stream.

Why by hand instead of `torch.multinomial` over the batch: multinomial consumes one shared generator across rows,
so a row's draw depended on which other rows were in the batch (finished rows leaving, prefix sharing, the batch
size): switching `drop_finished` gave the same sampled rollout for 1 prompt in 32. Here row b's t-th sampled token
uses the t-th uniform of its own generator (inverse-CDF sampling), so a row's rollout is a function of its seed.
"""

from __future__ import annotations

import torch

from ctt.engine.records import SamplingConfig


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`[..., V]` bool, True for the tokens top-p sampling keeps: the smallest most-probable set reaching `top_p`.

    `logits` are already divided by the temperature. Shared by sampling and by ctt.rl, which must score a token
    under the same truncated, renormalised distribution it was drawn from.
    """
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    keep_sorted = probs.cumsum(-1) - probs < top_p  # strictly: the mass above a kept token is below top_p (vLLM's rule)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def row_generators(seeds: list[int] | None, count: int, device) -> list[torch.Generator | None]:
    """One generator per row (None: the global RNG, unseeded sampling)."""
    if seeds is None:
        return [None] * count
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `[B, V]` fp32 logits; row b draws one uniform from `generators[b]`."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_p < 1.0:
        logits = logits.masked_fill(~nucleus_mask(logits, cfg.top_p), float("-inf"))
    # float64 CDF: a float32 running sum over a 150k vocabulary rounds away the tail's mass.
    cdf = logits.softmax(-1).double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=logits.device) for g in generators])
    # side="right": the first token whose CDF exceeds x = u * total; a zero-probability token never is that one.
    # x stays below total (u * total can round up to it), so that token always exists.
    total = cdf[:, -1]
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x.unsqueeze(-1), right=True).squeeze(-1)
