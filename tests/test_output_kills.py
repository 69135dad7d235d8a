"""A SIGKILL at a random point of a `ctt-export` or a `ctt-generate` that replaces an earlier output leaves that
output whole: the earlier version or the complete new one, never a mix, a truncation or a missing folder; the next
run cleans up the temp siblings (ctt.outputs). As tests/test_resume.py does for training: the command runs as a
subprocess, killed after a random delay once its temp sibling exists (the write phase), several times."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from ctt.outputs import MARKER
from tests.test_export import tiny_config, write_token_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
KILLS = 3

pytestmark = pytest.mark.slow


def whole(folder: Path, rename: tuple[str, str] = ("", "")) -> dict[str, object]:
    """Every file of a folder (the marker's time stamp aside; JSON files parsed: safetensors metadata, which they
    quote, comes back in any order), with the text `rename[0]` replaced by `rename[1]`."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MARKER:
            data = p.read_bytes().replace(rename[0].encode(), rename[1].encode()) if rename[0] else p.read_bytes()
            files[str(p.relative_to(folder))] = json.loads(data) if p.suffix == ".json" else data
    return files


def command(module: str, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", module, "experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]


def run(args: list[str]) -> None:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_while_writing(args: list[str], writing: Callable[[], bool], rng: random.Random) -> None:
    """Start the command, wait until it is `writing` (or ends), then SIGKILL it after 0-1.5 s."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
    while proc.poll() is None and not writing() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 1.5))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and not p.name.endswith(".lock"))


def test_a_killed_export_leaves_the_earlier_folder_whole(tmp_path):
    tokens = [write_token_file(tmp_path / f"t{i}" / "continue_thinking_token.safetensors",
                               tiny_config(True, 0, None)) for i in (0, 1)]
    # a second token file with another row: the new export differs from the old in its weights
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(tokens[1]), framework="pt") as f:
        meta = f.metadata()
    save_file({"embedding": load_file(tokens[1])["embedding"] * 1.5}, str(tokens[1]), metadata=meta)
    out, ref = tmp_path / "hf", tmp_path / "ref"
    export = lambda tok, target, i: command("ctt.export", tmp_path / f"run{i}", f"token.path={tok}",  # noqa: E731
                                            f"export.dir={target}", "export.overwrite=true")
    run(export(tokens[0], out, "a"))
    run(export(tokens[1], ref, "b"))
    versions = [whole(out), whole(ref, (str(ref), str(out)))]
    assert versions[0] != versions[1]
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for k in range(KILLS):
        kill_while_writing(export(tokens[1], out, f"k{k}"), lambda: bool(list(tmp_path.glob(".hf.tmp-*"))), rng)
        assert out.is_dir() and whole(out) in versions, f"kill {k}: the export folder is not one whole version"
        assert json.loads((out / MARKER).read_text())["kind"] == "export"
    run(export(tokens[0], out, "again"))
    assert whole(out) == versions[0] and leftovers(tmp_path, "hf") == []


def test_a_killed_generate_leaves_the_earlier_output_whole(tmp_path):
    token = write_token_file(tmp_path / "continue_thinking_token.safetensors", tiny_config(True, 0, None))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {i} + {i}?"}) + "\n" for i in range(12)))
    out, ref = tmp_path / "o.jsonl", tmp_path / "ref.jsonl"
    generate = lambda source, target, i: command(  # noqa: E731
        "ctt.generate", tmp_path / f"run{i}", f"token.path={token}", f"generate.output={target}",
        *(["generate.prompt=x"] if source is None else [f"generate.input={source}"]))
    run(generate(None, out, "a"))
    run(generate(prompts, ref, "b"))
    versions = [out.read_bytes(), ref.read_bytes()]
    assert len(versions[1].splitlines()) == 12
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for k in range(KILLS):
        stamp = out.stat().st_mtime_ns
        started = lambda: bool(list(tmp_path.glob(".o.jsonl.tmp-*"))) or out.stat().st_mtime_ns != stamp  # noqa: E731
        kill_while_writing(generate(prompts, out, f"k{k}"), started, rng)
        assert out.read_bytes() in versions, f"kill {k}: the output is not one whole version"
    run(generate(None, out, "again"))
    assert out.read_bytes() == versions[0] and leftovers(tmp_path, "o.jsonl") == []
