"""Hostile checkpoints (issue 11, items 1, 3, 4 and the checkpoint family): nothing in a checkpoint runs, whatever
its format; `ckpt_path=last` is the newest checkpoint of the run; a checkpoint of another run (base model, token,
hidden size, config) is refused with one line; a new run never overwrites an earlier run's checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ctt.errors import ConfigError
from tests.test_cli_errors import assert_user_error, run_main, smoke

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_DEEPSPEED = ["trainer=deepspeed_zero2", "trainer.accelerator=cpu", "trainer.devices=1",
                 "trainer.strategy._target_=tests.cpu_deepspeed.CPUDeepSpeedStrategy"]


class Payload:
    """Unpickling this calls `open(path, "w")`: it creates the file. A stand-in for any `__reduce__` payload."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _lightning_file(path: Path, payload: Path | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"global_step": 1, "state_dict": {"model.model.embed_tokens.row": torch.zeros(64)}}
    torch.save({**ckpt, "extra": Payload(payload)} if payload else ckpt, path)
    return path


def _deepspeed_dir(path: Path, payload: Path | None = None, where: str = "model", tag: str = "checkpoint") -> Path:
    """The layout Lightning's DeepSpeedStrategy writes: <dir>/latest naming <dir>/<tag>/ with the model states and one
    optimizer file per rank, saved in torch's legacy format as DeepSpeed does."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text(tag)
    model = {"module": {"model.model.embed_tokens.row": torch.zeros(64)}, "global_step": 1,
             "param_shapes": [{"model.model.embed_tokens.row": torch.Size([64])}]}
    optim = {"optimizer_state_dict": {"zero_stage": 2}, "ds_version": "0.19"}
    if payload is not None:
        (model if where == "model" else optim)["extra"] = Payload(payload)
    torch.save(model, path / "checkpoint" / "mp_rank_00_model_states.pt", _use_new_zipfile_serialization=False)
    torch.save(optim, path / "checkpoint" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
               _use_new_zipfile_serialization=False)
    return path


# --- item 1: nothing in a checkpoint runs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, trainer",
    [("file", []), ("file", CPU_DEEPSPEED), ("dir-model", CPU_DEEPSPEED), ("dir-optimizer", CPU_DEEPSPEED)],
    ids=["file", "file-deepspeed", "deepspeed-model-states", "deepspeed-optimizer-states"],
)
def test_a_code_payload_in_a_checkpoint_never_runs(tmp_path, capfd, layout, trainer):
    pytest.importorskip("deepspeed")
    marker = tmp_path / "payload-ran"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    if layout == "file":
        _lightning_file(last, marker)
    else:
        _deepspeed_dir(last, marker, where=layout.split("-")[1])
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "ckpt_path=last", *trainer), capfd=capfd)
    assert not marker.exists(), "the checkpoint's payload ran"
    assert_user_error(code, err, "ConfigError", "cannot be loaded with weights_only=True", "open object")


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda d: d.mkdir(parents=True), ["is an empty directory, not a DeepSpeed checkpoint"]),
        (lambda d: _deepspeed_dir(d, tag="../../elsewhere"), ["names '../../elsewhere'", "not a folder of this"]),
        (lambda d: (_deepspeed_dir(d), (d / "latest").unlink()), ["without a 'latest' file"]),
        (lambda d: _deepspeed_dir(d), ["is a DeepSpeed checkpoint (a directory)", "trainer=deepspeed_*"]),
        (lambda d: (d.parent.mkdir(parents=True), torch.save({"step": 3}, d)), ["not a Lightning checkpoint"]),
        (lambda d: (d.parent.mkdir(parents=True), d.write_bytes(b"\x00" * 64)), ["cannot be loaded"]),
    ],
    ids=["empty-dir", "tag-outside", "no-latest", "deepspeed-dir-cpu-trainer", "not-lightning", "garbage"],
)
def test_unusable_checkpoints_are_one_line(tmp_path, capfd, make, needles):
    make(tmp_path / "run" / "checkpoints" / "last.ckpt")
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "ckpt_path=last"), capfd=capfd)
    assert_user_error(code, err, "ConfigError", *needles)


@pytest.mark.parametrize("which, needle", [("empty", "ckpt_path is empty"), ("tree", "without a 'latest' file")])
def test_a_checkpoint_path_that_is_no_checkpoint(tmp_path, capfd, which, needle):
    """`ckpt_path=''` used to mean the working directory; a directory tree is not searched for *.pt files."""
    (tmp_path / "deep" / "er").mkdir(parents=True)
    torch.save({"x": 1}, tmp_path / "deep" / "er" / "unrelated.pt")
    path = "''" if which == "empty" else str(tmp_path)
    code, _, err = run_main("ctt.train", *smoke(tmp_path, f"ckpt_path={path}"), capfd=capfd)
    assert_user_error(code, err, "ConfigError", needle)


def test_a_token_file_passed_as_checkpoint(tmp_path, capfd):
    from ctt.models.token import save_token_file

    token = save_token_file(tmp_path / "t.safetensors", torch.zeros(64), {"base_model": "tiny_random"})
    code, _, err = run_main("ctt.train", *smoke(tmp_path, f"ckpt_path={token}"), capfd=capfd)
    assert_user_error(code, err, "ConfigError", "is a safetensors file (a token file?", f"token.path={token}")


def test_a_file_checkpoint_under_a_deepspeed_trainer(tmp_path, capfd):
    _lightning_file(tmp_path / "run" / "checkpoints" / "last.ckpt")
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "ckpt_path=last", *CPU_DEEPSPEED), capfd=capfd)
    assert_user_error(code, err, "ConfigError", "is a single-file checkpoint")


# --- items 3 and 4: which checkpoint, and whether it belongs to this run -----------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run dir after 2 steps of experiment=smoke (checkpoint every step)."""
    base = tmp_path_factory.mktemp("trained")
    code, _, _ = run_main("ctt.train", *smoke(base, "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1"),
                          capfd=None)
    assert code == 0
    return base / "run"


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (copy / ".ctt.lock").unlink(missing_ok=True)
    return copy


def test_a_new_run_does_not_overwrite_an_earlier_runs_checkpoints(run_dir, capfd):
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    code, _, err = run_main("ctt.train", *smoke(run_dir.parent, "seed=7"), capfd=capfd)
    assert_user_error(code, err, "ConfigError", "already holds checkpoints of an earlier run", "ckpt_path=last")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config  # the run's config is still its own


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["model.name=other_tiny"], ["trained on base model 'tiny_random', not 'other_tiny'", "allow_base_mismatch"]),
        (["token.text='<|other|>'"], ["trained the token '<|continue-thinking|>', not token.text='<|other|>'"]),
        (["rl.temperature=0.5", "seed=3"], ["written with another config", "rl.temperature: 1.0 -> 0.5",
                                            "seed: 0 -> 3", "resume_mismatch=allow"]),
        (["data.batch_size=1"], ["written with another config", "data.batch_size: 2 -> 1"]),
        (["model.tiny.hidden_size=32", "resume_mismatch=allow"], ["hidden size 64, but the model has 32"]),
    ],
    ids=["base-model", "token-text", "config", "data", "hidden-size"],
)
def test_a_checkpoint_of_another_run_is_refused(run_dir, capfd, overrides, needles):
    code, _, err = run_main("ctt.train", *smoke(run_dir.parent, "ckpt_path=last", "trainer.max_steps=3", *overrides),
                            capfd=capfd)
    assert_user_error(code, err, "ConfigError", *needles)


def test_resume_mismatch_allow_resumes_with_a_warning(run_dir, capfd):
    code, _, err = run_main("ctt.train", *smoke(run_dir.parent, "ckpt_path=last", "trainer.max_steps=3",
                                                "callbacks.model_checkpoint.every_n_train_steps=1",
                                                "rl.temperature=0.5", "resume_mismatch=allow"), capfd=capfd)
    assert code == 0, err[-3000:]
    assert "resuming anyway (resume_mismatch=allow)" in err
    # (A copied run dir: Lightning writes last-v1.ckpt beside last.ckpt; `last` is the one of the highest step.)
    steps = [torch.load(p, weights_only=True)["global_step"] for p in (run_dir / "checkpoints").glob("last*.ckpt")]
    assert max(steps) == 3


def test_checkpoints_carry_the_base_model_and_token(compose_cfg, run_dir):
    """The module saves what it trains (`ctt` in the checkpoint) and checks it when Lightning loads one directly."""
    from ctt.training.module import build_module

    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["ctt"] == {"base_model": "tiny_random", "pretrained": None, "token": "<|continue-thinking|>",
                            "hidden_size": 64, "count": 1, "base_fingerprint": saved["ctt"]["base_fingerprint"]}
    assert len(saved["ctt"]["base_fingerprint"]) == 64  # sha256 of the base weights (tests/test_fingerprint.py)
    cfg = compose_cfg("train", ["experiment=smoke", "model.name=another", f"paths.output_dir={run_dir}"])
    with pytest.raises(ConfigError, match="trained on base model 'tiny_random', not 'another'"):
        build_module(cfg).on_load_checkpoint(saved)
