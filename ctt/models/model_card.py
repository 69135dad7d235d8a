"""The README.md (model card) of a folder written by ctt-export, from the facts ctt_export.json records."""

from __future__ import annotations

import json

# Budget forcing with plain transformers, filled with the folder's ids. tests/test_export.py runs this snippet.
SNIPPET = '''\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}")
tok = AutoTokenizer.from_pretrained("{path}")
TOKENS, MARKER, EOS = {token_ids}, {marker_id}, {eos_id}  # {token}, the end-of-thinking marker {marker_text!r}, eos
N, THINK, ANSWER = {n}, {think}, {answer}  # forced continuations, thinking cap, answer tokens

text = tok.apply_chat_template([{{"role": "user", "content": "What is 17 + 25?"}}], add_generation_prompt=True,
                               tokenize=False)
ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
start = ids.shape[1]
for forced in range(N + 1):  # think until the marker; replace it by the token(s), N times
    left = THINK - (ids.shape[1] - start)
    ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(left, 1), do_sample=False,
                         eos_token_id=[MARKER, EOS])
    if forced == N or ids[0, -1] != MARKER or ids.shape[1] - 1 + len(TOKENS) - start >= THINK:
        break  # (a continuation is inserted only if it and one more token fit under the cap)
    ids = torch.cat([ids[:, :-1], torch.tensor([TOKENS])], dim=1)
if ids[0, -1] not in (MARKER, EOS):  # thinking cap reached: end thinking
    ids = torch.cat([ids, torch.tensor([[MARKER]])], dim=1)
if MARKER != EOS and ids[0, -1] == MARKER:  # thinking is over: the answer
    ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER, do_sample=False)
print(tok.decode(ids[0, start:]))
'''


def snippet(info: dict, path: str) -> str:
    recipe = info["recipe"]
    return SNIPPET.format(
        path=path, token_ids=info["token_ids"], token="".join(info["tokens"]), marker_id=info["end_of_thinking_ids"][0],
        marker_text=info["end_of_thinking_text"], eos_id=info["eos_token_ids"][0], n=recipe["num_continuations"],
        think=recipe["thinking_budget"] or recipe["max_new_tokens"], answer=recipe["max_answer_tokens"],
    )


def _weights(info: dict) -> list[str]:
    table, out, ids = info["table"], info["output"], info["token_ids"]
    lines = [f"- Embedding table: {table['rows']} rows; " + (
        "the token uses a spare row (the table had rows beyond the tokenizer), so its shape is the base model's."
        if table["spare_row"] else f"resized from {table['rows_before']} rows (no spare row) to {table['rows']}.")]
    kind = out["output_rows"]
    if kind == "tied":
        lines.append("- Input and output embeddings are tied: the token's output row is its learned input row, so "
                     "its logit can be high; it is kept out of sampling by the generation config (below).")
    elif kind == "calibrated":
        lines.append(f"- Untied output layer: the token's output row is -s·u, u the mean direction of the final "
                     f"hidden states on {out['probe_positions']} probe positions (greedy answers to 6 questions), "
                     f"s = {out['scale']:.4g}: there its logit was at least {out['probe_margin']:.1f} below every "
                     "other logit. A fixed row cannot guarantee that for every input, hence also the generation "
                     "config.")
    elif kind == "zero":
        lines.append("- Untied output layer: the token's output row is zero (logit 0 whatever the input; the probe "
                     "found no direction that keeps it below every other logit), hence the generation config.")
    if info["format"] == "hf":
        lines.append(f"- `generation_config.json` has `suppress_tokens: {info['suppress_tokens']}`: transformers' "
                     "`generate` never samples the token. Other engines need the same rule: e.g. a logit bias of "
                     f"-100 for id {ids[0]} (vLLM `SamplingParams(logit_bias=...)`, llama.cpp `--logit-bias`).")
    return lines


def _training(info: dict) -> list[str]:
    meta, run = info.get("token_metadata") or {}, info.get("training_run") or {}
    lines = [f"- Token file: `{info['token_file']}`"]
    for key in ("init", "init_word", "step", "train_data"):
        if meta.get(key):
            lines.append(f"- {key}: `{meta[key]}`")
    if run.get("config"):
        import yaml

        lines += [f"- Training config (`{run['config']}`, main sections):", "", "```yaml",
                  yaml.safe_dump(run["training_config"], sort_keys=False).rstrip(), "```", ""]
    if run.get("overrides") is not None:
        lines.append("- Training command overrides: `" + " ".join(map(str, run["overrides"])) + "`")
    lines += ["", "### Results", "", run["results_md"].strip() if run.get("results_md") else
              "No results.md next to the token file (evaluate with `ctt-eval`)."]
    return lines


def _loading(info: dict) -> list[str]:
    tid = info["token_ids"][0]
    if info["format"] == "hf":
        return ["A complete Hugging Face model folder: `AutoModelForCausalLM.from_pretrained(DIR)` and "
                "`AutoTokenizer.from_pretrained(DIR)`, no remote code. ctt loads it with "
                "`ctt-generate model=exported model.path=DIR` or `ContinueThinking.from_exported(DIR)`."]
    base = info["base_weights"]
    resize = "" if info["table"]["spare_row"] else "\nbase.resize_token_embeddings(len(tok))  # room for the token"
    return ["A PEFT `TrainableTokens` adapter for the base model; the token-added tokenizer is in this folder:", "",
            "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "", 'tok = AutoTokenizer.from_pretrained("DIR")',
            f'base = AutoModelForCausalLM.from_pretrained("{base}"){resize}',
            'model = PeftModel.from_pretrained(base, "DIR")',
            f"# never let it sample the token: model.generate(..., suppress_tokens=[{tid}])", "```", "",
            f"Base weights: {info['base_weights_note']}."]


def model_card(info: dict) -> str:
    recipe, ids = info["recipe"], info["token_ids"]
    marker = f"`{info['end_of_thinking_text']}` (ids {info['end_of_thinking_ids']})"
    cap = recipe["thinking_budget"]
    eos_marker = info["end_of_thinking_ids"] == info["eos_token_ids"][:1]
    lines = [
        f"# {info['base_model']} + `{info['tokens'][0]}`", "",
        f"A learned continue-thinking token (ctt, arXiv 2506.11274) for **{info['base_model']}** (base weights: "
        f"{info['base_weights_note']}). Every base weight is unchanged; only the "
        f"input embedding of the new special token `{info['tokens'][0]}` (id {ids[0]}) was trained, by "
        f"reinforcement learning with budget forcing. It replaces the end-of-thinking marker {marker}.", "",
        "## Budget forcing with the token", "",
        "1. Generate until the model emits the end-of-thinking marker (stop token ids = the marker).",
        f"2. Drop the marker, append the token id {ids[0]}, and continue generating.",
        f"3. Do this N times (N = {recipe['num_continuations']}, from the {info['recipe_from']}); the next marker "
        + ("ends the reply (this model's end of thinking is its end of sequence)." if eos_marker else
           "ends thinking and the answer follows."),
        f"4. Thinking cap: {f'after {cap} thinking tokens' if cap else 'optional; at a cap of your choice'}, append "
        f"the marker yourself (s1's budget forcing). Answers were given {recipe['max_answer_tokens']} tokens.", "",
        "```python", snippet(info, "DIR").rstrip(), "```", "",
        "## Loading", "", *_loading(info), "",
        "## How the token is stored and kept from being sampled", "", *_weights(info), "",
        "## Training", "", *_training(info), "",
        "## Export", "",
        f"Written by `ctt-export` (format `{info['format']}`); `ctt_export.json` holds these facts:", "",
        "```json", json.dumps({k: info[k] for k in ("token_ids", "end_of_thinking_ids", "eos_token_ids", "recipe")},
                              indent=2), "```", "",
    ]
    return "\n".join(lines)
