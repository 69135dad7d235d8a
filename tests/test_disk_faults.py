"""Environment faults while writing: a full disk (ENOSPC after some bytes) and a read-only target (EROFS) during
training, evaluation, export and report each end with ONE OutputError line naming the file (exit status 2); the
earlier version of the file stays byte-identical and no temp sibling is left.

Faults are injected in this process (root ignores chmod, so a 0555 folder would prove nothing under root): `Faults`
makes the OS refuse writes to the files whose name holds a given name, at `os.open` / `open` (read-only) or at
`os.write` after `room` bytes (full disk, with a short write first, as a real one gives).
"""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
from pathlib import Path

import pytest

from ctt.errors import OutputError
from ctt.writes import append_bytes, atomic_open, atomic_write_bytes
from tests.test_cli_errors import assert_user_error, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class Faults:
    """The environment refusing writes to files whose base name holds `name` (temp siblings `.<name>.tmp-*`
    included), or whose path does when `name` holds a "/" (a folder: "/.hydra/"): `code` EROFS/EACCES at open,
    ENOSPC once `room` bytes have been written to them."""

    def __init__(self, monkeypatch, name: str, code: int = errno.ENOSPC, room: int = 0):
        self.name, self.code, self.room, self.hits = name, code, room, 0
        real_open, real_write, real_builtin_open = os.open, os.write, builtins.open

        def hit(path) -> bool:
            path = os.path.abspath(os.fsdecode(path))  # TensorBoard's writer opens a bytes path
            return self.name in (path if "/" in self.name else os.path.basename(path))

        def refuse(path) -> None:
            if self.code != errno.ENOSPC and hit(path):
                self.hits += 1
                raise OSError(self.code, os.strerror(self.code), os.fspath(path))

        def fake_os_open(path, flags, mode=0o777, *args, **kwargs):
            if flags & WRITE_FLAGS:
                refuse(path)
            return real_open(path, flags, mode, *args, **kwargs)

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+"):
                refuse(file)
            return real_builtin_open(file, mode, *args, **kwargs)

        def fake_write(fd, data):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if self.code == errno.ENOSPC and target and hit(target):
                if self.room <= 0:
                    self.hits += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                data = memoryview(data)[: self.room]
                self.room -= len(data)
            return real_write(fd, data)

        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "write", fake_write)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)


def temp_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name)


def snapshot(folder: Path, *names: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (not names or p.name in names)}


# --- the writers ---------------------------------------------------------------------------------------------------


def _atomic_open(data: bytes, path: Path) -> None:
    with atomic_open(path) as f:
        f.write(data.decode())


@pytest.mark.parametrize("write", [atomic_write_bytes, _atomic_open, append_bytes])
@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"),
                                          (errno.EROFS, "read-only file system"),
                                          (errno.EACCES, "permission denied")])
def test_every_writer_turns_a_refused_write_into_one_output_error(tmp_path, monkeypatch, write, code, reason):
    path = tmp_path / "out.csv"
    path.write_bytes(b"a,b\n1,2\n")
    faults = Faults(monkeypatch, "out.csv", code, room=3)
    with pytest.raises(OutputError, match=f"^{reason} writing {path}$"):
        write(b"3,4\n" * 100, path)
    assert faults.hits and path.read_bytes() == b"a,b\n1,2\n"  # the earlier file whole: no half row appended
    assert temp_siblings(tmp_path) == []


def test_a_failed_append_to_a_new_file_leaves_no_empty_file(tmp_path, monkeypatch):
    Faults(monkeypatch, "rollouts.jsonl", room=5)
    with pytest.raises(OutputError):
        append_bytes(b'{"step": 1}\n', tmp_path / "rollouts.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_a_native_writers_os_error_is_an_output_error_too(tmp_path):
    from safetensors import SafetensorError

    from ctt.writes import writing

    with pytest.raises(OutputError, match="no space left on device writing"):  # what safetensors says on ENOSPC
        with writing(tmp_path / "m.safetensors"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(ValueError):  # anything else is not the environment's fault: it stays itself
        with writing(tmp_path / "m.safetensors"):
            raise ValueError("a bug")


# --- report ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, code", [("r.csv", errno.ENOSPC), ("r.md", errno.EROFS), ("r_debate.png", errno.ENOSPC)])
def test_report_on_a_full_disk_or_read_only_target(tmp_path, monkeypatch, capsys, name, code):
    from ctt.report import main
    from tests.test_report import make_run

    runs = tmp_path / "runs"
    for seed in (0, 1):
        make_run(runs / f"s{seed}", rewards=[0.5], results=[("toy", "base", 0, 0.2), ("toy", "learned", 1, 0.3 + seed)])
    out = tmp_path / "rep" / "r"
    assert main([str(runs), "--out", str(out), "--group-seeds"]) == 0
    before = snapshot(out.parent)
    assert name in {Path(k).name for k in before}
    capsys.readouterr()
    faults = Faults(monkeypatch, name, code, room=10)
    assert main([str(runs), "--out", str(out), "--group-seeds"]) == 2
    err = capsys.readouterr().err
    assert faults.hits and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"OutputError: {os.strerror(code).lower()} writing {out.parent / name}" in err, err
    assert snapshot(out.parent) == before and temp_siblings(out.parent) == []


# --- training: a checkpoint save, a metrics write, a rollouts append, a token export fail mid-run -----------------


def train(run: Path, capfd, *overrides: str) -> tuple[int, str, str]:
    return run_main("ctt.train", "experiment=smoke", "evaluate=false", f"hydra.run.dir={run}", *overrides, capfd=capfd)


@pytest.mark.parametrize("file, code, room", [
    ("checkpoints/last.ckpt", errno.ENOSPC, 2000),
    ("csv/metrics.csv", errno.ENOSPC, 20),
    ("rollouts.jsonl", errno.EROFS, 0),
    ("continue_thinking_token.safetensors", errno.ENOSPC, 50),
    ("csv/hparams.yaml", errno.EROFS, 0),  # Lightning rewrites it at every start
])
def test_training_on_a_full_disk_or_read_only_target(tmp_path, monkeypatch, capfd, file, code, room):
    run = tmp_path / "run"
    assert train(run, capfd, "trainer.max_steps=2")[0] == 0  # its files are the earlier versions to keep
    before = (run / file).read_bytes()
    faults = Faults(monkeypatch, Path(file).name, code, room)
    # resumed for 2 more steps, the metrics flushed every step: each write fails mid-run, not at the end
    code_, _, err = train(run, capfd, "trainer.max_steps=4", "ckpt_path=last", "+logger.csv.flush_logs_every_n_steps=1")
    assert_user_error(code_, err, f"OutputError: {os.strerror(code).lower()} writing {run / file}")
    assert faults.hits and (run / file).read_bytes() == before and temp_siblings(run) == []


def test_a_third_party_writer_on_a_read_only_target_is_one_line(tmp_path, monkeypatch, capfd):
    """TensorBoard writes its event files from a thread of its own, outside ctt.writes; its error reaches the main
    thread at a flush inside Lightning's loop, and was a traceback there (ctt.errors.environment_fault)."""
    run = tmp_path / "run"
    faults = Faults(monkeypatch, "events.out.tfevents", errno.EROFS)
    code, _, err = train(run, capfd, "trainer.max_steps=2", "logger=tensorboard")
    line = assert_user_error(code, err, f"OutputError: read-only file system writing {run / 'tensorboard'}/events.out")
    assert faults.hits and "b'" not in line


def test_an_environment_fault_is_found_along_the_chain_of_causes():
    from ctt.errors import environment_fault

    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), b"/w/events")
        except OSError as inner:
            raise RuntimeError("a library's wrapper") from inner
    except RuntimeError as outer:
        assert environment_fault(outer) == "no space left on device writing /w/events"
    assert environment_fault(OSError(errno.EDQUOT, "quota")) == "disk quota exceeded (writing an output)"
    assert environment_fault(PermissionError(errno.EACCES, "denied", "/x")) is None  # a read meets it too
    assert environment_fault(ValueError("x")) is None


@pytest.mark.parametrize("command", ["ctt.train", "ctt.eval", "multirun"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_hydras_own_files_on_a_full_disk_or_read_only_target(tmp_path, monkeypatch, capfd, command, code):
    """Hydra writes `.hydra/*.yaml` (and a multirun's `multirun.yaml`) with a plain `open` before ctt's code runs:
    ctt checks the folder takes those bytes first (ctt.reliability.run_dir.check_room_for_hydra), so a full or
    read-only disk is one OutputError line, not Hydra's traceback and exit status 1."""
    if command == "multirun":
        folder, args = tmp_path / "sweep", ("ctt.train", "-m", "experiment=smoke", "evaluate=false",
                                             "trainer.max_steps=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1")
    else:
        folder = tmp_path / "run" / ".hydra"
        args = (command, "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}",
                *(("evaluate=false", "trainer.max_steps=1") if command == "ctt.train" else ("eval.limit=1",)))
    faults = Faults(monkeypatch, f"{folder}/", code)
    code_, _, err = run_main(*args, capfd=capfd)
    assert_user_error(code_, err, f"OutputError: {os.strerror(code).lower()} writing {folder}")
    assert faults.hits and not [p for p in folder.rglob("*") if p.is_file()]


def test_a_full_disk_under_the_run_log_is_one_notice_not_a_traceback_per_line(tmp_path, monkeypatch, capfd):
    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(logging.FileHandler, "_open", lambda self: FullDisk())  # <run dir>/train.log: disk full
    faults = Faults(monkeypatch, "last.ckpt")
    code, _, err = train(tmp_path / "run", capfd, "trainer.max_steps=2")
    assert_user_error(code, err, "OutputError: no space left on device writing")
    assert faults.hits and err.count("writing the log file") == 1, err[-3000:]


# --- evaluation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, code, room", [("scaling.png", errno.ENOSPC, 100), ("results.csv", errno.EROFS, 0),
                                              ("samples.jsonl", errno.ENOSPC, 10)])
def test_evaluation_on_a_full_disk_or_read_only_target(tmp_path, monkeypatch, capfd, name, code, room):
    run = tmp_path / "eval"
    evaluate = ("ctt.eval", "experiment=smoke", "eval.limit=1", "eval.samples=1", "eval.num_continuations=[1]",
                "eval.modes=[base,fixed]", f"hydra.run.dir={run}")
    assert run_main(*evaluate, capfd=capfd)[0] == 0
    before = snapshot(run, name, "results.csv", "results.md", "scaling.png", "deltas.png", "comparisons.csv")
    assert name in before
    faults = Faults(monkeypatch, name, code, room)
    code_, _, err = run_main(*evaluate, capfd=capfd)  # the same evaluation again, in the same dir
    assert_user_error(code_, err, f"OutputError: {os.strerror(code).lower()} writing {run / name}")
    assert faults.hits and snapshot(run, *before) == before and temp_siblings(run) == []
    assert (run / "scaling.png").stat().st_size  # never a 0-byte plot


# --- export ------------------------------------------------------------------------------------------------------


def test_export_on_a_full_disk_or_read_only_target(tmp_path, monkeypatch, capfd):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from tests.test_outputs import export

    out = tmp_path / "hf"
    assert export(tmp_path, capfd, f"export.dir={out}")[0] == 0
    before = snapshot(out)
    real_save = transformers.modeling_utils.safe_save_file

    def disk_full(tensors, filename, metadata=None):  # what safetensors raises on ENOSPC (checked under strace)
        Path(filename).write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
        code, _, err = export(tmp_path, capfd, f"export.dir={out}", "export.overwrite=true")
    assert_user_error(code, err, f"OutputError: no space left on device writing {out}")
    assert real_save is transformers.modeling_utils.safe_save_file
    with monkeypatch.context() as patch:
        faults = Faults(patch, "ctt_export.json", errno.EROFS)
        code, _, err = export(tmp_path, capfd, f"export.dir={out}", "export.overwrite=true")
    assert_user_error(code, err, f"OutputError: read-only file system writing {out}")
    assert faults.hits and snapshot(out) == before  # the earlier export whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == [".hf.lock"]  # no temp folder left
