"""The vLLM engine from the command line: a missing vLLM or a model vLLM cannot serve is one line (exit 2), and
`ctt-eval engine=vllm` of the main job's token writes the results `engine=hf` writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_vllm
from tests.test_cli_errors import ONE_THREAD, ROOT, assert_user_error, run_main, smoke

pytestmark = pytest.mark.usefixtures("one_thread")


def test_engine_vllm_without_vllm_is_one_line_before_anything_loads(tmp_path):
    """vLLM hidden from the interpreter (sys.modules['vllm'] = None, as a failed install would leave it): the
    start-up check names the problem and the fix."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")
    env = {**ONE_THREAD, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), str(ROOT)])}
    commands = {"ctt.train": smoke(tmp_path / "train", "engine=vllm"),
                "ctt.eval": ["experiment=smoke", "engine=vllm", f"hydra.run.dir={tmp_path / 'eval'}"]}
    for module, overrides in commands.items():
        proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        line = assert_user_error(proc.returncode, proc.stderr, "ConfigError", "needs vLLM", "pip install vllm")
        assert "engine=hf" in line
        assert "Loading" not in proc.stderr  # refused before any model was loaded


def test_a_model_vllm_cannot_serve_is_one_line(tmp_path, capfd):
    """The tiny random model's attention heads are 16 wide: vLLM's CPU attention has no kernel for that."""
    need_vllm()
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "engine=vllm"), capfd=capfd)
    assert_user_error(code, err, "ModelError", "vLLM cannot serve this model", "head_dim=16", "engine=hf")


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


@pytest.mark.slow
def test_ctt_eval_with_vllm_writes_the_results_of_ctts_engine(tmp_path):
    """A short main-job training run, then `ctt-eval` of its token with each engine: the same results.csv and
    comparisons.csv, row for row (greedy; base, fixed words, no string and learned at N = 0, 1, 2)."""
    need_vllm()
    run = tmp_path / "train"
    train = subprocess.run([sys.executable, "-m", "ctt.train", f"hydra.run.dir={run}", "trainer.max_steps=6",
                            "evaluate=false"], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    token = run / "continue_thinking_token.safetensors"
    for engine in ("hf", "vllm"):
        proc = subprocess.run(
            [sys.executable, "-m", "ctt.eval", "experiment=demo", f"engine={engine}", f"token.path={token}",
             f"hydra.run.dir={tmp_path / engine}", "eval.num_continuations=[0,1,2]"],
            cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(tmp_path / "vllm" / "results.csv") == _rows(tmp_path / "hf" / "results.csv")
    assert _rows(tmp_path / "vllm" / "comparisons.csv") == _rows(tmp_path / "hf" / "comparisons.csv")
    modes = {r["mode"] for r in _rows(tmp_path / "hf" / "results.csv")}
    assert {"base", "learned", "no_string"} <= modes and len(modes) >= 5, modes
