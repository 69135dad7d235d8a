"""Train the organism from scratch: a ~1M-parameter Qwen2 on the task's traces, next-token cross-entropy.

Deterministic for a seed: the traces come from one `random.Random(seed)`, the weights from `torch.manual_seed(seed)`,
and training runs on one CPU thread (on a shared 2-core machine two threads were not faster for this size).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2ForCausalLM

from ctt.organism.task import Mixture, assistant_text, draw_terms, question_text
from ctt.organism.task_r1 import MixtureR1
from ctt.organism.tokenizer import ASSISTANT, THINK, THINK_END, USER, build_tokenizer, padded_vocab_size
from ctt.models.tiny import qwen2_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """Qwen2 (the R1-Distill-Qwen family) at ~1M parameters; untied embeddings like R1-Distill-Qwen-1.5B."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    steps: int = 3200
    batch_size: int = 8  # small batches, many steps: at the same tokens, 32 x 800 steps learnt far less (card)
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 80  # at most a tenth of the steps (a short schedule, as in the test, still learns)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threads: int = 1
    log_every: int = 200
    pool_batches: int = 16  # length bucketing: batches drawn at a time, sorted by length
    mixture: Mixture | MixtureR1 = field(default_factory=Mixture)  # the task: the hasty organism's or organism_r1's


def build_model(tokenizer: PreTrainedTokenizerBase, arch: Architecture, seed: int) -> Qwen2ForCausalLM:
    config = qwen2_config(tokenizer, padded_vocab_size(len(tokenizer)), **asdict(arch))
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def prompt_text(question: str) -> str:
    """The chat-template prompt for a bare question (what `ctt.data.sources.build_prompt_ids` gives with prompt=organism)."""
    return f"<｜begin▁of▁sentence｜>{USER}{question}{ASSISTANT}{THINK}\n"


def _encode_examples(tokenizer, rng: random.Random, count: int,
                     mix: Mixture | MixtureR1) -> list[tuple[list[int], int]]:
    """`count` fresh traces as (token ids up to and including eos, prompt length)."""
    prompts, fulls = [], []
    for _ in range(count):
        trace = mix.trace(draw_terms(rng, mix.min_terms, mix.max_terms), rng)
        prompt = prompt_text(question_text(trace.terms))
        prompts.append(prompt)
        fulls.append(prompt + assistant_text(trace, THINK_END) + tokenizer.eos_token)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    return [(f, len(p)) for p, f in zip(prompt_ids, full_ids)]


def batches(tokenizer, rng: random.Random, settings: TrainSettings) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless `[B, T]` input ids (right-padded) and labels (-100 on the prompt and padding).

    Length bucketing: a pool of `pool_batches` batches is sorted by length and cut into batches (in shuffled
    order), so little compute goes to padding (about 40% of it without).
    """
    while True:
        pool = _encode_examples(tokenizer, rng, settings.batch_size * settings.pool_batches, settings.mixture)
        pool.sort(key=lambda e: len(e[0]))
        chunks = [pool[i : i + settings.batch_size] for i in range(0, len(pool), settings.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield _collate(chunk, tokenizer.pad_token_id)


def _collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(f) for f, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (full, prompt_len) in enumerate(examples):
        ids[i, : len(full)] = torch.tensor(full)
        labels[i, prompt_len : len(full)] = ids[i, prompt_len : len(full)]
    return ids, labels


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio."""
    warmup = max(1, min(settings.warmup_steps, settings.steps // 10))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, settings.steps - warmup))
    floor = settings.min_lr_ratio
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    # No weight decay on norms and biases (the usual GPT recipe).
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def train(settings: TrainSettings = TrainSettings(), arch: Architecture = Architecture()) -> tuple:
    """Returns (model, tokenizer, record); `record` holds the settings, the loss curve and the measured speed."""
    torch.set_num_threads(settings.threads)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, arch, settings.seed)
    model.train()
    opt = _optimizer(model, settings)
    data = batches(tokenizer, random.Random(settings.seed), settings)
    losses, tokens, start = [], 0, time.perf_counter()
    for step in range(settings.steps):
        ids, labels = next(data)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        tokens += int((ids != tokenizer.pad_token_id).sum())  # real tokens, padding not counted
        losses.append(loss.item())
        if (step + 1) % settings.log_every == 0 or step == 0:
            elapsed = time.perf_counter() - start
            log.info("step %d/%d loss %.4f  %.0f tokens/s  %.0f s", step + 1, settings.steps, losses[-1],
                     tokens / elapsed, elapsed)
    seconds = time.perf_counter() - start
    model.eval()
    record = {
        "settings": {k: v for k, v in asdict(settings).items() if k != "mixture"},
        "mixture": settings.mixture.as_dict(),
        "architecture": asdict(arch),
        "seconds": round(seconds, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds),
        "load_average": round(os.getloadavg()[0], 2),  # 1-minute load at the end: how shared the CPU was
        "loss_first": round(sum(losses[:20]) / len(losses[:20]), 4),
        "loss_last": round(sum(losses[-50:]) / len(losses[-50:]), 4),
    }
    return model, tokenizer, record


def save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str) -> None:
    """config.json, model.safetensors, generation_config.json and the tokenizer files."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the folder is shipped
    # transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever the config says, and that class
    # adds "<|endoftext|>" as unk unless unk_token is explicitly null (R1-Distill-Qwen's config has null too).
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(unk_token=None, tokenizer_class="Qwen2Tokenizer")
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
