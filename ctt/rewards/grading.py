"""Grading one answer text against a gold answer: a Score that never raises."""

from __future__ import annotations

from dataclasses import dataclass

from math_verify.errors import TimeoutException

from ctt.data.answers import extract_answer, verify_or_raise


@dataclass(frozen=True)
class Score:
    reward: float
    correct: bool
    extracted: str | None
    status: str  # "correct" | "incorrect" | "missing" | "error"


def score_completion(text: str, gold: str, *, timeout_s: float | None = 5.0) -> Score:
    """Reward 1.0 if the completion's final answer verifies against the normalised gold, else 0.0. Never raises."""
    try:
        extracted = extract_answer(text)
    except Exception:  # extraction is plain regex work; this is belt and braces
        return Score(0.0, False, None, "error")
    if extracted is None:
        return Score(0.0, False, None, "missing")
    try:
        correct = verify_or_raise(extracted, gold, timeout_s)
    except (Exception, TimeoutException):
        return Score(0.0, False, extracted, "error")
    return Score(float(correct), correct, extracted, "correct" if correct else "incorrect")
