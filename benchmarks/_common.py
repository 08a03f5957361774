"""Shared helpers of the benchmark scripts: machine info, timing, matmul peaks, tables.

Not a test and not part of the package; imported by the scripts in this folder.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence


def load_average() -> tuple[float, float, float]:
  try:
    return os.getloadavg()
  except OSError:
    return (float("nan"),) * 3


def machine_info() -> dict:
  """CPU model, cores, RAM, load and library versions (imports only what is installed)."""
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  ram_gib = float("nan")
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          ram_gib = int(line.split()[1]) / 2**20
          break
  except OSError:
    pass
  from importlib import metadata
  versions = {}
  for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
    try:  # metadata only: importing torch here would start its thread pools in this process
      versions[mod] = metadata.version(mod)
    except metadata.PackageNotFoundError:
      pass
  return {
      "cpu": cpu,
      "cores": os.cpu_count(),
      "ram_gib": round(ram_gib, 1),
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "loadavg_1_5_15": [round(x, 2) for x in load_average()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "versions": versions,
  }


def time_calls(fn: Callable[[], object], *, min_repeats: int = 5, max_repeats: int = 50,
               budget_s: float = 20.0) -> list[float]:
  """Seconds of each call of `fn` (which must block until its work is done).

  Runs at least `min_repeats` calls, then more until `budget_s` or `max_repeats`.
  """
  times = []
  start = time.perf_counter()
  while len(times) < max_repeats:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    if len(times) >= min_repeats and time.perf_counter() - start > budget_s:
      break
  return times


def summarize(times: Sequence[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "n": len(times)}


class MatmulPeak:
  """f32 n x n @ n x n matmul rate of one library, measurable again and again in a run.

  `measure(repeats)` returns {"median_gflops", "best_gflops", ...} over `repeats` calls.
  """

  def __init__(self, lib: str, n: int = 2048):
    self.lib, self.n = lib, n
    if lib == "jax":
      import jax
      import jax.numpy as jnp
      import numpy as np
      rng = np.random.default_rng(0)
      a = jnp.asarray(rng.standard_normal((n, n), np.float32))
      b = jnp.asarray(rng.standard_normal((n, n), np.float32))
      f = jax.jit(jnp.dot)
      self._call = lambda: f(a, b).block_until_ready()
    elif lib == "torch":
      import torch
      g = torch.Generator().manual_seed(0)
      a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
      out = torch.empty(n, n)
      self._call = lambda: torch.matmul(a, b, out=out)
    else:
      raise ValueError(lib)
    for _ in range(3):
      self._call()

  def measure(self, repeats: int = 20) -> dict:
    times = time_calls(self._call, min_repeats=repeats, max_repeats=repeats)
    flops = 2.0 * self.n ** 3
    self.last = {"n": self.n, "median_gflops": flops / statistics.median(times) / 1e9,
                 "best_gflops": flops / min(times) / 1e9, "repeats": repeats}
    return self.last


def jax_matmul_peak(n: int = 2048, repeats: int = 20) -> dict:
  """f32 GFLOP/s of a jitted n x n @ n x n jnp.dot (median and best of `repeats`)."""
  return MatmulPeak("jax", n).measure(repeats)


def torch_matmul_peak(n: int = 2048, repeats: int = 20) -> dict:
  """f32 GFLOP/s of torch.matmul n x n @ n x n (median and best of `repeats`)."""
  import torch
  return dict(MatmulPeak("torch", n).measure(repeats), threads=torch.get_num_threads())


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """Markdown table; columns are (key, header, format spec)."""
  head = "| " + " | ".join(h for _, h, _ in columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  lines = [head, sep]
  for r in rows:
    cells = []
    for key, _, spec in columns:
      v = r.get(key)
      if v is None:
        cells.append("-")
      elif isinstance(v, str):
        cells.append(v)
      else:
        cells.append(format(v, spec))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_json(path: Optional[str], payload: dict) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  print(f"wrote {path}")
