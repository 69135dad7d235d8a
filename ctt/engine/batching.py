"""Token-batch helpers shared by generation (ctt.engine), the loss pass (ctt.rl) and the reference oracle
(ctt.reference_oracle): padding a batch of id lists, and banning ids (never sampled, never scored as possible)."""

from __future__ import annotations

from typing import Iterable, Literal

import torch


def pad_batch(
    seqs: list[list[int]], pad_id: int, device, side: Literal["left", "right"] = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, width]` ids and attention mask (long). side="left": sequences end at the same column (prompts to be
    continued); side="right": they start at column 0 (whole sequences scored position by position)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def banned_in_vocab(banned_ids: Iterable[int], vocab_size: int) -> list[int]:
    """The banned ids that index a row of a `vocab_size`-wide logit table (an id past the output table, as the new
    token of an untied model whose head was not grown, can never be sampled anyway)."""
    return [i for i in banned_ids if i < vocab_size]


def mask_banned(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """`logits[..., banned] = -inf` in place (ids already filtered with `banned_in_vocab`); returns `logits`."""
    if banned:
        logits[..., banned] = float("-inf")
    return logits
