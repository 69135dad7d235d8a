"""ctt-generate and the Python API: streaming equals the rendered text, a token file and its exported folder answer
alike, prompts from every input kind, one-line errors."""

from __future__ import annotations

import io
import json
import sys

import pytest

from ctt import ContinueThinking
from ctt.api import compose_config
from ctt.policy.build import policy_from_config
from ctt.export import ExportSettings, export, export_info
from ctt.models.loading import LoadedModel
from ctt.policy.policy import ForcingSettings, Policy
from tests.conftest import tiny
from tests.test_cli_errors import assert_user_error, run_main
from tests.test_export import tiny_config, write_token_file

PROMPTS = ["What is 2+3?", "x", "Compute 17*3 and explain.", "ok so"]
MODES = ["learned", "fixed:Wait", "no_string", "base", "filler:. x3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def streamed(ct: ContinueThinking, prompt: str, mode: str, n: int = 2):
    pieces: list[str] = []
    completion = ct.stream(prompt, pieces.append, mode=mode, num_continuations=n)
    return "".join(pieces), completion


@pytest.mark.parametrize("mode", MODES)
def test_streamed_text_equals_the_rendered_completion(mode):
    ct = ContinueThinking.from_config(tiny_config(False, 8, None))
    batch = ct.generate(PROMPTS, mode=mode, num_continuations=2)
    for prompt, whole in zip(PROMPTS, batch):
        text, one = streamed(ct, prompt, mode)
        assert text == one.completion == whole.completion
    if mode != "base":
        assert any(c.forced for c in batch) and all(c.completion.count("[[") == c.forced for c in batch)


@pytest.mark.parametrize("mode", ["learned", "no_string", "fixed:Wait"])
def test_streaming_holds_back_a_multi_token_marker_until_it_is_settled(mode):
    """Marker "</think></think>" (two tokens; this model emits </think> again and again): the engine feeds its first
    token, then removes both. The streamer writes a token only once the next one shows it was not the start of a
    removed marker; writing it at once would put a "</think>" before every mark."""
    loaded = tiny(boost=2.0)
    marker = loaded.tokenizer.convert_tokens_to_ids("</think>")
    loaded = LoadedModel(loaded.model, loaded.tokenizer, "tiny_random", [marker, marker])
    ct = ContinueThinking(Policy(loaded, ForcingSettings(max_new_tokens=24, max_answer_tokens=6), "Answer."))
    text, completion = streamed(ct, "hello there", mode, n=3)
    assert completion.forced == 3 and text == completion.completion
    assert text.startswith("[[")


def test_api_two_lines_from_a_token_file_and_from_its_exported_folder(tmp_path):
    token = write_token_file(tmp_path / "continue_thinking_token.safetensors", tiny_config(True, 0, None))
    ct = ContinueThinking.from_token_file("tiny_random", token)
    out = ct.generate(["What is 2+3?", "ok so"], mode="learned", num_continuations=2)
    assert [set(c.to_dict()) for c in out] == [{"prompt", "completion", "answer_text", "answer", "mode",
                                                "num_continuations", "forced", "thinking_tokens", "answer_tokens",
                                                "total_tokens", "stop_reason"}] * 2
    assert out[0].prompt == "What is 2+3?" and out[0].mode == "learned" and out[0].forced == 2
    cfg = compose_config("tiny_random")
    cfg.token.path = str(token)
    policy, meta = policy_from_config(cfg)
    export(policy, ExportSettings(str(tmp_path / "hf")), export_info(cfg, policy, meta))
    again = ContinueThinking.from_exported(tmp_path / "hf").generate(["What is 2+3?", "ok so"], num_continuations=2)
    assert [c.to_dict() for c in again] == [c.to_dict() for c in out]  # the overlay and the merged row agree
    meta = ContinueThinking.from_exported(tmp_path / "hf").meta  # the token file's, for ctt-eval's held-out check
    assert meta["exported_from"] == str(tmp_path / "hf") and meta["step"] == "12" and meta["init_word"] == "Wait"


def _cli(tmp_path, capfd, *overrides: str):
    token = tmp_path / "continue_thinking_token.safetensors"
    if not token.exists():
        write_token_file(token, tiny_config(True, 0, None))
    return run_main("ctt.generate", "experiment=smoke", f"token.path={token}", f"hydra.run.dir={tmp_path}/run",
                    *overrides, capfd=capfd)


def test_ctt_generate_streams_to_stdout_and_writes_jsonl(tmp_path, capfd, monkeypatch):
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": PROMPTS[0]}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    code, _, err = _cli(tmp_path, capfd, f"generate.input={tmp_path}/p.jsonl", f"generate.output={tmp_path}/o.jsonl")
    assert code == 0, err[-3000:]
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [PROMPTS[0], "x"] and records[0]["num_continuations"] == 2
    code, out, err = _cli(tmp_path, capfd, f"generate.prompt='{PROMPTS[0]}'")
    assert code == 0, err[-3000:]
    header, rest = out.split("\n", 1)
    assert header == f"=== [1/1] {PROMPTS[0]}"
    text, footer = rest.rsplit("\n--- answer: ", 1)
    assert text == records[0]["completion"] and f"continuations inserted: {records[0]['forced']}/2" in footer
    (tmp_path / "p.txt").write_text("x\n\nok so\n")
    code, out, err = _cli(tmp_path, capfd, f"generate.input={tmp_path}/p.txt", "generate.stream=false")
    assert code == 0 and out.count("=== [") == 2 and "=== [2/2] ok so" in out, err[-3000:]
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\n"))
    code, out, err = _cli(tmp_path, capfd, "generate.input=-", "generate.mode=fixed:Wait",
                          "generate.num_continuations=1")
    assert code == 0 and out.startswith("=== [1/1] x\n") and "/1 |" in out, err[-3000:]


def test_ctt_generate_loads_an_exported_folder(tmp_path, capfd):
    token = write_token_file(tmp_path / "continue_thinking_token.safetensors", tiny_config(True, 0, None))
    code, _, err = run_main("ctt.export", "experiment=smoke", f"token.path={token}", f"export.dir={tmp_path}/hf",
                            f"hydra.run.dir={tmp_path}/run", capfd=capfd)
    assert code == 0, err[-3000:]
    code, out, err = run_main("ctt.generate", "experiment=smoke", "model=exported", f"model.path={tmp_path}/hf",
                              "generate.prompt=x", f"hydra.run.dir={tmp_path}/run2", capfd=capfd)
    assert code == 0 and "--- answer:" in out, err[-3000:]
    code, out2, err = _cli(tmp_path, capfd, "generate.prompt=x")
    assert out2 == out  # the token file on the base model answers exactly like its exported folder


def test_ctt_generate_bad_input_is_one_line(tmp_path, capfd):
    (tmp_path / "bad.jsonl").write_text('{"text": "no question"}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    cases = {
        ("generate.prompt=x", f"generate.input={tmp_path}/p.txt"): "give generate.prompt=TEXT or generate.input=FILE",
        (): "give generate.prompt=TEXT or generate.input=FILE",
        (f"generate.input={tmp_path}/missing.jsonl",): "data file not found",
        (f"generate.input={tmp_path}/bad.jsonl",): "bad.jsonl:1",
        (f"generate.input={tmp_path}/empty.txt",): "no prompts",
        (f"generate.input={tmp_path}/p.csv",): "must be a .txt or .jsonl file",
        ("generate.prompt=x", "generate.mode=nope"): "generate.mode kind must be one of base, no_string",
        ("generate.prompt=x", "generate.mode=fixed"): "needs its argument",
        ("generate.prompt=x", "generate.num_continuations=-1"): "num_continuations",
        ("generate.prompt=x", f"generate.output={tmp_path}/o.txt"): "must be a .jsonl file",
    }
    for overrides, needle in cases.items():
        code, _, err = _cli(tmp_path, capfd, *overrides)
        assert_user_error(code, err, needle)


@pytest.mark.parametrize("seed", ["-1", "abc", "4294967296"])
def test_ctt_generate_checks_the_seed_before_seeding(tmp_path, capfd, seed):
    """ctt-generate seeded before its config was checked: Lightning's traceback (or a warning and a random seed)."""
    code, _, err = _cli(tmp_path, capfd, f"seed={seed}", "generate.prompt=x")
    assert_user_error(code, err, "ConfigError", "seed")
