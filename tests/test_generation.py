"""Budget-forced generation: exact insert counts, equivalence with a cache-free reference, budgets, banned token."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ctt.engine import ForcingConfig, SamplingConfig
from ctt.engine.hf import generate_forced
from ctt.models.loading import load_model
from ctt.models.token import install_token
from tests.conftest import tiny

PROMPTS = ["hello there", "what is 2+2?", "x", "a much longer prompt about sums and products"]


@torch.no_grad()
def naive_forced(model, prompt, marker, n, continuation, eos, banned, max_new, max_answer):
    """Reference: recompute the whole sequence every step (no cache), edit the sequence as s1 does. A continuation
    goes in only if it and one more token fit into max_new; an empty one ("no string") bans the marker once."""
    seq, out, sampled, forced, thinking, suppress = list(prompt), [], [], 0, True, None
    answer, answer_start, k = 0, None, len(marker)
    while len(out) < max_new:
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        logits[[b for b in banned if b < logits.shape[0]]] = float("-inf")
        if suppress is not None:
            logits[suppress], suppress = float("-inf"), None
        tok = int(logits.argmax())
        seq.append(tok), out.append(tok), sampled.append(True)
        if thinking and out[-k:] == marker and all(sampled[-k:]):
            if forced < n and len(out) - k + len(continuation) + 1 <= max_new:
                del seq[-k:], out[-k:], sampled[-k:]
                seq += continuation
                out += continuation
                sampled += [False] * len(continuation)
                suppress = None if continuation else marker[0]
                forced += 1
                continue
            thinking, answer_start = False, len(out)
            if marker == [eos]:
                break
            continue
        if tok == eos:
            break
        if not thinking:
            answer += 1
            if answer >= max_answer:
                break
    return out, forced, answer_start


def _unforced_greedy(loaded, prompts):
    tok = loaded.tokenizer
    cfg = ForcingConfig(end_of_thinking_ids=(tok.eos_token_id,), eos_token_ids=(tok.eos_token_id,), max_new_tokens=40)
    return generate_forced(loaded.model, prompts, cfg, SamplingConfig(temperature=0))


@pytest.mark.parametrize("marker_len", [1, 2])
@pytest.mark.parametrize("n", [0, 2])
@pytest.mark.parametrize("continuation", ["learned", "word", "empty"])
def test_forcing_matches_cache_free_reference(marker_len, n, continuation):
    loaded = tiny(boost=0.0)
    tok, model = loaded.tokenizer, loaded.model
    prompts = [tok.encode(p) for p in PROMPTS]
    # Pick as marker the token (or token pair) the greedy model emits most: forcing then has work to do.
    outs = [r.completion_ids for r in _unforced_greedy(loaded, prompts)]
    grams = Counter(tuple(o[i : i + marker_len]) for o in outs for i in range(len(o) - marker_len + 1))
    marker = list(grams.most_common(1)[0][0])
    new_id = tok.convert_tokens_to_ids("<|continue-thinking|>")
    cont = {"learned": [new_id], "word": tok.encode("Wait"), "empty": []}[continuation]
    cfg = ForcingConfig(
        end_of_thinking_ids=tuple(marker), eos_token_ids=(tok.eos_token_id,), num_continuations=n,
        continuation_ids=tuple(cont), max_new_tokens=30, max_answer_tokens=6, banned_ids=(new_id,),
    )
    rollouts = generate_forced(model, prompts, cfg, SamplingConfig(temperature=0), pad_token_id=tok.pad_token_id)
    emitted_any = False
    for prompt, r in zip(prompts, rollouts):
        ref, ref_forced, ref_answer_start = naive_forced(model, prompt, marker, n, cont, tok.eos_token_id, [new_id], 30, 6)
        assert r.completion_ids == ref
        assert r.num_forced == ref_forced <= n
        assert r.replaced_markers == [tuple(marker)] * r.num_forced
        assert r.answer_start == ref_answer_start
        # Each recorded insertion point holds the continuation, and exactly num_forced were inserted.
        for start in r.continuation_starts:
            assert r.completion_ids[start : start + len(cont)] == cont
            assert not any(r.sampled[start : start + len(cont)])
        if cont == [new_id]:
            assert r.completion_ids.count(new_id) == r.num_forced
        emitted_any |= r.num_forced > 0
    if n:
        assert emitted_any, "the chosen marker was never emitted: the test would prove nothing"


def test_inserts_min_of_n_and_emissions_in_a_ragged_batch():
    """Sampling with a model that emits </think> often: sequences finish at different steps."""
    loaded = tiny(boost=4.0)
    tok = loaded.tokenizer
    marker = loaded.end_of_thinking_ids
    new_id = tok.convert_tokens_to_ids("<|continue-thinking|>")
    prompts = [tok.encode(p) for p in PROMPTS * 4]
    for n in (1, 2, 5):
        cfg = ForcingConfig(
            end_of_thinking_ids=tuple(marker), eos_token_ids=(tok.eos_token_id,), num_continuations=n,
            continuation_ids=(new_id,), max_new_tokens=40, max_answer_tokens=5, banned_ids=(new_id,),
        )
        rollouts = generate_forced(loaded.model, prompts, cfg, SamplingConfig(temperature=1.0, seed=n))
        for r in rollouts:
            # A marker left in the thinking part was emitted after N were forced (it ends thinking).
            passed = r.completion_ids[: r.thinking_tokens].count(marker[0])
            assert passed <= 1
            emissions = r.num_forced + passed
            # A marker that ended thinking with fewer than N forced came too late: the continuation and one more
            # token would not have fitted into max_new_tokens once it was removed.
            no_room = passed and r.thinking_tokens - 1 + len((new_id,)) + 1 > cfg.max_new_tokens
            assert r.num_forced == min(n, emissions) or no_room
            assert r.completion_ids.count(new_id) == r.num_forced
            if passed and not no_room:
                assert r.num_forced == n
        assert len({len(r.completion_ids) for r in rollouts}) > 1, "all rows finished together"
        assert any(r.num_forced == n for r in rollouts)


def test_thinking_budget_forces_the_end_and_bounds_the_answer():
    loaded = tiny(boost=0.0)
    tok = loaded.tokenizer
    marker = tuple(loaded.end_of_thinking_ids)
    force = tuple(tok.encode("</think>Final answer:"))
    cfg = ForcingConfig(
        end_of_thinking_ids=marker, eos_token_ids=(tok.eos_token_id,), num_continuations=2,
        continuation_ids=tuple(tok.encode("Wait")), thinking_budget=10, budget_force_ids=force,
        max_answer_tokens=4, max_new_tokens=200,
    )
    prompts = [tok.encode(p) for p in PROMPTS]
    rollouts = generate_forced(loaded.model, prompts, cfg, SamplingConfig(temperature=1.0, seed=0))
    reached = [r for r in rollouts if r.thinking_tokens == 10]
    assert reached, [(r.thinking_tokens, r.stop_reason) for r in rollouts]  # the budget branch ran
    assert all(r.answer_start == 10 for r in reached)
    for r in rollouts:
        assert r.thinking_tokens <= 10
        if r.stop_reason != "eos":
            start = r.thinking_tokens
            assert tuple(r.completion_ids[start : start + len(force)]) == force
            assert r.answer_tokens == 4 and r.stop_reason == "answer_limit"
        assert len(r.completion_ids) <= 10 + len(force) + 4


def test_model_never_samples_the_new_token():
    loaded = load_model(name="t", source="tiny_random", end_of_thinking="</think>")
    model, tok = loaded.model, loaded.tokenizer
    model.resize_token_embeddings(len(tok) + 8)  # padded vocab, as in Qwen: the new id gets a real logit
    new_id = len(tok)
    with torch.no_grad():
        model.get_output_embeddings().weight[new_id] = model.get_output_embeddings().weight[5] * 50
    install_token(model, tok, {"name": "mean"})
    assert tok.convert_tokens_to_ids("<|continue-thinking|>") == new_id < model.get_output_embeddings().weight.shape[0]
    prompts = [tok.encode(p) for p in PROMPTS]
    base = dict(end_of_thinking_ids=(tok.eos_token_id,), eos_token_ids=(tok.eos_token_id,), max_new_tokens=30)
    control = generate_forced(model, prompts, ForcingConfig(**base), SamplingConfig(temperature=1.0, seed=0))
    assert any(new_id in r.completion_ids for r in control), "control: without the ban the token is sampled"
    banned = ForcingConfig(**base, banned_ids=(new_id,))
    for r in generate_forced(model, prompts, banned, SamplingConfig(temperature=1.0, seed=0)):
        assert new_id not in r.completion_ids


def test_sampling_is_reproducible_for_a_seed():
    loaded = tiny(boost=4.0)
    tok = loaded.tokenizer
    cfg = ForcingConfig(end_of_thinking_ids=tuple(loaded.end_of_thinking_ids), eos_token_ids=(tok.eos_token_id,),
                        num_continuations=2, continuation_ids=tuple(tok.encode("Wait")), max_new_tokens=20)
    prompts = [tok.encode(p) for p in PROMPTS]
    a = generate_forced(loaded.model, prompts, cfg, SamplingConfig(temperature=1.0, top_p=0.9, seed=3))
    b = generate_forced(loaded.model, prompts, cfg, SamplingConfig(temperature=1.0, top_p=0.9, seed=3))
    c = generate_forced(loaded.model, prompts, cfg, SamplingConfig(temperature=1.0, top_p=0.9, seed=4))
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


@pytest.mark.parametrize("word", ["Wait", "Alternatively, let me"])
def test_a_continuation_is_inserted_only_when_it_fits(word):
    """A marker sampled near max_new_tokens ends thinking instead of being replaced: a continuation never overruns
    the limit (fixed "Wait" used to reach 15 of 12 tokens)."""
    loaded = tiny(boost=6.0)  # the marker is the greedy choice: it comes at every step
    tok = loaded.tokenizer
    cont = tuple(tok.encode(word))
    for max_new in range(2, 14):
        cfg = ForcingConfig(end_of_thinking_ids=tuple(loaded.end_of_thinking_ids), eos_token_ids=(tok.eos_token_id,),
                            num_continuations=50, continuation_ids=cont, max_new_tokens=max_new, max_answer_tokens=4)
        prompts = [tok.encode(p) for p in PROMPTS]
        for r in generate_forced(loaded.model, prompts, cfg, SamplingConfig(temperature=0)):
            assert len(r.completion_ids) <= max_new
            for start in r.continuation_starts:  # each continuation is followed by a sample (kept, or a marker replaced)
                after = start + len(cont)
                assert after < len(r.completion_ids) and (r.sampled[after] or after in r.continuation_starts)
            if max_new >= len(cont) + 2:
                assert r.num_forced >= 1


def test_no_string_suppresses_the_marker_instead_of_resampling_it():
    """An empty continuation ("no string") must change what comes next: greedy, re-sampling the same context
    unbanned would give the marker again at once and use up all N replacements."""
    loaded = tiny(boost=6.0)
    tok = loaded.tokenizer
    marker = tuple(loaded.end_of_thinking_ids)
    cfg = ForcingConfig(end_of_thinking_ids=marker, eos_token_ids=(tok.eos_token_id,), num_continuations=3,
                        continuation_ids=(), max_new_tokens=30, max_answer_tokens=4)
    for r in generate_forced(loaded.model, [tok.encode(p) for p in PROMPTS], cfg, SamplingConfig(temperature=0)):
        assert r.num_forced == 3 and r.replaced_markers == [marker] * 3
        starts = r.continuation_starts
        assert len(set(starts)) == 3, f"each suppression must be followed by a new token: {starts}"
        for s in starts:
            assert r.completion_ids[s] != marker[0]


def test_a_sampled_row_depends_on_its_own_seed_alone():
    """Each row draws from its own stream: finished rows leaving the batch (or not), prefix sharing, the cache kind
    and the batch size change none of the 32 sampled rollouts. (With one generator shared by the batch, as before,
    batch_size=5 changes them: checked by hand.)"""
    from ctt.engine import EngineSettings, build_engine, row_seeds

    loaded = tiny(boost=3.0, init_range=0.3)
    tok, new_id = loaded.tokenizer, loaded.tokenizer.convert_tokens_to_ids("<|continue-thinking|>")
    prompts = [tok.encode(f"question {i}: {i * 7 % 13}+{i}") for i in range(32)]
    cfg = ForcingConfig(end_of_thinking_ids=tuple(loaded.end_of_thinking_ids), eos_token_ids=(tok.eos_token_id,),
                        num_continuations=2, continuation_ids=(new_id,), max_new_tokens=40, max_answer_tokens=6,
                        banned_ids=(new_id,))
    sampling, seeds = SamplingConfig(temperature=1.0, top_p=0.95, seed=3), row_seeds(3, len(prompts))

    def run(batch_size=32, **engine):
        e = build_engine(EngineSettings(**engine), model=loaded.model, pad_token_id=tok.pad_token_id,
                         batch_size=batch_size)
        return [r.record() for r in e.generate(prompts, cfg, sampling, seeds=seeds)]

    reference = run()
    assert len({len(r[1]) for r in reference}) > 1, "rows of one length: nothing left the batch early"
    for variant in ({"drop_finished": False}, {"share_prefix": False}, {"cache": "dynamic"}, {"batch_size": 5}):
        assert run(**variant) == reference, variant
    assert [r.record() for r in generate_forced(loaded.model, prompts[7:8], cfg, sampling, tok.pad_token_id,
                                                seeds=seeds[7:8])] == reference[7:8]
