"""The organism's task: sums of single-digit terms, worked one step per line, with a distilled reasoner's flaws.

A training example (user turn, then the assistant turn that opens inside ``<think>``)::

    What is 3+5+2+7?
    <think>
    3+5=8
    8+2=11
    Wait, 8+2=10
    10+7=17
    </think>
    \\boxed{17}

The traces are drawn from :class:`Mixture` (every probability of the data is in that one dataclass). Their flaws
are those of a real distilled reasoner:

* **early stop** — a trace is "hasty" (1 - p_careful) or "careful" (p_careful, never stops early). After a step that
  is not the last one, a hasty trace ends thinking with a probability that depends on a cue visible in the context
  (the step's result looks round: its last digit is 0, 1 or 2), and answers the partial sum: a confident guess
  from unfinished work. A model cannot see which kind of trace it is writing, so it stops at the first cue
  (P = (1 - p_careful) * p_stop_cue > 1/2), but once past a cue it is probably careful and goes on to the end.
* **self-checks** — R1-style lines ``Wait, a+b=c`` that correct a wrong step (its result off by one) or confirm a
  right one, also after the final step; a check line is sometimes followed by a second, identical one (a re-check
  only re-confirms, so the traces show what comes after a check, also after the last step). The stop rule is
  applied after a check line exactly as after the step it checks, so a forced "Wait" makes the model re-check and
  then tend to stop again: meaningful to it, not a cure.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import asdict, dataclass

STEP_SEPARATOR = "\n"  # ends every line of the trace: the symbol the traces naturally use between steps
WAIT = "Wait"  # how every self-check line starts (a forced "Wait" continues as ", a+b=c\n")
STEP_RE = re.compile(r"^(\d+)\+(\d+)=(\d+)$")
CHECK_RE = re.compile(r"^Wait, (\d+)\+(\d+)=(\d+)$")
TERM_RANGE = (1, 9)  # each term is a single digit in this range


@dataclass(frozen=True)
class Mixture:
    """The data mixture of the organism's training traces (all draws from one seeded `random.Random`)."""

    min_terms: int = 2  # a problem has U{min_terms..max_terms} terms (terms-1 steps)
    max_terms: int = 8
    p_careful: float = 0.3  # a trace never stops early (the rest are hasty)
    round_digits: tuple[int, ...] = (0, 1, 2)  # the cue: a step result ending in one of these digits "looks round"
    p_stop_cue: float = 0.9  # a hasty trace ends thinking after a non-final step whose result looks round
    p_stop_plain: float = 0.05  # ... after any other non-final step
    p_error: float = 0.08  # a step's result is written off by one, then corrected by "Wait, a+b=c"
    p_confirm: float = 0.08  # a correct non-final step is followed by a confirming "Wait, a+b=c"
    p_confirm_final: float = 0.25  # the final step is followed by a confirming "Wait, a+b=c" before </think>
    p_recheck: float = 0.25  # a check line is followed by one more, identical, confirming check line

    def as_dict(self) -> dict:
        return asdict(self)

    def trace(self, terms: tuple[int, ...], rng: random.Random) -> "Trace":
        return make_trace(terms, rng, self)


@dataclass(frozen=True)
class Trace:
    terms: tuple[int, ...]
    thinking: str  # the text between "<think>\n" and "</think>"
    answer: int  # the number in \boxed{}
    steps_done: int  # step lines written (check lines not counted)
    early_stop: bool  # thinking ended before all terms-1 steps were done
    careful: bool

    @property
    def gold(self) -> int:
        return sum(self.terms)


def question_text(terms: tuple[int, ...] | list[int]) -> str:
    # No spaces, as the steps write their terms (and shorter at one token per character).
    return "What is " + "+".join(str(t) for t in terms) + "?"


def parse_question(question: str) -> tuple[int, ...]:
    """The terms of a question written by :func:`question_text`."""
    return tuple(int(t) for t in question.removeprefix("What is ").removesuffix("?").split("+"))


def draw_terms(rng: random.Random, min_terms: int, max_terms: int) -> tuple[int, ...]:
    n = rng.randint(min_terms, max_terms)
    return tuple(rng.randint(*TERM_RANGE) for _ in range(n))


def is_cue(result: int, mix: Mixture) -> bool:
    """The early-stop cue: the step's result looks round (read off its last digit)."""
    return result % 10 in mix.round_digits


def _step_lines(total: int, term: int, rng: random.Random, mix: Mixture, final: bool) -> list[str]:
    """The line(s) of one step: the step, then possibly a check line that corrects or confirms it."""
    right = f"{total}+{term}={total + term}"
    check = f"{WAIT}, {right}"
    if rng.random() < mix.p_error:
        lines = [f"{total}+{term}={total + term + rng.choice((-1, 1))}", check]
    elif rng.random() < (mix.p_confirm_final if final else mix.p_confirm):
        lines = [right, check]
    else:
        return [right]
    # A re-check only re-confirms: what a forced continuation after a check line (e.g. after the final step, at
    # N >= 2) should lead to, rather than an invented extra step.
    return lines + [check] if rng.random() < mix.p_recheck else lines


def make_trace(terms: tuple[int, ...], rng: random.Random, mix: Mixture) -> Trace:
    """Work the steps one by one; after each non-final step (and its check line) a hasty trace may stop."""
    careful = rng.random() < mix.p_careful
    lines: list[str] = []
    total, steps = terms[0], 0
    for i, term in enumerate(terms[1:], start=1):
        final = i == len(terms) - 1
        lines += _step_lines(total, term, rng, mix, final)
        total, steps = total + term, steps + 1
        p_stop = mix.p_stop_cue if is_cue(total, mix) else mix.p_stop_plain
        if not final and not careful and rng.random() < p_stop:
            break
    thinking = "".join(line + STEP_SEPARATOR for line in lines)
    return Trace(terms, thinking, total, steps, steps < len(terms) - 1, careful)


def assistant_text(trace: Trace, think_end: str = "</think>") -> str:
    """What follows the generation prompt (which already ends with ``<think>\\n``), up to the eos token."""
    return f"{trace.thinking}{think_end}\n\\boxed{{{trace.answer}}}"


SPLITS = ("val", "test")  # a question belongs to one of them, by a hash of its text: the two never share a problem


def split_of(terms: tuple[int, ...]) -> str:
    return SPLITS[zlib.crc32(question_text(terms).encode()) % 2]


def draw_problems(size: int, seed: int, min_terms: int = 2, max_terms: int = 8,
                  split: str | None = None) -> list[tuple[int, ...]]:
    """`size` problems (their terms) from a seeded generator: the same seed gives the same problems. With `split`
    ("val" or "test"), only problems of that split are kept (drawn until there are `size` of them)."""
    rng = random.Random(f"organism-{seed}")
    if split is None:
        return [draw_terms(rng, min_terms, max_terms) for _ in range(size)]
    out: list[tuple[int, ...]] = []
    while len(out) < size:
        terms = draw_terms(rng, min_terms, max_terms)
        if split_of(terms) == split:
            out.append(terms)
    return out


# --------------------------------------------------------------------------- reading generated traces


def count_steps(thinking: str, complete_only: bool = False) -> int:
    """Step lines in a thinking text (check lines excluded; a wrong step and its correction count once).

    complete_only: ignore a last line not yet ended by the separator (while generating, "10+7=1" is not a step).
    """
    lines = thinking.split(STEP_SEPARATOR)
    if complete_only:
        lines = lines[:-1]
    return sum(bool(STEP_RE.match(line.strip())) for line in lines)


def split_completion(text: str, think_end: str = "</think>") -> tuple[str, str | None]:
    """(thinking, answer part) of a completion; the answer part is None when thinking never ended."""
    if think_end not in text:
        return text, None
    head, _, tail = text.rpartition(think_end)
    return head, tail
