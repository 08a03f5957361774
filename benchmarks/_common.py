"""Shared helpers of the benchmark scripts: machine info, timing, matmul peaks, tables.

Not a test and not part of the package; imported by the scripts in this folder.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
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


def sample_before(params, prompts_BxP, prompt_lengths_B, rng, *, model, sp):
  """`sampling.sample` as it was before prompt sharing (2026-12-02, commit 28bbe2d): the
  prompt's cache copied to each of its K rows (P + N slots each), one cached step per token,
  on today's model code (its full-cache decode path is the one prefill uses); the same keys,
  token choice and outputs (no hook, no stop sequences). The "before" of the sampler
  benchmarks."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qdc_jax import sampling  # pylint: disable=g-import-not-at-top
  from qdc_jax.models import transformer  # pylint: disable=g-import-not-at-top
  cfg = model.config
  b, p = prompts_BxP.shape
  k, n = sp.num_samples, sp.max_new_tokens
  cache = transformer.init_cache(cfg, b, p + n)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
  logits, cache = model.apply({"params": params}, prompts_BxP, positions, cache=cache,
                              logits_index_B=prompt_lengths_B - 1)
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
  last = jnp.repeat(logits[:, 0], k, axis=0)
  start = jnp.repeat(prompt_lengths_B.astype(jnp.int32), k)
  keys = sampling.row_keys(rng, b, k)
  rows = b * k
  stops = jnp.asarray(sp.stop_ids, jnp.int32)

  def body(c):
    i, done = c["i"], c["done"]
    at_i = jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(i, (rows,)))
    tok = sampling.choose_tokens(c["logits"], at_i, sp)
    logp = jnp.take_along_axis(jax.nn.log_softmax(c["logits"], -1), tok[:, None], -1)[:, 0]
    tok = jnp.where(done, sp.pad_id, tok)
    logits, cache = model.apply({"params": params}, tok[:, None], (start + i)[:, None],
                                cache=c["cache"])
    return {"i": i + 1, "tokens": c["tokens"].at[:, i].set(tok),
            "logps": c["logps"].at[:, i].set(jnp.where(done, 0.0, logp)),
            "lengths": c["lengths"] + (~done).astype(jnp.int32),
            "done": done | jnp.isin(tok, stops), "logits": logits[:, 0], "cache": cache}

  init = {"i": jnp.zeros((), jnp.int32), "tokens": jnp.full((rows, n), sp.pad_id, jnp.int32),
          "logps": jnp.zeros((rows, n), jnp.float32), "lengths": jnp.zeros((rows,), jnp.int32),
          "done": jnp.zeros((rows,), jnp.bool_), "logits": last, "cache": cache}
  out = jax.lax.while_loop(lambda c: (c["i"] < n) & ~jnp.all(c["done"]), body, init)
  return sampling.SampleOutput(out["tokens"], out["lengths"], out["logps"])


def module_at_revision(path: str, rev: str):
  """The repository file `path` as of git revision `rev`, imported as a fresh module (a
  benchmark's "before" of the same run)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, check=True,
                       capture_output=True, text=True).stdout
  tmp = os.path.join(tempfile.mkdtemp(prefix="qdc_rev_"), os.path.basename(path))
  with open(tmp, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location(f"_rev_{rev}_{os.path.basename(path)[:-3]}",
                                                tmp)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses (flax modules) resolve names through it
  spec.loader.exec_module(mod)
  return mod
