"""Crash-safe Lightning checkpoints.

Lightning 2.6.6's `TorchCheckpointIO` writes through `fsspec`'s transaction, whose local temp file is created by
`tempfile.mkstemp()` in the *system* temp dir and then `shutil.move`d into place: when that dir is on another
filesystem (a tmpfs /tmp, a network run dir) the move is a copy, so a kill during it leaves a truncated
`last.ckpt`; nothing is fsync'ed either. `AtomicCheckpointIO` writes the bytes to a temp file in the target's own
directory, fsyncs it, `os.replace`s it over the target (atomic on POSIX) and fsyncs the directory: after a kill,
`last.ckpt` is the previous complete checkpoint or the new complete one, never a mix. A kill can leave a stray
`.<name>.*.tmp` file next to it; the next save in that directory removes stale ones.

Loading defaults to `weights_only=True`: our checkpoints hold only tensors and plain containers (the module saves
its hyperparameters as plain dicts), so a checkpoint file cannot run code when it is resumed.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from fsspec.implementations.local import LocalFileSystem

from ctt.outputs import atomic_write_bytes  # the one atomic writer (ctt.outputs); imported from here too

log = logging.getLogger(__name__)

STALE_TMP_SECONDS = 3600.0  # temp files older than this are left-overs of a killed save


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to `path` atomically: temp file in the same directory, fsync, `os.replace`, fsync the dir."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise fully before touching the disk: a failure here writes nothing
    return atomic_write_bytes(buffer.getbuffer(), path)


def remove_stale_temp_files(directory: str | os.PathLike, name: str, older_than_s: float = STALE_TMP_SECONDS) -> int:
    """Delete `.<name>.*.tmp` files left by killed saves (only old ones: a concurrent save may own a fresh one)."""
    removed, now = 0, time.time()
    for tmp in Path(directory).glob(f".{name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except OSError:
            pass
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with atomic local saves and `weights_only=True` loads by default."""

    def __init__(self, weights_only: bool = True) -> None:
        super().__init__()
        self.weights_only = weights_only

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):  # object stores: Lightning's upload path
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(path)
        remove_stale_temp_files(path.parent, path.name)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path, map_location: Optional[Callable] = lambda storage, loc: storage, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(
            path, map_location=map_location, weights_only=self.weights_only if weights_only is None else weights_only
        )
