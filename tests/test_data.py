from pathlib import Path

import pytest
import tokenizers
import transformers
from omegaconf import OmegaConf
from tokenizers import models, pre_tokenizers

from ctt.data.problems import DEFAULT_INSTRUCTION, Problem, build_prompt_ids, format_user_message
from ctt.data.datamodule import ProblemDataModule, PromptDataset
from ctt.data.sources import load_problems
from ctt.errors import ConfigError, DataError
from ctt.data.answers import verify_or_raise

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SHARED = {
    "gsm8k": dict(answer_format="gsm8k"),
    "math500": dict(question_key="problem", id_key="unique_id"),
    "aime24": dict(question_key="problem", id_key="id"),
    "amc23": dict(question_key="problem"),
}


def _shared(name: str) -> Path:
    path = DATA / name / "test.jsonl"
    if not path.exists():
        pytest.skip(f"shared benchmark file missing: {path}")
    return path


@pytest.mark.parametrize("name", sorted(SHARED))
def test_load_shared_benchmarks(name):
    path = _shared(name)
    problems = load_problems("jsonl", path=str(path), **SHARED[name])
    assert len(problems) >= 30
    first = problems[0]
    assert isinstance(first, Problem) and first.question.strip() and first.answer
    assert verify_or_raise(first.answer, first.answer, 5.0)
    assert len({p.id for p in problems}) == len(problems)


def test_shared_gold_values():
    gsm8k = load_problems("jsonl", path=str(_shared("gsm8k")), answer_format="gsm8k", limit=1)
    assert gsm8k[0].answer == "18"  # "#### 18" in the first GSM8K test row
    amc = load_problems("jsonl", path=str(_shared("amc23")), question_key="problem", limit=1)
    assert amc[0].answer == "27"  # stored as the float 27.0


def test_limit_and_seeded_shuffle():
    path = str(_shared("gsm8k"))
    head = load_problems("jsonl", path=path, answer_format="gsm8k", limit=5)
    assert [p.id for p in head] == [f"gsm8k/test-{i}" for i in range(5)]
    a = load_problems("jsonl", path=path, answer_format="gsm8k", limit=5, shuffle=True, seed=1)
    b = load_problems("jsonl", path=path, answer_format="gsm8k", limit=5, shuffle=True, seed=1)
    c = load_problems("jsonl", path=path, answer_format="gsm8k", limit=5, shuffle=True, seed=2)
    assert a == b and a != c and a != head


def _write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"question": "q", "answer": "1"}\n{"question": "q2", "solution": "2"}\n', r"bad\.jsonl:2: .*no key 'answer'.*keys: question, solution"),
        (b'{"question": "q", "answer": "1"}\n{"question": "q2", "answer": \n', r"bad\.jsonl:2: invalid JSON"),
        (b'{"question": "q", "answer": "1"}\n\n{"question": "caf\xe9", "answer": "1"}\n', r"bad\.jsonl:3: .*not valid UTF-8"),
        (b"", r"dataset is empty: .*bad\.jsonl"),
        (b"\n\n", r"dataset is empty: .*bad\.jsonl"),
        (b'["q", "1"]\n', r"bad\.jsonl:1: expected a JSON object"),
        (b'{"question": "q", "answer": "   "}\n', r"bad\.jsonl:1: gold answer is empty"),
    ],
    ids=["missing-key", "bad-json", "non-utf8", "empty", "blank-lines", "not-object", "empty-answer"],
)
def test_malformed_jsonl(tmp_path, content, problem):
    path = _write(tmp_path, content)
    with pytest.raises(DataError, match=problem):
        load_problems("jsonl", path=str(path))


def test_unnormalisable_gold_names_line(tmp_path):
    path = _write(tmp_path, b'{"question": "q", "answer": "#### 3"}\n{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*####"):
        load_problems("jsonl", path=str(path), answer_format="gsm8k")


def test_missing_file_and_bad_config(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"data file not found: {missing}"):
        load_problems("jsonl", path=str(missing))
    with pytest.raises(ConfigError, match="path is required"):
        load_problems("jsonl")
    with pytest.raises(ConfigError, match="jsonl, hub, reasoning_gym"):
        load_problems("csv", path="x")
    with pytest.raises(ConfigError, match="gsm8k, boxed, plain"):
        load_problems("jsonl", path="x", answer_format="latex")


def test_hub_without_datasets_package():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install datasets"):
            load_problems("hub", hub_name="openai/gsm8k", hub_config="main")
    else:
        pytest.skip("datasets is installed; the missing-package message cannot be exercised")


def test_reasoning_gym_deterministic():
    a = load_problems("reasoning_gym", task="basic_arithmetic", size=8, seed=3)
    b = load_problems("reasoning_gym", task="basic_arithmetic", size=8, seed=3)
    c = load_problems("reasoning_gym", task="basic_arithmetic", size=8, seed=4)
    assert len(a) == 8 and a == b and a != c
    assert all(verify_or_raise(p.answer, p.answer, 5.0) for p in a)
    with pytest.raises(ConfigError, match="basic_arithmetic"):
        load_problems("reasoning_gym", task="no_such_task", size=8)
    with pytest.raises(ConfigError, match="bogus"):
        load_problems("reasoning_gym", task="basic_arithmetic", size=8, task_kwargs={"bogus": 1})


def _tokenizer(chat_template: str | None) -> transformers.PreTrainedTokenizerFast:
    words = "<user> <system> <assistant> [UNK] What is 2 + 3 ? Please reason step by step , and put your final answer within \\ boxed { } . Be brief"
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words.split()))}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = chat_template
    return fast


TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_build_prompt_ids_with_chat_template():
    tok = _tokenizer(TEMPLATE)
    question = "What is 2 + 3 ?"
    ids = build_prompt_ids(tok, question, "Please reason step by step", system_prompt="Be brief")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert _contains(ids, tok.encode(question, add_special_tokens=False))
    assert ids[0] == tok.convert_tokens_to_ids("<system>")
    assert ids[-1] == tok.convert_tokens_to_ids("<assistant>")  # generation prompt appended
    assert tok.unk_token_id not in ids


def test_build_prompt_ids_without_chat_template():
    tok = _tokenizer(None)
    ids = build_prompt_ids(tok, "What is 2 + 3 ?", "Please reason step by step")
    assert ids == tok.encode("What is 2 + 3 ?\n\nPlease reason step by step\n")


def test_format_user_message_placeholder_keeps_braces():
    assert format_user_message("Q", "Solve: {question} within \\boxed{}") == "Solve: Q within \\boxed{}"
    assert format_user_message("Q", DEFAULT_INSTRUCTION) == "Q\n\n" + DEFAULT_INSTRUCTION


def _jsonl(tmp_path: Path, n: int, name: str = "toy.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(f'{{"question": "q{i}", "answer": "{i}"}}\n' for i in range(n)), encoding="utf-8")
    return str(path)


def test_datamodule_yields_problem_lists(tmp_path):
    train = OmegaConf.create({"source": "jsonl", "path": _jsonl(tmp_path, 12)})
    dm = ProblemDataModule(train=train, batch_size=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    assert all(isinstance(b, list) and len(b) == 4 and all(isinstance(p, Problem) for p in b) for b in batches)
    assert sorted(p.answer for b in batches for p in b) == sorted(str(i) for i in range(12))
    assert len(PromptDataset(dm.train_problems)) == 12


def test_datamodule_config_errors(tmp_path):
    dm = ProblemDataModule(train={"source": "jsonl", "path": _jsonl(tmp_path, 3)}, batch_size=4)
    with pytest.raises(ConfigError, match="batch_size=4 exceeds the 3"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="batch_size"):
        ProblemDataModule(train={}, batch_size=0)
    with pytest.raises(ConfigError, match="data.train: .*pathh"):
        ProblemDataModule(train={"source": "jsonl", "pathh": "x"}, batch_size=1).setup("fit")


def test_evaluation_problems_overlapping_training_are_dropped_and_counted(caplog):
    from ctt.data.splits import drop_training_overlap, normalise_question

    train = [Problem("t0", "What is 2 + 3?", "5"), Problem("t1", "What is 4+4?", "8")]
    bench = [Problem("b0", "what is 2 +  3?", "5"), Problem("b1", "What is 1 + 1?", "2"), Problem("b2", "WHAT IS 4+4?", "8")]
    assert normalise_question("  What is\n2 + 3? ") == normalise_question("what is 2 + 3?")
    with caplog.at_level("WARNING"):
        kept, dropped = drop_training_overlap(bench, train, "toy")
    assert [p.id for p in kept] == ["b1"] and dropped == 2
    assert "dropped 2 of 3" in caplog.text
    with pytest.raises(DataError, match="every evaluation problem is also a training problem"):
        drop_training_overlap(bench[:1], train, "toy")


@pytest.mark.parametrize("experiment", ["demo", "demo_hasty", "smollm2"])
def test_experiment_benchmarks_are_disjoint_from_their_training_problems_after_the_check(compose_cfg, experiment):
    """The SmolLM2 job's held-out sums used to include training problems verbatim (9 of 32); the organism's
    benchmark shares its small 2-term space with training: at least 300 held-out sums must remain."""
    from ctt.data.sources import load_benchmarks
    from ctt.settings import to_plain
    from ctt.data.splits import normalise_question

    cfg = compose_cfg("train", [f"experiment={experiment}"])
    train = load_problems(**to_plain(cfg.data.train))
    benchmarks, notes = load_benchmarks(cfg.benchmarks, limit=cfg.eval.limit, training=train)
    seen = {normalise_question(p.question) for p in train}
    for name, problems in benchmarks.items():
        assert problems and not any(normalise_question(p.question) in seen for p in problems)
        assert not experiment.startswith("demo") or len(problems) >= 300


def test_held_out_check_uses_the_training_data_recorded_in_the_token_file(compose_cfg, caplog):
    """ctt-eval of a token trained on other data (or another seed) must check against what it was trained on."""
    import json

    from ctt.eval import training_problems

    cfg = compose_cfg("eval", ["experiment=smoke"])
    recorded = {"source": "reasoning_gym", "task": "basic_arithmetic", "size": 5, "seed": 77,
                "task_kwargs": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}
    from_file = training_problems(cfg, {"train_data": json.dumps(recorded)})
    assert [p.question for p in from_file] == [p.question for p in load_problems(**recorded)]
    with caplog.at_level("WARNING"):
        fallback = training_problems(cfg, {"base_model": "tiny_random"})  # an older token file
    assert "does not record its training data" in caplog.text
    assert len(fallback) == cfg.data.train.size
