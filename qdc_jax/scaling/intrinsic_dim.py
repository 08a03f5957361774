"""Intrinsic dimension of a point set: Levina-Bickel MLE and TwoNN, in JAX (thesis 2.4).

Both read only the sorted nearest-neighbour distances of every point (`embed.knn`):
- Levina-Bickel MLE with K neighbours: per point m(x) = (K - 1) / sum_{j<=K} log(T_K / T_j),
  T_j the distance to the j-th neighbour; aggregated by the arithmetic mean of the per-point
  estimates (scikit-dimension's `MLE().fit(X, comb="mean")`) or by the harmonic form
  1 / mean(1 / m(x)) (its `comb="mle"`, Levina & Bickel's MacKay-Ghahramani correction).
- TwoNN (Facco et al. 2017): mu = T_2 / T_1 follows Pareto(1, d); the slope through the
  origin of -log(1 - F_emp(mu)) against log(mu), the largest `discard_fraction` of the mu
  left out (scikit-dimension's `TwoNN()`, method 'linear').

Duplicate points (a zero distance among a point's neighbours) would give log(T_K / 0) and
0 / 0: such points are left out of the aggregate and counted in `duplicates`, never a NaN.
The thesis's procedure for large sets (`estimate_in_batches`): shuffle, split into batches of
4096 points, estimate each batch on its own neighbours, average the batch estimates.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qdc_jax import embed
from qdc_jax import sharding as sharding_lib

AGGREGATIONS = ("mean", "harmonic")
TWONN_DISCARD = 0.1  # scikit-dimension's default: the largest 10% of the ratios left out


@dataclasses.dataclass(frozen=True)
class Estimate:
  dimension: float
  points: int  # points that entered the aggregate
  duplicates: int  # points left out: a zero distance among their neighbours
  # MLE: m(x) of the points that entered; TwoNN: their ratios mu = T_2 / T_1.
  per_point: Optional[np.ndarray] = None
  degenerate: int = 0  # MLE: points left out whose K neighbours are all equidistant


@jax.jit
def _mle_per_point(dist_NxK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  k = dist_NxK.shape[1]
  distinct = dist_NxK[:, 0] > 0  # sorted: the first is the smallest
  safe = jnp.where(distinct[:, None], dist_NxK, 1.0)
  logs = jnp.sum(jnp.log(safe[:, -1:] / safe), axis=1)
  # All K neighbours at one distance: sum 0 -> an infinite estimate; keep it finite and out.
  ok = distinct & (logs > 0)
  return jnp.where(ok, (k - 1) / jnp.where(ok, logs, 1.0), 0.0), ok, distinct


def mle_from_distances(dist_NxK, aggregation: str = "mean") -> Estimate:
  """Levina-Bickel MLE from sorted neighbour distances [N, K] (self excluded)."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; choose one of {AGGREGATIONS}")
  dist = jnp.asarray(dist_NxK)
  if dist.ndim != 2 or dist.shape[1] < 2:
    raise ValueError(f"MLE needs [N, K >= 2] neighbour distances, got shape {dist.shape}")
  m, ok, distinct = sharding_lib.to_host(_mle_per_point(dist))
  if not ok.any():
    raise ValueError("Every point has a zero distance among its neighbours (all duplicates) "
                     "or K equidistant neighbours; deduplicate the points or raise K")
  return Estimate(float(_aggregate(m[ok], aggregation)), int(ok.sum()),
                  int((~distinct).sum()), m[ok], int((distinct & ~ok).sum()))


def mle(x_NxD, k: int = 20, *, aggregation: str = "mean", metric: str = "euclidean",
        block: int = 1024) -> Estimate:
  """Levina-Bickel MLE of the points' intrinsic dimension with `k` neighbours."""
  nbrs = embed.knn(x_NxD, k, metric=metric, block=block)
  return mle_from_distances(nbrs.distances, aggregation)


def _twonn_slope(mu: np.ndarray, discard_fraction: float) -> float:
  """The slope through the origin of -log(1 - F_emp) against log mu (largest mu dropped)."""
  mu = np.sort(mu)
  n = len(mu)
  keep = int(n * (1 - discard_fraction))
  x = np.log(mu[:keep])
  y = -np.log(1.0 - np.arange(1, keep + 1) / n)
  return float(np.dot(x, y) / np.dot(x, x))


def twonn_from_distances(dist_Nx2, discard_fraction: float = TWONN_DISCARD) -> Estimate:
  """TwoNN from the first two neighbour distances [N, >= 2] of each point."""
  if not 0.0 < discard_fraction < 1.0:
    # With nothing discarded the largest mu has F_emp = 1 and -log(1 - 1) = inf.
    raise ValueError(f"discard_fraction={discard_fraction} must be in (0, 1) for the linear "
                     f"fit (the largest ratio would sit at -log(0))")
  d = np.asarray(sharding_lib.to_host(dist_Nx2), np.float64)
  r1, r2 = d[:, 0], d[:, 1]
  ok = r1 > 0
  mu = r2[ok] / r1[ok]
  keep = int(len(mu) * (1 - discard_fraction))
  if keep < 2:
    raise ValueError(f"TwoNN needs at least 2 points after dropping {int((~ok).sum())} "
                     f"duplicates and the top {discard_fraction:.0%}; got {keep}")
  return Estimate(_twonn_slope(mu, discard_fraction), keep, int((~ok).sum()), mu)


def twonn(x_NxD, *, discard_fraction: float = TWONN_DISCARD, metric: str = "euclidean",
          block: int = 1024) -> Estimate:
  nbrs = embed.knn(x_NxD, 2, metric=metric, block=block)
  return twonn_from_distances(nbrs.distances, discard_fraction)


@dataclasses.dataclass(frozen=True)
class BatchedEstimate:
  dimension: float  # mean of the batch estimates
  stderr: float  # standard error of that mean over batches (nan with one batch)
  batch_dimensions: tuple[float, ...]
  duplicates: int
  interval: tuple[float, float]  # percentile bootstrap interval of `dimension`
  bootstrap: str  # what was resampled


def _aggregate(m: np.ndarray, aggregation: str, axis: int = -1) -> np.ndarray:
  return np.mean(m, axis) if aggregation == "mean" else 1.0 / np.mean(1.0 / m, axis)


def estimate_in_batches(x_NxD, *, k: int = 20, batch: int = 4096, estimator: str = "mle",
                        aggregation: str = "mean", metric: str = "euclidean", seed: int = 0,
                        bootstrap: int = 1000, level: float = 0.95) -> BatchedEstimate:
  """The thesis's procedure: shuffle (seeded), batches of `batch` points (with several
  batches the last, shorter one is dropped), one estimate per batch on that batch's own
  neighbours, averaged.

  Uncertainty: the standard error over batches, and a percentile bootstrap interval of the
  averaged estimate that resamples points within each batch (the per-point MLE estimates, or
  TwoNN's ratios mu, refitted), so one batch still gets an interval. The neighbour graph is
  held fixed: the interval is the spread of the aggregate, not an error bar on d.
  """
  if estimator not in ("mle", "twonn"):
    raise ValueError(f"estimator={estimator!r}; choose 'mle' or 'twonn'")
  x = np.asarray(x_NxD)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x))
  nb = max(1, len(x) // batch)
  ests = []
  for b in range(nb):
    rows = order[b * batch:(b + 1) * batch] if nb > 1 else order
    if estimator == "mle":
      ests.append(mle(x[rows], k, aggregation=aggregation, metric=metric))
    else:
      ests.append(twonn(x[rows], metric=metric))
  d = np.asarray([e.dimension for e in ests])
  se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
  boot = np.zeros(bootstrap)
  for e in ests:
    m = e.per_point
    draws = m[rng.integers(0, len(m), (bootstrap, len(m)))]
    if estimator == "mle":
      boot += _aggregate(draws, aggregation)
    else:
      boot += np.asarray([_twonn_slope(row, TWONN_DISCARD) for row in draws])
  boot /= len(ests)
  what = ("per-point estimates" if estimator == "mle" else "ratios mu") + " within each batch"
  lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
  return BatchedEstimate(float(d.mean()), se, tuple(map(float, d)),
                         sum(e.duplicates for e in ests), (float(lo), float(hi)), what)


# ------------------------------------------------------------------------ text under a model


def lab_texts(num_docs: int, seed: int = 0) -> list[str]:
  """`num_docs` lab problems with their reference solutions (prompt + solution): the shipped
  lab student's training distribution, and the command line's default corpus."""
  from qdc_jax.data import lab_tasks  # pylint: disable=g-import-not-at-top
  return [p.to_record()["prompt"] + p.solution
          for p in lab_tasks.student_problems(num_docs, seed=seed)]


def of_texts(texts: Sequence[str], *, model_dir: Optional[str] = None,
             layers: Sequence[Optional[int]] = (None,),
             position_buckets: Sequence[Optional[tuple[int, int]]] = (None,),
             context: int = 1024, per_doc: int = 32, k: int = 20, batch: int = 4096,
             metric: str = "euclidean", seed: int = 0, mesh=None) -> list[dict]:
  """Intrinsic dimension of texts under a model directory's transformer, the thesis's way:
  per document a random window of `context` tokens and `per_doc` of its token embeddings
  (`embed.sampled_token_embeddings`), then `estimate_in_batches` (MLE, K = `k`, batches of
  `batch` points).

  Args:
    texts: The documents (each encoded with BOS by the model's tokenizer).
    model_dir: A `qdc_jax.model_io` directory; None = the shipped lab student.
    layers: None = the final layer after the final norm; l = as `embed.hidden_states`.
    position_buckets: None = every window position; (lo, hi) = positions lo <= i < hi only.
    mesh: Default: all devices on the data axis.

  Returns:
    One row per (layer, bucket), layers outermost: {"layer" (num_layers for the final one),
    "positions", "points", "dimension", "stderr", "interval", "batches", "duplicates"}; a
    combination with no estimate (a layer whose vectors all repeat, an empty bucket) gives
    {"layer", "positions", "points", "error"} and the others still come.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from qdc_jax import model_io  # pylint: disable=g-import-not-at-top
  from qdc_jax.models import transformer  # pylint: disable=g-import-not-at-top
  mesh = mesh or sharding_lib.make_mesh((-1, 1, 1))
  cfg, params, tok, _, shardings = model_io.load_model(
      model_dir or model_io.asset_path("lab_student"), mesh=mesh)
  docs = [tok.encode(t, add_bos=True) for t in texts]
  model = transformer.Transformer(cfg)
  results = []
  for layer in layers:
    for bucket in position_buckets:
      name = cfg.num_layers if layer is None else layer
      x = np.zeros((0, cfg.d_model))
      try:
        x = embed.sampled_token_embeddings(
            params, docs, model=model, layer=layer, context=context, per_doc=per_doc,
            seed=seed, positions=bucket, mesh=mesh, param_shardings=shardings)
        est = estimate_in_batches(x, k=k, batch=batch, seed=seed, metric=metric)
      except ValueError as e:  # all vectors repeat, an empty bucket: say so, go on
        results.append({"layer": name, "positions": bucket, "points": len(x),
                        "error": str(e)})
        logging.warning("layer %s: %s", layer, e)
        continue
      results.append({"layer": name, "positions": bucket, "points": len(x),
                      "dimension": est.dimension, "stderr": est.stderr,
                      "interval": est.interval, "batches": len(est.batch_dimensions),
                      "duplicates": est.duplicates})
  return results


# ----------------------------------------------------------------------------------- CLI
#
#   python -m qdc_jax.scaling.intrinsic_dim [--model_dir=DIR] [--texts=FILE] \
#       [--layers=final|all|0,2,4] [--out=DIR]
#
# Intrinsic dimension of a text corpus the thesis's way, under a model directory's
# transformer: per document a random window of --context tokens, --per_doc token embeddings
# of each layer asked for, all shuffled, MLE with K neighbours on batches of --batch points.
# Defaults: the shipped lab student on lab problem + solution texts. Writes id.json and, with
# several layers or --position_buckets, id_vs_layer.png / id_vs_position.png (thesis fig. 2.4).


def _read_texts(path: str) -> list[str]:
  """Documents of a .txt file (one per non-empty line) or a .jsonl file (a "text" field, or
  "prompt" + "completion" joined)."""
  from qdc_jax import storage  # pylint: disable=g-import-not-at-top
  if not storage.exists(path):
    raise FileNotFoundError(f"No such text file: {path} (--texts)")
  if not path.endswith(".jsonl"):
    return [l for l in storage.read_text(path).splitlines() if l.strip()]
  docs = []
  for i, row in enumerate(storage.read_rows(path), 1):
    if "text" in row:
      docs.append(str(row["text"]))
    elif "prompt" in row and "completion" in row:
      docs.append(str(row["prompt"]) + str(row["completion"]))
    else:
      raise ValueError(f"{path}: row {i} needs a 'text' field or 'prompt' and 'completion' "
                       f"(fields: {sorted(row)})")
  return docs


def _plot(rows: list[dict], key: str, xlabel: str, k: int, path: str) -> None:
  """ID with its bootstrap interval against one ablation axis (thesis figure 2.4)."""
  if len(rows) < 2:
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from qdc_jax import storage  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  xs = [r[key][0] if key == "positions" else r[key] for r in rows]
  ys = [r["dimension"] for r in rows]
  err = [[r["dimension"] - r["interval"][0] for r in rows],
         [r["interval"][1] - r["dimension"] for r in rows]]
  ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(f"intrinsic dimension (MLE, K={k})")
  fig.tight_layout()
  storage.save_figure(fig, path)
  plt.close(fig)


def _main(argv) -> None:
  del argv
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from qdc_jax import model_io, storage  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  sharding_lib.initialize_distributed(
      enabled=f.distributed, coordinator_address=f.coordinator_address,
      num_processes=f.num_processes, process_id=f.process_id)
  model_dir = f.model_dir or model_io.asset_path("lab_student")
  texts = _read_texts(f.texts) if f.texts else lab_texts(f.num_docs, seed=f.seed)
  texts = texts[:f.num_docs]
  num_layers = model_io.load_model_config(model_dir)[0].num_layers
  if f.layers == "final":
    layers = [None]
  elif f.layers == "all":  # every block's output (layer 0, the embedding table, on request)
    layers = list(range(1, num_layers + 1))
  else:
    layers = [int(x) for x in f.layers.split(",")]
  edges = [int(e) for e in f.position_buckets.split(",") if e]
  if edges and (len(edges) < 2 or edges[0] < 0 or edges != sorted(set(edges))):
    raise app.UsageError(f"--position_buckets={f.position_buckets}: give at least two "
                         f"increasing, non-negative edges, e.g. 0,16,32,64")
  buckets = list(zip(edges[:-1], edges[1:])) or [None]
  results = of_texts(texts, model_dir=model_dir, layers=layers, position_buckets=buckets,
                     context=f.context, per_doc=f.per_doc, k=f.k, batch=f.batch,
                     metric=f.metric, seed=f.seed)
  if jax.process_index() == 0:
    for row in results:
      if "error" in row:
        continue
      bucket = row["positions"]
      where = f" positions {bucket[0]}-{bucket[1]}" if bucket else ""
      print(f"layer {row['layer']}{where}: ID {row['dimension']:.2f} (95% interval "
            f"{row['interval'][0]:.2f}-{row['interval'][1]:.2f}; {row['points']} points, "
            f"{row['batches']} batches, {row['duplicates']} duplicates)", flush=True)
  out = {"model_dir": model_dir, "texts": f.texts or "lab student problems", "documents":
         len(texts), "context": f.context, "per_doc": f.per_doc, "k": f.k, "batch": f.batch,
         "metric": f.metric, "seed": f.seed, "results": results}
  storage.makedirs(f.out)
  storage.write_json(storage.join(f.out, "id.json"), out)
  results_ok = [r for r in results if "error" not in r]
  if len(layers) > 1:  # at the first position bucket; positions at the last layer
    _plot([r for r in results_ok if r["positions"] == buckets[0]], "layer",
          "layer (block l's output; 0 = embeddings, L = after the final norm)", f.k,
          storage.join(f.out, "id_vs_layer.png"))
  if len(buckets) > 1:
    _plot([r for r in results_ok if r["layer"] == results[-1]["layer"]], "positions",
          "position in the window (bucket start)", f.k,
          storage.join(f.out, "id_vs_position.png"))
  if jax.process_index() == 0:
    print(f"wrote {storage.join(f.out, 'id.json')}")


if __name__ == "__main__":
  from absl import app as _app, flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string("model_dir", None, "model directory (default: the shipped lab student)")
  _flags.DEFINE_string("texts", None, ".txt (a document per line) or .jsonl; default: lab "
                       "problem + solution texts")
  _flags.DEFINE_integer("num_docs", 2000, "documents read (the first N)")
  _flags.DEFINE_string("layers", "final", "'final', 'all' (1..L; L = after the final norm), "
                       "or a comma list of layer indices (0 = the embedding table)")
  _flags.DEFINE_integer("context", 1024, "tokens per document window")
  _flags.DEFINE_string("position_buckets", "", "window-position edges, e.g. 0,16,32,64,128: "
                       "one estimate per [edge_i, edge_i+1) (the context-position ablation)")
  _flags.DEFINE_integer("per_doc", 32, "token embeddings sampled per document")
  _flags.DEFINE_integer("k", 20, "MLE neighbours")
  _flags.DEFINE_integer("batch", 4096, "points per estimation batch")
  _flags.DEFINE_enum("metric", "euclidean", list(embed.METRICS), "distance")
  _flags.DEFINE_integer("seed", 0, "windows, token picks, shuffling and bootstrap")
  _flags.DEFINE_string("out", "/tmp/qdc_id", "output directory (local or gs://)")
  # Several hosts: the same command on every host (each embeds all documents; one writes).
  _flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() (TPU VM slices)")
  _flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0's coordinator")
  _flags.DEFINE_integer("num_processes", 0, "processes (with --coordinator_address)")
  _flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator_address)")
  _app.run(_main)
