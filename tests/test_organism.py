"""The model organism: its tokenizer and chat template, its training traces, the shipped model, the script."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ctt.config.hydra_glue import CONFIG_DIR
from ctt.data.problems import build_prompt_ids
from ctt.data.sources import load_problems
from ctt.models.loading import load_model
from ctt.organism.task import (
    CHECK_RE, STEP_RE, Mixture, assistant_text, count_steps, draw_problems, draw_terms, is_cue, make_trace,
    parse_question, question_text,
)
from ctt.organism.tokenizer import THINK, THINK_END, build_tokenizer
from ctt.organism.train import prompt_text

MODEL_DIR = Path(__file__).resolve().parents[1] / "ctt" / "organism" / "model"
TRACE = "3+5=8\n8+2=11\nWait, 8+2=10\n10+7=17\nWait, 10+7=17\nWait, 10+7=17\n"


def _organism_cfg():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # ~experiment: experiment=demo (the default) sets its own prompt.instruction.
        cfg = compose(config_name="train", overrides=["~experiment", "model=organism", "prompt=organism",
                                                      "data=organism", "benchmarks=[organism,organism_long]"])
    return {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "prompt", "data", "benchmarks")}


@pytest.fixture(scope="module")
def shipped():
    cfg = _organism_cfg()
    start = time.perf_counter()
    loaded = load_model(**cfg["model"])
    return loaded, time.perf_counter() - start


# --------------------------------------------------------------------------- tokenizer and chat template


@pytest.mark.parametrize("source", ["built", "shipped"])
def test_think_markers_are_single_tokens_and_a_trace_round_trips(source, shipped):
    tok = build_tokenizer() if source == "built" else shipped[0].tokenizer
    added = tok.get_added_vocab()
    for marker in (THINK, THINK_END):
        assert marker in added and tok.encode(marker, add_special_tokens=False) == [added[marker]]
    text = f"{THINK}\n{TRACE}{THINK_END}\n\\boxed{{17}}{tok.eos_token}"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(added[THINK_END]) == 1 and tok.decode(ids) == text
    assert len(ids) == len(text) - len(THINK) - len(THINK_END) - len(tok.eos_token) + 3  # character level
    # As in R1-Distill: </think> is an added, non-special token, so skip_special_tokens keeps it (eos is dropped).
    assert tok.decode(ids, skip_special_tokens=True) == f"{THINK}\n{TRACE}{THINK_END}\n\\boxed{{17}}"
    assert tok.decode(tok.encode("Wait, é 日本", add_special_tokens=False)) == "Wait, é 日本"  # byte level: no unk


def test_saved_tokenizer_matches_the_built_one(shipped):
    # AutoTokenizer loads a qwen2 folder as Qwen2Tokenizer (transformers 5): it must tokenize as build_tokenizer does.
    built, loaded = build_tokenizer(), shipped[0].tokenizer
    assert type(loaded).__name__ == "Qwen2Tokenizer" and loaded.unk_token is None
    assert built.get_vocab() == loaded.get_vocab() and len(built) == len(loaded)
    text = "Please reason step by step.\n\nWhat is 1 + 2?" + TRACE + THINK_END
    assert built.encode(text, add_special_tokens=False) == loaded.encode(text, add_special_tokens=False)
    assert {t.content: t.special for t in built.added_tokens_decoder.values()} == {
        t.content: t.special for t in loaded.added_tokens_decoder.values()}


def test_chat_template_opens_the_assistant_turn_inside_think(shipped):
    tok = shipped[0].tokenizer
    messages = [{"role": "user", "content": "What is 1+2?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"{tok.bos_token}<｜User｜>What is 1+2?<｜Assistant｜>{THINK}\n"
    assert text.endswith("<think>\n")
    system = tok.apply_chat_template([{"role": "system", "content": "S"}] + messages, tokenize=False)
    assert system == f"{tok.bos_token}S<｜User｜>What is 1+2?"
    # What the RL pipeline feeds with prompt=organism is exactly what the organism was trained on.
    ids = build_prompt_ids(tok, "What is 1+2?", _organism_cfg()["prompt"]["instruction"])
    assert ids == tok.encode(prompt_text("What is 1+2?"), add_special_tokens=False)


# --------------------------------------------------------------------------- the shipped model


def test_model_organism_loads_offline_quickly(shipped, monkeypatch):
    loaded, _ = shipped  # how quickly: bench/bench_grading.py --organism (a wall-clock bound is not a test)
    model, tok = loaded.model, loaded.tokenizer
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.config.tie_word_embeddings
    assert loaded.end_of_thinking_ids == [tok.convert_tokens_to_ids(THINK_END)]
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows > len(tok)  # spare rows, as Qwen2 has
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 3e6
    card = json.loads((MODEL_DIR / "card.json").read_text())
    assert card["model"]["tokenizer_size"] == len(tok) and card["model"]["embedding_rows"] == rows
    assert (MODEL_DIR / "ORGANISM.md").is_file()


def test_card_shows_the_properties_the_organism_was_designed_for():
    """The card's measured figures (re-measured by the slow test below) have the properties of the design."""
    figures = json.loads((MODEL_DIR / "card.json").read_text())["figures"]["held_out"]
    base, oracle = figures["base"], figures["oracle"]
    assert base["n"] >= 300 and 0.30 <= base["accuracy"] <= 0.70
    assert base["early_share"] >= 0.25  # thinks too briefly
    assert oracle["accuracy"] >= base["accuracy"] + 0.25  # headroom for budget forcing
    assert figures["wait1"]["accuracy"] < oracle["accuracy"] - 0.15  # "Wait" is not a cure
    assert set(base["per_terms"]) == {str(k) for k in range(2, 9)}
    card_md = (MODEL_DIR / "ORGANISM.md").read_text()
    assert f"{100 * base['accuracy']:.1f}%" in card_md and f"{100 * oracle['accuracy']:.1f}%" in card_md


# --------------------------------------------------------------------------- the training traces


def _check_lines(trace) -> None:
    """Step k is `partial[k-1]+terms[k]=partial[k]`, its result possibly off by one and then corrected by the next
    line `Wait, <the step, right>`; any check line may be followed by one identical re-check; nothing else."""
    terms, lines = trace.terms, trace.thinking.split("\n")
    assert lines.pop() == ""  # every line ends with the separator
    partial = [sum(terms[: i + 1]) for i in range(len(terms))]
    step, checks = 0, 0  # step lines so far; check lines since the last step line
    for i, line in enumerate(lines):
        right = f"{partial[step - 1]}+{terms[step]}={partial[step]}" if step else None
        if match := STEP_RE.match(line):
            step, checks = step + 1, 0
            a, b, c = map(int, match.groups())
            assert (a, b) == (partial[step - 1], terms[step])
            if c != partial[step]:  # a wrong result is off by one, and the next line corrects it
                assert abs(c - partial[step]) == 1 and lines[i + 1] == f"Wait, {a}+{b}={partial[step]}"
        else:
            checks += 1
            assert CHECK_RE.match(line) and line == f"Wait, {right}" and checks <= 2
    assert step == trace.steps_done == count_steps(trace.thinking)


def test_traces_have_the_documented_properties():
    mix, rng = Mixture(), random.Random(7)
    stops = {True: [0, 0], False: [0, 0]}  # cue -> [stopped, non-final steps seen]
    rechecks, checks, careful_early = 0, 0, 0
    for _ in range(20000):
        trace = make_trace(draw_terms(rng, mix.min_terms, mix.max_terms), rng, mix)
        terms, partial = trace.terms, [sum(trace.terms[: i + 1]) for i in range(len(trace.terms))]
        assert trace.answer == partial[trace.steps_done]  # the gold, or the partial sum on an early stop
        assert trace.early_stop == (trace.steps_done < len(terms) - 1) == (trace.answer != trace.gold)
        careful_early += trace.careful and trace.early_stop
        _check_lines(trace)
        lines = trace.thinking.splitlines()
        checks += sum(line.startswith("Wait") for line in lines)
        rechecks += sum(x == y and x.startswith("Wait") for x, y in zip(lines, lines[1:]))
        if trace.careful:
            continue
        for k in range(1, min(trace.steps_done, len(terms) - 2) + 1):  # non-final steps a hasty trace reached
            cue = is_cue(partial[k], mix)
            stops[cue][1] += 1
            stops[cue][0] += k == trace.steps_done
    assert careful_early == 0
    assert abs(stops[True][0] / stops[True][1] - mix.p_stop_cue) < 0.02
    assert abs(stops[False][0] / stops[False][1] - mix.p_stop_plain) < 0.01
    assert abs(rechecks / (checks - rechecks) - mix.p_recheck) < 0.03
    plain = Mixture(p_error=0, p_confirm=0, p_confirm_final=0)
    assert assistant_text(make_trace((3, 5, 2), rng, plain)) in ("3+5=8\n8+2=10\n</think>\n\\boxed{10}",
                                                                  "3+5=8\n</think>\n\\boxed{8}")


def test_organism_data_source_and_benchmarks():
    cfg = _organism_cfg()
    held = load_problems(**cfg["benchmarks"]["organism"])
    assert len(held) == 350 and held[0].id == "organism-1234-0"
    assert [parse_question(p.question) for p in held] == draw_problems(350, 1234, 2, 8)
    assert all(str(sum(parse_question(p.question))) == p.answer for p in held)
    long = load_problems(**cfg["benchmarks"]["organism_long"])
    assert {len(parse_question(p.question)) for p in long} == {9, 10}
    train = load_problems(**cfg["data"]["train"])
    assert re.fullmatch(r"What is \d(\+\d){1,7}\?", train[0].question)
    assert question_text(parse_question(train[0].question)) == train[0].question


def test_bad_organism_source_settings_are_one_line_config_errors():
    from ctt.errors import ConfigError

    for kwargs in ({"min_terms": 1}, {"min_terms": 5, "max_terms": 4}, {"digits": 2}):
        with pytest.raises(ConfigError, match="source=organism takes task_kwargs"):
            load_problems("organism", size=4, task_kwargs=kwargs)


# --------------------------------------------------------------------------- the script


def test_script_bad_input_is_one_line_and_exit_2(tmp_path, capsys, caplog):
    """One ConfigError line (argparse's usage block before); --steps 10^12 trained until killed."""
    from ctt.organism.__main__ import main

    for argv in (["--steps", "0"], ["--steps", str(10**12)], ["--threads", "-3"], ["--measure-only", "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
    assert "usage:" not in capsys.readouterr().err
    assert "ConfigError: --steps must be an integer from 1 to 1000000, got 0" in caplog.text
    assert f"--steps must be an integer from 1 to 1000000, got {10**12}" in caplog.text
    assert "--threads must be an integer from 1 to 1024, got -3" in caplog.text


def _config_facts(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}


def test_script_reproduces_a_model_of_the_same_kind_on_a_short_schedule(tmp_path, one_thread, shipped):
    from ctt.organism.__main__ import main

    main(["--out", str(tmp_path), "--steps", "60", "--no-measure"])
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["training"]["loss_last"] < 0.6 * card["training"]["loss_first"]  # 1.8 vs 3.8 when measured
    fresh = load_model(name="fresh", source="local", path=str(tmp_path), end_of_thinking=THINK_END)
    ref = shipped[0]
    assert _config_facts(fresh.model.config) == _config_facts(ref.model.config)
    assert fresh.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    assert fresh.tokenizer.chat_template == ref.tokenizer.chat_template
    assert fresh.tokenizer.all_special_tokens == ref.tokenizer.all_special_tokens

    from ctt.organism.measure import generate_mode, prompts_for

    problems = draw_problems(16, 99, 2, 6)
    texts = generate_mode(fresh.model, fresh.tokenizer, prompts_for(fresh.tokenizer, problems), 0)
    well_formed = [re.fullmatch(r"(.*\n)?</think>\n\\boxed\{\d+\}<｜end▁of▁sentence｜>", t, re.S) for t in texts]
    assert sum(bool(w) for w in well_formed) >= 12, texts


@pytest.mark.slow
def test_card_figures_are_reproduced_from_the_shipped_weights(shipped, one_thread):
    """Greedy on one thread: identical on the machine that wrote the card; another CPU (other kernels, float rounding
    at near-ties) may flip a problem or two, so counts may differ by 2 (and never more)."""
    from ctt.organism.measure import MODES, measure

    card = json.loads((MODEL_DIR / "card.json").read_text())
    figures = measure(shipped[0].model, shipped[0].tokenizer)
    for name in ("held_out", "long"):
        got, want = figures[name], card["figures"][name]
        assert got["problems"] == want["problems"]
        for mode in MODES:
            for key in ("all", *want[mode]["per_terms"]):
                g = got[mode] if key == "all" else got[mode]["per_terms"][key]
                w = want[mode] if key == "all" else want[mode]["per_terms"][key]
                assert g["n"] == w["n"], (name, mode, key)
                for count in ("correct", "early", "unclosed"):
                    assert abs(g[count] - w[count]) <= 2, (name, mode, key, count, g[count], w[count])
