"""Metrics out of a run: console progress (rate, ETA), TensorBoard events and a JSONL file.

TensorBoard events are written with the `tensorboard` package's record writer directly: its
EventFileWriter imports TensorFlow when installed (seconds of start-up, GBs of address space)
for nothing we need. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import socket
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from qdc_jax import storage


def _scalar(v: Any) -> Optional[float]:
  try:
    f = float(np.asarray(v))
  except (TypeError, ValueError):
    return None
  return f


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricLogger:
  """Writes `<workdir>/<name>_metrics.jsonl` and TensorBoard events under `<workdir>/tb/<name>`.

  On resume from `start_step`, JSONL rows with a later step are dropped first: they were
  logged after the checkpoint the run restarts from and will be logged again, so the file
  ends up with each step once.
  """

  def __init__(self, workdir: str, *, name: str = "train", total_steps: Optional[int] = None,
               start_step: int = 0, unit: str = "steps"):
    self.enabled = jax.process_index() == 0
    self.total_steps, self.unit = total_steps, unit
    self.path = storage.join(workdir, f"{name}_metrics.jsonl")
    self._t0, self._s0 = time.perf_counter(), start_step
    self._last_t, self._last_step = self._t0, start_step
    if not self.enabled:
      return
    kept = []
    if storage.exists(self.path):
      for line in storage.read_text(self.path).splitlines():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill mid-write
        if row.get("step", -1) <= start_step:
          kept.append(json.dumps(row))
    self._jsonl = storage.AppendWriter(self.path, kept)
    tb_dir = storage.join(workdir, "tb", name)
    storage.makedirs(tb_dir)
    fname = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
    self._tb_file = storage.path(storage.join(tb_dir, fname)).open("wb")
    self._tb = RecordWriter(self._tb_file)
    self._add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _add_event(self, event) -> None:
    self._tb.write(event.SerializeToString())

  def write(self, step: int, metrics: Mapping[str, Any], *, console: bool = True,
            items_per_step: Optional[float] = None, items_name: str = "tokens") -> dict:
    """Log scalars at `step`; adds `<unit>_per_s` (and items/s) since the previous call."""
    now = time.perf_counter()
    row = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
    dt = now - self._last_t
    if step > self._last_step and dt > 0:
      rate = (step - self._last_step) / dt
      row[f"{self.unit}_per_s"] = rate
      if items_per_step:
        row[f"{items_name}_per_s"] = rate * items_per_step
    self._last_t, self._last_step = now, step
    if not self.enabled:
      return row
    self._jsonl.write_line(json.dumps({"step": int(step), "time": time.time(), **row}))
    for k, v in row.items():
      if math.isfinite(v):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)])
        self._add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary))
    self._tb.flush()
    if console:
      parts = [f"{self.unit[:-1] if self.unit.endswith('s') else self.unit} {step}"
               + (f"/{self.total_steps}" if self.total_steps else "")]
      parts += [f"{k}={v:.4g}" for k, v in row.items()]
      done = step - self._s0
      if self.total_steps and done > 0:
        left = (self.total_steps - step) * (now - self._t0) / done
        parts.append(f"ETA {format_duration(left)}")
      logging.info(" | ".join(parts))
    return row

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb_file.close()
