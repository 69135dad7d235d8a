"""Evaluation modes: what replaces the end-of-thinking marker, as a small typed value with a registry of kinds.

A mode is (kind, argument, N). Each kind says how its continuation is built from the policy, how it is labelled in
results, reports and plots, and whether it is a baseline the others are compared with. Adding a kind of mode is one
entry in `KINDS`.

Specs in configs (`eval.modes`): `base`, `learned`, `no_string`, `fixed:<word>`, `filler:<text>x<m>` (the text
repeated m times, e.g. `filler:. x8`), and `fixed` alone, which stands for every word of `eval.fixed_words`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ctt.errors import ConfigError
from ctt.settings import MAX_CONTINUATIONS, one_of

Encode = Callable[[str], tuple[int, ...]]  # a text as the model's token ids


@dataclass(frozen=True)
class ModeKind:
    # what replaces the marker, from (encode, the learned tokens' ids, the argument)
    continuation: Callable[[Encode, tuple[int, ...], str | None], tuple[int, ...]]
    label: Callable[[str | None], str]  # the mode's name in results.csv, reports and plots
    takes_arg: bool = False
    forced: bool = True  # False: the base model, never forced (runs once, as N=0)
    reference: bool = True  # other modes are compared with it at the same N (comparisons.csv)
    parse_arg: Callable[[str], str] = lambda arg: arg


MAX_FILLER_CHARS = 1 << 16  # a filler longer than any context: its text is never built (filler:.x1e10 was)


def _parse_filler(arg: str) -> str:
    m = re.fullmatch(r"(.+)x(\d+)", arg, flags=re.DOTALL)
    if not m or int(m.group(2)[:12]) < 1:
        raise ConfigError(f"filler mode needs '<text>x<m>' with m >= 1, e.g. 'filler:. x8'; got 'filler:{arg:.60}'")
    if len(m.group(2)) > 12 or len(m.group(1)) * int(m.group(2)) > MAX_FILLER_CHARS:  # (int() of 5000 digits raises)
        raise ConfigError(f"filler mode 'filler:{arg:.40}' would be more than {MAX_FILLER_CHARS} characters; use a "
                          "smaller m")
    return arg


def _filler_text(arg: str) -> str:
    text, times = re.fullmatch(r"(.+)x(\d+)", arg, flags=re.DOTALL).groups()
    return text * int(times)


def _nonempty_word(arg: str) -> str:
    # Whitespace is a word here: a model's step separator ("\n") is a fixed-word baseline; nothing is `no_string`.
    if not arg:
        raise ConfigError("fixed mode needs a non-empty word, e.g. 'fixed:Wait' (nothing appended is 'no_string')")
    return arg


def _shown(text: str) -> str:
    """A label must fit one table cell and one CSV field: control characters escaped (`fixed:\\n`)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


KINDS: dict[str, ModeKind] = {
    "base": ModeKind(lambda enc, ids, a: (), lambda a: "base", forced=False, reference=False),
    "no_string": ModeKind(lambda enc, ids, a: (), lambda a: "no_string"),
    "fixed": ModeKind(lambda enc, ids, a: enc(a), lambda a: f"fixed:{_shown(a)}", takes_arg=True, parse_arg=_nonempty_word),
    "filler": ModeKind(
        lambda enc, ids, a: enc(_filler_text(a)), lambda a: f"filler:{_shown(a)}", takes_arg=True, parse_arg=_parse_filler
    ),
    "learned": ModeKind(lambda enc, ids, a: ids, lambda a: "learned", reference=False),
}  # in this order in tables and plots: the base model, the baselines, the learned token


@dataclass(frozen=True)
class Mode:
    kind: str
    arg: str | None = None
    num_continuations: int = 0

    @property
    def spec(self) -> ModeKind:
        return KINDS[self.kind]

    @property
    def label(self) -> str:
        return self.spec.label(self.arg)

    def continuation(self, encode: Encode, learned_ids: tuple[int, ...]) -> tuple[int, ...]:
        return self.spec.continuation(encode, learned_ids, self.arg)


def parse_mode(spec: str, key: str = "eval.modes") -> tuple[str, str | None]:
    """`fixed:Wait` -> ("fixed", "Wait"); a bad spec is a ConfigError naming `key` and the valid kinds."""
    if not isinstance(spec, str):
        raise ConfigError(f"{key} entries must be texts, got {spec!r}")
    kind, sep, arg = spec.partition(":")
    one_of(f"{key} kind", kind, KINDS)
    if KINDS[kind].takes_arg != bool(sep):
        form = f"'{kind}:<argument>'" if KINDS[kind].takes_arg else f"'{kind}' without an argument"
        if kind == "fixed" and not sep:  # `fixed` alone: the words come from eval.fixed_words
            return kind, None
        raise ConfigError(f"{key}: {spec!r} must be written {form}")
    return kind, (KINDS[kind].parse_arg(arg) if sep else None)


def expand_modes(specs: list[str], num_continuations: list[int], fixed_words: list[str] = ()) -> list[Mode]:
    """Every evaluation run, in a stable order: the base model once (N=0), then for each N every forced mode."""
    if not specs:
        raise ConfigError("eval.modes is empty: nothing to evaluate")
    ns = sorted(set(num_continuations))
    if not ns or any(not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_CONTINUATIONS for n in ns):
        raise ConfigError(f"eval.num_continuations must be a non-empty list of integers from 0 to "
                          f"{MAX_CONTINUATIONS}, got {num_continuations}")
    kinds: list[tuple[str, str | None]] = []
    for spec in specs:
        kind, arg = parse_mode(spec)
        if kind == "fixed" and arg is None:
            if not fixed_words:
                raise ConfigError("eval.modes has 'fixed' but eval.fixed_words is empty")
            kinds += [("fixed", parse_mode(f"fixed:{w}")[1]) for w in fixed_words]
        else:
            kinds.append((kind, arg))
    kinds = list(dict.fromkeys(kinds))
    runs = [Mode(k, a, 0) for k, a in kinds if not KINDS[k].forced]
    for n in ns:
        if n == 0 and runs:
            continue  # forcing nothing is the base run
        runs += [Mode(k, a, n) for k, a in kinds if KINDS[k].forced]
    return runs


def label_family(label: str) -> str:
    """The kind a results label belongs to (`fixed:Wait` -> `fixed`), for plots and reports reading results.csv."""
    return label.partition(":")[0]


def base_label() -> str:
    """The label of the N-independent baseline (the kind that is never forced): what deltas are taken against."""
    return next(spec.label(None) for spec in KINDS.values() if not spec.forced)


def label_rank(label: str) -> tuple[int, str]:
    """Sort key for labels read back from results.csv: the order of KINDS, then the label."""
    kind = label.partition(":")[0]
    return (list(KINDS).index(kind) if kind in KINDS else len(KINDS), label)


def baseline_labels(modes: list[Mode]) -> tuple[list[str], list[str]]:
    """(N-independent baselines, same-N references) among the runs, as comparisons.csv needs them."""
    base = list(dict.fromkeys(m.label for m in modes if not m.spec.forced))
    refs = list(dict.fromkeys(m.label for m in modes if m.spec.forced and m.spec.reference))
    return base, refs
