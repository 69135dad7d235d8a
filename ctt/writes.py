"""Every file ctt writes goes through here: atomic (a temp sibling, fsync, `os.replace`) or appended whole, and the
environment refusing a write (a full disk, a quota, a read-only target) is one `OutputError` line naming the file.

ENOSPC, EDQUOT, EROFS, EACCES, EPERM, EFBIG and EIO count, also as a native writer's "(os error N)" (safetensors'
Rust writer reports an errno that way): `writing` wraps every writer's block. On such an error the earlier version of
the file stays byte-identical and no temp sibling is left; an append (`append_bytes`) is cut back to the earlier end.
`ctt.outputs` re-exports these (ownership, locks and folder swaps are there).
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from ctt.errors import WRITE_FAULTS, OutputError


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def temp_siblings(path: Path, tag: str = "tmp") -> list[Path]:
    """The `temp_sibling(path, tag)` names present beside `path`, matched exactly: not a glob, whose `*`, `?` or
    `[` in an output's name would match other files (a user's `.ab.tmp-notes` beside `export.dir=a*`)."""
    pattern = re.compile(re.escape(f".{path.name}.{tag}-") + r"\d+-[0-9a-f]{8}\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / name for name in names if pattern.fullmatch(name)]


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_NATIVE_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust writers (safetensors, tokenizers) report an errno


def write_fault(err: BaseException) -> str | None:
    """The reason, when `err` is the environment refusing a write (full disk, quota, read-only), else None."""
    code = err.errno if isinstance(err, OSError) else None
    if not isinstance(err, OSError) and (match := _NATIVE_OS_ERROR.search(str(err))):
        code = int(match.group(1))
    return WRITE_FAULTS.get(code)


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Every writer's block: an environment fault inside it becomes one OutputError line naming `path`."""
    try:
        yield
    except OutputError:
        raise
    except Exception as err:
        reason = write_fault(err)
        if reason is None:
            raise
        raise OutputError(f"{reason} writing {path}") from err


class LogFileHandler(logging.FileHandler):
    """The run's log file (hydra/default.yaml): when the disk fills up or the file turns read-only it says so once
    on stderr and goes quiet, instead of logging's traceback for every later line; the console keeps every line."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        reason = write_fault(sys.exc_info()[1] or Exception())
        if reason is None:
            return super().handleError(record)
        if not self.failed:
            self.failed = True
            sys.stderr.write(f"{reason} writing the log file {self.baseFilename}: log lines go to stderr only\n")


def make_folder(directory: str | os.PathLike) -> Path:
    """`mkdir -p directory`, every output's folder made here: a part of the path that is a file is one OutputError
    naming it (not mkdir's FileExistsError or NotADirectoryError traceback); a full or read-only disk is `writing`'s
    line."""
    directory = Path(directory)
    with writing(directory):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in [directory, *directory.parents] if p.exists() and not p.is_dir()), directory)
            raise OutputError(f"cannot create the folder {directory}: {blocker} is a file, not a folder") from None
    return directory


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _discard(path: Path) -> None:
    with suppress(OSError):  # gone already, or the filesystem refuses even that
        path.unlink()


def atomic_write_bytes(data: bytes | memoryview, path: str | os.PathLike) -> Path:
    """Replace `path` by `data` atomically (after a kill or a full disk: the old bytes or the new, never a mix, and no
    temp sibling left by an error), mode per umask."""
    path = Path(path)
    tmp = temp_sibling(path)
    with writing(path):
        make_folder(path.parent)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                _write_all(fd, data)
                os.fsync(fd)  # a full disk may only say so here (delayed allocation, NFS)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            _discard(tmp)
            raise
    fsync_dir(path.parent)
    return path


def check_room(directory: str | os.PathLike, nbytes: int) -> None:
    """OutputError unless `directory` (created if missing) takes `nbytes` now: a file of that size is written,
    fsynced and removed. For a writer ctt cannot route through here (Hydra's own `.hydra/*.yaml`, written with a
    plain `open` between its callbacks), checked just before it: a read-only target or a full disk is then one line
    instead of that writer's traceback (the disk can still fill up in the milliseconds between)."""
    directory = Path(directory)
    probe = temp_sibling(directory / "room", "probe")
    with writing(directory):
        make_folder(directory)
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, bytes(nbytes))
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            _discard(probe)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[io.StringIO]:
    """A text file collected in memory and written by `atomic_write_text` when the block ends without an error:
    readers, a kill and a full disk only ever leave the old file or the whole new one."""
    buffer = io.StringIO(newline="")
    yield buffer
    atomic_write_text(buffer.getvalue(), path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp sibling path for a writer that only takes a path (Lightning's hparams.yaml), fsync'ed and renamed over
    `path` when the block ends without an error, else removed."""
    path = Path(path)
    tmp = temp_sibling(path)
    with writing(path):
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            _discard(tmp)  # gone once renamed
    fsync_dir(path.parent)


def append_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Append `data` to `path` whole or not at all: a failed write (a full disk) is cut back to the earlier end (a
    file it created is removed), so the earlier lines stay whole and no half line is left."""
    path = Path(path)
    with writing(path):
        make_folder(path.parent)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            end = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                with suppress(OSError):
                    os.ftruncate(fd, end)
                if not existed:
                    _discard(path)
                raise
        finally:
            os.close(fd)
