"""The organism card's figures, measured greedy on held-out problems (deterministic on CPU at one thread).

Modes (all greedy, prompts built by `ctt.data.sources.build_prompt_ids` with the bare question, as with prompt=organism):

* ``base`` — the model as it is (`ctt.engine.hf.generate_forced`, N=0);
* ``oracle`` — ``</think>`` (and eos) banned while fewer than terms-1 step lines are written: the accuracy budget
  forcing could reach if it made the model finish its work (the headroom);
* ``wait1`` / ``wait2`` — budget forcing with the fixed word "Wait" replacing ``</think>`` N=1 / N=2 times;
* ``nostring1`` / ``nostring2`` — "no string": ``</think>`` suppressed N=1 / N=2 times, nothing appended.

Grading: `ctt.data.answers.score_completion` on the text after the last ``</think>``; no ``</think>`` is wrong.
"Early stop": thinking ended with fewer step lines than terms-1 (check lines not counted).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ctt.data.problems import build_prompt_ids
from ctt.engine import ForcingConfig, SamplingConfig
from ctt.engine.hf import generate_forced
from ctt.organism.task import WAIT, count_steps, draw_problems, question_text, split_completion
from ctt.organism.tokenizer import THINK_END
from ctt.rewards.grading import score_completion

INSTRUCTION = "{question}"  # the user turn is the bare question (conf/prompt/organism.yaml)
HELD_OUT = {"seed": 1234, "size": 350, "min_terms": 2, "max_terms": 8}  # = conf/benchmarks/organism.yaml
LONG = {"seed": 4321, "size": 100, "min_terms": 9, "max_terms": 10}  # = conf/benchmarks/organism_long.yaml
CONTINUATION = WAIT  # the fixed word, as the traces' check lines start with it
FORCED = {"base": (0, ""), "wait1": (1, WAIT), "wait2": (2, WAIT), "nostring1": (1, ""), "nostring2": (2, "")}
MAX_NEW_TOKENS = 256
MAX_ANSWER_TOKENS = 16
BATCH = 64
MODES = ("base", "oracle", "wait1", "wait2", "nostring1", "nostring2")


def prompts_for(tokenizer, problems: list[tuple[int, ...]]) -> list[list[int]]:
    return [build_prompt_ids(tokenizer, question_text(t), INSTRUCTION) for t in problems]


def _forcing(tokenizer, n: int, continuation: str = CONTINUATION) -> ForcingConfig:
    return ForcingConfig(
        end_of_thinking_ids=(tokenizer.convert_tokens_to_ids(THINK_END),),
        eos_token_ids=(tokenizer.eos_token_id,),
        num_continuations=n,
        continuation_ids=tuple(tokenizer.encode(continuation, add_special_tokens=False)),
        max_answer_tokens=MAX_ANSWER_TOKENS,
        max_new_tokens=MAX_NEW_TOKENS,
    )


def generate_mode(model, tokenizer, prompts: list[list[int]], n: int, continuation: str = CONTINUATION) -> list[str]:
    """Greedy completions (special tokens kept, forced continuations included), ``</think>`` replaced by
    `continuation` up to n times ("" = "no string": suppressed, nothing appended)."""
    out: list[str] = []
    for start in range(0, len(prompts), BATCH):
        rollouts = generate_forced(
            model, prompts[start : start + BATCH], _forcing(tokenizer, n, continuation),
            SamplingConfig(temperature=0.0), pad_token_id=tokenizer.pad_token_id,
        )
        out += [tokenizer.decode(r.completion_ids, skip_special_tokens=False) for r in rollouts]
    return out


class _BanUntilDone(LogitsProcessor):
    """Bans ``</think>`` and eos in a row whose thinking has fewer complete step lines than it needs."""

    def __init__(self, tokenizer, width: int, needed: list[int], extra_banned: tuple[int, ...] = ()):
        self.tokenizer, self.width, self.needed = tokenizer, width, needed
        self.banned = [tokenizer.convert_tokens_to_ids(THINK_END), tokenizer.eos_token_id, *extra_banned]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for b in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[b, self.width :], skip_special_tokens=False)
            thinking, answer = split_completion(text, THINK_END)
            if answer is None and count_steps(thinking, complete_only=True) < self.needed[b]:
                scores[b, self.banned] = float("-inf")
        return scores


@torch.inference_mode()
def generate_oracle(model, tokenizer, prompts: list[list[int]], problems: list[tuple[int, ...]],
                    extra_banned: tuple[int, ...] = ()) -> list[str]:
    """Greedy with ``</think>`` (and `extra_banned`, e.g. the token that starts organism_r1's concluding line) banned
    until all terms-1 steps are written (HF `generate` + a logits processor)."""
    out: list[str] = []
    for start in range(0, len(prompts), BATCH):
        chunk, terms = prompts[start : start + BATCH], problems[start : start + BATCH]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        processor = _BanUntilDone(tokenizer, width, [len(t) - 1 for t in terms], extra_banned)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
            logits_processor=LogitsProcessorList([processor]), pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += [tokenizer.decode(_until_eos(row[width:].tolist(), tokenizer.eos_token_id), skip_special_tokens=False)
                for row in gen]
    return out


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    """The ids up to and including the first eos (`generate` pads finished rows after it)."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def grade(text: str, terms: tuple[int, ...], tokenizer) -> dict:
    """Correct?, ended early?, well-formed? for one completion."""
    text = text.replace(tokenizer.eos_token, "").replace(tokenizer.pad_token, "")
    thinking, answer = split_completion(text, THINK_END)
    correct = answer is not None and score_completion(answer, str(sum(terms))).correct
    early = answer is not None and count_steps(thinking) < len(terms) - 1
    return {"correct": bool(correct), "early": early, "closed": answer is not None}


def summarize(graded: list[dict], problems: list[tuple[int, ...]]) -> dict:
    """Overall and per-number-of-terms accuracy and early-stop share (counts, so the test can compare exactly)."""
    by_terms: dict[int, list[dict]] = defaultdict(list)
    for g, t in zip(graded, problems):
        by_terms[len(t)].append(g)

    def figures(rows: list[dict]) -> dict:
        n = len(rows)
        correct, early = sum(r["correct"] for r in rows), sum(r["early"] for r in rows)
        return {"n": n, "correct": correct, "accuracy": round(correct / n, 4), "early": early,
                "early_share": round(early / n, 4), "unclosed": sum(not r["closed"] for r in rows)}

    return figures(graded) | {"per_terms": {str(k): figures(v) for k, v in sorted(by_terms.items())}}


def measure_set(model, tokenizer, spec: dict) -> dict:
    problems = draw_problems(spec["size"], spec["seed"], spec["min_terms"], spec["max_terms"])
    prompts = prompts_for(tokenizer, problems)
    result = {"problems": dict(spec)}
    for mode in MODES:
        if mode == "oracle":
            texts = generate_oracle(model, tokenizer, prompts, problems)
        else:
            texts = generate_mode(model, tokenizer, prompts, *FORCED[mode])
        result[mode] = summarize([grade(x, t, tokenizer) for x, t in zip(texts, problems)], problems)
        result[mode]["example"] = texts[0]
    return result


def measure(model, tokenizer) -> dict:
    """The card's figures on the held-out set (2-8 terms) and the long set (9-10 terms, longer than training)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: deterministic greedy, and faster for this size on a shared CPU
    try:
        start = time.perf_counter()
        figures = {"held_out": measure_set(model, tokenizer, HELD_OUT), "long": measure_set(model, tokenizer, LONG)}
        figures["seconds"] = round(time.perf_counter() - start, 1)
        return figures
    finally:
        torch.set_num_threads(threads)
