"""The budget-forcing state machine, one per rollout, shared by every engine (so they agree on what is forced):

    THINKING --marker, forced < N, room left--> (marker removed, continuation fed) --> THINKING
    THINKING --marker, forced == N or no room--> ANSWER (or DONE when the marker is end-of-sequence)
    THINKING --thinking budget spent--> budget tokens forced --> ANSWER
    ANSWER   --eos / answer limit--> DONE

An engine hands `advance` each token it chose (sampled, or popped from `RowState.queue` when forced) and feeds
what `advance` says. Every replaced marker is recorded (`Rollout.replaced_markers`): it was sampled, so its
probability is part of the rollout's likelihood (ctt.rl scores it). An empty continuation ("no string", s1)
suppresses the marker: the next token is sampled at the same context with the marker's first token banned
(`RowState.suppress`). A continuation is inserted only when it and at least one more token fit in `max_new_tokens`
(and the thinking budget); otherwise the marker ends thinking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ctt.engine.records import ForcingConfig, Rollout

THINKING, ANSWER, DONE = "thinking", "answer", "done"


@dataclass
class RowState:
    rollout: Rollout
    phase: str = THINKING
    queue: list[int] = field(default_factory=list)  # forced tokens still to feed
    suppress: int | None = None  # a token banned at the next sample (the marker, after an empty continuation)


def advance(row: RowState, token: int, was_sampled: bool, forcing: ForcingConfig) -> tuple[int, int]:
    """Apply one chosen token to a row's state.

    Returns (how many already-fed trailing tokens to mask out, the token to feed next; -1 when the row is done).
    """
    ro = row.rollout
    ro.completion_ids.append(token)
    ro.sampled.append(was_sampled)
    if row.phase == THINKING:
        ro.thinking_tokens += 1
        marker = list(forcing.end_of_thinking_ids)
        k = len(marker)
        if was_sampled and ro.completion_ids[-k:] == marker and all(ro.sampled[-k:]):
            if ro.num_forced < forcing.num_continuations and room_for_continuation(ro, k, forcing):
                return _replace_marker(row, k, forcing)
            row.phase = DONE if forcing.marker_is_eos else ANSWER
            ro.stop_reason = "eos" if row.phase == DONE else ""
            ro.answer_start = len(ro.completion_ids)
        elif was_sampled and token in forcing.eos_token_ids:
            row.phase, ro.stop_reason = DONE, "eos"  # ended without closing its thinking
        elif forcing.thinking_budget is not None and ro.thinking_tokens >= forcing.thinking_budget and not row.queue:
            if forcing.budget_force_ids is None and forcing.marker_is_eos:
                row.phase, ro.stop_reason = DONE, "thinking_budget"  # nothing to force but the end
                ro.answer_start = len(ro.completion_ids)
            else:
                row.queue = list(forcing.budget_force_ids if forcing.budget_force_ids is not None else marker)
                row.phase = ANSWER
                ro.answer_start = len(ro.completion_ids)  # the forced end of thinking (and its text) comes first
    elif was_sampled:
        if token in forcing.eos_token_ids:
            row.phase, ro.stop_reason = DONE, "eos"
        else:
            ro.answer_tokens += 1
            if ro.answer_tokens >= forcing.max_answer_tokens and not row.queue:
                row.phase, ro.stop_reason = DONE, "answer_limit"
    if row.phase != DONE and len(ro.completion_ids) >= forcing.max_new_tokens and not row.queue:
        row.phase, ro.stop_reason = DONE, "max_new_tokens"
    return 0, (-1 if row.phase == DONE else token)


def room_for_continuation(ro: Rollout, k: int, forcing: ForcingConfig) -> bool:
    """Whether the continuation and at least one sampled token after it fit into the token limits once the k marker
    tokens are removed: otherwise forcing would overrun `max_new_tokens` or only feed text that is never read."""
    after = len(forcing.continuation_ids) + 1
    if len(ro.completion_ids) - k + after > forcing.max_new_tokens:
        return False
    return forcing.thinking_budget is None or ro.thinking_tokens - k + after <= forcing.thinking_budget


def _replace_marker(row: RowState, k: int, forcing: ForcingConfig) -> tuple[int, int]:
    """Move the just-completed marker from the completion to `replaced_markers`; start feeding the continuation.

    Its first k-1 tokens were already fed to the model: they get masked out of attention.
    """
    ro = row.rollout
    ro.replaced_markers.append(tuple(ro.completion_ids[-k:]))
    del ro.completion_ids[-k:], ro.sampled[-k:]
    ro.thinking_tokens -= k
    ro.continuation_starts.append(len(ro.completion_ids))
    row.queue = list(forcing.continuation_ids)
    if not row.queue:
        # Empty continuation ("no string"): suppress the marker. Mask the last kept token's cached position too and
        # feed it once more at the same position: the same context, sampled again with the marker's first token
        # banned (s1's "no string" ignores the end of thinking; re-sampling it unbanned would just repeat it).
        row.suppress = forcing.end_of_thinking_ids[0]
        last = ro.completion_ids[-1] if ro.completion_ids else ro.prompt_ids[-1]
        return k, last
    nxt = row.queue.pop(0)
    ro.completion_ids.append(nxt)
    ro.sampled.append(False)
    ro.thinking_tokens += 1
    return k - 1, nxt


def segment_limit(row: RowState, forcing: ForcingConfig) -> int:
    """How many tokens a row may sample in a row before its state machine must look at them: the next limit
    (max_new_tokens, the thinking budget, the answer limit) is reached exactly at this count. Used by engines that
    sample a whole segment before handing it to `advance` (ctt.engine.vllm)."""
    ro = row.rollout
    left = forcing.max_new_tokens - len(ro.completion_ids)
    if row.phase == THINKING and forcing.thinking_budget is not None:
        left = min(left, forcing.thinking_budget - ro.thinking_tokens)
    elif row.phase == ANSWER:
        left = min(left, forcing.max_answer_tokens - ro.answer_tokens)
    return max(1, left)
