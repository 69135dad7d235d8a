"""Answers: the final answer read from a text, gold answers normalised, and math_verify's equality of two answers.

Used where problems are loaded (a gold that cannot be parsed is skipped) and where rollouts are graded (ctt.rewards).
math_verify does the symbolic comparison. Its timeouts are `signal.alarm` based, so they only work in
the main thread; elsewhere a call with a timeout is refused (scored "error") rather than risking a hang.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
from math_verify import verify as _mv_verify
from math_verify.errors import TimeoutException

from ctt.errors import DataError
from ctt.settings import one_of

log = logging.getLogger(__name__)

# No real final answer is this long; longer ones are scored incorrect without parsing, because
# parse time grows steeply with nesting (200 nested parentheses already take ~1 s).
MAX_ANSWER_CHARS = 500

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
# [ \t]*, never \s*: a line break is a segment boundary (ctt.policy.policy.Policy.answer_text), not part of the phrase.
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?:final answer|answer)[ \t]*(?:is|:)[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE)
# Minus only when not following a word/closing bracket, so "3-5" yields 3 and 5, not -5.
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|(?:(?<![\w)\]}])-)?\.\d+"
)
# Decorations that make math_verify fail to parse an otherwise fine answer (e.g. "\$18", "10\%").
_NOISE = ("\\!", "\\,", "\\$", "\\%", "%", "^{\\circ}", "^\\circ")
_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each balanced `{` -> index of its `}`, in one pass (a stack): extraction stays linear in the text."""
    match, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            match[stack.pop()] = i
    return match


def _boxed_content(text: str, start: int, match: dict[int, int]) -> str | None:
    """Content of the box whose command ends at `start`: `{...}` with balanced braces, or `\\boxed x`."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = match.get(i)
        return text[i + 1 : end].strip() if end is not None else None  # None: unbalanced, e.g. truncated
    if i > start:  # "\boxed 42": up to the next whitespace or math delimiter
        m = re.match(r"[^\s$]+", text[i : i + MAX_ANSWER_CHARS + 1])
        return m.group(0) if m else None
    return None


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    match = _matching_braces(text)
    for start in reversed(starts):
        content = _boxed_content(text, start, match)
        if content:
            return content
    return None


# What may follow "the answer is": a $...$ or \\(...\\) span, a number, or else text up to the end of the clause.
_LEADING_MATH_RE = re.compile(r"\$([^$\n]+)\$|\\\((.+?)\\\)")
# After a number, what says the number is the whole answer: the end, sentence punctuation, or a unit word.
_NUMBER_ENDS_RE = re.compile(r"\s*$|[.!?,;](?:\s|$)|\s+[A-Za-z]{2,}\b")
# Where a clause ends (outside brackets): a sentence end, ";", ", <word>", or a conjunction.
_CLAUSE_END_RE = re.compile(r"[.!?](?:\s|$)|;|,\s*(?=[A-Za-z]{2,}|[A-Za-z]\s)|\s(?:because|since|and|so|but|which|then)\b")


def _first_clause(s: str) -> str:
    depth, depths = 0, []
    for ch in s:
        depths.append(depth)
        depth += ch in "([{" and 1 or (-1 if ch in ")]}" else 0)
    cut = next((m.start() for m in _CLAUSE_END_RE.finditer(s) if depths[m.start()] <= 0), len(s))
    return s[:cut].strip().rstrip(".").strip()


def _clean_phrase(s: str) -> str:
    """The answer stated after "answer is" / "####", not the rest of the line: "9, let me check" -> "9", while
    "2 + \\sqrt{3}", "(3, 4)", "x=5, y=3" and "4:30" stay whole."""
    s = s.strip().lstrip(":").strip()
    m = _LEADING_MATH_RE.match(s)
    if m:
        return (m.group(1) or m.group(2)).strip()
    s = re.sub(r"^\\?\$(?=\s*[-.\d])", "", s)  # a currency sign ("$1,000"), not a $...$ span
    number = _NUMBER_RE.match(s)
    if number and _NUMBER_ENDS_RE.match(s, number.end()):
        return re.sub(r"\s+", "", number.group(0))
    return _first_clause(s)


def extract_answer(text: str) -> str | None:
    """Final answer of a completion: last \\boxed{}, else `#### x`, else "answer is x", else the last number."""
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    for pattern in (_GSM8K_RE, _ANSWER_IS_RE):
        last = None
        for last in pattern.finditer(text):
            pass
        if last is not None and (found := _clean_phrase(last.group(1))):
            return found
    last_number = None
    for last_number in _NUMBER_RE.finditer(text):
        pass
    return re.sub(r"\s+", "", last_number.group(0)) if last_number else None


ANSWER_FORMATS = ("gsm8k", "boxed", "plain")


def check_answer_format(answer_format: str, key: str = "answer_format") -> str:
    """`answer_format` when it is one of ANSWER_FORMATS (the one check: config schema, data loading, gold parsing)."""
    return one_of(key, answer_format, ANSWER_FORMATS)


class UnusableGold(DataError):
    """A gold field that is not one answer (null, a list, a mapping, a boolean): the row is skipped and counted."""


def gold_answer(raw: str | int | float, answer_format: str) -> str:
    """Normalise a data set's gold field into a string `verify` accepts."""
    check_answer_format(answer_format)
    if raw is None or isinstance(raw, bool) or not isinstance(raw, str | int | float):
        # str() would turn these into "None" or "['1', '2']", which `\boxed{None}` would then match.
        raise UnusableGold(f"gold answer is {'null' if raw is None else type(raw).__name__}, not one answer")
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)  # AMC stores 27.0; "27" reads better in logs
    text = str(raw)
    if answer_format == "gsm8k":
        if "####" not in text:
            raise DataError("gold answer has no '#### <answer>' line")
        answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_format == "boxed":
        answer = _last_boxed(text) or ""
        if not answer:
            raise DataError("gold solution has no \\boxed{...} answer")
    else:
        answer = text.strip()
    if not answer:
        raise DataError("gold answer is empty")
    return answer


def _as_boxed(answer: str) -> str:
    """Put a bare answer into the form math_verify parses most reliably (bare tuples fail, boxed work)."""
    s = answer.strip()
    for noise in _NOISE:
        s = s.replace(noise, "")
    if "\\boxed" in s:
        return s
    return "\\boxed{" + s.replace("$", "").strip() + "}"


@lru_cache(maxsize=8192)
def _parse_gold(gold: str, timeout: int | None) -> list:
    # Gold strings repeat for every rollout of a prompt; parsing them once saves most of the cost.
    return parse(_as_boxed(gold), extraction_config=_CONFIG, parsing_timeout=timeout)


def _whole_seconds(timeout_s: float | None) -> int | None:
    """math_verify's timeouts are whole seconds (`signal.alarm`); None or <= 0 means no timeout."""
    return None if timeout_s is None or timeout_s <= 0 else max(1, math.ceil(timeout_s))


_PLAIN_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def gold_parses(gold: str, timeout_s: float | None = 5.0) -> bool:
    """Whether math_verify can parse a normalised gold answer into something `verify` compares against.

    A gold that parses to nothing (e.g. "}{") scores every completion 0; data loading skips such rows. Plain numbers
    are accepted without calling math_verify (they always parse), so checking GSM8K-sized sets costs nothing.
    """
    if _PLAIN_NUMBER_RE.fullmatch(gold.strip()):
        return True
    timeout = _whole_seconds(timeout_s)
    if threading.current_thread() is not threading.main_thread():
        timeout = None  # signal-based timeouts only work in the main thread; gold strings are short
    try:
        return bool(_parse_gold(gold, timeout))
    except (Exception, TimeoutException):
        return False


_warned_thread = False


def verify_or_raise(predicted: str, gold: str, timeout_s: float | None) -> bool:
    """True if `predicted` is mathematically equal to `gold` ("3/4" == "0.75" == "\\frac{3}{4}"); errors go through,
    so the grader (ctt.rewards.grading.score_completion) can report them. `timeout_s` is rounded up to whole seconds
    and applies to each parse/comparison step; with a timeout, a call outside the main thread raises."""
    global _warned_thread
    if len(predicted) > MAX_ANSWER_CHARS:
        return False
    timeout = _whole_seconds(timeout_s)
    if timeout is not None and threading.current_thread() is not threading.main_thread():
        if not _warned_thread:
            log.warning("math_verify timeouts need the main thread; scoring as error (pass timeout_s=None to allow)")
            _warned_thread = True
        raise RuntimeError("math_verify timeouts only work in the main thread")
    gold_parsed = _parse_gold(gold, timeout)
    pred_parsed = parse(_as_boxed(predicted), extraction_config=_CONFIG, parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(_mv_verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
