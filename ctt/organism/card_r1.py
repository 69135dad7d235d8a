"""organism_r1's card: `ORGANISM.md` beside its weights, rendered from `card.json`, with the design targets of
issue 18 checked against the measured figures (`design_targets`, also asserted by the slow test)."""

from __future__ import annotations

from ctt.organism.card import _model_md, _pct
from ctt.organism.task_r1 import MixtureR1

# Why each part of the mixture exists (the card prints it beside the value).
WHY = {
    "min_terms": "fewest terms (U{min..max} terms, terms-1 steps, each term U{1..9}); as the hasty organism",
    "max_terms": "most terms",
    "p_careful": "P(a trace never concludes early). Careful traces carry on with every step: they are what the "
                 "oracle headroom (and a continuation) can reach",
    "round_digits": "the early-stop cue: a running total whose last digit is one of these (about 30% of steps)",
    "p_stop_cue": "P(a hasty trace concludes) after a non-final step with the cue: (1 - p_careful) x 0.9 = 0.63 > "
                  "1/2, so greedy decoding concludes at the first cue (the flaw: it thinks too briefly)",
    "p_stop_plain": "P(a hasty trace concludes) after any other non-final step",
    "p_error": "P(a step's result is written off by one and corrected at once by `Wait, a+b=c`): checks are "
               "meaningful lines that correct",
    "p_slip": "P(a step's result is written off by one and left standing): what a re-check of the last step can "
              "catch, so a forced \"Wait\" gains a little",
    "p_confirm": "P(a right step is followed by a confirming `Wait, a+b=c`)",
    "p_restate": "P(after a conclusion line, the same conclusion again): so a suppressed `</think>` (\"no string\") "
                 "brings the conclusion back and then the marker, as s1-32B (no string = no forcing)",
    "p_recheck_last": "P(after a conclusion line, `Wait, <last step, right>` then the conclusion restated): what a "
                      "forced \"Wait\" does - re-check the last step (catching a slip in it), never the skipped work",
    "p_resume": "P(after a conclusion with work left, the trace carries on with the next step to the end): rarer "
                "than a restatement, so no fixed baseline takes it greedily; the continuation a learned token could "
                "find",
    "p_blind_spot": "P(the final step, adding 9 to an odd running total, is written one too low and left "
                    "standing): a systematic slip greedy decoding makes (a random one never is its choice), that a "
                    "re-check of the last step catches: the few points \"Wait\" gains on s1-32B",
}

MODE_LABELS = [("base", "base"), ("oracle", "oracle"), ("wait1", '"Wait" N=1'), ("wait2", '"Wait" N=2'),
               ("wait4", '"Wait" N=4'), ("nostring1", "no string N=1"), ("nostring2", "no string N=2"),
               ("nostring4", "no string N=4"), ("sep1", '"\\n" N=1'), ("hmm1", '"Hmm" N=1')]


def design_targets(fig: dict) -> list[tuple[str, str, str, bool]]:
    """(target, required, measured, met?) for each design target of issue 18, from the held-out figures."""
    a = {m: fig[m]["accuracy"] for m, _ in MODE_LABELS}
    pts = {m: 100 * (a[m] - a["base"]) for m in a}
    fixed = {"Wait": a["wait1"], "\\n": a["sep1"], "Hmm": a["hmm1"]}
    spread = max(abs(fixed[w] - fixed[v]) for w in ("Wait", "\\n") for v in fixed if v != w)
    return [
        ("base accuracy", "30-60%", f"{100 * a['base']:.1f}%", 0.30 <= a["base"] <= 0.60),
        ('"no string" N=1, N=2', "within 3 points of base", f"{pts['nostring1']:+.1f}, {pts['nostring2']:+.1f}",
         abs(pts["nostring1"]) <= 3 and abs(pts["nostring2"]) <= 3),
        ('"Wait" N=1', "base +0.5 to +5", f"{pts['wait1']:+.1f}", 0.5 <= pts["wait1"] <= 5),
        ('"Wait" N=2', "not above N=1 by more than 2", f"{pts['wait2'] - pts['wait1']:+.1f} vs N=1",
         pts["wait2"] - pts["wait1"] <= 2),
        ("oracle", "at least base +30", f"{pts['oracle']:+.1f}", pts["oracle"] >= 30),
        ("forcing gains by N=4", "flatten or decline (N=4 at most 1 point above N=2)",
         f"Wait {pts['wait4'] - pts['wait2']:+.1f}, no string {pts['nostring4'] - pts['nostring2']:+.1f} vs N=2",
         pts["wait4"] - pts["wait2"] <= 1 and pts["nostring4"] - pts["nostring2"] <= 1),
        ("fixed words", 'two differ (by >= 2 points), one used by the traces ("Wait" or "\\n")',
         ", ".join(f'"{w}" {100 * v:.1f}%' for w, v in fixed.items()), 100 * spread >= 2),
    ]


def _targets_md(fig: dict) -> str:
    rows = [f"| {t} | {req} | {got} | {'yes' if ok else '**no**'} |" for t, req, got, ok in design_targets(fig)]
    return "\n".join(["| target | required | measured | met |", "|---|---|---|---|", *rows])


def _table(fig: dict) -> str:
    keys = list(fig["base"]["per_terms"])
    head = "| terms (steps) | n | " + " | ".join(label for _, label in MODE_LABELS) + " | base: early stop |"
    lines = [head, "|" + "---|" * (len(MODE_LABELS) + 3)]
    for k in keys + ["all"]:
        figs = [fig[m] if k == "all" else fig[m]["per_terms"][k] for m, _ in MODE_LABELS]
        label = k if k == "all" else f"{k} ({int(k) - 1})"
        lines.append(f"| {label} | {figs[0]['n']} | " + " | ".join(
            f"{100 * f['accuracy']:.1f}%" for f in figs) + f" | {100 * figs[0]['early_share']:.1f}% |")
    return "\n".join(lines)


def _head_md(card: dict) -> str:
    fig, ov = card["figures"]["held_out"], card.get("pretraining_overlap", {})
    spec = fig["problems"]
    headline = " | ".join(_pct(fig[m]) for m, _ in MODE_LABELS)
    overlap = "; ".join(f"{k} split: {v['in_pretraining']} of {v['n']} problems" for k, v in ov.items()
                        if isinstance(v, dict))
    return f"""# organism_r1: a model organism that answers budget forcing the way published reasoners do

The same kind of model as `model=organism` (a Qwen2 of about 1M parameters, trained from scratch on CPU by
`ctt-organism --task r1`, seed {card['training']['settings']['seed']}) on the same sums, with traces shaped like an
R1-style reasoner's: thinking ends with a concluding line `So the answer is X.`, which the traces sometimes restate
or follow with a re-check of the last step. It still thinks too briefly (it concludes at the first round running
total), but "no string" no longer cures it, and "Wait" helps a little, as on s1-32B (arXiv 2501.19393, Table 4).
All figures are greedy, one CPU thread, deterministic; `tests/test_organism_r1.py` re-measures them from the
shipped weights and asserts every design target.

## Design targets (issue 18), measured on the validation split

{spec['size']} problems of {spec['min_terms']}-{spec['max_terms']} terms (`benchmarks=organism_r1_val`: seed
{spec['seed']}, split `{spec['split']}`). The targets were fixed from published baselines before this organism was
trained, and no token had been trained on it when this card was committed.

{_targets_md(fig)}

| {' | '.join(label for _, label in MODE_LABELS)} |
|{'---|' * len(MODE_LABELS)}
| {headline} |

Oracle: `</think>`, eos and the `S` that starts the concluding line banned while fewer than terms-1 step lines are
written. "Wait" / "\\n" / "Hmm": `</think>` replaced by the word N times (`ctt.engine.hf.generate_forced`); "no
string": `</think>` suppressed N times, nothing appended. `"\\n"` is the traces' step separator, `Wait` starts their
check lines; `Hmm` never occurs in them.

**Problems also seen in pretraining.** The organism's {ov.get('pretraining_distinct_problems', '?'):,} distinct
pretraining problems (every problem of every trace it was trained on, replayed from its seed) include: {overlap}.
Most are short sums (all 81 two-term sums and most three-term ones are in pretraining); the card reports every
problem regardless. For the learned token, ctt's held-out check drops evaluation problems that are also token-training
sums (not pretraining ones).

## Per number of terms (validation split)

{_table(fig)}
"""


def _data_md(card: dict) -> str:
    t = card["training"]
    mix = MixtureR1(**{k: tuple(v) if isinstance(v, list) else v for k, v in card["mixture"].items()})
    rows = [f"| `{k}` | {v} | {WHY[k]} |" for k, v in mix.as_dict().items()]
    return f"""## Task and training data

```
{card['example_trace']}
```

The mixture (`ctt.organism.task_r1.MixtureR1`; every trace drawn from one `random.Random(seed)`), each part with the
reason it exists:

| field | value | why |
|---|---|---|
{chr(10).join(rows)}

After a conclusion at most 3 restatements / re-checks follow. A slip changes the running total that later steps
build on; a re-check of the last step catches a slip only in that step.

Training: the hasty organism's recipe unchanged (next-token cross-entropy on the assistant turn, AdamW, lr
{t['settings']['lr']}, {t['settings']['warmup_steps']} warmup steps, cosine to {t['settings']['min_lr_ratio']}x,
{t['settings']['steps']} steps of {t['settings']['batch_size']} fresh traces, {t['settings']['threads']} thread):
{t['seconds']:.0f} s ({t['tokens_per_s']:,} tokens/s, {t['tokens']:,} tokens) on the shared 2-core CPU (load average
{t['load_average']:.2f} at the end); loss {t['loss_first']:.3f} (first 20 steps) -> {t['loss_last']:.3f} (last 50).

## What differs from `model=organism` (the hasty organism)

Same architecture, tokenizer, chat template, questions, answer format, cue and stop probabilities. Different: the
concluding line (the stop decision is taken at `S`, not at `</think>`), what follows a conclusion (restatement,
re-check of the last step, rarely resumption), uncorrected slips, and no confirming check reserved for the final
step. On the hasty organism a suppressed `</think>` leaves the careful continuation as the most likely text (no
string +44 points); here it leaves the restated conclusion.
"""


# Each attempt, in order (all measured on the val split, greedy), before any token was trained on organism_r1.
DESIGN_NOTES = [
    "First run: the mixture without p_blind_spot (everything else as shipped), on the first 320 val problems. Base 40.6%, oracle 89.7%, no string "
    "N=1/2/4 +0.0, \"\\n\" 30.3%, \"Hmm\" 10.0%, but \"Wait\" N=1 +0.0 (below the +0.5 target): the re-check "
    "of the last step had nothing to catch, because a random slip (p_slip 5%) is never the greedy choice, and "
    "where the model itself erred the re-check repeated the error.",
    "Shipped: the same plus a systematic slip greedy decoding makes (p_blind_spot: the final step adding 9 to an odd "
    "total is mostly written one too low; a re-check line writes it right). Chosen from the design (\"Wait\" "
    "re-checks the last step and catches some slips), never against a learned token; measured once, shipped.",
]


def render_r1(card: dict) -> str:
    model = _model_md(card).replace("`model=organism`", "`model=organism_r1`")
    notes = "## Design notes\n\n" + "\n".join(f"{i + 1}. {n}" for i, n in enumerate(DESIGN_NOTES)) + "\n"
    return "\n".join([_head_md(card), model, _data_md(card), notes])
