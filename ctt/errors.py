"""Exception hierarchy for ctt, and how the entry points report errors."""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import NoReturn

CLOSED_STDOUT_STATUS = 141  # 128 + SIGPIPE: what the shell reports for `yes | head`


class CttError(Exception):
    """Base class of every error ctt raises on purpose."""


class ConfigError(CttError):
    """A configuration value is missing, of the wrong type, or out of range."""


class DataError(CttError):
    """A data set is missing, malformed or empty."""


class ModelError(CttError):
    """A model or tokenizer cannot be loaded or lacks something ctt needs."""


class TokenFileError(CttError):
    """A saved token file is missing, malformed, or does not fit the model."""


class OutputError(CttError):
    """An output cannot be written: the disk is full, a quota is reached, or the target is read-only."""


class TrainingError(CttError):
    """Training cannot go on, e.g. the loss was not finite for `rl.max_bad_steps` consecutive steps."""


# The environment refusing a write (ctt.writes.writing turns each into one OutputError line).
WRITE_FAULTS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EFBIG: "file too large", errno.EIO: "input/output error"}


# Of those, the faults only a write meets. A writer ctt cannot route through `writing` (TensorBoard's event files,
# W&B's run folder, a library's cache) raises them from inside Lightning's loop: `environment_fault` gives the entry
# points the same one line. (EACCES/EPERM/EIO are left out: a read meets them too, and ctt's readers name their own.)
WRITE_ONLY_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def environment_fault(err: BaseException | None) -> str | None:
    """"<reason> writing <file>" when `err`, or an error it was raised from, is a full disk, a quota, a read-only
    file system or a file too large; None otherwise."""
    seen = 0
    while err is not None and seen < 16:
        if isinstance(err, OSError) and err.errno in WRITE_ONLY_FAULTS:
            reason = WRITE_FAULTS[err.errno]
            named = isinstance(err.filename, str | bytes | os.PathLike) and err.filename
            return f"{reason} writing {os.fsdecode(err.filename)}" if named else f"{reason} (writing an output)"
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def user_error_message(err: BaseException) -> str | None:
    """The one line an entry point prints for an error the user can fix, or None for anything else (a bug).

    User errors: every CttError, and a config Hydra cannot instantiate (`trainer.max_steps=abc`, a missing optional
    package), whose message Hydra spreads over several lines; a CttError raised inside an instantiated target
    (e.g. `data.batch_size=0`) is reported as itself.
    """
    from hydra.errors import InstantiationException

    cause = err
    while isinstance(cause, InstantiationException) and isinstance(cause.__cause__, Exception):
        cause = cause.__cause__
    if isinstance(cause, CttError):
        return f"{type(cause).__name__}: {cause}"
    fault = environment_fault(err)
    if fault is not None:
        return f"OutputError: {fault}"
    if isinstance(err, InstantiationException):
        return "ConfigError: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return None


def exit_for_user_error(err: Exception, log: logging.Logger, what: str) -> NoReturn:
    """Entry points' last word on an exception: one line and exit 2 for a user error, else log and re-raise."""
    if isinstance(err, BrokenPipeError):
        exit_for_closed_stdout()
    message = user_error_message(err)
    if message is None:  # a bug: the full traceback goes to the run's log (<run dir>/<task>.log) too
        log.exception("%s failed: %s: %s", what, type(err).__name__, err)
        raise err
    log.error(message)  # a user error: one clear line, no traceback
    raise SystemExit(2) from None


def exit_for_closed_stdout() -> NoReturn:
    """The reader of stdout went away (`ctt-generate ... | head`): stop quietly, like coreutils, with status 141
    (not 0: the output was cut short, which `set -o pipefail` should see). Files are untouched (an atomic writer
    drops its temp file). stdout is pointed at /dev/null so that the interpreter's last flush cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout file descriptor (an in-process capture)
        pass
    raise SystemExit(CLOSED_STDOUT_STATUS) from None


def _closed_stream_error(err: BaseException | None) -> bool:
    return isinstance(err, BrokenPipeError) or (isinstance(err, ValueError) and "closed file" in str(err))


_handle_error = logging.Handler.handleError


def _quiet_on_closed_stream(self: logging.Handler, record: logging.LogRecord) -> None:
    if _closed_stream_error(sys.exc_info()[1]):
        return  # the reader of that stream went away: the line has nowhere to go, the traceback neither
    _handle_error(self, record)


def guard_closed_stdout() -> None:
    """Each command's first step: a log line written to a stdout whose reader went away (`ctt-export ... | head`;
    DeepSpeed, imported by accelerate inside save_pretrained, logs to stdout with a handler of its own) is dropped,
    not logging's "--- Logging error ---" wall for every later line. Other logging errors are reported as before.
    Why by hand: logging's only switch, `logging.raiseExceptions`, would silence every logging error."""
    logging.Handler.handleError = _quiet_on_closed_stream

