"""Run logging on process 0: JSON lines, TensorBoard event files, a progress bar with ETA.

TensorBoard files are written by tensorboardX (no TensorFlow). Other processes get a
writer that does nothing, so callers never branch on the process index.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import numpy as np

from pupujepa_jax.masking import STRATEGIES as MASK_STRATEGIES



def _plain(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Writes `metrics.jsonl` and `tb/` under the workdir and drives a tqdm progress bar."""

  def __init__(self, workdir, total_steps: int, start_step: int = 0, enabled: bool = True,
               progress: bool = True):
    self.enabled = enabled
    self._bar = None
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(str(workdir / "tb"))
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                       dynamic_ncols=True, file=sys.stderr)

  def write(self, step: int, metrics: dict) -> dict:
    """Log scalars of one step; returns the JSON-able record."""
    record = {"step": int(step), "time": time.time()}
    for key, value in metrics.items():
      record[key] = _plain(value)
    if "mask_strategy" in record:
      record["mask_strategy"] = MASK_STRATEGIES[int(record["mask_strategy"])]
    if not self.enabled:
      return record
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)
    return record

  def advance(self, steps: int = 1):
    if self._bar is not None:
      self._bar.update(steps)

  def close(self):
    if not self.enabled:
      return
    self._jsonl.close()
    self._tb.close()
    if self._bar is not None:
      self._bar.close()


def read_jsonl(path) -> list[dict]:
  """All records of a metrics.jsonl; a resumed run's re-logged steps keep the last record."""
  by_step = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]
