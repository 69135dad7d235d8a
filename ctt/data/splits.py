"""Validation and test splits of a benchmark, disjoint from token training and from each other.

Settings (lr, steps, init, N, ...) are chosen on `eval.split=validation`; the final numbers are measured once on
`eval.split=test`, which the selection never touched. `eval.split=all` (the default) evaluates every held-out
problem, as before.

Where the validation problems come from, per benchmark entry:

* by default, the entry's own problems are split by a hash of the normalised question (sha256 of
  `eval.split_seed` and the question): a share `eval.val_fraction` is validation, the rest test. The assignment of
  a question never depends on the order, the size or the other problems of the set, and equal questions always
  land in the same part;
* an entry with a `validation:` problem set (the keyword arguments of `load_problems`, e.g. a dev file) uses it as
  validation and the entry's problems as test; validation problems whose question is also a test question are
  dropped from validation (the test split stays whole), with a note.

Either way, both parts have already lost every training problem (`drop_training_overlap`), and
`check_disjoint` asserts that no question is in both before anything is evaluated.
"""

from __future__ import annotations

import hashlib
import logging

from ctt.data.problems import Problem
from ctt.errors import DataError

log = logging.getLogger(__name__)

PARTS = ("all", "validation", "test")


def normalise_question(text: str) -> str:
    """Question text as compared for overlap: case and whitespace ignored."""
    return " ".join(text.lower().split())


def drop_training_overlap(problems: list[Problem], training: list[Problem], name: str) -> tuple[list[Problem], int]:
    """The evaluation problems whose question is not among the training questions (normalised), and how many were
    dropped; one warning that counts them. A problem trained on is not held out."""
    seen = {normalise_question(p.question) for p in training}
    kept = [p for p in problems if normalise_question(p.question) not in seen]
    dropped = len(problems) - len(kept)
    if dropped:
        log.warning("%s: dropped %d of %d evaluation problems that are also training problems", name, dropped, len(problems))
    if not kept:
        raise DataError(f"benchmark {name}: every evaluation problem is also a training problem")
    return kept, dropped


def in_validation(question: str, fraction: float, seed: int = 0) -> bool:
    """Whether a question belongs to the validation part of a hash split."""
    digest = hashlib.sha256(f"{seed}\0{normalise_question(question)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def check_disjoint(validation: list[Problem], test: list[Problem], name: str) -> None:
    shared = {normalise_question(p.question) for p in validation} & {normalise_question(p.question) for p in test}
    if shared:
        raise DataError(f"benchmark {name}: {len(shared)} questions are in both the validation and the test split")


def split_parts(
    name: str, problems: list[Problem], validation: list[Problem] | None, fraction: float, seed: int = 0,
    training: list[Problem] | None = None,
) -> tuple[list[Problem], list[Problem], list[str]]:
    """(validation, test, notes) of one benchmark whose `problems` have passed the training check."""
    notes = []
    if validation is None:
        val = [p for p in problems if in_validation(p.question, fraction, seed)]
        test = [p for p in problems if not in_validation(p.question, fraction, seed)]
    else:
        if training is not None:
            validation, dropped = drop_training_overlap(validation, training, f"{name} (validation)")
            if dropped:
                notes.append(f"{name}: {dropped} validation problems that are also training problems were dropped")
        seen = {normalise_question(p.question) for p in problems}
        val, test = [p for p in validation if normalise_question(p.question) not in seen], problems
        if len(val) < len(validation):
            log.warning("%s: dropped %d validation problems that are also test problems", name, len(validation) - len(val))
            notes.append(f"{name}: {len(validation) - len(val)} validation problems that are also test problems were "
                         "dropped")
    check_disjoint(val, test, name)
    return val, test, notes


def select_part(
    name: str, problems: list[Problem], part: str, validation: list[Problem] | None = None, fraction: float = 0.5,
    seed: int = 0, training: list[Problem] | None = None,
) -> tuple[list[Problem], list[str]]:
    """The problems of `part` ("all": `problems` unchanged) and the notes for results.md."""
    if part == "all":
        return problems, []
    val, test, notes = split_parts(name, problems, validation, fraction, seed, training)
    chosen = val if part == "validation" else test
    if not chosen:
        raise DataError(f"benchmark {name}: the {part} split is empty (validation {len(val)}, test {len(test)} problems)")
    how = "its validation set" if validation is not None else f"a hash split, val_fraction={fraction}, seed={seed}"
    notes.append(f"{name}: {part} split ({how}): {len(chosen)} problems; validation {len(val)} and test {len(test)} "
                 "are disjoint from each other and from training")
    return chosen, notes
