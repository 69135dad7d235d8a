"""One check before ctt reads a file a user hands it: a regular file (or a directory where one is expected) of a
bounded size, decided by `os.stat` alone, so a device (`/dev/zero`), a FIFO or a socket is refused at once instead of
being read until memory runs out (or waited on for ever).

The bounds are generous: far above what ctt writes (a token file of 64 rows of hidden size 16384 is 4 MiB; a
checkpoint holds the row, its optimizer state and the loop state), so only a file that cannot be ctt's is refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ctt.errors import ConfigError, CttError

GiB = 1 << 30
MAX_BYTES = {
    "token file": 1 * GiB,
    "checkpoint": 64 * GiB,  # a DeepSpeed model-states file may hold more than the row
    "metadata": 64 << 20,  # ctt_export.json, a DeepSpeed `latest` tag
    "data file": 64 * GiB,  # a JSONL problem set, a prompt file (read line by line)
    "run file": 4 * GiB,  # another run's .hydra/*.yaml, results.csv, metrics.csv (read whole by ctt-report)
    "model file": 1 << 40,  # a local model folder's config, tokenizer and weight shards (memory-mapped)
}


def check_input(path: str | os.PathLike, kind: str, what: str | None = None, error: type[CttError] = ConfigError,
                directory: bool = False) -> Path:
    """`path` when it is a regular file of at most MAX_BYTES[kind] (or, with `directory`, a directory); else one
    `error` line naming it (`what`, default `kind`). A missing path is left to the caller's own message."""
    path, what = Path(path), what or kind
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    if directory and stat.S_ISDIR(st.st_mode):
        return path
    if not stat.S_ISREG(st.st_mode):
        kind_of = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, FIFO or socket"
        raise error(f"{what}: {path} is {kind_of}, not a regular file")
    if st.st_size > MAX_BYTES[kind]:
        raise error(f"{what}: {path} is {st.st_size} bytes, over the {MAX_BYTES[kind]}-byte limit for a {kind}")
    return path
