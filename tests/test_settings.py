"""Typed config groups (ctt.settings, ctt.config.check): unknown keys and wrong types anywhere in a composed config stop
`ctt-train` / `ctt-eval` at start-up with one line naming the key (exit status 2), before a model or data set is
loaded; every "must be one of" message comes from one helper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

from ctt.errors import ConfigError
from ctt.settings import Settings, check_kwargs, check_value, one_of
from tests.test_cli_errors import assert_user_error, run_main, smoke

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Inner(Settings):
    section: ClassVar[str] = "outer.inner"
    flag: bool = False


@dataclass(frozen=True)
class Outer(Settings):
    section: ClassVar[str] = "outer"
    count: int = 1
    rate: float = 0.5
    name: str | None = None
    kind: Literal["a", "b"] = "a"
    sizes: list[int] = (1,)
    inner: Inner | None = None


@pytest.mark.parametrize(
    "given, message",
    [
        ({"cuont": 2}, "unknown key(s) outer.cuont; valid keys of outer: count, inner, kind, name, rate, sizes"),
        ({"count": "abc"}, "outer.count must be an integer, got 'abc'"),
        ({"count": True}, "outer.count must be an integer, got True"),
        ({"count": 1.5}, "outer.count must be an integer, got 1.5"),
        ({"rate": "x"}, "outer.rate must be a number, got 'x'"),
        ({"name": 3}, "outer.name must be a text or null, got 3"),
        ({"kind": "c"}, "outer.kind must be one of a, b; got 'c'"),
        ({"sizes": [1, "x"]}, "outer.sizes[1] must be an integer, got 'x'"),
        ({"sizes": 3}, "outer.sizes must be a list of integers, got 3"),
        ({"inner": {"flg": True}}, "unknown key(s) outer.inner.flg; valid keys of outer.inner: flag"),
        ({"inner": {"flag": "yes"}}, "outer.inner.flag must be true or false, got 'yes'"),
    ],
)
def test_settings_reject_unknown_keys_and_wrong_types(given, message):
    with pytest.raises(ConfigError) as err:
        Outer.from_config(given)
    assert str(err.value) == message


def test_settings_build_nested_groups_and_widen_integers():
    got = Outer.from_config({"rate": 2, "inner": {"flag": True}, "name": None})
    assert got.rate == 2.0 and isinstance(got.rate, float) and got.inner == Inner(flag=True)


def test_keyword_groups_are_checked_against_the_signature():
    def load(source: str, *, limit: int | None = None, **ignored) -> None: ...

    assert check_kwargs(load, {"source": "x", "limit": 3}, "data.train") == {"source": "x", "limit": 3}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) data.train.lmit; valid keys of data.train: limit, source"):
        check_kwargs(load, {"source": "x", "lmit": 3}, "data.train")
    with pytest.raises(ConfigError, match="data.train.source is required"):
        check_kwargs(load, {}, "data.train")
    with pytest.raises(ConfigError, match="data.train.limit must be an integer or null, got 'all'"):
        check_kwargs(load, {"source": "x", "limit": "all"}, "data.train")


def test_one_of_is_the_one_message():
    assert one_of("rl.baseline", "none", ["none", "group_mean"]) == "none"
    with pytest.raises(ConfigError, match=r"^rl.baseline must be one of none, group_mean; got 'median'$"):
        one_of("rl.baseline", "median", ["none", "group_mean"])
    with pytest.raises(ConfigError, match="got \\['x'\\]"):
        one_of("k", ["x"], ["x"])
    assert check_value("k", float | None, None) is None


def test_no_hand_written_one_of_messages_are_left():
    """Every "must be one of" / "valid: ..." message in ctt/ comes from ctt.settings."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ctt"
    offenders = [
        f"{path.name}:{i}" for path in root.glob("*.py") if path.name != "settings.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "raise" in line and ("one of" in line or "valid:" in line or "valid sources" in line)
    ]
    assert not offenders, offenders


# --- the whole composed config, through the entry points ---------------------------------------------------------


@pytest.mark.parametrize(
    "override, needles",
    [
        ("+forcing.bar=2", ["unknown key(s) forcing.bar", "valid keys of forcing:", "max_new_tokens"]),
        ("+forcing.engine.x=1", ["unknown key(s) forcing.engine.x", "share_prefix"]),
        ("forcing.engine.cache=paged", ["forcing.engine.cache must be one of buffer, dynamic, static", "'paged'"]),
        ("+model.foo=1", ["unknown key(s) model.foo", "valid keys of model:", "end_of_thinking"]),
        ("+model.tiny.x=1", ["unknown key(s) model.tiny.x", "hidden_size"]),
        ("model.tiny.hidden_size=abc", ["model.tiny.hidden_size must be an integer", "'abc'"]),
        ("model.name=' '", ["model.name must be a non-blank text"]),
        ("+model.attn_implementation=bogus", ["model.attn_implementation must be one of eager,", "sdpa", "'bogus'"]),
        ("model.dtype=float64", ["model.dtype must be one of bfloat16, float16, float32", "'float64'"]),
        ("+token.init.x=1", ["unknown key(s) token.init.x; valid keys of token.init: name, word"]),
        ("+token.foo=1", ["unknown key(s) token.foo"]),
        ("token.text=''", ["token.text must be a non-blank text", "''"]),
        ("token.text=' '", ["token.text must be a non-blank text", "' '"]),
        ("token.text=null", ["token.text must be a text, got None"]),
        ("seed=abc", ["seed must be an integer, got 'abc'"]),
        ("evaluate=maybe", ["evaluate must be true or false"]),
        ("resume_mismatch=sometimes", ["resume_mismatch must be one of refuse, allow"]),
        ("eval.num_continuations=[-1]", ["eval.num_continuations", "integers from 0 to 1024", "[-1]"]),
        ("eval.num_continuations=[one]", ["eval.num_continuations[0] must be an integer", "'one'"]),
        ("eval.temperature=abc", ["eval.temperature must be a number, got 'abc'"]),
        ("eval.samples=0", ["eval.samples must be an integer from 1 to 65536, got 0"]),
        ("eval.modes=[bogus]", ["eval.modes kind must be one of base, no_string, fixed, filler, learned", "'bogus'"]),
        ("eval.modes=[filler:x]", ["filler mode needs '<text>x<m>'"]),
        ("eval.limit=0", ["eval.limit must be an integer >= 1 or null"]),
        ("+eval.foo=1", ["unknown key(s) eval.foo"]),
        ("+prompt.foo=1", ["unknown key(s) prompt.foo"]),
        ("distributed.zero3_gather_max_memory_fraction=2", ["distributed.zero3_gather_max_memory_fraction"]),
        ("+data.train.foo=1", ["unknown key(s) data.train.foo", "task_kwargs"]),
        ("data.train.size=abc", ["data.train.size must be an integer, got 'abc'"]),
        ("data.train.source=nope", ["data.train.source must be one of jsonl, hub, reasoning_gym", "'nope'"]),
        ("+data.foo=1", ["unknown key(s) data.foo", "batch_size"]),
        ("+benchmarks.arith_easy.foo=1", ["unknown key(s) benchmarks.arith_easy.foo"]),
        ("+benchmarks.extra.size=3", ["benchmarks.extra has no source (it sets only size)"]),
        ("trainer.max_steps=0", ["trainer.max_steps=0 trains nothing"]),
        ("rl.temperature=0", ["rl.temperature must be a number > 0"]),
        ("rl.reward=nope", ["rl.reward must be one of math_verify", "'nope'"]),
        ("+data.num_workers=-1", ["data.num_workers must be an integer >= 0, got -1"]),
        ("callbacks.token_export.every_n_steps=abc", ["callbacks.token_export.every_n_steps must be an integer"]),
        ("+callbacks.token_export.foo=1", ["unknown key(s) callbacks.token_export.foo", "every_n_steps"]),
        ("+plugins.checkpoint_io.weights_only=maybe", ["plugins.checkpoint_io.weights_only must be true or false"]),
        ("scheduler=cosine scheduler.T_max=abc", ["scheduler.T_max must be an integer, got 'abc'"]),
        ("+optimizer.foo=1", ["unknown key(s) optimizer.foo; valid keys of optimizer:", "weight_decay"]),
        ("optimizer=sgd optimizer.momentum=abc", ["optimizer.momentum must be a number, got 'abc'"]),
    ],
)
def test_config_family_is_one_line_at_start_up(tmp_path, capfd, monkeypatch, override, needles):
    import ctt.train

    def must_not_run(cfg):  # the check comes first: no model, data or trainer is built
        raise AssertionError("training started")

    monkeypatch.setattr(ctt.train, "train", must_not_run)
    overrides = [override] if "'" in override else override.split()  # (quoted values hold spaces)
    code, _, err = run_main("ctt.train", *smoke(tmp_path, *overrides), capfd=capfd)
    assert_user_error(code, err, "ConfigError", *needles)


@pytest.mark.parametrize("override", ["eval.modes=[bogus]", "+forcing.bar=2", "eval.samples=0", "benchmarks=[]"])
def test_eval_checks_the_config_before_loading_anything(tmp_path, capfd, monkeypatch, override):
    import ctt.eval

    monkeypatch.setattr(ctt.eval, "load_policy", lambda cfg: (_ for _ in ()).throw(AssertionError("model loaded")))
    code, _, err = run_main("ctt.eval", "experiment=smoke", f"hydra.run.dir={tmp_path}/e", override, capfd=capfd)
    assert_user_error(code, err, "ConfigError")


@pytest.mark.parametrize("config_name", ["train", "eval"])
@pytest.mark.parametrize("experiment", ["smoke", "demo", "demo_hasty", "smollm2", "filler_debate", "paper_gsm8k"])
def test_every_shipped_experiment_passes_the_check(compose_cfg, config_name, experiment):
    from ctt.config.check import validate_config

    cfg = compose_cfg(config_name, [f"experiment={experiment}", "paths.output_dir=/tmp/unused"])
    validate_config(cfg)


@pytest.mark.parametrize("benchmarks", ["[gsm8k_local]", "[gsm8k_local,math500_local]", "[arith_easy]"])
def test_a_benchmark_list_composes_into_complete_entries(compose_cfg, benchmarks):
    """Item 10: `experiment=smoke "benchmarks=[gsm8k_local]"` used to leave a half-defined `arith_easy: {size: 4}`
    (set by the experiment) next to the chosen benchmark; evaluation then failed after training."""
    from ctt.config.check import check_problem_set

    cfg = compose_cfg("train", ["experiment=smoke", f"benchmarks={benchmarks}"])
    assert set(cfg.benchmarks) == {b.replace("_local", "") for b in benchmarks.strip("[]").split(",")}
    for name, spec in cfg.benchmarks.items():
        check_problem_set(dict(spec), f"benchmarks.{name}")


def test_a_whitespace_fixed_word_is_a_baseline_with_a_one_cell_label():
    """The organism's step separator "\\n" is a fixed-word baseline; its label stays one table cell / CSV field."""
    from ctt.policy.modes import expand_modes

    labels = [m.label for m in expand_modes(["base", "fixed"], [0, 1], ["Wait", "\n", " "])]
    assert labels == ["base", "fixed:Wait", "fixed:\\n", "fixed: "]
    with pytest.raises(ConfigError, match="non-empty word"):
        expand_modes(["fixed:"], [1])
