"""One loader for every torch file ctt reads, and for every file a library loads on its behalf: nothing in them runs.

`load_pt` is `torch.load(weights_only=True)`: tensors, plain containers and numbers only, with four plain-data
classes DeepSpeed pickles into its optimizer files allowed (a loss scaler holding two numbers, an enum, a named
tuple of offsets); anything else, a `__reduce__` payload included, is refused with one ConfigError line instead of
being unpickled.

`read_checkpoint` reads a Lightning checkpoint through it, a file or a DeepSpeed directory. DeepSpeed's own loader
(which Lightning calls for a directory) uses `torch.load(weights_only=False)`, so the `latest` tag it follows must name
a folder inside the directory, and every `*.pt` file of that folder is loaded here first: resuming runs DeepSpeed's
loader only on files this module has already loaded safely. Token files are safetensors (no code at all),
`.hydra/*.yaml` is read by OmegaConf's safe YAML loader, and hub models keep `trust_remote_code=false` (transformers
loads their weights from safetensors, or with `weights_only=True`).
"""

from __future__ import annotations

import importlib
import re
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ctt.errors import ConfigError
from ctt.inputs import check_input

# DeepSpeed's plain-data classes found in its checkpoints (ZeRO-1/2/3 optimizer files): constructed from numbers.
DEEPSPEED_DATA_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
ROW_SUFFIX = ".row"  # the state-dict key of the trainable row ends so (ctt.models.token.ContinueThinkingEmbedding.row)


@lru_cache(maxsize=1)
def _allowed_globals() -> tuple:
    allowed = []
    for dotted in DEEPSPEED_DATA_CLASSES:
        module, _, name = dotted.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # DeepSpeed not installed: its files cannot be resumed anyway
            pass
    return tuple(allowed)


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte length of its JSON header, then `{`."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def load_pt(path: str | Path, what: str) -> Any:
    """`torch.load` that never runs code from the file; `what` names the file in the one-line error."""
    path = check_input(path, "checkpoint", what)  # before anything opens it: /dev/zero, a FIFO
    if is_safetensors(path):
        raise ConfigError(f"{what}: {path} is a safetensors file (a token file? evaluate it with ctt-eval "
                          f"token.path={path}), not a training checkpoint")
    try:
        with torch.serialization.safe_globals(list(_allowed_globals())):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:
        text = str(err).strip()
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        reason = (f"it holds a {unsafe.group(1)} object, which could run code when unpickled" if unsafe
                  else text.splitlines()[0] if text else type(err).__name__)
        raise ConfigError(f"{what}: {path} cannot be loaded with weights_only=True: {reason}") from None


def _deepspeed_files(path: Path, what: str) -> tuple[Path, list[Path]]:
    """(the model-states file, every *.pt file) of a DeepSpeed checkpoint directory: the folder its `latest` file
    names, which must be inside it (DeepSpeed loads nothing else)."""
    latest = check_input(path / "latest", "metadata", what)
    if not latest.is_file():
        empty = not any(path.iterdir())
        raise ConfigError(f"{what}: {path} is " + ("an empty directory" if empty else "a directory without a 'latest' "
                          "file naming its DeepSpeed checkpoint tag") + ", not a DeepSpeed checkpoint")
    tag = latest.read_text(errors="replace").strip()
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or not (path / tag).is_dir():
        raise ConfigError(f"{what}: {path}/latest names {tag!r}, which is not a folder of this checkpoint")
    files = sorted((path / tag).glob("*.pt"))
    states = [p for p in files if p.name.endswith("model_states.pt")]
    if not states:
        raise ConfigError(f"{what}: {path / tag} holds no *model_states.pt file")
    return states[0], files


# The fields ctt and Lightning read from a checkpoint, with the types they read them as: a tampered one is one line
# here, not a TypeError deep in Lightning's loops or in ctt's resume checks (checked where present).
CHECKPOINT_FIELDS: dict[str, type] = {"global_step": int, "epoch": int, "hyper_parameters": dict, "ctt": dict,
                                      "ctt_metrics_row": dict, "loops": dict, "callbacks": dict,
                                      "optimizer_states": list, "lr_schedulers": list, "ProblemDataModule": dict}


def _check_fields(checkpoint: dict, what: str, path: Path) -> dict:
    for key, kind in CHECKPOINT_FIELDS.items():
        value = checkpoint.get(key)
        if value is None:
            continue
        ok = isinstance(value, kind) and not isinstance(value, bool) and (kind is not int or value >= 0)
        if ok and key == "ctt_metrics_row":  # metric name -> number, as pending_metrics_row saves it
            ok = all(isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                     for k, v in value.items())
        if not ok:
            expected = {int: "an integer >= 0", dict: "a mapping", list: "a list"}[kind]
            raise ConfigError(f"{what}: {path} has a tampered '{key}' (expected {expected}, got "
                              f"{type(value).__name__} {value!r:.40})")
    return checkpoint


def read_checkpoint(path: str | Path, what: str = "ckpt_path") -> dict:
    """A Lightning checkpoint (file) or DeepSpeed checkpoint (directory) loaded safely, as one dict: the loop state,
    `hyper_parameters`, `ctt` (base model, token) and `state_dict` (the DeepSpeed model states' `module`)."""
    path = check_input(path, "checkpoint", what, directory=True)
    if path.is_dir():
        states, files = _deepspeed_files(path, what)
        loaded = {p: load_pt(p, what) for p in files}  # every file DeepSpeed may open, before it opens any
        checkpoint = loaded[states]
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("module"), dict):
            raise ConfigError(f"{what}: {states} is not DeepSpeed model states (no 'module')")
        return _check_fields({**checkpoint, "state_dict": checkpoint["module"], "deepspeed": True}, what, states)
    if not path.exists():
        raise ConfigError(f"{what}: {path}: no such checkpoint")
    checkpoint = load_pt(path, what)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{what}: {path} is not a Lightning checkpoint (it has no state_dict)")
    return _check_fields({**checkpoint, "deepspeed": False}, what, path)


def saved_row_size(checkpoint: dict) -> int | None:
    """The hidden size of the token row a checkpoint holds (None when it holds none). DeepSpeed: from its recorded
    parameter shapes (under ZeRO-3 the saved tensor may be a partition)."""
    shapes = [group for group in checkpoint.get("param_shapes") or [] if isinstance(group, dict)]
    for key, value in [item for group in shapes for item in group.items()] + list((checkpoint.get("state_dict") or {}).items()):
        shape = getattr(value, "shape", value)
        if key.endswith(ROW_SUFFIX) and isinstance(shape, torch.Size | tuple | list) and len(shape) == 1:
            return int(shape[0])
    return None
