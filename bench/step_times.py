"""A Lightning callback for bench/bench_paper_shape.py: per rank, each training step's wall time, the process's peak
RSS so far (VmHWM), the last push of the row into vLLM and the time of one more (forced) push, one JSON line per step in `path`_rank<r>.jsonl.
Added to a ctt-train run with `+callbacks.step_times._target_=bench.step_times.StepTimes +callbacks.step_times.path=P`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


class StepTimes(L.Callback):
    def __init__(self, path: str):
        self.path = path
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        engine = getattr(pl_module.policy, "_engine", None)
        step_s = time.perf_counter() - self._start
        # A random model's rewards are all 0, so the row does not move and the engine pushes nothing: push the same
        # row once more (after the step is timed) to measure the push at this shape.
        forced_push = engine.sync_rows(force=True) if getattr(engine, "kind", None) == "vllm" else None
        record = dict(rank=trainer.global_rank, step=trainer.global_step, step_s=step_s,
                      peak_rss_mb=_status_kb("VmHWM") / 1024, rss_mb=_status_kb("VmRSS") / 1024,
                      engine=getattr(engine, "kind", None),
                      last_push_ms=None if getattr(engine, "last_sync_seconds", None) is None
                      else engine.last_sync_seconds * 1e3,
                      forced_push_ms=None if forced_push is None else forced_push * 1e3)
        with open(f"{self.path}_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
