"""Which checkpoint a run resumes, and whether it may.

* `ckpt_path=last` is the newest checkpoint of the run dir: of every `last*.ckpt` in the checkpoint dir (Lightning's
  ModelCheckpoint writes `last-v1.ckpt` next to an existing `last.ckpt` in a new run) and Lightning's SLURM
  `hpc_ckpt_<n>.ckpt`, the one with the highest saved step, then the latest written.
* Every candidate is read with ctt.reliability.safe_load (nothing in it runs) before Lightning or DeepSpeed opens it.
* A checkpoint is refused when it does not fit (`check_fits`: another base model, token text or hidden size; also
  checked by the module's `on_load_checkpoint`), and when it was written with another config (`check_same_config`:
  the saved hyperparameters and data settings against the current ones), unless `resume_mismatch=allow`.
* A new run (no `ckpt_path`) in a run dir that already holds checkpoints is refused: it would fork them into
  `last-v1.ckpt` and overwrite the earlier run's token file, metrics and results.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ctt.errors import ConfigError
from ctt.models.token import TokenSettings, check_base_fingerprint, check_row
from ctt.reliability.safe_load import ROW_SUFFIX, read_checkpoint, saved_row_size
from ctt.settings import flatten, to_plain

log = logging.getLogger(__name__)

# Keys of the saved hyperparameters that say how a run computes, not what: they may change across a resume.
IGNORED = ("model.cache_dir", "token.path", "token.allow_base_mismatch", "forcing.engine", "rl.prefix_reuse",
           "rl.gradient_checkpointing", "distributed")
MAX_LISTED = 4


def checkpoint_dir(cfg: DictConfig) -> Path:
    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    return Path(dirpath or Path(cfg.paths.output_dir) / "checkpoints")


def candidates(cfg: DictConfig) -> list[Path]:
    """Every checkpoint of the run dir that `ckpt_path=last` may mean (a DeepSpeed checkpoint is a directory)."""
    found = [*checkpoint_dir(cfg).glob("last*.ckpt"), *Path(cfg.paths.output_dir).glob("hpc_ckpt_*.ckpt")]
    return sorted(p for p in found if p.exists())


def _newest(paths: list[Path]) -> tuple[Path, dict]:
    loaded = {p: read_checkpoint(p, "ckpt_path=last") for p in paths}
    path = max(paths, key=lambda p: (int(loaded[p].get("global_step") or 0), p.stat().st_mtime))
    return path, loaded[path]


def resolve_ckpt_path(cfg: DictConfig) -> tuple[str | None, dict | None]:
    """(`ckpt_path` resolved, the checkpoint read safely) or (None, None) for a new run; ConfigError when the path
    is missing, unsafe, of the wrong format for the trainer, or a new run would overwrite an earlier one."""
    path = cfg.get("ckpt_path")
    if path in ("best", "hpc", "registry") or (path is not None and "://" in str(path)):
        return path, None  # Lightning's own keywords and remote URLs: Lightning resolves and reports them
    if path is None:
        return None, _refuse_overwrite(cfg)
    if not str(path).strip():
        raise ConfigError("ckpt_path is empty: give a checkpoint, or last, or leave it unset (null) for a new run")
    if path == "last":
        found = candidates(cfg)
        if not found:
            raise ConfigError(
                f"ckpt_path=last: no checkpoint in {checkpoint_dir(cfg)}; to resume, pass the interrupted run's "
                "directory (hydra.run.dir=<run dir> ckpt_path=last)"
            )
        chosen, checkpoint = _newest(found)
    else:
        if not Path(path).exists():
            raise ConfigError(f"ckpt_path={path}: no such checkpoint")
        chosen, checkpoint = Path(path), read_checkpoint(path, f"ckpt_path={path}")
    _check_format(cfg, chosen, checkpoint)
    log.info("resuming from %s (step %s)", chosen, checkpoint.get("global_step"))
    return str(chosen), checkpoint


def _refuse_overwrite(cfg: DictConfig) -> dict | None:
    found = candidates(cfg)
    if not found:
        return None
    from lightning.fabric.plugins.environments import SLURMEnvironment

    hpc = [p for p in found if p.name.startswith("hpc_ckpt_")]
    if hpc and SLURMEnvironment.detect():  # a requeued SLURM job: Lightning resumes its hpc checkpoint itself
        chosen, checkpoint = _newest(hpc)
        _check_format(cfg, chosen, checkpoint)
        return checkpoint
    names = ", ".join(str(p.relative_to(cfg.paths.output_dir)) if p.is_relative_to(cfg.paths.output_dir) else str(p)
                      for p in found)
    raise ConfigError(
        f"hydra.run.dir={cfg.paths.output_dir} already holds checkpoints of an earlier run ({names}); resume it with "
        "ckpt_path=last, or start the new run in another hydra.run.dir"
    )


def _check_format(cfg: DictConfig, path: Path, checkpoint: dict) -> None:
    target = str(OmegaConf.select(cfg, "trainer.strategy._target_", default="") or "")
    deepspeed_trainer = "DeepSpeed" in target
    if checkpoint["deepspeed"] and not deepspeed_trainer:
        raise ConfigError(f"ckpt_path: {path} is a DeepSpeed checkpoint (a directory); resume it with the DeepSpeed "
                          "trainer that wrote it (trainer=deepspeed_*)")
    if deepspeed_trainer and not checkpoint["deepspeed"]:
        raise ConfigError(f"ckpt_path: {path} is a single-file checkpoint; a DeepSpeed trainer resumes only "
                          "DeepSpeed checkpoint directories")


# --- does the checkpoint belong to this run? ---------------------------------------------------------------------


def run_identity(model: Mapping[str, Any], token: Mapping[str, Any], row: torch.Tensor | None = None,
                 fingerprint: str | None = None) -> dict[str, Any]:
    """What a run trains, saved in its checkpoints and checked before a resume: base model, pretrained id, token text
    and count; given the row (once the model is loaded), its hidden size and the count it holds, and the fingerprint
    of the base weights (ctt.models.token.base_fingerprint)."""
    settings = TokenSettings.from_config(token)
    ident = {"base_model": model["name"], "pretrained": model.get("pretrained"), "token": settings.text,
             "count": settings.count}
    if fingerprint:
        ident["base_fingerprint"] = fingerprint
    if row is not None:
        shape = getattr(row, "ds_shape", row.shape)  # ZeRO-3 keeps the full shape there
        ident |= {"hidden_size": int(shape[-1]), "count": 1 if len(shape) == 1 else int(shape[0])}
    return ident


def saved_identity(checkpoint: dict) -> dict[str, Any]:
    """Base model, pretrained id, token text and hidden size a checkpoint was trained with: its `ckpt["ctt"]`
    identity (required, check_fits), over what its hyperparameters say."""
    hp = checkpoint.get("hyper_parameters") or {}
    model, token = hp.get("model") or {}, hp.get("token") or {}
    ident = {"base_model": model.get("name"), "pretrained": model.get("pretrained"), "token": token.get("text"),
             "hidden_size": saved_row_size(checkpoint)}
    return {**ident, **{k: v for k, v in (checkpoint.get("ctt") or {}).items() if v is not None}}


def check_fits(checkpoint: dict, current: dict[str, Any], where: str, allow_base_mismatch: bool = False) -> None:
    """One ConfigError line when the checkpoint was trained on another base model or other base weights (unless
    allowed), for another token text, or holds a row of another hidden size. `current` has the keys of
    `saved_identity`. A checkpoint without ctt's identity (`ckpt["ctt"]`, saved by every ctt run) is refused: nothing
    says what it trained."""
    ident = checkpoint.get("ctt")
    if not isinstance(ident, dict) or not ident.get("base_model") or not ident.get("token"):
        raise ConfigError(f"checkpoint {where} has no ctt identity (ckpt['ctt'] with its base model and token): it "
                          "was not written by ctt, or the identity was stripped")
    saved = saved_identity(checkpoint)
    for key in ("base_model", "pretrained"):
        if not allow_base_mismatch and saved.get(key) and current.get(key) and saved[key] != current[key]:
            raise ConfigError(f"checkpoint {where} was trained on base model {saved[key]!r}, not {current[key]!r} "
                              "(set token.allow_base_mismatch=true to resume it anyway)")
    if saved.get("token") and current.get("token") and saved["token"] != current["token"]:
        raise ConfigError(f"checkpoint {where} trained the token {saved['token']!r}, not token.text="
                          f"{current['token']!r}")
    if saved.get("hidden_size") and current.get("hidden_size") and saved["hidden_size"] != current["hidden_size"]:
        raise ConfigError(f"checkpoint {where} holds a token row of hidden size {saved['hidden_size']}, but the "
                          f"model has {current['hidden_size']}")
    if saved.get("count", 1) != current.get("count", 1):
        raise ConfigError(f"checkpoint {where} holds {saved.get('count', 1)} learned token row(s), not "
                          f"token.count={current.get('count', 1)}")
    # last: another hidden size or count is the clearer reason, and changes the fingerprint too
    check_base_fingerprint(saved.get("base_fingerprint"), current.get("base_fingerprint"), f"checkpoint {where}",
                           allow_base_mismatch, ConfigError)


def check_saved_row(checkpoint: dict, row: torch.Tensor, table: torch.Tensor, where: str) -> None:
    """The token row a checkpoint holds can be resumed into `row` (this run's parameter, joining the frozen `table`):
    present, of the same shape, finite and of a plausible norm (ctt.models.token.check_row); Lightning would
    otherwise resume a missing row as the initial one (the module loads non-strictly) and a tampered one as it is."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        return  # Lightning's DeepSpeed client state: the engine loads the row (checked in the model states file)
    rows = [v for k, v in state.items() if k.endswith(ROW_SUFFIX)]
    if len(rows) != 1 or not isinstance(rows[0], torch.Tensor):
        raise ConfigError(f"checkpoint {where} holds no token row (no one '*{ROW_SUFFIX}' tensor in its state_dict)")
    partitioned = checkpoint.get("deepspeed") or hasattr(row, "ds_shape")  # ZeRO-3 may save a partition
    check_row(rows[0], table, f"checkpoint {where}", None if partitioned else row.shape, ConfigError)


def check_same_config(cfg: DictConfig, checkpoint: dict, where: str) -> None:
    """The checkpoint's saved config (hyperparameters, data settings) against the current one; a difference is a
    ConfigError listing the keys, unless `resume_mismatch=allow` (then a warning)."""
    hp = checkpoint.get("hyper_parameters") or {}
    now = {key: to_plain(cfg.get(key)) for key in hp if key in cfg}
    data_state = checkpoint.get("ProblemDataModule") or {}
    if data_state and "data" in cfg:
        hp = {**hp, "data": {k: data_state[k] for k in ("batch_size", "seed", "train") if k in data_state}}
        now["data"] = {k: to_plain(cfg.data.get(k)) for k in hp["data"]}
    # an empty mapping is no key at all here: a group that sets nothing matches one that is absent
    before, after = ({k: v for k, v in flatten(c).items() if v != {}} for c in (hp, now))
    changed = [k for k in sorted(before.keys() | after.keys())
               if before.get(k) != after.get(k) and not any(k == i or k.startswith(i + ".") for i in IGNORED)]
    if not changed:
        return
    listed = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:MAX_LISTED])
    more = f" and {len(changed) - MAX_LISTED} more" if len(changed) > MAX_LISTED else ""
    message = f"checkpoint {where} was written with another config ({listed}{more})"
    if cfg.get("resume_mismatch", "refuse") == "allow":
        log.warning("%s; resuming anyway (resume_mismatch=allow)", message)
        return
    raise ConfigError(f"{message}; resume with the same overrides, or pass resume_mismatch=allow")
