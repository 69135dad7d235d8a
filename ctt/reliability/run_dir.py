"""A run dir belongs to one live process, and what a run writes must be writable before it starts.

`RunDirLock` is a Hydra callback (conf/hydra/default.yaml): before Hydra creates the run dir and writes `.hydra/`
into it (`on_run_start`; a multirun job's dir at `on_job_start`), it takes an exclusive `fcntl.flock` on
`<run dir>/.ctt.lock` and writes its pid there. A second ctt process in the same dir stops with one line naming the
owner's pid (exit status 2) instead of overwriting `.hydra/`, doubling `metrics.csv` and forking the checkpoints.
The OS drops the lock when its process dies, however it dies, so a killed run never leaves the dir locked (the file
stays, unlocked). A rerun in a dir that already has `.hydra/` writes its Hydra files to `.hydra/reruns/<time>/`
(`keep_first_config`). Processes that are ranks of a launch (Lightning's re-launched DDP ranks, SLURM or torchrun ranks
> 0) share their launcher's run dir and take no lock.

Why by hand: neither Hydra nor Lightning has an owner for a run dir (Hydra's `hydra.run.dir` is just a path, and
Lightning's ModelCheckpoint avoids clobbering files by versioning them, which is the fork this prevents).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ctt.errors import ConfigError, CttError, DataError, OutputError
from ctt.text import read_yaml
from ctt.outputs import RUN_DIR_SIGNS, open_lock_file, place_reason, try_lock
from ctt.writes import check_room

log = logging.getLogger(__name__)

LOCK_FILE = ".ctt.lock"
_held: dict[Path, int] = {}  # run dir -> descriptor holding its lock, in this process


def launch_rank() -> int:
    """This process's global rank when an outside launcher started one process per device (SLURM's srun, e.g.
    through hydra/launcher=slurm, or torchrun), else 0. Read from the environment as the job starts."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def is_secondary_rank() -> bool:
    """A process started by a launcher for rank > 0 (its run dir belongs to the launching process)."""
    return launch_rank() != 0 or os.environ.get("LOCAL_RANK", "0") not in ("", "0")


def _make_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"hydra.run.dir={path} is a file, not a directory; choose another hydra.run.dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create hydra.run.dir={path}: {err.strerror or err}") from None


# What a ctt run leaves in its run dir, RUN_DIR_SIGNS (`.ctt.lock` also with output_subdir=null, `checkpoints/`
# copied to resume), and in its sweep dir.
SWEEP_SIGNS = ("multirun.yaml", *RUN_DIR_SIGNS)


def check_run_dir(path: Path, what: str = "hydra.run.dir", signs: tuple[str, ...] = RUN_DIR_SIGNS) -> None:
    """A run writes results.csv, samples.jsonl, results.md, metrics, checkpoints and plots into its run dir,
    replacing files of those names: so a run dir is a new or empty folder, or one a ctt run made (it holds `.hydra/`,
    `.ctt.lock` or `checkpoints/`). A folder of the user's (a copy of results, a paper's figures) and the places no
    output may take (the project checkout, a home directory, an ancestor of the current directory) are refused with
    one line. The current directory itself is a run dir like any other folder: when it is empty or a ctt run's."""
    reason = place_reason(path, cwd_ok=True)
    if reason is not None:
        raise ConfigError(f"{what}={path} cannot be a run dir: {reason}; choose a new folder")
    if not path.is_dir():
        return  # absent (created next), or a file (refused by _make_dir)
    try:
        entries = sorted(os.listdir(path))
    except OSError as err:
        raise ConfigError(f"cannot read {what}={path}: {err.strerror or err}") from None
    if entries and not any(sign in entries for sign in signs):
        raise ConfigError(f"{what}={path} holds files ctt did not write ({entries[0]!r}, ...) and no ctt run (no "
                          f"{' or '.join(signs)}); a run there would overwrite files of its names: choose a new or "
                          "empty folder")


def lock_run_dir(path: str | Path) -> None:
    """Take the run dir's lock for this process (re-entrant); ConfigError naming the owner if another holds it, or
    when the folder is not one a run may write into (`check_run_dir`)."""
    path = Path(path).absolute()
    if path in _held:
        return
    check_run_dir(path)
    _make_dir(path)
    fd = open_lock_file(path / LOCK_FILE, f"hydra.run.dir={path}")  # never follows a symlinked lock file
    owner = try_lock(fd)
    if owner is not None:  # another process holds it
        os.close(fd)
        raise ConfigError(
            f"hydra.run.dir={path} is in use by another ctt process (pid {owner}); wait for it to end, or choose "
            "another hydra.run.dir"
        )
    _held[path] = fd


def unlock_run_dir(path: str | Path) -> None:
    fd = _held.pop(Path(path).absolute(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def one_line_exit(err: CttError) -> None:
    """Hydra's logging is not set up yet when the callback runs: print the entry points' one line and exit 2."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}][{__name__}][ERROR] - {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_room_for_hydra(config: DictConfig, directory: Path) -> None:
    """Hydra writes `.hydra/*.yaml` (or a multirun's `multirun.yaml`) with a plain `open` right after this callback:
    a read-only or full disk would be its traceback. Check that `directory` takes those bytes first (twice the
    config's YAML: config.yaml, hydra.yaml and overrides.yaml together are less)."""
    try:
        check_room(directory, 2 * len(OmegaConf.to_yaml(config).encode("utf-8")))
    except OutputError as err:
        one_line_exit(err)


class RunDirLock(Callback):
    """Hydra callback: one live process per run dir (see the module docstring)."""

    def _take(self, config: DictConfig, key: str) -> Path | None:
        if is_secondary_rank():
            return None
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # as Hydra's run_job does, so `${hydra:...}` in the dir resolves
        path = Path(str(OmegaConf.select(config, key)))
        try:
            lock_run_dir(path)
        except ConfigError as err:
            one_line_exit(err)
        return path

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._run_dir = self._take(config, "hydra.run.dir")
        if self._run_dir is None:
            return
        try:
            own = own_run_dir(config, self._run_dir)
        except ConfigError as err:
            one_line_exit(err)
        if own != self._run_dir:
            unlock_run_dir(self._run_dir)
            from omegaconf import open_dict, read_write

            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.run.dir = str(own)
            print(f"{self._run_dir} holds a run of another kind or config: this {config.task_name} run writes to "
                  f"{own}", file=sys.stderr, flush=True)
            self._run_dir = self._take(config, "hydra.run.dir")
        keep_first_config(config, self._run_dir)
        if config.hydra.get("output_subdir") is not None:
            check_room_for_hydra(config, self._run_dir / str(config.hydra.output_subdir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_secondary_rank():
            return
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # the sweep dir's `${now:...}` resolves as the launcher's will
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()
        try:
            check_run_dir(sweep_dir, "hydra.sweep.dir", SWEEP_SIGNS)
        except ConfigError as err:
            one_line_exit(err)
        check_room_for_hydra(config, sweep_dir)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if getattr(self, "_run_dir", None) is not None:
            unlock_run_dir(self._run_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            self._job_dir = self._take(config, "hydra.runtime.output_dir")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if getattr(self, "_job_dir", None) is not None:
            unlock_run_dir(self._job_dir)
            self._job_dir = None


def _stored(run_dir: Path, name: str) -> dict | None:
    """The run dir's `.hydra/<name>` (None when it has none). One that cannot be read, is not YAML or not a
    mapping is refused: which run the dir holds cannot be told, so no run may write its results there."""
    path = run_dir / ".hydra" / name
    if not os.path.lexists(path):
        return None
    try:
        return read_yaml(path)  # the one YAML reader: bounded, safe
    except DataError as err:
        raise ConfigError(f"hydra.run.dir={run_dir} cannot be told apart from another run: {err}; repair it or "
                          "choose another hydra.run.dir") from None


def _same_evaluation(stored: dict, current: dict) -> bool:
    """Whether ctt-eval's stored config is the current one. ctt-eval records the token count a k-row token file
    installs under the default token.count=1 (ctt.eval.record_token_count): with the same token file and that default,
    the stored count is the file's, and the rerun is the same evaluation."""
    stored_token, token = stored.get("token"), current.get("token")
    if (isinstance(stored_token, dict) and isinstance(token, dict) and token.get("path")
            and stored_token.get("path") == token.get("path") and token.get("count", 1) == 1):
        stored = {**stored, "token": {**stored_token, "count": token.get("count", 1)}}
    return stored == current


def own_run_dir(config: DictConfig, run_dir: Path) -> Path:
    """A run dir holds one kind of run, so that `.hydra/config.yaml` describes the results beside it. A command in a
    dir whose config another command wrote (its `.hydra/hydra.yaml` names the entry point's config: train, eval,
    generate, export), and ctt-eval in a dir whose config differs from its own, run in a subfolder of their own,
    `<run dir>/<command>/<time>/` (ctt-report finds it there); training there is refused (a rerun of training is a
    resume, which ctt.resume checks)."""
    stored = _stored(run_dir, "config.yaml")
    if stored is None:
        return run_dir
    kind = OmegaConf.select(config, "hydra.job.config_name")
    stored_kind = OmegaConf.select(OmegaConf.create(_stored(run_dir, "hydra.yaml") or {}), "hydra.job.config_name")
    if kind == "train":
        if stored_kind not in (None, "train"):
            raise ConfigError(f"hydra.run.dir={run_dir} holds a ctt-{stored_kind} run (its .hydra/); train in another "
                              "hydra.run.dir")
        return run_dir
    if stored_kind == kind:
        current = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k != "hydra"}
        if kind != "eval" or _same_evaluation(stored, current):
            return run_dir
    return run_dir / str(kind) / time.strftime("%Y-%m-%d_%H-%M-%S")


def keep_first_config(config: DictConfig, run_dir: Path) -> None:
    """A rerun in a run dir that has `.hydra/config.yaml` (a resume, or a run refused at start-up) writes its Hydra
    files to `.hydra/reruns/<time>/` instead: the run's config stays the one it was started with (a resume must use
    the same config, ctt.reliability.resume checks that), and a rerun refused at start-up does not replace it."""
    from omegaconf import open_dict, read_write

    subdir = config.hydra.get("output_subdir")
    if subdir is None or not (run_dir / subdir / "config.yaml").is_file():
        return
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = f"{subdir}/reruns/{time.strftime('%Y-%m-%d_%H-%M-%S')}"


def _probe(directory: Path) -> None:
    with tempfile.TemporaryFile(dir=directory):
        pass


def check_writable(directory: Path, what: str) -> None:
    """ConfigError unless `directory` (when it exists) is a directory this process can create files in."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ConfigError(f"{what} {directory} is a file, not a directory")
    try:
        _probe(directory)
    except OSError as err:
        raise ConfigError(f"{what} {directory} is not writable: {err.strerror or err}") from None


def check_writable_outputs(cfg: DictConfig) -> None:
    """The run dir and the folders a run writes into (checkpoints, csv metrics) are writable, checked before
    training instead of failing at the first save."""
    from ctt.reliability.resume import checkpoint_dir

    out = Path(cfg.paths.output_dir)
    check_writable(out, "the run dir")
    check_writable(checkpoint_dir(cfg), "the checkpoint dir")
    check_writable(out / "csv", "the metrics dir")
    for name, node in (cfg.get("logger") or {}).items():  # TensorBoard's, W&B's folders: they write outside ctt.writes
        save_dir = Path(str(node.save_dir)) if isinstance(node, DictConfig) and node.get("save_dir") else None
        if save_dir is not None:
            check_writable(save_dir, f"the {name} logger's save_dir")
            if node.get("name"):
                check_writable(save_dir / str(node.name), f"the {name} logger's dir")
