#!/usr/bin/env python
"""The paper's shape before anyone spends GPU hours: 2 RL steps of `experiment=paper_gsm8k` on CPU with each engine,
on a RANDOMLY initialised Qwen2 with DeepSeek-R1-Distill-Qwen-1.5B's shape. Peak memory and step time per engine.

Not a test. `--build DIR` writes the model once: hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960,
a 151,936-row embedding table (ctt's byte-level tiny tokenizer, 263 tokens, so the new token lands on a spare row as
in the real checkpoint), `tie_word_embeddings=false` as in the hub's config.json of that model,
`max_position_embeddings` 4096 (the hub's 131,072 makes vLLM reserve a KV cache for one 131k-token sequence).
`</think>` is boosted (the trick of `ctt.tiny_model._boost_marker`, calibrated on a short probe) so that a random
model emits it often enough at T=0.6 for forcing, and so the loss pass, to have work to do. Saved in bf16 (weights
are random: nothing is lost), loaded in `--dtype`.

Each run is `python -m ctt.train experiment=paper_gsm8k` with the model, CPU trainer and short budgets overridden
(1 prompt x 8 rollouts of at most 64 new tokens per rank, N=2), in a child process whose tree's RSS is sampled;
`bench/step_times.py` records each step per rank.

    python bench/bench_paper_shape.py --build /tmp/r1shape
    python bench/bench_paper_shape.py --folder /tmp/r1shape --engine hf --out bench/results/paper_shape_hf.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

R1_SHAPE = dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                max_position_embeddings=4096, tie_word_embeddings=False)
VOCAB_ROWS = 151_936
TARGET_MARKER_P, TEMPERATURE = 0.08, 0.6  # per sampled step at paper_gsm8k's rl.temperature


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", default=None, help="write the random R1-shaped model to this folder and exit")
    p.add_argument("--reboost", default=None, help="recalibrate the marker boost of a built folder and exit")
    p.add_argument("--folder", default="/tmp/r1shape")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--trainer", choices=["cpu", "ddp_cpu"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _probe_ids(tokenizer) -> list[int]:
    """What a rollout's context looks like: a GSM8K prompt through the chat template, then 48 random ids (a random
    model samples from the whole 151,936-row table, spare rows included)."""
    from ctt.data.problems import DEFAULT_INSTRUCTION, build_prompt_ids

    question = json.loads(open(_data_dir() / "gsm8k" / "train.jsonl").readline())["question"]
    tail = torch.randint(0, VOCAB_ROWS, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    return build_prompt_ids(tokenizer, question, DEFAULT_INSTRUCTION) + tail


@torch.no_grad()
def _boost(model, tokenizer, marker: int) -> float:
    """Raise the marker's output row along the mean last hidden state u of a realistic context (`_probe_ids`), by
    b * u / |u|^2, with b chosen by bisection so that the marker's mean probability at T=0.6 over the context's last
    48 positions is TARGET_MARKER_P. (A first version used feature 0, as ctt.tiny_model._boost_marker does; after
    28 random layers that feature came out negative, which lowered the marker instead: no rollout was forced.)"""
    ids = torch.tensor([_probe_ids(tokenizer)])
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, -48:].float()
    u = hidden.mean(0)
    gain = hidden @ u / u.dot(u)  # the logit change per unit of b at each position
    logits = model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()
    lo, hi = 0.0, 200.0
    for _ in range(50):
        mid = (lo + hi) / 2
        z = logits.clone()
        z[:, marker] += mid * gain
        p = torch.softmax(z / TEMPERATURE, -1)[:, marker].mean()
        lo, hi = (mid, hi) if p < TARGET_MARKER_P else (lo, mid)
    row = model.lm_head.weight[marker]
    row += (lo * u / u.dot(u)).to(row.dtype)
    return lo


def reboost(folder: str) -> None:
    """Recalibrate the marker of a folder written by `build` (loads it in bf16, rewrites it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    marker = tok.convert_tokens_to_ids("</think>")
    boost = _boost(model, tok, marker)
    model.save_pretrained(folder)
    info = json.loads(Path(folder, "R1_SHAPE.json").read_text())
    info.update(boost_nats=boost, boost="along the mean hidden state of a GSM8K prompt + 48 random ids")
    Path(folder, "R1_SHAPE.json").write_text(json.dumps(info))
    print(f"reboosted {folder}: {boost:.2f}")


def build(folder: str) -> None:
    from transformers import Qwen2ForCausalLM

    from ctt.models.tiny import build_tiny_tokenizer, qwen2_config

    tok = build_tiny_tokenizer()
    config = qwen2_config(tok, VOCAB_ROWS, **R1_SHAPE, bos_token_id=None, rms_norm_eps=1e-6, rope_theta=10000.0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.model.embed_tokens.weight[:, 0] = 1.0  # a constant direction in the residual stream (kept from v1)
    marker = tok.convert_tokens_to_ids("</think>")
    boost = _boost(model, tok, marker)
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    Path(folder, "R1_SHAPE.json").write_text(json.dumps(dict(R1_SHAPE, vocab_rows=VOCAB_ROWS, tokenizer=len(tok),
                                                             marker=marker, boost_nats=boost, parameters=params)))
    print(f"wrote {folder}: {params / 1e9:.3f}B parameters, tokenizer {len(tok)}, boost {boost:.2f} nats")


def overrides(args, out_dir: str, times: str) -> list[str]:
    return [
        "experiment=paper_gsm8k", "model.name=r1_shape_random", "model.source=local", f"+model.path={args.folder}",
        f"model.dtype={args.dtype}", "data=gsm8k_local", "data.batch_size=1",
        "rl.samples_per_prompt=8", f"forcing.max_new_tokens={args.max_new_tokens}", "forcing.thinking_budget=48",
        "forcing.max_answer_tokens=16", "forcing.batch_size=8", f"engine={args.engine}", f"trainer={args.trainer}",
        "trainer.precision=32-true" if args.dtype == "float32" else "trainer.precision=bf16-mixed",
        f"trainer.max_steps={args.steps}", "logger=csv", "evaluate=false", "~callbacks.rollout_samples",
        "+callbacks.step_times._target_=bench.step_times.StepTimes", f"+callbacks.step_times.path={times}",
        f"hydra.run.dir={out_dir}",
    ]


def _tree_rss_mb(pid: int) -> tuple[float, dict]:
    import psutil

    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, {}
    per = {}
    for p in procs:
        try:
            per[p.pid] = p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return sum(per.values()), per


def run(args) -> dict:
    out_dir = tempfile.mkdtemp(prefix="paper-shape-")
    times = str(Path(out_dir) / "steps")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT),
               CTT_DATA_DIR=os.environ.get("CTT_DATA_DIR", str(_data_dir())))
    cmd = [sys.executable, "-m", "ctt.train", *overrides(args, out_dir, times)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"total_mb": 0.0, "per_process_mb": {}}

    def sample():
        while proc.poll() is None:
            total, per = _tree_rss_mb(proc.pid)
            if total > peak["total_mb"]:
                peak.update(total_mb=total, per_process_mb=per)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = proc.stdout.read()
    proc.wait()
    sampler.join()
    steps = [json.loads(line) for f in sorted(Path(out_dir).glob("steps_rank*.jsonl")) for line in open(f)]
    return dict(engine=args.engine, trainer=args.trainer, dtype=args.dtype, returncode=proc.returncode,
                wall_s=time.perf_counter() - start, peak_tree_rss_mb=peak["total_mb"],
                peak_per_process_mb=list(peak["per_process_mb"].values()), steps=steps, command=cmd,
                log_tail=log[-3000:], out_dir=out_dir, load=os.getloadavg(),
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def _data_dir() -> Path:
    for cand in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data"):
        if cand.is_dir():
            return cand
    raise SystemExit("no ../shared/data")


def main(argv=None):
    args = parse_args(argv)
    if args.build:
        return build(args.build)
    if args.reboost:
        return reboost(args.reboost)
    result = run(args)
    result["model"] = json.loads(Path(args.folder, "R1_SHAPE.json").read_text())
    print(json.dumps({k: v for k, v in result.items() if k not in ("log_tail", "command")}, indent=1))
    if result["returncode"]:
        print(result["log_tail"], file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
