"""Hostile input, issue 20 family 3: values that are finite but absurd. Rows of 1e30 or NaN (token file, checkpoint),
too many rows, a token.count the file disagrees with, a malformed `train_data` record, `seed=-1`,
`trainer.max_steps=1.5`, tampered checkpoints, and inputs that are devices or FIFOs (never read)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ctt.errors import ConfigError, TokenFileError
from tests.test_checkpoints import run_dir, trained  # noqa: F401 (fixtures: a 2-step smoke run dir)
from tests.test_cli_errors import assert_user_error, jsonl_data, run_main, smoke

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = 64  # experiment=smoke's tiny model


def _token(path: Path, tensor: torch.Tensor, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({"embedding": tensor}, str(path), metadata={"base_model": "tiny_random", **(meta or {})})
    return path


def _eval_policy(compose_cfg, *overrides: str):
    from ctt.policy.build import policy_from_config

    return policy_from_config(compose_cfg("eval", ["experiment=smoke", *overrides]))


# --- rows ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor, needles",
    [
        (torch.full((HIDDEN,), 1e30), ["a token row has norm 8e+30", "largest row norm of the model's embedding table"]),
        (torch.full((2, HIDDEN), 1e6), ["a token row has norm 8e+06"]),
        (torch.zeros(1000, HIDDEN), ["got [1000, 64]", "2 <= k <= 64"]),
    ],
    ids=["1e30", "k-rows-1e6", "1000-rows"],
)
def test_an_absurd_token_file_is_refused_before_it_is_installed(compose_cfg, tmp_path, tensor, needles):
    """Every path that brings a token file in (ctt-eval, ctt-export, ctt-generate, the API) builds its policy here."""
    path = _token(tmp_path / "t.safetensors", tensor)
    with pytest.raises(TokenFileError) as err:
        _eval_policy(compose_cfg, f"token.path={path}")
    assert str(path) in str(err.value) and all(n in str(err.value) for n in needles), err.value


def test_the_norm_bound_sits_between_a_trained_scale_row_and_an_absurd_one(compose_cfg, tmp_path):
    """The bound is relative to the model's own table: a row 100x its largest row norm (training warns there) loads,
    one 2000x it is refused."""
    from ctt.models.token import get_overlay

    table = get_overlay(_eval_policy(compose_cfg)[0].model).base.weight.detach()
    unit = table[5] / table[5].norm() * table.norm(dim=-1).max()
    policy, _ = _eval_policy(compose_cfg, f"token.path={_token(tmp_path / 'ok.safetensors', 100 * unit)}")
    assert torch.equal(policy.row.detach(), 100 * unit)
    with pytest.raises(TokenFileError, match="over 1000x the largest row norm"):
        _eval_policy(compose_cfg, f"token.path={_token(tmp_path / 'absurd.safetensors', 2000 * unit)}")


@pytest.mark.parametrize(
    "tamper, needles",
    [
        (lambda ck, key: ck["state_dict"][key].fill_(float("nan")), ["64 non-finite values"]),
        (lambda ck, key: ck["state_dict"][key].fill_(1e30), ["a token row has norm 8e+30"]),
        (lambda ck, key: ck["state_dict"].__setitem__(key, torch.zeros(2, HIDDEN)), ["shape [2, 64]", "is [64]"]),
        (lambda ck, key: ck["state_dict"].pop(key), ["holds no token row"]),
        (lambda ck, key: ck.pop("ctt"), ["has no ctt identity", "stripped"]),
    ],
    ids=["nan-row", "1e30-row", "row-shape", "no-row", "no-identity"],
)
def test_a_tampered_checkpoint_is_refused_on_resume(run_dir, capfd, tamper, needles):  # noqa: F811
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    [key] = [k for k in checkpoint["state_dict"] if k.endswith(".row")]
    tamper(checkpoint, key)
    torch.save(checkpoint, last)
    code, _, err = run_main("ctt.train", *smoke(run_dir.parent, "ckpt_path=last", "trainer.max_steps=3"), capfd=capfd)
    assert_user_error(code, err, "ConfigError", f"checkpoint {last}", *needles)


@pytest.mark.parametrize("field, value", [("hyper_parameters", [1, 2]), ("hyper_parameters", "x"),
                                          ("global_step", "abc"), ("global_step", -1), ("global_step", True),
                                          ("ctt_metrics_row", "x"), ("ctt_metrics_row", {"train/loss": "abc"}),
                                          ("loops", [1])])
def test_a_checkpoint_field_of_another_type_is_one_line(run_dir, capfd, field, value):  # noqa: F811
    """A list or string for hyper_parameters, a non-integer global_step or a string metrics row were TypeErrors
    in ctt's resume checks or deep in Lightning's loops."""
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint[field] = value
    torch.save(checkpoint, last)
    code, _, err = run_main("ctt.train", *smoke(run_dir.parent, "ckpt_path=last", "trainer.max_steps=3"), capfd=capfd)
    assert_user_error(code, err, "ConfigError", f"{last} has a tampered '{field}'")


def test_the_module_checks_a_row_lightning_loads_directly(compose_cfg, run_dir):  # noqa: F811
    """`trainer.fit(ckpt_path=...)` from Python: on_load_checkpoint checks the row before Lightning copies it."""
    from ctt.training.module import build_module

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for key in [k for k in checkpoint["state_dict"] if k.endswith(".row")]:
        checkpoint["state_dict"][key].fill_(float("nan"))
    module = build_module(compose_cfg("train", ["experiment=smoke", f"paths.output_dir={run_dir}"]))
    with pytest.raises(ConfigError, match="checkpoint being loaded: the token row has 64 non-finite values"):
        module.on_load_checkpoint(checkpoint)


# --- token.count ---------------------------------------------------------------------------------------------------


def test_a_token_count_the_file_contradicts_is_refused(compose_cfg, tmp_path):
    path = _token(tmp_path / "k2.safetensors", torch.zeros(2, HIDDEN))
    with pytest.raises(TokenFileError, match=r"holds 2 learned token\(s\) but token.count=3; set token.count=2"):
        _eval_policy(compose_cfg, f"token.path={path}", "token.count=3")


def test_the_default_token_count_takes_the_files_and_records_it(tmp_path, capfd, monkeypatch):
    """token.count is 1 unless set: a k-row file then installs k tokens, and the eval run's config says k, so that
    ctt-report labels the run by what it evaluated."""
    import ctt.eval

    monkeypatch.setattr(ctt.eval, "evaluate_policy", lambda *args: [])  # the count is decided before evaluating
    path = _token(tmp_path / "k2.safetensors", torch.zeros(2, HIDDEN))
    code, _, err = run_main("ctt.eval", "experiment=smoke", f"token.path={path}", f"hydra.run.dir={tmp_path}/e",
                            capfd=capfd)
    assert code == 0, err[-3000:]
    saved = OmegaConf.load(tmp_path / "e" / ".hydra" / "config.yaml")
    assert saved.token.count == 2 and "recorded as token.count=2" in err
    # the same evaluation again is the same run (not one of another config, in a subfolder of its own)
    code, _, err = run_main("ctt.eval", "experiment=smoke", f"token.path={path}", f"hydra.run.dir={tmp_path}/e",
                            capfd=capfd)
    assert code == 0 and not (tmp_path / "e" / "eval").exists(), err[-3000:]


# --- train_data metadata --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, needle",
    [
        ("{source: jsonl", "its train_data metadata: invalid JSON"),
        ('[{"source": "organism"}]', "train_data must be a mapping of load_problems settings"),
        ('{"source": "organism", "rows": 5}', "unknown key(s) train_data.rows"),
        ('{"source": "organism", "size": "many"}', "train_data.size must be an integer"),
        ('{"source": "organism", "size": 1000000000}', "train_data.size must be an integer in [1, 1000000]"),
    ],
    ids=["not-json", "list", "unknown-key", "wrong-type", "10^9-problems"],
)
def test_a_malformed_train_data_record_is_one_line_naming_the_file(compose_cfg, monkeypatch, record, needle):
    import ctt.data.sources
    from ctt.eval import training_problems

    def generate(*_):  # never reached: the record is refused first (10**9 problems used to hang ctt-eval here)
        raise AssertionError("the training data was generated")

    monkeypatch.setitem(ctt.data.sources.SOURCES, "organism", generate)
    cfg = compose_cfg("eval", ["experiment=smoke", "token.path=/runs/a/t.safetensors"])
    with pytest.raises(TokenFileError) as err:
        training_problems(cfg, {"train_data": record})
    assert str(err.value).startswith("token file /runs/a/t.safetensors: ") and needle in str(err.value), err.value


def test_a_generated_problem_set_is_bounded_for_every_caller(monkeypatch):
    import ctt.data.sources
    from ctt.data.sources import load_problems

    monkeypatch.setattr(ctt.data.sources, "_organism_problems", lambda *_: pytest.fail("generated 10**9 problems"))
    with pytest.raises(ConfigError, match=r"data.size must be in \[1, 1000000\]"):
        load_problems("organism", size=10**9)


# --- seed and trainer integers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        ("seed=-1", "seed must be an integer in [0, 4294967295], got -1"),
        ("seed=4294967296", "seed must be an integer in [0, 4294967295]"),
        ("trainer.max_steps=1.5", "trainer.max_steps must be an integer, got 1.5"),
        ("trainer.accumulate_grad_batches=2.5", "trainer.accumulate_grad_batches must be an integer, got 2.5"),
        ("trainer.log_every_n_steps=0.5", "trainer.log_every_n_steps must be an integer or null, got 0.5"),
        ("trainer.num_nodes=true", "trainer.num_nodes must be an integer, got True"),
        ("data.train.size=1000000000", "data.train.size must be an integer in [1, 1000000]"),
    ],
)
def test_absurd_numbers_are_refused_at_start_up(tmp_path, capfd, monkeypatch, override, needle):
    import ctt.data.sources

    for name in ("_organism_problems", "_reasoning_gym_problems"):  # refused before any data is loaded (10**9 hung)
        monkeypatch.setattr(ctt.data.sources, name, lambda *_: pytest.fail("the training data was loaded"))
    code, _, err = run_main("ctt.train", *smoke(tmp_path, override), capfd=capfd)
    assert_user_error(code, err, "ConfigError", needle)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


# --- inputs that are not regular files -------------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path) -> Path:
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"  # opening it for reading would block until a writer comes: it must never be opened


@pytest.mark.parametrize("which", ["/dev/zero", "fifo"])
@pytest.mark.parametrize(
    "module, key, error",
    [("ctt.train", "ckpt_path", "ConfigError"), ("ctt.eval", "token.path", "TokenFileError"),
     ("ctt.train", "data", "DataError")],
    ids=["checkpoint", "token-file", "data-file"],
)
def test_a_device_or_fifo_is_refused_without_reading_it(tmp_path, capfd, fifo, which, module, key, error):
    path = "/dev/zero" if which == "/dev/zero" else str(fifo)
    overrides = jsonl_data(Path(path)) if key == "data" else [f"{key}={path}"]
    if module == "ctt.train":
        overrides = smoke(tmp_path, *overrides)
    else:
        overrides = ["experiment=smoke", f"hydra.run.dir={tmp_path}/e", *overrides]
    code, _, err = run_main(module, *overrides, capfd=capfd)
    assert_user_error(code, err, error, f"{path} is a device, FIFO or socket, not a regular file")


def test_an_oversized_input_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """The bounds are generous (1 GiB for a token file); a smaller one stands in for a 2 GiB file here."""
    from ctt.models.token import load_token_file
    from ctt import inputs

    path = _token(tmp_path / "t.safetensors", torch.zeros(HIDDEN))
    monkeypatch.setitem(inputs.MAX_BYTES, "token file", 100)
    with pytest.raises(TokenFileError, match=r"t.safetensors is \d+ bytes, over the 100-byte limit for a token file"):
        load_token_file(path)


def test_a_tampered_deepspeed_master_row_is_refused_on_resume(tmp_path, capfd):
    """ZeRO-1/2/3 resume the fp32 master copy in the optimizer states, not the module row checked before loading:
    the row is checked again as the strategy restored it (on_train_start), before any step uses it."""
    pytest.importorskip("deepspeed")
    from ctt.reliability.safe_load import load_pt
    from tests.test_checkpoints import CPU_DEEPSPEED

    args = ("engine=hf", "callbacks.model_checkpoint.every_n_train_steps=1", *CPU_DEEPSPEED)
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "trainer.max_steps=1", *args), capfd=capfd)
    assert code == 0, err[-3000:]
    [optim] = (tmp_path / "run" / "checkpoints" / "last.ckpt").rglob("*optim_states.pt")
    states = load_pt(optim, "optimizer states")
    groups = states["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    groups[0] = torch.full_like(groups[0].detach(), 1e30)
    torch.save(states, optim)
    code, _, err = run_main("ctt.train", *smoke(tmp_path, "trainer.max_steps=2", "ckpt_path=last", *args),
                            capfd=capfd)
    assert_user_error(code, err, "ConfigError", "checkpoint ", "last.ckpt: a token row has norm 8e+30")
