"""A test oracle, not used by training or evaluation: budget forcing built on `model.generate`, as users of plain
transformers would write it (greedy only).

Two references for `ctt.engine.hf.generate_forced`, used by tests/test_speed_equivalence.py (token-for-token
equality) and bench/bench_rollout.py (speed):

* `s1_forced`: the s1 recipe. `generate` until the end-of-thinking marker (or eos), strip the marker, append the
  continuation ("Wait"), call `generate` again on the whole text; N+1 calls per sequence (plus one for the answer
  when the marker is not eos). Batched: every round sends all rows that still need a call of the same kind as one
  left-padded batch (rows that stop early sit in the batch as padding until the longest row finishes, then the
  whole text is prefilled again); `batched=False` does the same one sequence at a time.
* `inloop_forced`: one `generate` call; a LogitsProcessor replaces the marker by the continuation at the step
  where it would be chosen (so the marker never enters the context, as in s1 and ctt) and a StoppingCriteria
  applies the per-row limits. Possible only because the choice is greedy and the marker is one token: the processor
  must know the chosen token before `generate` appends it. With sampling the processor would have to draw the token
  itself, and a multi-token marker is already in the KV cache when its last token is drawn (`generate` cannot
  un-feed tokens): both are what `generate_forced` exists for. Nor can it force the learned token when its id lies
  outside the output vocabulary (the lm_head has no row for it, so no score can select it).

Neither supports a thinking budget (`ForcingConfig.thinking_budget`) or an empty continuation.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers import StoppingCriteria, StoppingCriteriaList

from ctt.engine.batching import banned_in_vocab, mask_banned, pad_batch
from ctt.engine import ForcingConfig, Rollout

_THINK, _ANSWER, _DONE = "thinking", "answer", "done"


def _check(forcing: ForcingConfig) -> None:
    if len(forcing.end_of_thinking_ids) != 1:
        raise ValueError("the generate-based references support single-token end-of-thinking markers only")
    if forcing.thinking_budget is not None:
        raise ValueError("the generate-based references do not implement a thinking budget")
    if forcing.num_continuations and not forcing.continuation_ids:
        raise ValueError("the generate-based references need a non-empty continuation")


class _Ban(LogitsProcessor):
    def __init__(self, banned: list[int]):
        self.banned = banned

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return mask_banned(scores, self.banned)


def _banned(model: PreTrainedModel, forcing: ForcingConfig) -> list[int]:
    return banned_in_vocab(forcing.banned_ids, model.get_output_embeddings().weight.shape[0])


def _greedy_config(max_new_tokens: int, eos: list[int], pad_token_id: int) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad_token_id,
        use_cache=True, temperature=None, top_p=None, top_k=None,
    )


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel,
    seqs: list[list[int]],
    stop_ids: list[int],
    max_new_tokens: int,
    pad_token_id: int,
    banned: list[int] = (),
) -> list[list[int]]:
    """One left-padded greedy `generate` call; per row the new tokens up to and including the first stop token."""
    ids, mask = pad_batch(seqs, pad_token_id, next(model.parameters()).device)
    processors = LogitsProcessorList([_Ban(list(banned))] if banned else [])
    out = model.generate(
        input_ids=ids, attention_mask=mask, generation_config=_greedy_config(max_new_tokens, stop_ids, pad_token_id),
        logits_processor=processors,
    )
    result = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))
        result.append(row[:cut])
    return result


def _apply_thinking(r: Rollout, state: dict, new: list[int], forcing: ForcingConfig) -> None:
    marker, eos = forcing.end_of_thinking_ids[0], forcing.eos_token_ids
    r.completion_ids += new
    r.sampled += [True] * len(new)
    r.thinking_tokens += len(new)
    last = new[-1] if new else None
    if last == marker:
        room = len(r.completion_ids) + len(forcing.continuation_ids) <= forcing.max_new_tokens  # marker out, +1 token
        if r.num_forced < forcing.num_continuations and room:
            r.completion_ids.pop(), r.sampled.pop()
            r.thinking_tokens -= 1
            r.replaced_markers.append((marker,))
            r.continuation_starts.append(len(r.completion_ids))
            r.completion_ids += forcing.continuation_ids
            r.sampled += [False] * len(forcing.continuation_ids)
            r.thinking_tokens += len(forcing.continuation_ids)
        elif marker in eos:
            state["phase"], r.stop_reason = _DONE, "eos"
            r.answer_start = len(r.completion_ids)
        else:
            state["phase"] = _ANSWER
            r.answer_start = len(r.completion_ids)
    elif last is not None and last in eos:
        state["phase"], r.stop_reason = _DONE, "eos"
    else:
        state["phase"], r.stop_reason = _DONE, "max_new_tokens"  # cut by the budget
    if state["phase"] != _DONE and len(r.completion_ids) >= forcing.max_new_tokens:
        state["phase"], r.stop_reason = _DONE, "max_new_tokens"


def _apply_answer(r: Rollout, state: dict, new: list[int], forcing: ForcingConfig) -> None:
    r.completion_ids += new
    r.sampled += [True] * len(new)
    if new and new[-1] in forcing.eos_token_ids:
        r.answer_tokens += len(new) - 1
        state["phase"], r.stop_reason = _DONE, "eos"
        return
    r.answer_tokens += len(new)
    state["phase"] = _DONE
    r.stop_reason = "answer_limit" if r.answer_tokens >= forcing.max_answer_tokens else "max_new_tokens"


def s1_forced(
    model: PreTrainedModel,
    prompts: list[list[int]],
    forcing: ForcingConfig,
    pad_token_id: int,
    batched: bool = True,
) -> list[Rollout]:
    """The s1 recipe on `generate` (see the module docstring). Greedy; returns rollouts like `generate_forced`."""
    _check(forcing)
    marker, eos = forcing.end_of_thinking_ids[0], list(forcing.eos_token_ids)
    banned = _banned(model, forcing)
    rollouts = [Rollout(prompt_ids=list(p)) for p in prompts]
    states = [{"phase": _THINK} for _ in prompts]
    while True:
        todo = [i for i, s in enumerate(states) if s["phase"] != _DONE]
        if not todo:
            break
        for phase in (_THINK, _ANSWER):
            rows = [i for i in todo if states[i]["phase"] == phase]
            for chunk in ([rows] if batched else [[i] for i in rows]) if rows else []:
                limits = []
                for i in chunk:
                    r = rollouts[i]
                    left = forcing.max_new_tokens - len(r.completion_ids)
                    limits.append(left if phase == _THINK else min(left, forcing.max_answer_tokens - r.answer_tokens))
                stops = sorted({marker, *eos}) if phase == _THINK else eos
                outs = generate_batch(
                    model, [rollouts[i].prompt_ids + rollouts[i].completion_ids for i in chunk], stops,
                    max(limits), pad_token_id, banned,
                )
                for i, new, limit in zip(chunk, outs, limits):
                    apply = _apply_thinking if phase == _THINK else _apply_answer
                    apply(rollouts[i], states[i], new[:limit], forcing)
    return rollouts


class _InLoopForcing(LogitsProcessor):
    """Chooses every token itself (greedy), replacing the marker by the continuation; tracks finished rows."""

    def __init__(self, forcing: ForcingConfig, batch: int, banned: list[int]):
        self.f, self.banned = forcing, banned
        self.rollouts = [Rollout(prompt_ids=[]) for _ in range(batch)]
        self.phase = [_THINK] * batch
        self.queue: list[list[int]] = [[] for _ in range(batch)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        f = self.f
        mask_banned(scores, self.banned)
        greedy = scores.argmax(-1).tolist()
        marker, eos = f.end_of_thinking_ids[0], f.eos_token_ids
        for b, r in enumerate(self.rollouts):
            if self.phase[b] == _DONE:
                continue
            was_sampled = not self.queue[b]
            token = greedy[b] if was_sampled else self.queue[b].pop(0)
            if self.phase[b] == _THINK:
                room = len(r.completion_ids) + len(f.continuation_ids) + 1 <= f.max_new_tokens
                if was_sampled and token == marker and r.num_forced < f.num_continuations and room:
                    r.replaced_markers.append((marker,))
                    r.continuation_starts.append(len(r.completion_ids))
                    token, was_sampled = f.continuation_ids[0], False
                    self.queue[b] = list(f.continuation_ids[1:])
                elif was_sampled and token == marker:
                    self.phase[b] = _DONE if marker in eos else _ANSWER
                    r.stop_reason = "eos" if marker in eos else ""
                    r.answer_start = len(r.completion_ids) + 1
                elif was_sampled and token in eos:
                    self.phase[b], r.stop_reason = _DONE, "eos"
                r.thinking_tokens += 1
            elif was_sampled:
                if token in eos:
                    self.phase[b], r.stop_reason = _DONE, "eos"
                else:
                    r.answer_tokens += 1
                    if r.answer_tokens >= f.max_answer_tokens and not self.queue[b]:
                        self.phase[b], r.stop_reason = _DONE, "answer_limit"
            r.completion_ids.append(token)
            r.sampled.append(was_sampled)
            if self.phase[b] != _DONE and len(r.completion_ids) >= f.max_new_tokens and not self.queue[b]:
                self.phase[b], r.stop_reason = _DONE, "max_new_tokens"
            scores[b].fill_(float("-inf"))
            scores[b, token] = 0.0
        return scores


class _InLoopStop(StoppingCriteria):
    def __init__(self, forcing: _InLoopForcing):
        self.forcing = forcing

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([p == _DONE for p in self.forcing.phase], device=input_ids.device)


@torch.no_grad()
def inloop_forced(
    model: PreTrainedModel, prompts: list[list[int]], forcing: ForcingConfig, pad_token_id: int
) -> list[Rollout]:
    """Budget forcing inside one `generate` call (see the module docstring). Greedy."""
    _check(forcing)
    vocab = model.get_output_embeddings().weight.shape[0]
    if any(i >= vocab for i in forcing.continuation_ids):
        raise ValueError(
            "the in-loop reference can only force ids the model can output; the continuation holds an id >= the "
            f"output vocabulary ({vocab}), e.g. the new token of a model whose lm_head was not resized"
        )
    ids, mask = pad_batch(prompts, pad_token_id, next(model.parameters()).device)
    state = _InLoopForcing(forcing, len(prompts), _banned(model, forcing))
    # The continuation may run past max_new_tokens (a continuation is never cut): leave room, the criteria stop rows.
    room = forcing.max_new_tokens + len(forcing.continuation_ids) + 1
    out = model.generate(
        input_ids=ids, attention_mask=mask,
        generation_config=_greedy_config(room, list(forcing.eos_token_ids), pad_token_id),
        logits_processor=LogitsProcessorList([state]), stopping_criteria=StoppingCriteriaList([_InLoopStop(state)]),
    )
    new = out[:, ids.shape[1] :].tolist()
    for p, r, row in zip(prompts, state.rollouts, new):
        r.prompt_ids = list(p)
        assert row[: len(r.completion_ids)] == r.completion_ids, "generate did not follow the forcing processor"
    return state.rollouts
