"""Greedy `generate_forced` equals plain transformers, token for token.

* N=0: `model.generate` on the same left-padded batch, and one prompt at a time.
* N=2: the s1 recipe on `generate` (stop at the marker, strip it, append the continuation, generate again on the whole
  text) and the in-loop LogitsProcessor variant (ctt/reference_oracle.py), both for a marker that is eos and one that is not.

The tiny model is untied (tie=False): the tied tiny model greedily repeats the prompt's last token forever. The
marker is the token that the greedy model emits in the most rows, so it is emitted at different steps per row and
never in some rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest

from ctt.errors import ConfigError
from ctt.engine import EngineSettings, ForcingConfig, SamplingConfig
from ctt.engine.hf import generate_forced
from tests.reference_oracle import generate_batch, inloop_forced, s1_forced
from transformers import LogitsProcessor, LogitsProcessorList
from tests.conftest import tiny

PROMPTS = [
    "hello there", "what is 2+2?", "x", "a much longer prompt about sums and products", "Janet has 3 ducks",
    "q", "Compute 17*3 and explain.", "ok so",
]
ENGINES = [
    EngineSettings(), EngineSettings(cache="dynamic"), EngineSettings(drop_finished=False), EngineSettings(cache="static"),
    EngineSettings(share_prefix=False),
]
# Chat-template-like: every prompt starts with the same text, and RL repeats each prompt K times.
SHARED = "<sys> You are a careful assistant. <user> "
SHARED_PROMPTS = [SHARED + p for p in PROMPTS[:5]] + [SHARED + PROMPTS[1]] * 2 + [SHARED + PROMPTS[3]]
FIELDS = ("completion_ids", "sampled", "continuation_starts", "replaced_markers", "answer_start", "thinking_tokens",
          "answer_tokens", "stop_reason")


pytestmark = pytest.mark.usefixtures("one_thread")


@lru_cache(maxsize=1)
def _setup():
    loaded = tiny(boost=0.0, tie=False)
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    free = ForcingConfig(end_of_thinking_ids=(tok.eos_token_id,), eos_token_ids=(tok.eos_token_id,), max_new_tokens=60)
    outs = [r.completion_ids for r in generate_forced(loaded.model, prompts, free, SamplingConfig(temperature=0))]
    rows_with = Counter(t for o in outs for t in set(o))
    marker = max(rows_with, key=lambda t: (rows_with[t], -min(o.index(t) for o in outs if t in o)))
    return loaded, prompts, marker


def _same(a, b, what):
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        for f in FIELDS:
            assert getattr(ra, f) == getattr(rb, f), f"row {i}: {f} differs from {what}"


@pytest.mark.parametrize("engine", ENGINES,
                         ids=lambda e: f"{e.cache}-drop{int(e.drop_finished)}-share{int(e.share_prefix)}")
def test_n0_equals_plain_generate(engine):
    loaded, prompts, _ = _setup()
    model, tok = loaded.model, loaded.tokenizer
    eos = tok.eos_token_id
    cfg = ForcingConfig(end_of_thinking_ids=(eos,), eos_token_ids=(eos,), max_new_tokens=40)
    ours = generate_forced(model, prompts, cfg, SamplingConfig(temperature=0), tok.pad_token_id, engine=engine)
    batched = generate_batch(model, prompts, [eos], 40, tok.pad_token_id)
    assert [r.completion_ids for r in ours] == batched
    for p, r in zip(prompts[:3], ours):  # unpadded, one at a time
        assert generate_batch(model, [p], [eos], 40, tok.pad_token_id) == [r.completion_ids]


@pytest.mark.parametrize("marker_is_eos", [True, False], ids=["marker=eos", "marker!=eos"])
@pytest.mark.parametrize("continuation", ["word", "learned"])
def test_n2_equals_s1_loop_and_inloop_processor(marker_is_eos, continuation):
    loaded, prompts, marker = _setup()
    model, tok = loaded.model, loaded.tokenizer
    new_id = tok.convert_tokens_to_ids("<|continue-thinking|>")
    cont = tuple(tok.encode("Wait")) if continuation == "word" else (new_id,)
    cfg = ForcingConfig(
        end_of_thinking_ids=(marker,), eos_token_ids=(marker,) if marker_is_eos else (tok.eos_token_id,),
        num_continuations=2, continuation_ids=cont, max_new_tokens=48, max_answer_tokens=7, banned_ids=(new_id,),
    )
    greedy = SamplingConfig(temperature=0)
    ours = generate_forced(model, prompts, cfg, greedy, tok.pad_token_id)
    forced = [r.num_forced for r in ours]
    assert 2 in forced and 0 in forced, f"the marker should be forced in some rows only, got {forced}"
    assert len({r.continuation_starts[0] for r in ours if r.continuation_starts}) > 1
    _same(ours, s1_forced(model, prompts, cfg, tok.pad_token_id), "the batched s1 loop")
    if continuation == "word":  # the learned id is outside the output vocabulary: no processor can force it
        _same(ours, inloop_forced(model, prompts, cfg, tok.pad_token_id), "the in-loop processor")
    for engine in ENGINES[1:]:
        _same(ours, generate_forced(model, prompts, cfg, greedy, tok.pad_token_id, engine=engine), str(engine))


def _input_shapes(model, run):
    """(batch, length) of the input ids of every forward call made by `run()`, and its result."""
    shapes, original = [], model.forward

    def spy(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    model.forward = spy
    try:
        result = run()
    finally:
        del model.forward
    return shapes, result


def test_shared_prefix_and_repeated_prompts_are_fed_once_and_change_nothing():
    """Prefix caching: the common prefix runs at batch 1, each distinct prompt once (5 of 8), and the rollouts are
    the ones plain `generate` (N=0), the s1 loop (N=2) and the unshared engine give, token for token; sampled ones
    too (same seed)."""
    loaded, _, marker = _setup()
    model, tok = loaded.model, loaded.tokenizer
    prompts = [tok.encode(p) for p in SHARED_PROMPTS]
    eos = tok.eos_token_id
    greedy, unshared = SamplingConfig(temperature=0), EngineSettings(share_prefix=False)
    n0 = ForcingConfig(end_of_thinking_ids=(eos,), eos_token_ids=(eos,), max_new_tokens=40)
    shapes, ours = _input_shapes(model, lambda: generate_forced(model, prompts, n0, greedy, tok.pad_token_id))
    shared = len(tok.encode(SHARED))  # byte-level: the prompts agree on exactly these tokens
    assert shapes[:3] == [(1, shared), (5, max(map(len, prompts)) - shared), (8, 1)]  # then decode, all 8 rows
    assert [r.completion_ids for r in ours] == generate_batch(model, prompts, [eos], 40, tok.pad_token_id)
    n2 = ForcingConfig(end_of_thinking_ids=(marker,), eos_token_ids=(marker,), num_continuations=2,
                       continuation_ids=tuple(tok.encode("Wait")), max_new_tokens=48)
    ours = generate_forced(model, prompts, n2, greedy, tok.pad_token_id)
    assert any(r.num_forced for r in ours)
    _same(ours, s1_forced(model, prompts, n2, tok.pad_token_id), "the batched s1 loop")
    _same(ours, generate_forced(model, prompts, n2, greedy, tok.pad_token_id, engine=unshared), "unshared")
    sampled = SamplingConfig(temperature=1.0, seed=3)
    a = generate_forced(model, prompts, n2, sampled, tok.pad_token_id)
    _same(a, generate_forced(model, prompts, n2, sampled, tok.pad_token_id, engine=unshared), "unshared, sampled")
    assert len({tuple(r.completion_ids) for r in a[5:7]}) == 2  # repeated prompts still get their own samples


def test_per_sequence_s1_loop_equals_batched():
    loaded, prompts, marker = _setup()
    tok = loaded.tokenizer
    cfg = ForcingConfig(end_of_thinking_ids=(marker,), eos_token_ids=(marker,), num_continuations=2,
                        continuation_ids=tuple(tok.encode("Wait")), max_new_tokens=30)
    a = s1_forced(loaded.model, prompts[:4], cfg, tok.pad_token_id, batched=True)
    b = s1_forced(loaded.model, prompts[:4], cfg, tok.pad_token_id, batched=False)
    _same(a, b, "the per-sequence loop")


def test_references_reject_what_they_cannot_do():
    loaded, prompts, marker = _setup()
    tok = loaded.tokenizer
    new_id = tok.convert_tokens_to_ids("<|continue-thinking|>")
    base = dict(eos_token_ids=(tok.eos_token_id,), num_continuations=1)
    with pytest.raises(ValueError, match="single-token"):
        s1_forced(loaded.model, prompts, ForcingConfig(end_of_thinking_ids=(marker, marker), **base), 0)
    with pytest.raises(ValueError, match="output vocabulary"):
        inloop_forced(loaded.model, prompts, ForcingConfig(end_of_thinking_ids=(marker,), continuation_ids=(new_id,),
                                                           **base), 0)
    with pytest.raises(ConfigError, match="compile"):
        EngineSettings(compile=True)
    with pytest.raises(ConfigError, match="cache"):
        EngineSettings(cache="paged")


def test_benchmark_script_runs_and_checks_equality(tmp_path):
    """bench/bench_rollout.py on the smollm2 workload, tiny model, one round: it exits 0 (it exits non-zero when any
    variant's greedy tokens differ from ctt's) and its JSON records the equality and a ratio for every variant."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/bench_rollout.py", "--model", "tiny_random", "--data", "smollm2", "--batch", "3",
           "--max-new-tokens", "24", "--repeats", "1", "--no-ablations", "--skip-train", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["meta"]["data"] == "smollm2"
    assert report["meta"]["instruction"] == "Give the final answer as a number in \\boxed{}."
    variants = {r["variant"]: r for r in report["rollouts"]}
    assert {"(a) ctt generate_forced", "(b) s1 loop on generate, batched",
            "(c) in-loop LogitsProcessor on generate", "(d) N=0 batch 1: plain generate"} <= set(variants)
    for r in variants.values():
        assert r["equal_to_ctt"], r["mismatch"]
        assert r["time_vs_ctt"] > 0 and r["tokens"] > 0


class _SuppressFirstN(LogitsProcessor):
    """Plain transformers' "no string": ban the marker at the first N steps where greedy would choose it."""

    def __init__(self, marker: int, n: int, rows: int):
        self.marker, self.left = marker, [n] * rows

    def __call__(self, input_ids, scores):
        for row, left in enumerate(self.left):
            if left and int(scores[row].argmax()) == self.marker:
                scores[row, self.marker] = float("-inf")
                self.left[row] -= 1
        return scores


def test_no_string_and_filler_modes_insert_exactly_what_they_say():
    """Through the evaluation-mode registry (ctt.policy.modes -> Policy.forcing): `filler:. x3` appends exactly the ids of
    ". . . " (the s1 loop with that text gives the same tokens) and `no_string` appends nothing, the marker merely
    banned at its first N greedy choices (plain `generate` with such a LogitsProcessor gives the same tokens)."""
    import torch

    from ctt.models.loading import LoadedModel
    from ctt.policy.modes import Mode
    from ctt.policy.policy import ForcingSettings, Policy

    loaded, prompts, marker = _setup()
    model, tok = loaded.model, loaded.tokenizer
    policy = Policy(LoadedModel(model, tok, "tiny_random", [marker]), ForcingSettings(max_new_tokens=48,
                    max_answer_tokens=7), "Answer.")
    greedy = SamplingConfig(temperature=0)
    filler = policy.forcing(Mode("filler", ". x3", 2))
    assert filler.continuation_ids == tuple(tok.encode(". . . ", add_special_tokens=False))
    ours = generate_forced(model, prompts, filler, greedy, tok.pad_token_id)
    assert 2 in [r.num_forced for r in ours]
    _same(ours, s1_forced(model, prompts, filler, tok.pad_token_id), "the s1 loop with the filler text")

    no_string = policy.forcing(Mode("no_string", None, 2))
    assert no_string.continuation_ids == ()
    ours = generate_forced(model, prompts, no_string, greedy, tok.pad_token_id)
    assert 2 in [r.num_forced for r in ours]
    eos = tok.eos_token_id
    for prompt, rollout in zip(prompts, ours):
        x = torch.tensor([prompt])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False,
                             eos_token_id=[marker, eos], pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([_SuppressFirstN(marker, 2, 1)]))
        thinking = out[0, len(prompt):].tolist()
        assert rollout.completion_ids[: len(thinking)] == thinking
