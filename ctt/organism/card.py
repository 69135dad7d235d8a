"""The organism card: `card.json` (every figure) and `ORGANISM.md` (the same, readable), beside the weights."""

from __future__ import annotations

import json
from pathlib import Path

from ctt.organism.task import STEP_SEPARATOR, WAIT, Mixture

# Each attempt, in order. Changes were made to the data, the trace format and the training recipe only, to reach
# the properties the design asks for (base greedy accuracy 30-70%, early stop >= 25%, headroom clearly higher),
# never against a learned token. Figures of attempts 2-9 are from throwaway runs (held-out problems, greedy).
DESIGN_NOTES = [
    "Prototype (before this script): cue = the step changed the tens digit, p_stop_cue 0.65, no careful traces. "
    "A tens change happens on about half of all steps, so a greedy model that follows the cue stops at the first "
    "one: simulated greedy accuracy 22% (5 terms 2%, 6-8 terms 0%), below the band. Cue changed to 'the result "
    "looks round' (last digit 0-2, ~30% of steps): simulated 41%.",
    "Format `3+5=8` lines, batch 32 x 800 steps (5.5 min): base 31%, early stop 61%, oracle 49% (2-4 terms "
    "89-100%, 5-8 terms 4-20%): the model could not find the k-th term of the question for k >= 4, so the headroom "
    "was capped by inability, not by stopping.",
    "Lines carrying the rest of the sum (`8+2+7`, `10+7`, `17`): oracle 33%, mostly arithmetic errors (operands at "
    "the start of the previous line). Lines `a+b=c+<terms left>`: oracle 41%; 80% of failures were copying the "
    "question's tail into the first line. Restating the question first: 40%. MLP 256 + 4 KV heads: 38%. "
    "lr 1e-2: diverged.",
    "Back to `3+5=8` lines: distinct terms (500 steps) 27%; index labels in the question (`a3+b5`, `c: 8+2=10`) "
    "54%; 30% careful traces that never stop early (more full-length traces to learn late steps from; "
    "p_stop_cue raised to 0.9 so that the first cue still stops greedy decoding: 0.7 x 0.9 > 1/2) 54%; the same "
    "with 2-6 terms 55%. The late steps stayed unreliable in every variant at 800 steps of 32.",
    "The careful-trace mixture with batch 8 x 3200 steps (the same number of tokens, 4x the updates), "
    "lr 1.5e-3: oracle 96% (throwaway run, 140 problems), base 47%, 'Wait' N=1 51%. The `a+b=c+<terms left>` "
    "format with the same recipe reached 87%.",
    "Shipped: the same, plus p_recheck (a check line is sometimes followed by an identical re-check). Why: a "
    "forced continuation after a check line that follows the final step (N >= 2, or 'no string' after a confirmed "
    "final step) had no example in the data, so the model had to invent what comes next (the prototype invented "
    "an extra step); now the traces show that a further check only re-confirms. Chosen from the data's "
    "properties, before any token was trained on this organism.",
]


def mixture_table(mix: Mixture) -> str:
    doc = {
        "min_terms": "fewest terms (a problem has U{min..max} terms, terms-1 steps; each term U{1..9})",
        "max_terms": "most terms",
        "p_careful": "P(a trace is careful: it never stops early); the others are hasty",
        "round_digits": "the early-stop cue: a step result whose last digit is one of these",
        "p_stop_cue": "P(a hasty trace ends thinking) after a non-final step with the cue (and its check line, if any)",
        "p_stop_plain": "P(a hasty trace ends thinking) after any other non-final step",
        "p_error": "P(a step's result is written off by one, then corrected by `Wait, a+b=c`)",
        "p_confirm": "P(a correct non-final step is followed by a confirming `Wait, a+b=c`)",
        "p_confirm_final": "P(the final step is followed by a confirming `Wait, a+b=c` before `</think>`)",
        "p_recheck": "P(a check line is followed by a second, identical check line: a re-check only re-confirms)",
    }
    rows = [f"| `{k}` | {v} | {doc[k]} |" for k, v in mix.as_dict().items()]
    return "\n".join(["| field | value | meaning |", "|---|---|---|", *rows])


def _pct(fig: dict) -> str:
    return f"{100 * fig['accuracy']:.1f}% ({fig['correct']}/{fig['n']})"


def figures_table(result: dict) -> str:
    """Accuracy per mode, overall and per number of terms; early-stop share of base."""
    modes = [("base", "base"), ("oracle", "no early stop (oracle)"), ("wait1", '"Wait" N=1'), ("wait2", '"Wait" N=2'),
             ("nostring1", "no string N=1"), ("nostring2", "no string N=2")]
    keys = list(result["base"]["per_terms"])
    head = "| terms (steps) | n | " + " | ".join(label for _, label in modes) + " | base: early stop |"
    lines = [head, "|" + "---|" * (len(modes) + 3)]
    for k in keys + ["all"]:
        figs = [result[m] if k == "all" else result[m]["per_terms"][k] for m, _ in modes]
        early = figs[0]
        lines.append(
            f"| {k if k == 'all' else f'{k} ({int(k) - 1})'} | {figs[0]['n']} | " + " | ".join(_pct(f) for f in figs)
            + f" | {100 * early['early_share']:.1f}% ({early['early']}) |"
        )
    return "\n".join(lines)


def _figures_md(card: dict) -> str:
    t, ho, lo = card["training"], card["figures"]["held_out"], card["figures"]["long"]
    return f"""# The model organism

A Qwen2-architecture causal LM (the R1-Distill-Qwen family) trained from scratch on CPU by
`python -m ctt.organism` (seed {t['settings']['seed']}), that thinks too briefly: on many problems it ends its
thinking before the work is done and answers the partial result as a guess. Everything below is measured (greedy,
one CPU thread, deterministic); `tests/test_organism.py` re-measures it from the shipped weights.

## Headline (held-out, {ho['base']['n']} problems of 2-8 terms, seed {ho['problems']['seed']})

| base accuracy | early stop (base) | no early stop (oracle headroom) | "Wait" N=1 | "Wait" N=2 | no string N=1 | \
no string N=2 |
|---|---|---|---|---|---|---|
| {_pct(ho['base'])} | {100 * ho['base']['early_share']:.1f}% | {_pct(ho['oracle'])} | {_pct(ho['wait1'])} | \
{_pct(ho['wait2'])} | {_pct(ho['nostring1'])} | {_pct(ho['nostring2'])} |

Oracle: `</think>` (and eos) banned while fewer than terms-1 step lines are written — the accuracy forcing could
reach if it made the model finish. Early stop: thinking ended with fewer step lines than terms-1 (check lines not
counted). "Wait": budget forcing (`ctt.engine.hf.generate_forced`) with the continuation
`tokenizer.encode("{WAIT}")` replacing `</think>` N times; the traces' check lines start with `{WAIT}, ` so the
model continues `, a+b=c` itself. "No string": `</think>` suppressed N times, nothing appended (ctt's `no_string`
mode). These are fixed baselines measured to describe the organism; it was not designed against any of them.

## Per number of terms (held-out)

{figures_table(ho)}

## Longer than training (9-10 terms, {lo['base']['n']} problems, seed {lo['problems']['seed']})

{figures_table(lo)}

Beyond the lengths it was trained on the organism fails even when it may not stop early (oracle \
{_pct(lo['oracle'])}): a 1M-parameter model does not extrapolate to more terms, so no forcing can help there. To
measure whether a token generalises to more steps, train it on fewer terms than it is evaluated on (e.g.
`data.train.task_kwargs.max_terms=5`, evaluated on 6-8 terms), all within the organism's 2-8.
"""


def _model_md(card: dict) -> str:
    m = card["model"]
    return f"""## Model

- Qwen2ForCausalLM, {m['parameters']:,} parameters: hidden {m['architecture']['hidden_size']}, \
{m['architecture']['num_layers']} layers, {m['architecture']['num_heads']} heads \
({m['architecture']['num_kv_heads']} KV heads), MLP {m['architecture']['intermediate_size']}, RoPE \
(theta {m['architecture']['rope_theta']:g}), max positions {m['architecture']['max_position_embeddings']}, \
untied input/output embeddings (as DeepSeek-R1-Distill-Qwen-1.5B), float32, {m['weights_bytes'] / 1e6:.1f} MB.
- Tokenizer: `PreTrainedTokenizerFast`, byte-level BPE without merges (Qwen2's normalizer and pre-tokenizer; one \
token per ASCII character, ids 0-255 = the bytes, no unk), {m['tokenizer_size']} tokens; the embedding table is \
padded to {m['embedding_rows']} rows (a multiple of 64, as Qwen2 pads 151,665 tokens to 151,936), so \
{m['embedding_rows'] - m['tokenizer_size']} rows are spare. `AutoTokenizer` loads the folder as `Qwen2Tokenizer` \
(transformers 5 does so for every qwen2 model), which tokenizes identically.
- Special tokens (R1-distill spelling): {', '.join(f'`{k}`={v}' for k, v in m['special_tokens'].items())}. \
`<think>`/`</think>` are single added tokens that are NOT "special", as in R1-Distill's tokenizer: \
`decode(..., skip_special_tokens=True)` keeps them and drops bos/eos/pad/`<｜User｜>`/`<｜Assistant｜>`.
- Chat template (R1-distill style): `bos + system + <｜User｜>{{question}}` and, with `add_generation_prompt`, \
`<｜Assistant｜><think>\\n` — the assistant turn opens inside `<think>`. The user turn is the bare question: \
use `prompt=organism` (instruction `{{question}}`).
- Step separator: `{STEP_SEPARATOR!r}` — every trace line (step or check) ends with it.
- Loads offline (`model=organism`, `source: local`) in {card['load_seconds']:.2f} s on the machine that measured it.
"""


def _data_md(card: dict) -> str:
    t, example = card["training"], card["example_trace"]
    mix = Mixture(**{k: tuple(v) if isinstance(v, list) else v for k, v in card["mixture"].items()})
    load = f"load average {t['load_average']:.2f} at the end" if "load_average" in t else "shared"
    return f"""## Task and training data

Questions `What is 3+5+2+7?` (2-8 single-digit terms); the trace works one step per line, the answer follows
`</think>`:

```
{example}
```

The data mixture (`ctt.organism.task.Mixture`; every trace is drawn from one `random.Random(seed)`):

{mixture_table(mix)}

A model cannot tell a careful trace from a hasty one, so at the first round result it stops
((1 - p_careful) x p_stop_cue = 0.63 > 1/2); once past a round result without stopping, the trace is probably
careful (posterior 0.81) and it goes on to the end. The same stop rule applies after a check line as after the
step it checks, so a forced "Wait" makes the model re-check the last step and then tend to stop again: "Wait" is
meaningful to it (it writes a sane check line, also after the final step) but not a cure.

Training: next-token cross-entropy on the assistant turn, AdamW (betas 0.9/0.95, weight decay \
{t['settings']['weight_decay']}), lr {t['settings']['lr']} with {t['settings']['warmup_steps']} warmup steps and a \
cosine to {t['settings']['min_lr_ratio']}x, {t['settings']['steps']} steps of {t['settings']['batch_size']} fresh \
traces (length-bucketed), {t['settings']['threads']} thread: {t['seconds']:.0f} s \
({t['tokens_per_s']:,} tokens/s, {t['tokens']:,} tokens) on a 2-core CPU ({load}); loss \
{t['loss_first']:.3f} (first 20 steps) -> {t['loss_last']:.3f} (last 50).

## Design notes

""" + "\n".join(f"{i + 1}. {note}" for i, note in enumerate(DESIGN_NOTES)) + "\n"


def render(card: dict) -> str:
    return "\n".join([_figures_md(card), _model_md(card), _data_md(card)])


def write_card(card: dict, out_dir: str | Path, markdown: bool = True, renderer=None) -> None:
    """card.json and (with `markdown`) ORGANISM.md, rendered by `renderer` (default: this organism's `render`), each
    replaced atomically; without `markdown` an ORGANISM.md left from an earlier model is removed (its figures would
    describe other weights)."""
    from ctt.outputs import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n", out / "card.json")
    if markdown:
        atomic_write_text((renderer or render)(card), out / "ORGANISM.md")
    else:
        (out / "ORGANISM.md").unlink(missing_ok=True)
