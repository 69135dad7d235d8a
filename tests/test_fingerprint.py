"""A token belongs to the weights it was trained on: token files, checkpoints and exported folders record a
fingerprint of the base weights themselves (ctt.models.token.base_fingerprint), and loading onto other weights with
the same config name is refused unless token.allow_base_mismatch=true."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file, save_file

from ctt.errors import ConfigError, ModelError, TokenFileError
from ctt.models.loading import load_model
from ctt.policy.build import EXPORT_INFO, policy_from_config
from tests.test_cli_errors import assert_user_error, run_main, smoke

pytestmark = pytest.mark.usefixtures("one_thread")
SMOKE = ["experiment=smoke", "evaluate=false", "trainer.max_steps=1", "callbacks.rollout_samples=null"]


def fingerprint(seed: int = 0, dtype: str = "float32") -> str:
    from ctt.models.token import base_fingerprint

    loaded = load_model(name="tiny_random", source="tiny_random", end_of_thinking="</think>", dtype=dtype,
                        tiny={"seed": seed})
    return base_fingerprint(loaded.model, len(loaded.tokenizer))


def test_fingerprints_tell_weights_apart_not_their_dtype_or_name():
    assert fingerprint(0) == fingerprint(0)
    assert fingerprint(0) != fingerprint(1)  # the same config name, other weights
    assert fingerprint(0, "bfloat16") == fingerprint(0)  # one base loaded in bf16 or fp32


def smoke_fingerprint(compose_cfg, *overrides: str) -> str:
    """The fingerprint ctt-eval computes for `experiment=smoke`'s tiny model (with `overrides`)."""
    return policy_from_config(compose_cfg("eval", ["experiment=smoke", *overrides]))[0].base_fingerprint


def train_module(compose_cfg, *overrides: str):
    from ctt.training.module import build_module

    return build_module(compose_cfg("train", [*SMOKE, *overrides]))


def test_the_token_file_records_the_base_weights_and_is_refused_on_others(compose_cfg, tmp_path, caplog):
    from callbacks.token_export import TokenExport
    from ctt.models.token import load_token_file

    module = train_module(compose_cfg)
    trainer = SimpleNamespace(is_global_zero=True, datamodule=None, global_step=1)
    TokenExport(str(tmp_path)).export(trainer, module)
    path = tmp_path / "continue_thinking_token.safetensors"
    meta = load_token_file(path)[1]
    assert meta["base_fingerprint"] == module.policy.base_fingerprint == smoke_fingerprint(compose_cfg)
    other = smoke_fingerprint(compose_cfg, "model.tiny.seed=1")

    def load(*overrides: str):
        return policy_from_config(compose_cfg("eval", ["experiment=smoke", f"token.path={path}", *overrides]))

    assert load()[0].base_fingerprint == meta["base_fingerprint"]
    with pytest.raises(TokenFileError) as err:
        load("model.tiny.seed=1")  # same model name, other weights
    assert meta["base_fingerprint"][:12] in str(err.value) and other[:12] in str(err.value)
    assert "token.allow_base_mismatch=true" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="ctt.models.token"):
        load("model.tiny.seed=1", "token.allow_base_mismatch=true")
    assert "loading it anyway" in caplog.text
    # a file written before fingerprints existed loads, with a warning
    embedding = load_file(str(path))["embedding"]
    old = tmp_path / "old.safetensors"
    save_file({"embedding": embedding}, str(old), metadata={k: v for k, v in meta.items() if k != "base_fingerprint"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctt.models.token"):
        policy_from_config(compose_cfg("eval", ["experiment=smoke", f"token.path={old}", "model.tiny.seed=1"]))
    assert "records no fingerprint" in caplog.text


def test_a_trained_token_file_on_other_weights_is_one_line_from_the_cli(tmp_path, capfd):
    code, _, err = run_main("ctt.train", *smoke(tmp_path), capfd=capfd)
    assert code == 0, err[-3000:]
    token = tmp_path / "run" / "continue_thinking_token.safetensors"
    code, _, err = run_main("ctt.eval", "experiment=smoke", f"token.path={token}", "model.tiny.seed=1",
                            f"hydra.run.dir={tmp_path}/eval", capfd=capfd)
    assert_user_error(code, err, "TokenFileError", "other base weights", "token.allow_base_mismatch=true")


def test_a_checkpoint_records_the_base_weights_and_is_refused_on_others(compose_cfg, caplog):
    module = train_module(compose_cfg)
    checkpoint = {"state_dict": module.state_dict()}  # what Lightning hands the hook (it keeps the row only)
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["ctt"]["base_fingerprint"]
    assert saved == smoke_fingerprint(compose_cfg)
    other = train_module(compose_cfg, "model.tiny.seed=1")
    with pytest.raises(ConfigError, match=f"other base weights .*{saved[:12]}.*{other.policy.base_fingerprint[:12]}"):
        other.on_load_checkpoint(checkpoint)
    train_module(compose_cfg, "model.tiny.seed=1", "token.allow_base_mismatch=true").on_load_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)
    del checkpoint["ctt"]["base_fingerprint"]  # a checkpoint written before fingerprints existed
    with caplog.at_level(logging.WARNING, logger="ctt.models.token"):
        other.on_load_checkpoint(checkpoint)
    assert "records no fingerprint" in caplog.text


@pytest.fixture
def exported_k(tmp_path):
    """`exported_k(k)`: a tiny model's k-token hf export (of a token file from before fingerprints: the export
    records the fingerprint of the weights it is written from)."""
    from ctt.export import ExportSettings, export, export_info
    from ctt.models.token import save_token_file
    from tests.test_export import tiny_config

    def make(count: int) -> Path:
        extra = (f"token.count={count}",)
        policy, _ = policy_from_config(tiny_config(True, 0, None, extra=extra))
        token = save_token_file(tmp_path / f"k{count}.safetensors", policy.row.detach() + 0.1,
                                {"base_model": "tiny_random"})
        cfg = tiny_config(True, 0, token, extra=extra)
        policy, meta = policy_from_config(cfg)
        out = tmp_path / f"hf{count}"
        export(policy, ExportSettings(str(out), "hf"), export_info(cfg, policy, meta))
        return out

    return make


def load_exported(folder: Path, *overrides: str):
    from ctt.api import compose_config

    return policy_from_config(compose_config(str(folder), ["model.end_of_thinking='</think>'", *overrides]))


@pytest.mark.parametrize("count, text", [(3, None), (1, None), (1, "<|other|>")],
                         ids=["k3", "k1", "k1-other-text"])
def test_an_exported_folder_without_its_info_is_never_used_as_learned(exported_k, count, text):
    folder = exported_k(count)
    info = json.loads((folder / EXPORT_INFO).read_text())
    assert load_exported(folder)[0].token_ids == tuple(info["token_ids"])
    (folder / EXPORT_INFO).unlink()  # the marker is then given by hand
    with pytest.raises(ModelError, match=f"has no {EXPORT_INFO}"):
        load_exported(folder, *([f"token.text='{text}'"] if text else []))


def test_an_exported_folder_whose_weights_were_replaced_is_refused(exported_k, tmp_path):
    folder = exported_k(1)
    recorded = json.loads((folder / EXPORT_INFO).read_text())["base_fingerprint"]
    assert recorded == load_exported(folder)[0].base_fingerprint
    weights = load_file(str(folder / "model.safetensors"))
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key][:10] += 0.5  # the vocabulary's rows of other weights; the learned row untouched
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="other base weights"):
        load_exported(folder)
    load_exported(folder, "token.allow_base_mismatch=true")


@pytest.fixture(scope="module")
def retrained_organism(tmp_path_factory) -> tuple[Path, Path]:
    """(the shipped organism folder, a copy of it retrained for one step with --no-measure)."""
    from ctt.organism.__main__ import main

    shipped = Path(__file__).resolve().parents[1] / "ctt" / "organism" / "model"
    out = tmp_path_factory.mktemp("organism") / "org"
    shutil.copytree(shipped, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["--out", str(out), "--steps", "1", "--no-measure"])
    finally:
        torch.set_num_threads(threads)
    return shipped, out


def test_organism_no_measure_into_a_measured_folder_leaves_no_stale_card(retrained_organism):
    """(Already so before the fingerprint: the folder is swapped in whole.) A short retrain with --no-measure over a
    measured organism writes new weights and a card without figures, and no ORGANISM.md of the old model."""
    shipped, out = retrained_organism
    assert not (out / "ORGANISM.md").exists()
    assert json.loads((out / "card.json").read_text())["figures"] is None
    assert (out / "model.safetensors").read_bytes() != (shipped / "model.safetensors").read_bytes()
    assert "ORGANISM.md" not in json.loads((out / ".ctt-output.json").read_text())["files"]


def test_a_token_of_the_shipped_organism_is_refused_on_a_retrained_one(retrained_organism, tmp_path):
    from ctt.api import compose_config
    from ctt.models.token import save_token_file

    _, out = retrained_organism
    policy, _ = policy_from_config(compose_config("organism"))
    token = save_token_file(tmp_path / "t.safetensors", policy.row.detach(),
                            {"base_model": "organism", "base_fingerprint": policy.base_fingerprint})
    with pytest.raises(TokenFileError, match="other base weights"):  # model=organism, its folder retrained
        policy_from_config(compose_config("organism", [f"token.path={token}", f"model.path={out}"]))
    assert policy_from_config(compose_config("organism", [f"token.path={token}"]))[0].base_fingerprint


@pytest.mark.parametrize("text", ["{not json", "[]", "{}"])
def test_an_unreadable_export_info_is_one_line(exported_k, text):
    folder = exported_k(1)
    (folder / EXPORT_INFO).write_text(text)
    with pytest.raises(ModelError, match=EXPORT_INFO):
        load_exported(folder)


@pytest.mark.parametrize("name, damage", [("config.json", "garble"), ("tokenizer.json", "garble"),
                                          ("tokenizer_config.json", "garble"), ("model.safetensors", "truncate"),
                                          ("model.safetensors", "garble"), ("model.safetensors", "/dev/zero")])
def test_a_damaged_exported_folder_is_one_line(exported_k, name, damage):
    """transformers', tokenizers' and safetensors' tracebacks (a bare Exception from tokenizers) became one line; a
    shard linked to /dev/zero is refused by its stat, never read."""
    folder = exported_k(1)
    path = folder / name
    if damage == "garble":
        path.write_text('{"not": json')
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.unlink()
        path.symlink_to(damage)
    with pytest.raises(ModelError, match="a device, FIFO or socket" if damage == "/dev/zero" else "cannot be loaded"):
        load_exported(folder)


def test_a_token_text_the_base_model_already_holds_is_not_evaluated_as_learned(compose_cfg):
    """Without ctt_export.json, a token.text the tokenizer holds (here the marker) is no learned row: refused (it
    was used as "learned" as it was)."""
    with pytest.raises(ModelError, match=f"holds the token.s. </think> but has no {EXPORT_INFO}"):
        policy_from_config(compose_cfg("eval", ["experiment=smoke", "token.text='</think>'"]))


def test_a_hand_written_export_info_beside_weights_without_the_token_is_refused(tmp_path):
    """A ctt_export.json written (or copied) by hand beside base weights that do not hold its token: the fresh,
    untrained row it would install was evaluated and generated from as "learned"."""
    folder = tmp_path / "fake-export"
    shutil.copytree(Path(__file__).resolve().parents[1] / "ctt" / "organism" / "model", folder)
    (folder / EXPORT_INFO).write_text(json.dumps({"base_fingerprint": "deadbeef", "end_of_thinking": "</think>",
                                                  "tokens": ["<|continue-thinking|>"]}))
    with pytest.raises(ModelError, match="its tokenizer does not hold it"):
        load_exported(folder)
    (folder / EXPORT_INFO).write_text(json.dumps({"base_fingerprint": "deadbeef", "end_of_thinking": "</think>"}))
    with pytest.raises(ModelError, match="its tokenizer does not hold it"):  # no "tokens": the default text
        load_exported(folder)


@pytest.mark.parametrize("field, value", [("tokens", 5), ("tokens", []), ("tokens", [1]), ("tokens", ["a"] * 65),
                                          ("token_metadata", "x"), ("token_metadata", [1]),
                                          ("end_of_thinking", 7), ("base_fingerprint", ["deadbeef"])])
def test_a_tampered_export_info_field_is_one_line(exported_k, field, value):
    folder = exported_k(1)
    info = json.loads((folder / EXPORT_INFO).read_text())
    (folder / EXPORT_INFO).write_text(json.dumps({**info, field: value}))
    with pytest.raises(ModelError, match=f"{EXPORT_INFO}: '{field}' must be"):
        load_exported(folder)
