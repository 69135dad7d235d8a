"""A CSV logger that survives a resume and a kill.

Lightning's CSVLogger deletes an existing `metrics.csv` when it starts, so resuming a run in its own directory
(`ckpt_path=last`) would throw away the metrics of everything before the interruption. `ResumableCSVLogger` keeps
the earlier rows up to the first step the resumed run logs (rows of steps that are trained again after the
checkpoint are replaced), so the file stays one continuous history. Lightning also rewrites the whole file in place
(truncate, then write) whenever a new metric name appears; a kill in between lost every earlier row. Here every
whole-file rewrite is atomic (`ctt.writes.atomic_write_bytes`, `hparams.yaml` too), and new rows are
appended whole or not at all (`append_bytes`: a full disk cuts the file back to its earlier rows, one OutputError line).
"""

from __future__ import annotations

import csv
import io
import logging
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers.logger import rank_zero_experiment

from ctt.errors import OutputError
from ctt.writes import append_bytes, atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


def _csv_bytes(fieldnames: list[str], rows: list[dict], header: bool = True) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def pending_metrics_row(trainer, names: set[str]) -> dict | None:
    """The row Lightning will log for the step that just ran, read where checkpoints are saved (batch end): the
    synced values of `names` (what the module logs to loggers), with the step and epoch Lightning gives the row."""
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k in names}
    if not values or trainer.global_step < 1:
        return None
    return {**values, "epoch": trainer.current_epoch, "step": trainer.global_step - 1}


class _ResumingWriter(ExperimentWriter):
    restored_row: dict | None = None  # the checkpoint's last step, in case its row never reached the file

    def _check_log_dir_exists(self) -> None:  # called by __init__ instead of deleting metrics.csv
        self._previous: list[dict] | None = None
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._previous = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def log_hparams(self, params: dict) -> None:  # Lightning's, renamed into place: a resume rewrites the file
        self.hparams.update(params)
        with atomic_path(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        atomic_write_bytes(_csv_bytes(fieldnames, rows), self.metrics_file_path)

    def save(self) -> None:
        if self._previous is not None and self.metrics:
            first = min(m["step"] for m in self.metrics)
            kept = [r for r in self._previous if _step(r) < first]  # NaN steps compare False: dropped
            row = self.restored_row
            if row is not None and row["step"] == first - 1 and all(_step(r) != row["step"] for r in kept):
                kept.append(row)
                self.metrics_keys = sorted(set(self.metrics_keys) | set(row))
            self._record_new_keys()
            atomic_write_bytes(_csv_bytes(self.metrics_keys, kept), self.metrics_file_path)
            self._previous = None  # only once written: a failed rewrite is tried again, never skipped to the append
        if not self.metrics:
            return
        # Lightning's save, with the rows appended whole (its own `open(.., "a")` leaves half a row on a full disk)
        new_keys, exists = self._record_new_keys(), os.path.isfile(self.metrics_file_path)
        if new_keys and exists:
            self._rewrite_with_new_header(self.metrics_keys)
        append_bytes(_csv_bytes(self.metrics_keys, self.metrics, header=not exists), self.metrics_file_path)
        self.metrics = []


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment

    def finalize(self, status: str) -> None:
        try:
            super().finalize(status)
        except OutputError as err:
            if status != "failed":
                raise
            # Lightning flushes the metrics while it unwinds another error: that one is reported, not this
            log.warning("metrics not flushed: %s", err)

    def restore_row(self, row: dict | None) -> None:
        """The resumed checkpoint's `pending_metrics_row`: written before the resumed run's first row if missing."""
        experiment = self.experiment
        if isinstance(experiment, _ResumingWriter):  # rank 0 (other ranks hold a dummy)
            experiment.restored_row = row
