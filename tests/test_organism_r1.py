"""organism_r1 (model=organism_r1): its traces, its validation/test splits, its card and the design targets."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from ctt.data.sources import load_problems
from ctt.organism.card_r1 import design_targets
from ctt.organism.task import CHECK_RE, STEP_RE, count_steps, draw_problems, draw_terms, parse_question, split_of
from ctt.organism.task_r1 import CONCLUSION_RE, MixtureR1

MODEL_DIR = Path(__file__).resolve().parents[1] / "ctt" / "organism" / "model_r1"


def _read(trace):
    """(kinds of lines, numbers concluded); asserts every line is a step, a check or a conclusion."""
    kinds, concluded = [], []
    for line in trace.thinking.splitlines():
        if m := CONCLUSION_RE.match(line):
            kinds.append("C")
            concluded.append(int(m.group(1)))
        else:
            kinds.append("S" if STEP_RE.match(line) else "W")
            assert STEP_RE.match(line) or CHECK_RE.match(line), line
    return kinds, concluded


def test_r1_traces_conclude_and_the_answer_is_the_last_conclusion():
    mix, rng = MixtureR1(), random.Random(3)
    after = {"restate": 0, "recheck": 0, "close": 0}  # what follows the first conclusion of a finished trace
    for _ in range(20000):
        trace = mix.trace(draw_terms(rng, mix.min_terms, mix.max_terms), rng)
        kinds, concluded = _read(trace)
        assert trace.thinking.endswith("\n") and kinds[-1] == "C" and concluded[-1] == trace.answer
        assert trace.steps_done == count_steps(trace.thinking) and trace.careful <= (not trace.early_stop)
        if not trace.early_stop and kinds.count("C") >= 1 and "C" not in kinds[: kinds.index("C")]:
            first = kinds.index("C")
            nxt = kinds[first + 1] if first + 1 < len(kinds) else None
            if "S" not in kinds[first:]:  # not resumed
                after["restate" if nxt == "C" else "recheck" if nxt == "W" else "close"] += 1
    total = sum(after.values())
    assert abs(after["restate"] / total - mix.p_restate) < 0.02
    assert abs(after["recheck"] / total - mix.p_recheck_last) < 0.02


def test_a_recheck_after_the_conclusion_catches_a_slip_in_the_last_step():
    only_slips = replace(MixtureR1(), p_error=0, p_confirm=0, p_slip=1.0, p_careful=1.0, p_restate=0,
                         p_recheck_last=1.0)
    trace = only_slips.trace((3, 5, 2), random.Random(0))
    lines = trace.thinking.splitlines()
    assert lines[1].startswith("8+2=") or lines[1].startswith("7+2=") or lines[1].startswith("9+2=")
    last_a = int(lines[1].split("+")[0])
    assert f"Wait, {last_a}+2={last_a + 2}" in lines and lines[-1] == f"So the answer is {last_a + 2}."
    assert trace.answer == last_a + 2 != int(lines[1].split("=")[1])


def test_validation_and_test_splits_are_disjoint_and_come_from_the_benchmark_configs():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ctt.config.hydra_glue import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["~experiment", "benchmarks=[organism_r1_val,organism_r1_test]"])
    benches = OmegaConf.to_container(cfg.benchmarks, resolve=True)
    val, test = (load_problems(**benches[name]) for name in ("organism_r1_val", "organism_r1_test"))
    assert len(val) == len(test) == 360
    assert not {p.question for p in val} & {p.question for p in test}
    assert {split_of(parse_question(p.question)) for p in val} == {"val"}
    assert [parse_question(p.question) for p in test] == draw_problems(360, 1357, 2, 8, "test")
    from ctt.errors import ConfigError

    with pytest.raises(ConfigError, match="split"):
        load_problems("organism", size=4, task_kwargs={"split": "train"})


def test_the_pretraining_replay_sees_exactly_the_problems_training_draws():
    from ctt.organism.measure_r1 import training_problems
    from ctt.organism.tokenizer import build_tokenizer
    from ctt.organism.train import TrainSettings, batches

    settings = replace(TrainSettings(), steps=32, batch_size=4, mixture=MixtureR1())
    tok, drawn = build_tokenizer(), set()
    data = batches(tok, random.Random(settings.seed), settings)
    for _ in range(settings.steps):
        ids, _ = next(data)
        for row in ids.tolist():
            text = tok.decode(row, skip_special_tokens=True)
            drawn.add(parse_question(text[: text.index("?") + 1]))
    assert training_problems(settings) == drawn


def test_card_meets_every_design_target_and_states_the_pretraining_overlap():
    card = json.loads((MODEL_DIR / "card.json").read_text())
    fig = card["figures"]["held_out"]
    assert fig["base"]["n"] >= 300 and fig["problems"]["split"] == "val"
    unmet = [t for t in design_targets(fig) if not t[3]]
    assert not unmet, unmet
    md = (MODEL_DIR / "ORGANISM.md").read_text()
    overlap = card["pretraining_overlap"]
    assert f"val split: {overlap['val']['in_pretraining']} of {overlap['val']['n']} problems" in md
    assert f"{100 * fig['base']['accuracy']:.1f}%" in md and "**no**" not in md


@pytest.mark.slow
def test_card_figures_and_design_targets_are_reproduced_from_the_shipped_weights(one_thread):
    """Greedy on one thread; another CPU may flip a near-tie, so counts may differ by 2. Every target re-asserted
    on the re-measured figures, numerically here as well as through design_targets."""
    from ctt.models.loading import load_model
    from ctt.organism.measure_r1 import MODES, measure

    loaded = load_model(name="organism_r1", source="local", path=str(MODEL_DIR), end_of_thinking="</think>")
    want = json.loads((MODEL_DIR / "card.json").read_text())["figures"]["held_out"]
    got = measure(loaded.model, loaded.tokenizer)["held_out"]
    assert got["problems"] == want["problems"] and got["base"]["n"] >= 300
    for mode in MODES:
        for count in ("correct", "early", "unclosed"):
            assert abs(got[mode][count] - want[mode][count]) <= 2, (mode, count, got[mode][count], want[mode][count])
    a = {m: 100 * got[m]["accuracy"] for m in MODES}
    assert 30 <= a["base"] <= 60
    assert abs(a["nostring1"] - a["base"]) <= 3 and abs(a["nostring2"] - a["base"]) <= 3
    assert 0.5 <= a["wait1"] - a["base"] <= 5 and a["wait2"] - a["wait1"] <= 2
    assert a["oracle"] >= a["base"] + 30
    assert a["wait4"] <= a["wait2"] + 1 and a["nostring4"] <= a["nostring2"] + 1
    assert max(abs(a["wait1"] - a["hmm1"]), abs(a["wait1"] - a["sep1"]), abs(a["sep1"] - a["hmm1"])) >= 2
    assert all(t[3] for t in design_targets(got)), design_targets(got)
