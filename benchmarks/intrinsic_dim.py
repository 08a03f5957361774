"""Intrinsic-dimension estimation: qdc_jax (JAX, blocked kNN) vs scikit-dimension, one run.

20k points x 768 features (a 16-dimensional curved manifold embedded linearly, float32 as
model embeddings are), Levina-Bickel MLE with K = 20 (both aggregations from one kNN) and
TwoNN. scikit-dimension 0.5 gets the same points as float64 (its test-equal setting; ours run
in float32). Both estimates are printed side by side; timings are medians over rounds, each
covering the kNN search and the three estimates (JAX's first call, with compilation, is
reported apart).

  python benchmarks/intrinsic_dim.py --points 20000 --dim 768 --rounds 3
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def make_points(n, d, ambient, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.uniform(-1, 1, (n, d))
  feats = np.concatenate([z, np.sin(2 * z), np.cos(3 * z)], axis=1)
  return (feats @ rng.normal(size=(feats.shape[1], ambient))).astype(np.float32)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--points", type=int, default=20000)
  ap.add_argument("--dim", type=int, default=768)
  ap.add_argument("--true_dim", type=int, default=16)
  ap.add_argument("--k", type=int, default=20)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--block", type=int, default=1024)
  ap.add_argument("--skip_skdim", action="store_true")
  ap.add_argument("--out", default="/tmp/qdc_bench/intrinsic_dim.json")
  args = ap.parse_args(argv)
  info = _common.machine_info()

  import jax  # pylint: disable=g-import-not-at-top
  from qdc_jax import embed  # pylint: disable=g-import-not-at-top
  from qdc_jax.scaling import intrinsic_dim as idim  # pylint: disable=g-import-not-at-top

  x = make_points(args.points, args.true_dim, args.dim)

  def ours():
    nb = embed.knn(x, args.k, block=args.block)
    jax.block_until_ready(nb.distances)
    return {"mle_mean": idim.mle_from_distances(nb.distances, "mean").dimension,
            "mle_harmonic": idim.mle_from_distances(nb.distances, "harmonic").dimension,
            "twonn": idim.twonn_from_distances(nb.distances[:, :2]).dimension}

  def theirs():
    import skdim  # pylint: disable=g-import-not-at-top
    x64 = x.astype(np.float64)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      mle = skdim.id.MLE().fit(x64, n_neighbors=args.k, comb="mean")
      harmonic = 1.0 / np.mean(1.0 / mle.dimension_pw_)  # comb="mle" from the same fit
      two = skdim.id.TwoNN().fit(x64).dimension_
    return {"mle_mean": float(mle.dimension_), "mle_harmonic": float(harmonic),
            "twonn": float(two)}

  fns = {"qdc_jax": ours} if args.skip_skdim else {"qdc_jax": ours, "skdim": theirs}
  t0 = time.perf_counter()
  first = {"qdc_jax": ours()}
  compile_s = time.perf_counter() - t0
  times = {k: [] for k in fns}
  for _ in range(args.rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      first[name] = fn()
      times[name].append(time.perf_counter() - t0)
  res = {"machine": info, "points": args.points, "dim": args.dim, "true_dim": args.true_dim,
         "k": args.k, "block": args.block, "qdc_first_call_s": compile_s,
         "estimates": first, "times": times,
         "median_s": {k: statistics.median(v) for k, v in times.items()},
         "load_end": _common.load_average()}
  for name, med in res["median_s"].items():
    print(f"{name:8s} median {med:8.2f} s  estimates {first[name]}")
  if "skdim" in times:
    print(f"speed-up {res['median_s']['skdim'] / res['median_s']['qdc_jax']:.1f}x")
  _common.write_json(args.out, res)


if __name__ == "__main__":
  main()
