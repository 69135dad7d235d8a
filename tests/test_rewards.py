import json
import threading
import time
from pathlib import Path

import pytest

from ctt.errors import ConfigError, DataError
from ctt.data.problems import Problem
from ctt.engine import Rollout
from ctt.data.answers import extract_answer, gold_answer, verify_or_raise
from ctt.rewards.registry import REWARDS, MathVerify, reward_from_config
from ctt.rewards.grading import Score, score_completion

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rows(name: str, n: int = 5) -> list[dict]:
    path = DATA / name / "test.jsonl"
    if not path.exists():
        pytest.skip(f"shared benchmark file missing: {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}} hence", "\\frac{1}{2}"),
        ("nested \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("$\\boxed 42$", "42"),
        ("\\fbox{7}", "7"),
        ("She makes 9 * 2 = 18 dollars.\n#### 18", "18"),
        ("#### 1,234", "1,234"),
        ("So the answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Final answer: 12. Done.", "12"),
        ("We have 3 apples, then 5, total 1,234,567 apples", "1,234,567"),
        ("that gives -0.5", "-0.5"),
        ("the ratio is 3/4", "3/4"),
        ("an empty box \\boxed{} but 5 later", "5"),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("3/4", "\\frac{3}{4}", True),
        ("0.75", "\\frac{3}{4}", True),
        ("\\frac{3}{4}", "0.75", True),
        ("1,234", "1234", True),
        ("1234", "1,234", True),
        ("\\$18", "18", True),
        ("27", "27.0", True),
        ("0.7", "\\frac{3}{4}", False),
        ("1235", "1234", False),
    ],
)
def test_verify_equivalent_forms(pred, gold, ok):
    assert verify_or_raise(pred, gold, 5.0) is ok


def test_gold_answer_formats():
    assert gold_answer("so 1,000 + 234\n#### 1,234", "gsm8k") == "1234"
    assert gold_answer("thus $\\boxed{\\frac{1}{2}}$.", "boxed") == "\\frac{1}{2}"
    assert gold_answer("  42 \n", "plain") == "42"
    assert gold_answer(27.0, "plain") == "27"
    with pytest.raises(DataError, match="####"):
        gold_answer("no marker", "gsm8k")
    with pytest.raises(DataError, match="boxed"):
        gold_answer("no box here", "boxed")
    with pytest.raises(ConfigError, match="gsm8k"):
        gold_answer("1", "nope")


def test_gsm8k_rows_correct_incorrect_missing():
    for row in _rows("gsm8k"):
        gold = gold_answer(row["answer"], "gsm8k")
        right = score_completion(f"Let me think. {row['answer'].split('####')[0]} \\boxed{{{gold}}}", gold)
        assert right == Score(1.0, True, gold, "correct")
        wrong = score_completion(f"I believe it is \\boxed{{{int(gold) + 1}}}", gold)
        assert (wrong.reward, wrong.status) == (0.0, "incorrect")
        assert score_completion("no answer here", gold) == Score(0.0, False, None, "missing")


def test_math500_rows_latex_answers():
    rows = _rows("math500", 20)
    answers = [r["answer"] for r in rows]
    assert any("\\frac" in a for a in answers) and any("," in a for a in answers)  # fractions and tuples covered
    checked_wrong = 0
    for i, row in enumerate(rows):
        gold = gold_answer(row["solution"], "boxed")
        assert verify_or_raise(gold, row["answer"], 5.0), (gold, row["answer"])
        assert score_completion(f"Reasoning... so $\\boxed{{{row['answer']}}}$.", row["answer"]).correct
        other = rows[(i + 1) % len(rows)]["answer"]
        if not verify_or_raise(other, row["answer"], 5.0):  # skip accidental duplicates among the rows
            assert score_completion(f"\\boxed{{{other}}}", row["answer"]).status == "incorrect"
            checked_wrong += 1
    assert checked_wrong >= len(rows) - 2


@pytest.mark.parametrize(
    "text, timeout_s",
    [("\\boxed{" + "(" * 5000 + "}", 5.0), ("\\boxed{" + "(" * 300 + "}", 1.0), ("\\boxed{9^{9^{9}}}", 1.0)],
    ids=["5000-parens-over-length-cap", "300-parens-parse-timeout", "power-tower-compare-timeout"],
)
def test_pathological_inputs_are_bounded(text, timeout_s):
    score = score_completion(text, "1", timeout_s=timeout_s)  # returns (its duration: bench/bench_grading.py)
    assert score.reward == 0.0 and not score.correct


def test_non_main_thread_degrades_safely():
    out = {}

    def work():
        out["score"] = score_completion("\\boxed{2}", "2")
        try:
            out["verify"] = verify_or_raise("2", "2", 5.0)
        except RuntimeError as err:  # signal-based timeouts need the main thread
            out["verify"] = err
        out["no_timeout"] = verify_or_raise("2", "2", timeout_s=None)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert out["score"].status == "error" and out["score"].reward == 0.0
    assert isinstance(out["verify"], RuntimeError)
    assert out["no_timeout"] is True  # explicitly opting out of signals works in threads


def test_reward_registry():
    """The registered reward grades the rollout's answer text (what follows the end of thinking), not its whole
    text, against the problem's gold answer; an unknown name lists the registered ones."""
    graded = Rollout(prompt_ids=[1], text="maybe \\boxed{5}</think> so \\boxed{4}", answer_text="so \\boxed{4}")
    reward = reward_from_config("math_verify")
    assert reward(graded, Problem("p", "2+2?", "4")) == Score(1.0, True, "4", "correct")
    assert reward(graded, Problem("p", "2+3?", "5")) == Score(0.0, False, "4", "incorrect")
    with pytest.raises(ConfigError, match="rl.reward must be one of " + ", ".join(REWARDS)):
        reward_from_config("exact_match", "rl.reward")


def test_a_reward_takes_typed_parameters():
    """A reward is a typed group: its parameters come from the config (a mapping with its name), are checked like
    every group, and reach the grader."""
    assert reward_from_config({"name": "math_verify", "timeout_s": None}) == MathVerify(timeout_s=None)
    assert reward_from_config("math_verify") == MathVerify(timeout_s=5.0)
    with pytest.raises(ConfigError, match="timeout_s"):
        reward_from_config({"name": "math_verify", "timeout_s": "soon"})
    with pytest.raises(ConfigError, match="unknown"):
        reward_from_config({"name": "math_verify", "bonus": 1})


@pytest.mark.parametrize("text,answer", [
    ("The answer is 2 + \\sqrt{3}", "2 + \\sqrt{3}"), ("answer is 3 \\pi", "3 \\pi"), ("answer is 3+4i", "3+4i"),
    ("answer is (3, 4)", "(3, 4)"), ("answer is [2, 5)", "[2, 5)"), ("answer is x=5, y=3", "x=5, y=3"),
    ("answer is 4:30", "4:30"), ("answer is 4 + 5 = 9", "4 + 5 = 9"), ("#### $1,000", "1,000"),
    ("#### 1,234 dollars", "1,234"), ("the final answer is 9.\nWait\n, let me check.", "9"),
    ("The answer is 9 because 4+5=9", "9"), ("answer: $\\frac{3}{4}$ yes", "\\frac{3}{4}"),
    ("The answer is 2x+1, i think", "2x+1"), ("so the answer is -3.5.", "-3.5"), ("The answer is \\(x^2\\).", "x^2"),
    ("The final answer is: 42", "42"), ("answer is 12 apples.", "12"), ("answer is 10%", "10%"),
    ("answer is \\frac{1}{2}.", "\\frac{1}{2}"), ("answer is x = 5", "x = 5"), ("answer is 0.5.", "0.5"),
    ("so the answer is\nWait\n, let me check. 9", "9"),
])
def test_answer_phrases_keep_the_answer_and_only_the_answer(text, answer):
    assert extract_answer(text) == answer


def test_extraction_is_linear():
    """`\\boxed{` repeated 10,000 times took 20-25 s (every box scanned to the end). 10x the text must take about
    10x the time, not 100x (the absolute bound on a 1 MB completion is bench/bench_grading.py)."""
    def seconds(text: str) -> float:
        start = time.perf_counter()
        extract_answer(text)
        return time.perf_counter() - start

    for unit in ("\\boxed{", "x", "the answer is ", "9 "):
        small, large = unit * (100_000 // len(unit)), unit * (1_000_000 // len(unit))
        t_small = min(seconds(small) for _ in range(5))
        t_large = min(seconds(large) for _ in range(5))  # min of several: a stall on a shared CPU is not the algorithm
        assert t_large < 30 * t_small + 0.05, (unit, t_small, t_large)
