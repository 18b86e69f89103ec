"""Run logs: `metrics.jsonl` (one JSON object per logged step), TensorBoard scalars, a progress bar.

Only process 0 writes. On resume, the lines of the stage that lie beyond the restored step (written
after the last checkpoint of an interrupted run) are dropped, so the file reads like one clean run.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax
from tqdm import tqdm


class MetricsLogger:
    """Appends {"stage", "step", **metrics} lines to <workdir>/metrics.jsonl and TensorBoard events."""

    def __init__(self, workdir: str, stage: str, *, resume_step: int = 0, total_steps: int = 0,
                 batch_size: int = 1):
        self.stage = stage
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.batch_size = batch_size
        self._last_time, self._last_step = time.perf_counter(), resume_step
        self.excluded_seconds = 0.0  # the total left out of images_per_s (validation, sampling)
        self._writer = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _drop_lines_after(self.path, stage, resume_step)
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard", stage))
        self._bar = tqdm(total=total_steps, initial=resume_step, desc=stage, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, float]) -> dict:
        """Writes the train-step metrics of `step` with images_per_s since the previous call."""
        now = time.perf_counter()
        rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        record = self._write(step, {**metrics, "images_per_s": round(rate, 2)})
        if self.enabled:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}", img_s=f"{rate:.1f}")
        return record

    def log_extra(self, step: int, metrics: Mapping[str, float]) -> dict:
        """Writes other metrics of `step` (validation, samples) as their own line."""
        return self._write(step, metrics)

    def exclude_time(self, seconds: float) -> None:
        """Leaves `seconds` (validation, sampling) out of the next images_per_s."""
        self._last_time += seconds
        self.excluded_seconds += seconds

    def _write(self, step: int, metrics: Mapping[str, float]) -> dict:
        record = {"stage": self.stage, "step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{self.stage}/{key}", value, step)
        return record

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._bar.close()


def _plain(value) -> float | int:
    value = float(value)
    return value if not math.isfinite(value) or not value.is_integer() else int(value)


def _drop_lines_after(path: str, stage: str, step: int) -> None:
    """Rewrites `path` without the `stage` lines whose step is beyond `step` (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if not _is_beyond(line, stage, step)]
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _is_beyond(line: str, stage: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return True  # a line cut short by the interruption
    return record.get("stage") == stage and record.get("step", 0) > step
