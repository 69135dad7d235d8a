"""What a user without ctt does with ctt-export's folders: plain transformers (and PEFT), no ctt import.

Run by tests/test_export.py in a subprocess: `python tests/plain_transformers.py JOB.json OUT.json`. For every case
of the job it loads the exported folder with AutoModelForCausalLM / AutoTokenizer and runs s1-style budget forcing
(generate until the marker, drop it, append the token id, generate again; N times; then the answer), greedy; checks
that greedy `generate` never emits the token; runs the code snippet of the folder's model card; and, for a PEFT
adapter, loads it on the base model and compares its logits with the merged folder's.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def generate(model, ids: list[int], stops: list[int], max_new: int) -> list[int]:
    """Greedy `generate` (the folder's generation config, so its suppress_tokens apply); the new tokens up to the
    first stop."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=stops)[0, len(ids):].tolist()
    cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
    return out[:cut]


def s1_loop(model, prompt: list[int], info: dict, n: int, max_new: int, max_answer: int) -> dict:
    tokens, marker, eos = info["token_ids"], info["end_of_thinking_ids"][0], info["eos_token_ids"][0]
    done, forced = [], 0
    while True:  # thinking: stop at the marker or eos
        done += generate(model, prompt + done, [marker, eos], max_new - len(done))
        # ctt inserts a continuation only when it and one more token fit into max_new_tokens; so does this loop
        if done and done[-1] == marker and forced < n and len(done) - 1 + len(tokens) + 1 <= max_new:
            done = done[:-1] + tokens  # the marker dropped, the token(s) appended
            forced += 1
            continue
        break
    if marker != eos and done and done[-1] == marker and len(done) < max_new:  # the answer
        done += generate(model, prompt + done, [eos], min(max_answer, max_new - len(done)))
    return {"completion": done, "forced": forced}


def never_emits(model, prompts: list[list[int]], token: int, steps: int = 32) -> dict:
    """Greedy generation with the folder's config emits no token id `token`; without its suppress_tokens, how far
    the token's logit stays below every other logit (the output row alone)."""
    emitted, margins = False, []
    for p in prompts:
        x = torch.tensor([p])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False)
        emitted |= token in out[0, len(p):].tolist()
        free = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False,
                              suppress_tokens=None, output_logits=True, return_dict_in_generate=True)
        for logits in free.logits:
            others = torch.cat([logits[0, :token], logits[0, token + 1:]])
            margins.append(float(others.min() - logits[0, token]))
    return {"emitted": emitted, "min_margin_without_suppression": min(margins)}


def card_snippet(folder: str) -> str:
    card = open(f"{folder}/README.md", encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1).replace('"DIR"', repr(folder))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "card snippet", "exec"), {})
    return printed.getvalue()


def peft_logits(case: dict, merged) -> dict:
    """Largest |logit difference| from the merged folder's logits, over the columns compared: of the base model with
    the PEFT adapter, and (a check that the comparison can fail) of the base model alone."""
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(case["peft"])
    base = AutoModelForCausalLM.from_pretrained(case["base"])
    if base.get_input_embeddings().weight.shape[0] < len(tok):
        base.resize_token_embeddings(len(tok))
    ids = torch.tensor([case["prompts"][0] + [case["info"]["token_ids"][0]] * 2 + case["prompts"][1]])
    with torch.no_grad():
        alone = base(input_ids=ids).logits[0]
        model = PeftModel.from_pretrained(base, case["peft"]).eval()
        adapted, merged = model(input_ids=ids).logits[0], merged(input_ids=ids).logits[0]
    columns = torch.ones(merged.shape[-1], dtype=torch.bool)
    if not case["tied"]:  # the token's own output row differs (base row vs calibrated); it is never sampled
        columns[case["info"]["token_ids"]] = False
    diff = {name: float((x[:, columns] - merged[:, columns]).abs().max()) for name, x in [("peft", adapted),
                                                                                           ("base", alone)]}
    return {"peft_max_diff": diff["peft"], "base_max_diff": diff["base"]}


def run_case(case: dict) -> dict:
    folder = case["folder"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    info = json.load(open(f"{folder}/ctt_export.json"))
    token = info["token_ids"][0]
    prompts = [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"] for m in case["messages"]]
    out = {
        "rows": model.get_input_embeddings().weight.shape[0], "tokenizer_size": len(tok),
        "token_id": tok.convert_tokens_to_ids(info["tokens"][0]),
        "special": info["tokens"][0] in tok.all_special_tokens,
        "tied": model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
        "suppress_tokens": model.generation_config.suppress_tokens, "prompts": prompts,
        "rollouts": [s1_loop(model, p, info, case["n"], case["max_new"], case["max_answer"]) for p in prompts],
    }
    if case.get("checks"):
        out |= never_emits(model, prompts[:2], token)
    if case.get("card"):
        out["card_output"] = card_snippet(folder)
    if case.get("peft"):
        out |= peft_logits(case | {"prompts": prompts, "info": info}, model)
    return out


def main() -> None:
    job = json.load(open(sys.argv[1]))
    torch.set_num_threads(1)
    results = [run_case(case) for case in job["cases"]]
    assert not any(m == "ctt" or m.startswith("ctt.") for m in sys.modules), "plain transformers imported ctt"
    json.dump({"cases": results, "ctt_imported": False}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
