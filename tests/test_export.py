"""ctt-export: the exported folders work without ctt, token for token.

For a tied and an untied tiny model, each with and without spare embedding rows: the `hf` folder, loaded by plain
transformers in a subprocess that never imports ctt (tests/plain_transformers.py), runs s1-style budget forcing
(stop at the marker, append the token id, continue; N = 1, 2) and produces, greedily, exactly the tokens of ctt's own
learned-mode rollout on the base model with the token file. The same subprocess checks that greedy `generate` never
emits the token, runs the model card's code, and loads the `peft` adapter on the base model (same logits).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from ctt.api import compose_config
from ctt.policy.build import policy_from_config
from ctt.data.problems import Problem, format_user_message
from ctt.export import ExportSettings, export, export_info
from ctt.engine import SamplingConfig
from ctt.models.loading import load_model
from ctt.policy.modes import Mode
from ctt.models.token import load_token_file, save_token_file
from tests.test_cli_errors import assert_user_error, run_main
from tests.test_models import needs_wheel

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is 2+3?", "x", "Compute 17*3 and explain.", "ok so"]
LIMITS = {"max_new_tokens": 40, "max_answer_tokens": 12}
CASES = [(tie, spare) for tie in (True, False) for spare in (0, 8)]
# boost/seed/initializer_range: a random model that emits </think> in some rows and not in others
TINY = {"end_of_thinking_boost": 2.0, "seed": 2, "initializer_range": 0.1}

pytestmark = pytest.mark.usefixtures("one_thread")


def case_id(case) -> str:
    return f"{'tied' if case[0] else 'untied'}-{'spare' if case[1] else 'resized'}"


def tiny_config(tie: bool, spare: int, token_path: Path | None, n: int = 2, extra: tuple[str, ...] = ()):
    model = {"name": "tiny_random", "source": "tiny_random", "end_of_thinking": "</think>",
             "tiny": TINY | {"tie_word_embeddings": tie, "spare_rows": spare}}
    forcing = [f"forcing.{k}={v}" for k, v in (LIMITS | {"num_continuations": n}).items()]
    cfg = compose_config(model, forcing + ["prompt.instruction=Answer.", *extra])
    with open_dict(cfg):
        cfg.token.path = str(token_path) if token_path else None
    return cfg


def write_token_file(path: Path, cfg) -> Path:
    """A 'trained' row for the model of `cfg`: the "Wait" initialisation moved by a fixed random step."""
    policy, _ = policy_from_config(cfg)
    gen = torch.Generator().manual_seed(7)
    row = policy.row.detach()
    vector = row + 0.5 * row.norm() * torch.randn(row.shape, generator=gen) / row.shape[0] ** 0.5
    return save_token_file(path, vector, {"token": "<|continue-thinking|>", "base_model": cfg.model.name,
                                          "init": "word", "init_word": "Wait", "step": 12})


def ctt_rollouts(cfg, n: int):
    policy, _ = policy_from_config(cfg)
    problems = [Problem(str(i), q, "") for i, q in enumerate(QUESTIONS)]
    return policy.rollout(problems, policy.forcing(Mode("learned", None, n)), SamplingConfig(temperature=0.0))


@lru_cache(maxsize=1)
def exported(root: str) -> dict:
    """Every case's token file, hf folder, peft adapter and base folder, and the plain-transformers results (one
    subprocess for all)."""
    root, cases, meta = Path(root), [], {}
    for tie, spare in CASES:
        d = root / case_id((tie, spare))
        token = write_token_file(d / "continue_thinking_token.safetensors", tiny_config(tie, spare, None))
        base = load_model(**tiny_config(tie, spare, None).model)
        base.model.save_pretrained(d / "base")
        base.tokenizer.save_pretrained(d / "base")
        for fmt in ("hf", "peft"):
            cfg = tiny_config(tie, spare, token)
            policy, token_meta = policy_from_config(cfg)
            export(policy, ExportSettings(str(d / fmt), fmt), export_info(cfg, policy, token_meta))
        messages = [format_user_message(q, "Answer.") for q in QUESTIONS]
        for n in (1, 2):
            cases.append({"folder": str(d / "hf"), "messages": messages, "n": n, "max_new": LIMITS["max_new_tokens"],
                          "max_answer": LIMITS["max_answer_tokens"], "checks": n == 2, "card": n == 2, "tied": tie,
                          **({"peft": str(d / "peft"), "base": str(d / "base")} if n == 2 else {})})
            meta[(tie, spare, n)] = (len(cases) - 1, token)
    results = run_plain(root, cases)
    return {key: (results[i], token) for key, (i, token) in meta.items()}


def run_plain(root: Path, cases: list[dict]) -> list[dict]:
    """tests/plain_transformers.py on `cases`, in a fresh interpreter that never imports ctt."""
    job, out = root / "job.json", root / "out.json"
    job.write_text(json.dumps({"cases": cases}))
    env = {"OMP_NUM_THREADS": "1", "PATH": "", "HF_HUB_OFFLINE": "1", "HOME": str(Path.home())}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "plain_transformers.py"), str(job), str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["cases"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict:
    return exported(str(tmp_path_factory.mktemp("export")))


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_plain_transformers_on_the_hf_folder_reproduces_ctt_rollouts(plain, case, n):
    tie, spare = case
    result, token = plain[(tie, spare, n)]
    ours = ctt_rollouts(tiny_config(tie, spare, token, n), n)
    assert result["prompts"] == [r.prompt_ids for r in ours]  # the folder's tokenizer and chat template
    assert [r["completion"] for r in result["rollouts"]] == [r.completion_ids for r in ours]
    assert [r["forced"] for r in result["rollouts"]] == [r.num_forced for r in ours]
    assert any(r.num_forced == n for r in ours), "the marker should be replaced N times in some rows"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hf_folder_holds_the_token_as_a_special_token_in_a_spare_or_new_row(plain, case):
    tie, spare = case
    result, _ = plain[(tie, spare, 2)]
    tokenizer_size = 262  # 261 byte/special tokens + the new one
    assert result["token_id"] == tokenizer_size - 1 and result["special"] and result["tied"] == tie
    assert result["rows"] == (tokenizer_size - 1 + spare if spare else tokenizer_size)  # spare: shape unchanged
    assert result["token_id"] < result["rows"]
    assert result["suppress_tokens"] == [result["token_id"]]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_greedy_generate_never_emits_the_token_and_untied_rows_keep_it_below_every_logit(plain, case):
    tie, spare = case
    result, _ = plain[(tie, spare, 2)]
    assert not result["emitted"]
    if not tie:  # the calibrated output row alone keeps its logit below the lowest other one, on unseen prompts
        assert result["min_margin_without_suppression"] > 0, result["min_margin_without_suppression"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_peft_adapter_on_the_base_model_gives_the_merged_logits(plain, case):
    result, _ = plain[(*case, 2)]
    assert result["peft_max_diff"] < 1e-4
    assert result["base_max_diff"] > 1e-3  # the base model alone differs: the adapter's row is what matters


def test_model_card_records_the_recipe_and_its_code_runs(plain, tmp_path):
    result, token = plain[(False, 0, 2)]
    assert result["card_output"].strip()
    card = (token.parent / "hf" / "README.md").read_text()
    for needle in ("tiny_random", "<|continue-thinking|>", "id 261", "`</think>` (ids [260])", "N = 2",
                   "suppress_tokens: [261]", "step: `12`", "resized from 261 rows"):
        assert needle in card, needle
    assert "PeftModel.from_pretrained" in (token.parent / "peft" / "README.md").read_text()
    adapter = json.loads((token.parent / "peft" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "TRAINABLE_TOKENS" and adapter["token_indices"] == [261]


def test_k_learned_tokens_export_and_plain_transformers_reproduce_ctt_rollouts(tmp_path):
    """token.count=2: the file holds [2, hidden], ctt-eval/generate install 2 tokens from it (whatever token.count
    says), the hf folder holds both as special tokens in spare rows, and the s1 loop appending both ids (and the
    model card's code) reproduces ctt's greedy learned-mode rollouts."""
    token = write_token_file(tmp_path / "k2.safetensors", tiny_config(True, 8, None, extra=("token.count=2",)))
    assert load_token_file(token)[0].shape == (2, 64) and load_token_file(token)[1]["count"] == "2"
    cfg = tiny_config(True, 8, token)
    policy, token_meta = policy_from_config(cfg)
    assert policy.token_ids == (261, 262) and policy.row.shape == (2, 64)
    export(policy, ExportSettings(str(tmp_path / "hf"), "hf"), export_info(cfg, policy, token_meta))
    info = json.loads((tmp_path / "hf" / "ctt_export.json").read_text())
    assert info["token_ids"] == [261, 262] and info["tokens"] == ["<|continue-thinking-1|>", "<|continue-thinking-2|>"]
    messages = [format_user_message(q, "Answer.") for q in QUESTIONS]
    [result] = run_plain(tmp_path, [{"folder": str(tmp_path / "hf"), "messages": messages, "n": 2, "card": True,
                                     "max_new": LIMITS["max_new_tokens"], "max_answer": LIMITS["max_answer_tokens"]}])
    ours = ctt_rollouts(tiny_config(True, 8, token), 2)
    assert [r["completion"] for r in result["rollouts"]] == [r.completion_ids for r in ours]
    assert result["rows"] == 261 + 8 and result["card_output"].strip()
    pairs = [sum(r.completion_ids[i:i + 2] == [261, 262] for i in range(len(r.completion_ids))) for r in ours]
    assert pairs == [r.num_forced for r in ours] and any(pairs), "each continuation is both tokens, in order"


def test_tied_token_that_would_win_is_suppressed_by_the_generation_config(tmp_path):
    """A tied table makes the token's output row its learned input row: point it at the greedy token and scale it,
    and plain greedy `generate` would pick it at every step; the folder's generation config stops that."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(True, 0, None)
    policy, _ = policy_from_config(cfg)
    prompt = policy.prompt_ids(Problem("0", QUESTIONS[0], ""))
    with torch.no_grad():
        top = policy.model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax()
    token = save_token_file(tmp_path / "t.safetensors", 10 * policy.model.get_output_embeddings().weight[top],
                            {"base_model": "tiny_random"})
    with open_dict(cfg):
        cfg.token.path = str(token)
    policy, meta = policy_from_config(cfg)
    export(policy, ExportSettings(str(tmp_path / "hf")), export_info(cfg, policy, meta))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    x = torch.tensor([prompt])
    free = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, suppress_tokens=None)
    assert 261 in free[0, len(prompt):].tolist()  # without suppression the token would be sampled
    kept = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    assert 261 not in kept[0, len(prompt):].tolist()


def test_ctt_export_command_and_its_bad_input(tmp_path, capfd):
    token = write_token_file(tmp_path / "tok.safetensors", tiny_config(True, 0, None))
    common = ("experiment=smoke", f"token.path={token}", f"hydra.run.dir={tmp_path}/run")
    code, out, err = run_main("ctt.export", *common, f"export.dir={tmp_path}/hf", capfd=capfd)
    assert code == 0, err[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file() and str(tmp_path / "hf") in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp")]  # written through a temp dir
    runs = {}
    sources = {"file": (f"token.path={token}",), "folder": ("model=exported", f"model.path={tmp_path}/hf")}
    for name, model in sources.items():
        code, _, err = run_main("ctt.eval", "experiment=smoke", *model, f"hydra.run.dir={tmp_path}/eval-{name}",
                                capfd=capfd)
        assert code == 0, err[-3000:]
        samples = (tmp_path / f"eval-{name}" / "samples.jsonl").read_text().splitlines()
        runs[name] = [(r["mode"], r["completion"]) for r in map(json.loads, samples)]
    assert runs["folder"] == runs["file"]  # ctt-eval of the exported folder = of the token file on the base model
    bad = {
        (f"export.dir={tmp_path}/hf",): "exists and is not empty",
        (f"export.dir={tmp_path}/x", "export.format=gguf"): "export.format must be one of hf, peft",
        ("export.dir=null",): "export.dir",
    }
    for overrides, needle in bad.items():
        code, _, err = run_main("ctt.export", *common, *overrides, capfd=capfd)
        assert_user_error(code, err, needle)
    code, _, err = run_main("ctt.export", "experiment=smoke", f"export.dir={tmp_path}/y", capfd=capfd)
    assert_user_error(code, err, "token.path")
    code, _, err = run_main("ctt.export", "model=exported", f"model.path={tmp_path}/hf", f"token.path={token}",
                            f"export.dir={tmp_path}/z", capfd=capfd)
    assert_user_error(code, err, "already holds the token")


def export_both_formats(tmp_path: Path, cfg):
    """A 'trained' token file for the model of `cfg` (then in cfg.token.path), exported as an hf folder and a PEFT
    adapter under tmp_path; returns the policy the export was made from."""
    token = write_token_file(tmp_path / "continue_thinking_token.safetensors", cfg)
    with open_dict(cfg):
        cfg.token.path = str(token)
    for fmt in ("hf", "peft"):
        policy, meta = policy_from_config(cfg)
        export(policy, ExportSettings(str(tmp_path / fmt), fmt), export_info(cfg, policy, meta))
    return policy


def learned_rollouts(cfg, questions: list[str], n: int = 2):
    """ctt's own greedy learned-mode rollouts of `questions`."""
    policy, _ = policy_from_config(cfg)
    problems = [Problem(str(i), q, "") for i, q in enumerate(questions)]
    return policy.rollout(problems, policy.forcing(Mode("learned", None, n)), SamplingConfig(temperature=0.0))


@pytest.mark.slow
@needs_wheel
def test_smollm2_exported_folder_reproduces_ctt_rollouts_with_plain_transformers(tmp_path):
    """The real model (tied, no spare row, marker = end of sequence): the same checks as the tiny models, and the
    streamed text of ctt-generate's API equals its rendered text with a real BPE tokenizer."""
    from ctt import ContinueThinking

    smol_limits = {"max_new_tokens": 64, "max_answer_tokens": 16}
    limits = [f"forcing.{k}={v}" for k, v in (smol_limits | {"num_continuations": 2}).items()]
    cfg = compose_config("smollm2_135m", limits)
    policy = export_both_formats(tmp_path, cfg)
    questions = ["Name a color.", "What is 5 times 6?"]  # forced twice / once within 64 tokens
    (result,) = run_plain(tmp_path, [{
        "folder": str(tmp_path / "hf"), "messages": [format_user_message(q, policy.instruction) for q in questions],
        "n": 2, "max_new": smol_limits["max_new_tokens"], "max_answer": smol_limits["max_answer_tokens"],
        "checks": True,
        "tied": True, "peft": str(tmp_path / "peft"), "base": str(Path(cfg.model.cache_dir) / "smollm2_135m-hf"),
    }])
    ours = learned_rollouts(cfg, questions)
    assert [r["completion"] for r in result["rollouts"]] == [r.completion_ids for r in ours]
    assert any(r.num_forced == 2 for r in ours)
    assert result["rows"] == result["tokenizer_size"] == result["token_id"] + 1 and result["special"]
    assert not result["emitted"] and result["suppress_tokens"] == [result["token_id"]]
    assert result["peft_max_diff"] < 1e-4 < result["base_max_diff"]
    ct = ContinueThinking.from_exported(tmp_path / "hf", limits)
    pieces: list[str] = []
    streamed = ct.stream(questions[0], pieces.append, num_continuations=2)
    assert "".join(pieces) == streamed.completion and streamed.forced == ours[0].num_forced


def test_organism_exported_folder_reproduces_ctt_rollouts_with_plain_transformers(tmp_path):
    """The model organism (untied, a padded table with spare rows, a real `</think>` marker): the hf folder keeps
    the table's shape, calibrates the untied output row, and plain transformers reproduce ctt's greedy rollouts;
    the PEFT adapter gives the merged logits."""
    limits = ["forcing.max_new_tokens=120", "forcing.max_answer_tokens=8", "forcing.num_continuations=2",
              "prompt=organism"]
    cfg = compose_config("organism", limits)
    policy = export_both_formats(tmp_path, cfg)
    questions = ["What is 3+5+2+7?", "What is 8+5+5+8+6+4?", "What is 6+7+1+7+6?", "What is 9+9?"]
    (result,) = run_plain(tmp_path, [{
        "folder": str(tmp_path / "hf"), "messages": [format_user_message(q, policy.instruction) for q in questions],
        "n": 2, "max_new": 120, "max_answer": 8, "checks": True, "tied": False, "peft": str(tmp_path / "peft"),
        "base": str(Path(cfg.model.path)),
    }])
    ours = learned_rollouts(cfg, questions)
    assert [r["completion"] for r in result["rollouts"]] == [r.completion_ids for r in ours]
    assert any(r.num_forced >= 1 for r in ours)
    assert result["rows"] == 320 > result["tokenizer_size"] and result["special"]  # a spare row, same shape
    assert not result["emitted"] and result["peft_max_diff"] < 1e-4 < result["base_max_diff"]
