"""What is graded: an answer followed by an inserted continuation grades exactly as the answer alone.

A reader grades the final answer: with a real end-of-thinking marker, what follows the last (kept) one; when the
marker is end-of-sequence (SmolLM2), the whole completion with each inserted continuation kept apart as its own
segment, so "... is 9." + "Wait" + ", let me check." is not read as "9.Wait".
"""

from __future__ import annotations

import pytest

from ctt.data.problems import Problem
from ctt.engine import ForcingConfig, Rollout
from ctt.policy.modes import Mode
from ctt.policy.policy import ForcingSettings, Policy
from ctt.rewards.registry import reward_from_config
from tests.conftest import tiny

FIXED_WORDS = ["Wait", "Hmm", "Alternatively", "Let", "Perhaps"]
ANSWERS = [  # (completion stating an answer, gold)
    ("4 plus 5 makes 9, so the final answer is 9.", "9"),
    ("Adding them up: \\boxed{9}", "9"),
    ("We get 12 apples.\n#### 12", "12"),
    ("The answer is 3/4", "0.75"),
]
CONTINUATIONS = [", let me check.", " let me check the sum again.", "\nSo I think I am done here."]


def _policy(marker: str) -> Policy:
    return Policy(tiny(boost=0.0, marker=marker), ForcingSettings(), "Answer.")


def _continued(policy: Policy, stated: list[int], continuation: tuple[int, ...], after: list[int]) -> Rollout:
    ids = stated + list(continuation) + after
    return Rollout(prompt_ids=[1], completion_ids=ids, sampled=[True] * len(ids), continuation_starts=[len(stated)],
                   replaced_markers=[tuple(policy.marker)])


def _grade(policy: Policy, rollout: Rollout, continuation: tuple[int, ...], gold: str):
    forcing = ForcingConfig(tuple(policy.marker), policy.eos_ids, 1, tuple(continuation))
    rollout.answer_text = policy.answer_text(rollout, forcing)
    return reward_from_config("math_verify")(rollout, Problem("p", "q", gold))


@pytest.mark.parametrize("mode", [f"fixed:{w}" for w in FIXED_WORDS] + ["learned"])
def test_an_answer_then_a_continuation_grades_as_the_answer_alone_when_the_marker_is_eos(mode):
    policy = _policy("eos")
    kind, _, word = mode.partition(":")
    continuation = Mode(kind, word or None, 1).continuation(policy.encode_text, policy.token_ids)
    for stated_text, gold in ANSWERS:
        stated = policy.tokenizer.encode(stated_text)
        alone = _grade(policy, Rollout(prompt_ids=[1], completion_ids=stated, sampled=[True] * len(stated)), (), gold)
        assert alone.correct, (stated_text, alone)
        for after in CONTINUATIONS:
            rollout = _continued(policy, stated, continuation, policy.tokenizer.encode(after))
            assert _grade(policy, rollout, continuation, gold) == alone, (mode, stated_text, after)


@pytest.mark.parametrize("mode", [f"fixed:{w}" for w in FIXED_WORDS] + ["learned"])
def test_with_a_real_marker_the_answer_after_the_last_end_of_thinking_is_graded(mode):
    policy = _policy("</think>")
    tok, end = policy.tokenizer, list(policy.marker)
    kind, _, word = mode.partition(":")
    continuation = list(Mode(kind, word or None, 1).continuation(policy.encode_text, policy.token_ids))
    thinking = tok.encode("4+5=9, so maybe 8.") + continuation + tok.encode(" 4+5 is 9 indeed.")
    ids = thinking + end + tok.encode("The answer is \\boxed{9}.")
    rollout = Rollout(prompt_ids=[1], completion_ids=ids, sampled=[True] * len(ids), continuation_starts=[11],
                      answer_start=len(thinking) + len(end))
    assert _grade(policy, rollout, continuation, "9").correct
    assert rollout.answer_text == "The answer is \\boxed{9}."
    # A "final answer" inside the thinking does not count when the answer after </think> is wrong ...
    wrong = thinking + end + tok.encode("\\boxed{8}")
    assert not _grade(policy, Rollout([1], wrong, [True] * len(wrong), answer_start=len(thinking) + 1), continuation, "9").correct
    # ... nor when thinking never ended (no answer was given).
    unfinished = Rollout([1], thinking, [True] * len(thinking), continuation_starts=[11])
    assert _grade(policy, unfinished, continuation, "9").status == "missing"


def test_rendered_text_marks_every_continuation():
    policy = _policy("eos")
    stated = policy.tokenizer.encode("It is 9.")
    rollout = _continued(policy, stated, policy.encode_text("Wait"), policy.tokenizer.encode(" ok"))
    assert policy.render(rollout, len(policy.encode_text("Wait"))) == "It is 9.[[Wait]] ok"
    learned = _continued(policy, stated, policy.token_ids, policy.tokenizer.encode(" ok"))
    assert policy.render(learned, 1) == "It is 9.[[<|continue-thinking|>]] ok"


def test_an_answer_phrase_at_a_boundary_does_not_swallow_the_continuation():
    """"... so the answer is" + Wait + ", let me check. 9": the phrase regex must not read across the boundary
    ("Wait" would be the answer) -- the learned token, decoding to "", must not grade differently from Wait."""
    policy = _policy("eos")
    stated = policy.tokenizer.encode("4 plus 5 makes 9, so the answer is")
    after = policy.tokenizer.encode(", let me check.")
    alone = _grade(policy, Rollout([1], stated + after, [True] * (len(stated) + len(after))), (), "9")
    for continuation in (policy.encode_text("Wait"), policy.token_ids):
        rollout = _continued(policy, stated, continuation, after)
        assert _grade(policy, rollout, continuation, "9") == alone


def test_no_string_inserts_no_boundary():
    """The model's own text around a suppressed marker is one text: "1" + (suppressed) + "2." reads "12."."""
    policy = _policy("eos")
    ids = policy.tokenizer.encode("The answer is 12.")
    cut = len(policy.tokenizer.encode("The answer is 1"))
    rollout = Rollout([1], ids, [True] * len(ids), continuation_starts=[cut], replaced_markers=[tuple(policy.marker)])
    assert _grade(policy, rollout, (), "12").correct
