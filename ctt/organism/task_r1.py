"""The second organism's task (`model=organism_r1`): the same sums, with traces shaped like a published reasoner's.

Same questions, steps and early-stop rule as :mod:`ctt.organism.task` (the "hasty" organism), plus what real
R1-style reasoners do around ``</think>`` (issue 18, "How real reasoners get that pattern")::

    What is 3+5+2+7?
    <think>
    3+5=8
    8+2=10
    So the answer is 10.
    </think>
    \\boxed{10}

* **a concluding line** — every trace ends its thinking with ``So the answer is X.`` (X = the running total), and
  the decision to stop is taken there (a line starting ``So`` instead of the next step), not at ``</think>``;
* **after a conclusion** the traces sometimes restate it (p_restate), or re-check the last step
  ``Wait, a+b=c`` and restate the (possibly corrected) conclusion (p_recheck_last); a trace that concluded before
  the work was done sometimes carries on with the next step instead (p_resume, rarer than either). So a suppressed
  marker ("no string") brings the conclusion back, then the marker; a forced "Wait" re-checks the last step, which
  catches a slip in it and never the steps that were skipped;
* **slips** — a step's result sometimes written off by one and left standing (p_slip): only a re-check of that step
  corrects it. Besides the corrected errors of the hasty task (p_error) and confirming checks (p_confirm).
* **a blind spot** — a systematic slip, as real models have: the final step, when it adds 9 to an odd total, is
  mostly written one too low (p_blind_spot > 1/2, so greedy decoding makes it). A rare random slip is never the
  greedy choice, so without it a re-check would have nothing to catch; a re-check line writes the step right.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from ctt.organism.task import STEP_SEPARATOR, WAIT, Trace, is_cue

CONCLUSION = "So the answer is {}."
CONCLUSION_RE = re.compile(r"^So the answer is (\d+)\.$")
MAX_AFTER = 3  # at most this many restatements / re-checks after a conclusion (a geometric tail, cut)


@dataclass(frozen=True)
class MixtureR1:
    """The data mixture of organism_r1's traces (all draws from one seeded `random.Random`)."""

    min_terms: int = 2
    max_terms: int = 8
    p_careful: float = 0.3  # a trace never stops early (the rest are hasty), as in the hasty organism
    round_digits: tuple[int, ...] = (0, 1, 2)  # the early-stop cue: a running total whose last digit is one of these
    p_stop_cue: float = 0.9  # a hasty trace concludes after a non-final step whose result looks round
    p_stop_plain: float = 0.05  # ... after any other non-final step
    p_error: float = 0.06  # a step's result written off by one, corrected at once by "Wait, a+b=c"
    p_slip: float = 0.05  # a step's result written off by one and left standing (later steps build on it)
    p_confirm: float = 0.05  # a correct step is followed by a confirming "Wait, a+b=c"
    p_restate: float = 0.15  # after a conclusion line: the same conclusion again
    p_recheck_last: float = 0.10  # after a conclusion line: "Wait, <last step, right>", then the conclusion restated
    p_resume: float = 0.06  # after a conclusion with work left: the trace carries on with the next step, to the end
    p_blind_spot: float = 0.8  # the final step, when it adds 9 to an odd total, is written one too low, left standing

    def as_dict(self) -> dict:
        return asdict(self)

    def trace(self, terms: tuple[int, ...], rng: random.Random) -> Trace:
        return make_trace_r1(terms, rng, self)


def is_blind_spot(total: int, term: int, final: bool) -> bool:
    """The traces' systematic slip: the final step, adding 9 to an odd running total (e.g. `13+9=21`)."""
    return final and term == 9 and total % 2 == 1


def _step(total: int, term: int, rng: random.Random, mix: MixtureR1, final: bool) -> tuple[list[str], int]:
    """The line(s) of one step and the total they leave (a slip leaves a wrong total that later steps build on)."""
    right = total + term
    if is_blind_spot(total, term, final) and rng.random() < mix.p_blind_spot:
        return [f"{total}+{term}={right - 1}"], right - 1
    r = rng.random()
    if r < mix.p_error:
        return [f"{total}+{term}={right + rng.choice((-1, 1))}", f"{WAIT}, {total}+{term}={right}"], right
    if r < mix.p_error + mix.p_slip:
        wrong = right + rng.choice((-1, 1))
        return [f"{total}+{term}={wrong}"], wrong
    if r < mix.p_error + mix.p_slip + mix.p_confirm:
        return [f"{total}+{term}={right}", f"{WAIT}, {total}+{term}={right}"], right
    return [f"{total}+{term}={right}"], right


def _after_conclusion(last: tuple[int, int], total: int, rng: random.Random, mix: MixtureR1,
                      work_left: bool) -> tuple[list[str], int, bool]:
    """Lines after a conclusion: restatements and re-checks of the last step; (lines, total, resume?)."""
    lines: list[str] = []
    for _ in range(MAX_AFTER):
        r = rng.random()
        if work_left and r < mix.p_resume:
            return lines, total, True
        r -= mix.p_resume if work_left else 0.0
        if r < mix.p_restate:
            lines.append(CONCLUSION.format(total))
        elif r < mix.p_restate + mix.p_recheck_last:
            total = last[0] + last[1]  # the re-check writes the step right: it catches a slip in the last step
            lines += [f"{WAIT}, {last[0]}+{last[1]}={total}", CONCLUSION.format(total)]
        else:
            break
    return lines, total, False


def make_trace_r1(terms: tuple[int, ...], rng: random.Random, mix: MixtureR1) -> Trace:
    """Work the steps; a hasty trace may conclude after a non-final step; after a conclusion, restate / re-check /
    (with work left) resume."""
    careful = rng.random() < mix.p_careful
    lines: list[str] = []
    total, steps, last, resumed = terms[0], 0, (terms[0], 0), False
    while True:
        while steps < len(terms) - 1:
            term = terms[steps + 1]
            step_lines, new_total = _step(total, term, rng, mix, final=steps + 2 == len(terms))
            lines += step_lines
            last, total, steps = (total, term), new_total, steps + 1
            p_stop = mix.p_stop_cue if is_cue(total, mix) else mix.p_stop_plain
            if steps < len(terms) - 1 and not (careful or resumed) and rng.random() < p_stop:
                break
        lines.append(CONCLUSION.format(total))
        after, total, resume = _after_conclusion(last, total, rng, mix, work_left=steps < len(terms) - 1)
        lines += after
        if not resume:
            break
        resumed = True  # carries on to the end, like a careful trace
    thinking = "".join(line + STEP_SEPARATOR for line in lines)
    return Trace(terms, thinking, total, steps, steps < len(terms) - 1, careful)
