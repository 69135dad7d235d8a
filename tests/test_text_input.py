"""Hostile text input (issue 20, family 4): lone surrogates, non-UTF-8 stdin, deeply nested JSON, an over-long prompt
after good ones, a closed stdout. Every path reads text through ctt.text."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctt.errors import DataError
from tests.test_cli_errors import assert_user_error
from tests.test_generate import _cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
GOOD = b'{"question": "1+1?", "answer": "2"}\n'


@pytest.mark.parametrize("line, needle", [
    (b'{"question": "a\\ud800b", "answer": "2"}\n', "lone surrogate"),  # an escape json.loads accepts
    (b'{"question": "q", "answer": "2", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "nested too deeply"),
    (b'{"question": "q", "answer": ' + b"9" * 5000 + b"}\n", "invalid JSON"),  # over Python's int-digit limit
], ids=["surrogate", "deep", "huge-int"])
def test_a_bad_data_row_is_a_data_error_naming_its_line(tmp_path, line, needle):
    from ctt.data.sources import load_problems

    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + b"\n" + line)  # a blank line counts: the bad row is line 3
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{needle}"):
        load_problems("jsonl", path=str(path))


def test_generate_refuses_a_surrogate_prompt_before_answering_any(tmp_path, capfd):
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "x"}\n\n{"prompt": "bad \\udc80"}\n')
    code, out, err = _cli(tmp_path, capfd, f"generate.input={tmp_path}/p.jsonl")
    assert_user_error(code, err, "DataError", "p.jsonl:3", "lone surrogate")
    assert "=== [" not in out  # nothing was answered


def test_generate_refuses_non_utf8_stdin_naming_the_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x\n\ncaf\xe9\n"), encoding="utf-8"))
    code, out, err = _cli(tmp_path, capfd, "generate.input=-")
    assert_user_error(code, err, "DataError", "stdin:3", "not valid UTF-8")
    assert "=== [" not in out


@pytest.mark.parametrize("output", [False, True], ids=["stdout", "file"])
def test_generate_checks_every_prompt_before_the_first_is_answered(tmp_path, capfd, output):
    """The over-long prompt is the third line (after a blank one): named as p.txt:3, and nothing is answered or
    written, not even the prompt before it."""
    (tmp_path / "p.txt").write_text("x\n\n" + "y" * 5000 + "\n")
    out_file = tmp_path / "o.jsonl"
    code, out, err = _cli(tmp_path, capfd, f"generate.input={tmp_path}/p.txt",
                          *([f"generate.output={out_file}"] if output else []))
    assert_user_error(code, err, "DataError", "p.txt:3: its prompt is", "context of 4096")
    assert "=== [" not in out and not out_file.exists()


def test_json_line_cannot_fail_on_a_lone_surrogate():
    from ctt.text import json_line

    assert json_line({"a": "é"}) == '{"a": "é"}\n'  # non-ASCII kept as is
    line = json_line({"a": "x\ud800"})
    line.encode("utf-8")  # writable as UTF-8: the surrogate is escaped
    assert json.loads(line) == {"a": "x\ud800"}


def into_a_closed_pipe(tmp_path, module: str, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m <module> experiment=smoke <overrides>` with stdout a pipe whose reader is gone (every write to it
    fails with EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", module, "experiment=smoke", *overrides,
                               f"hydra.run.dir={tmp_path}/run"], stdout=write, stderr=subprocess.PIPE, cwd=tmp_path,
                              env=ENV, timeout=300)
    finally:
        os.close(write)


def test_export_into_a_closed_stdout_prints_no_logging_wall(tmp_path):
    """DeepSpeed (imported by accelerate inside save_pretrained) logs to stdout with a handler of its own: into a
    closed pipe each of its lines was logging's "--- Logging error ---" traceback (ctt.errors.guard_closed_stdout)."""
    from tests.test_export import tiny_config, write_token_file

    token = write_token_file(tmp_path / "continue_thinking_token.safetensors", tiny_config(True, 0, None))
    proc = into_a_closed_pipe(tmp_path, "ctt.export", f"token.path={token}", f"export.dir={tmp_path}/hf")
    err = proc.stderr.decode()
    assert proc.returncode == 141, err[-3000:]
    assert "Logging error" not in err and "Traceback" not in err, err[-3000:]
    assert (tmp_path / "hf" / "ctt_export.json").is_file()  # the export itself is whole


def test_generate_with_stdout_closed_is_one_line_unless_it_writes_a_file(tmp_path):
    """Started with fd 1 closed (`>&-`), Python's sys.stdout is None: ctt-generate raised AttributeError."""
    from tests.test_export import tiny_config, write_token_file

    token = write_token_file(tmp_path / "continue_thinking_token.safetensors", tiny_config(True, 0, None))
    command = [sys.executable, "-m", "ctt.generate", "experiment=smoke", f"token.path={token}", "generate.prompt=x"]

    def closed_stdout(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *extra], stderr=subprocess.PIPE, cwd=tmp_path, env=ENV, timeout=300,
                              preexec_fn=lambda: os.close(1))

    proc = closed_stdout(f"hydra.run.dir={tmp_path}/run")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "stdout is closed and generate.output is not set" in err
    proc = closed_stdout(f"hydra.run.dir={tmp_path}/run2", f"generate.output={tmp_path}/o.jsonl")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 1


def test_generate_into_a_closed_stdout_exits_quietly(tmp_path):
    """`ctt-generate ... | head`: the reader has gone; status 141 (128 + SIGPIPE, as the shell reports for
    coreutils), no traceback, no "Exception ignored" from the interpreter's last flush."""
    from tests.test_export import tiny_config, write_token_file

    token = write_token_file(tmp_path / "continue_thinking_token.safetensors", tiny_config(True, 0, None))
    (tmp_path / "p.txt").write_text("x\nok so\n")
    proc = into_a_closed_pipe(tmp_path, "ctt.generate", f"token.path={token}", f"generate.input={tmp_path}/p.txt")
    err = proc.stderr.decode()
    assert proc.returncode == 141, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err[-3000:]


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path, monkeypatch):
    """A file saved by Notepad starts with a BOM: it was kept in the first prompt (and made the first JSONL row
    invalid JSON, a CSV's first column misnamed)."""
    import io

    from ctt.text import jsonl_rows, read_csv, read_json, read_lines

    bom = "\ufeff".encode()
    (tmp_path / "p.txt").write_bytes(bom + b"first\nsecond\n")
    assert [text for _, text in read_lines(tmp_path / "p.txt")] == ["first", "second"]
    (tmp_path / "p.jsonl").write_bytes(bom + b'{"prompt": "a"}\n')
    assert [row for _, row in jsonl_rows(tmp_path / "p.jsonl")] == [{"prompt": "a"}]
    (tmp_path / "m.json").write_bytes(bom + b'{"a": 1}')
    assert read_json(tmp_path / "m.json") == {"a": 1}
    (tmp_path / "r.csv").write_bytes(bom + b"mode,accuracy\nbase,0.5\n")
    assert read_csv(tmp_path / "r.csv", required=("mode",)) == [{"mode": "base", "accuracy": "0.5"}]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeffx\n"))
    assert [text for _, text in read_lines("-")] == ["x"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bom + b"y\n")))
    assert [text for _, text in read_lines("-")] == ["y"]
    (tmp_path / "q.txt").write_bytes(b"a\n" + bom + b"b\n")  # only a leading mark is dropped
    assert [text for _, text in read_lines(tmp_path / "q.txt")] == ["a", "\ufeffb"]
