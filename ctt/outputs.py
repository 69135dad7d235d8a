"""What a ctt command writes: its own, whole, and one writer at a time (every command's outputs go through here).

* **Ownership.** A folder ctt creates as an output (`ctt-export`'s folder, `ctt-organism`'s model) holds a marker,
  `.ctt-output.json`, naming its kind, the command and the files written. A command replaces only an output of its
  own kind that ctt marked, and only when every file in it is one the marker lists (`check_output_dir`). Refused
  whatever `overwrite` says: the current directory, the project checkout, a home directory, any ancestor of them
  (the filesystem root included), a run dir (`.hydra/`, `checkpoints/` or `.ctt.lock`), and a folder holding a file
  ctt did not write. A single file (a `ctt-generate` output) is replaced only when its content is recognised as that
  kind of output (`check_output_file`).
* **Atomic replacement.** Files: a temp sibling, fsync, `os.replace` (`atomic_write_bytes`). Folders
  (`replacing_dir`): the new version is written into a temp sibling, then swapped with the old one in one
  `renameat2(RENAME_EXCHANGE)` where the kernel has it (else: old renamed aside, new renamed in), then the old one
  is deleted. A kill at any moment leaves the target holding one whole version (a kill between the two fallback
  renames leaves the old version whole beside it, renamed back by the next run); temp siblings are removed by the
  next writer of that output, which holds its lock.
* **One writer.** A process owns an output while it writes it: an `fcntl.flock` on the sibling `.<name>.lock`,
  released by the OS however the process dies; a second writer stops with one line (`hold_output`). Lock files are
  opened with `O_NOFOLLOW`: a symlinked (or hard-linked, or non-regular) lock file is refused, never followed.
* **Inputs.** An output that is one of the command's inputs (same path resolved, or the same file by `samefile`:
  a hard link) is refused before anything is read (`check_not_input`).
* **Faults.** A full disk, a quota or a read-only target while writing a file or filling a folder is one
  `OutputError` naming it (`ctt.writes.writing`); the earlier version stays whole, no temp is left.
* **Modes.** Files and folders are created with the user's umask (`fix_modes` undoes the 0600/0700 that mkstemp,
  mkdtemp and safetensors give), as `open()` would.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ctt.errors import ConfigError, DataError
from ctt.text import read_json
# the one file writer (ctt.writes), also imported from here
from ctt.writes import atomic_open, atomic_write_bytes, atomic_write_text  # noqa: F401
from ctt.writes import fsync_dir, make_folder, temp_sibling, temp_siblings, writing

MARKER = ".ctt-output.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUN_DIR_SIGNS = (".hydra", "checkpoints", ".ctt.lock")
_held: dict[Path, tuple[int, int]] = {}  # lock file -> (descriptor, depth), in this process


# --- modes --------------------------------------------------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fix_modes(root: Path) -> None:
    """Give `root` and everything under it the modes `open()`/`mkdir()` give under the umask (0666/0777 & ~umask)."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


# --- locks ----------------------------------------------------------------------------------------------------


def open_lock_file(path: Path, what: str) -> int:
    """Open (create) a lock file without following a symlink; refuse one that is a link or not a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"{what}: the lock file {path} is a symlink; ctt never follows one (remove it)") from None
        raise ConfigError(f"{what} is not writable: {err.strerror or err} (creating {path.name})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise ConfigError(f"{what}: the lock file {path} is not a plain file of its own (a link or a device?); "
                          "remove it")
    return fd


def try_lock(fd: int) -> str | None:
    """Take the exclusive flock of `fd`: None when taken, else the owner's pid as recorded in the file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return None


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def hold_output(target: str | os.PathLike, what: str) -> Iterator[None]:
    """Own `target` (a file or folder to write) for the block: a second process is refused with one line naming the
    owner's pid. Re-entrant within a process."""
    target = Path(target).absolute()
    lock = lock_path(target)
    if lock in _held:
        fd, depth = _held[lock]
        _held[lock] = (fd, depth + 1)
    else:
        make_folder(lock.parent)
        fd = open_lock_file(lock, what)
        owner = try_lock(fd)
        if owner is not None:
            os.close(fd)
            raise ConfigError(f"{what} {target} is being written by another ctt process (pid {owner}); wait for it "
                              "to end, or choose another path")
        _held[lock] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _held.pop(lock)
        if depth > 1:
            _held[lock] = (fd, depth - 1)
        else:
            os.close(fd)  # releases the flock; the file stays (unlinking it would race a waiting opener)


# --- what may be replaced -------------------------------------------------------------------------------------


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def place_reason(target: Path, *, cwd_ok: bool = False) -> str | None:
    """Why `target` is a place no output may take: the current directory (unless `cwd_ok`), the project checkout, a
    home directory, an ancestor of any of them (the filesystem root included); None otherwise."""
    target = target.resolve()
    for place, name in ((Path.cwd(), "the current directory"), (PROJECT_ROOT, "the ctt project"),
                        (Path.home(), "a home directory")):
        place = place.resolve()
        if cwd_ok and place == target and name == "the current directory":
            continue
        if _is_within(place, target):
            return f"it is {name}" if place == target else f"it holds {name} ({place})"
    if target.parent == Path("/home").resolve() or target == Path(target.anchor):
        return "it is a home or root directory"
    return None


def protected_reason(target: Path) -> str | None:
    """Why `target` (resolved) must never be replaced by an output, or None."""
    target = target.resolve()
    reason = place_reason(target)
    if reason is not None:
        return reason
    if target.is_dir():
        signs = [s for s in RUN_DIR_SIGNS if (target / s).exists()]
        if signs:
            return f"it is a run dir (it has {signs[0]})"
    return None


def read_marker(folder: Path) -> dict | None:
    try:
        marker = read_json(folder / MARKER)  # the one JSON reader: a FIFO or a huge file is never read
    except DataError:  # missing, unreadable or not JSON: not a marker ctt wrote
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def write_marker(folder: Path, kind: str, command: str) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    record = {"kind": kind, "command": command, "files": files, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(json.dumps(record, indent=1) + "\n", folder / MARKER)


def check_output_dir(target: str | os.PathLike, kind: str, overwrite: bool, what: str) -> None:
    """ConfigError unless `target` may be written as an output folder of `kind`: absent, empty, or (with
    `overwrite`) a folder ctt marked as that kind holding only files the marker lists."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ConfigError(f"{what}={target} is {'a symlink' if target.is_symlink() else 'a file'}, not a folder")
    inside = next((p for p in target.absolute().parents if (p / MARKER).is_file()), None)
    if inside is not None:  # the enclosing output's marker would not list it: that output could not be replaced
        raise ConfigError(f"{what}={target} is inside {inside}, an output ctt wrote; choose a folder outside it")
    if not target.exists():
        return
    reason = protected_reason(target)
    if reason is not None:
        raise ConfigError(f"{what}={target} cannot be an output folder: {reason}; choose a new folder")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    marker = read_marker(target)
    if marker is None or marker.get("kind") != kind:
        found = f"a {marker.get('kind')} output" if marker else f"files ctt did not write ({entries[0]}, ...)"
        raise ConfigError(f"{what}={target} holds {found}; ctt replaces only its own {kind} folders, choose a new "
                          "folder")
    foreign = [e for e in entries if e != MARKER and e not in marker["files"] and not e.startswith(f"{MARKER}.")]
    if foreign:
        raise ConfigError(f"{what}={target} holds {foreign[0]!r}, which ctt did not write; move it away or choose "
                          "a new folder")
    if not overwrite:
        raise ConfigError(f"{what}={target} exists and is not empty (set {what.split('.')[0]}.overwrite=true to "
                          "replace it)" if "." in what else f"{what} {target} exists and is not empty")


def check_output_file(path: str | os.PathLike, what: str, recognise: Callable[[Path], bool]) -> None:
    """ConfigError unless `path` is absent, empty, or a file `recognise` says ctt wrote (its kind of output)."""
    path = Path(path)
    if path.is_symlink():  # a dangling one was replaced by a regular file, its target never written
        raise ConfigError(f"{what}={path} is a symlink; ctt neither writes through nor replaces one: give the "
                          "path of a file")
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise ConfigError(f"{what}={path} is not a regular file")
    if path.is_file() and path.stat().st_size and not recognise(path):
        raise ConfigError(f"{what}={path} exists and was not written by ctt as this kind of output; ctt does not "
                          "overwrite it: choose another path")


def check_not_input(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """ConfigError when the output is one of the inputs or holds one (resolved paths; the same file through a hard
    link)."""
    out = Path(output)
    for name, source in inputs.items():
        if source is None or str(source) == "-":
            continue
        source = Path(source)
        same = _is_within(source.resolve(), out.resolve())  # the input itself, or a file inside the output folder
        if not same and out.exists() and source.exists():
            same = os.path.samefile(out, source)
        if same:
            raise ConfigError(f"the output {out} is the input {name}={source}; write to another file")


# --- replacing a folder ---------------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))


def swap_in(new: Path, target: Path) -> None:
    """Put the folder `new` at `target`; the previous version (if any) is deleted once it is out of the way."""
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # `new` now holds the old version
    else:
        old = temp_sibling(target, "old")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    fsync_dir(target.parent)


def clean_siblings(target: Path) -> None:
    """Remove the temp siblings of killed writers (call holding the output's lock); if a kill came between the
    fallback's two renames, put the old version back first."""
    olds = sorted(temp_siblings(target, "old"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.rename(olds.pop(), target)
    for stale in [*olds, *temp_siblings(target)]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextmanager
def replacing_dir(target: str | os.PathLike, kind: str, command: str, overwrite: bool, what: str) -> Iterator[Path]:
    """Yield an empty temp sibling folder to fill; when the block ends without an error it is marked as ctt's
    `kind` output and swapped in for `target` (checked by `check_output_dir`, owned by this process throughout)."""
    target = Path(target).absolute()
    check_output_dir(target, kind, overwrite, what)
    with hold_output(target, what), writing(target):
        clean_siblings(target)
        check_output_dir(target, kind, overwrite, what)  # again, now that no other writer can change it
        tmp = temp_sibling(target)
        tmp.mkdir()
        try:
            yield tmp
            write_marker(tmp, kind, command)
            fix_modes(tmp)
            swap_in(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
