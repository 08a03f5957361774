"""QDC pairwise measures at 100k rows: exact closed forms and linear-time self-BLEU vs naive.

Points: N rows of D-dimensional float32 embeddings (a low-rank Gaussian, like pooled model
states). Texts: N lab questions. Measured, each once after a warm-up call (compilation apart):
  dispersion, Vendi (closed forms, O(N D) / O(N D^2), all N rows),
  nearest-neighbour distance (blocked exact kNN) on --nn_rows rows,
  self-BLEU-4 of every row (linear in n-grams) on N questions,
  and the naive references where they fit: the N x N cosine matrix (dispersion, Vendi's
  eigenvalues) and nltk's sentence_bleu against all other rows, both on --naive_rows rows and
  extrapolated to N by their O(N^2) / O(N^2) cost (stated as an extrapolation).

  python benchmarks/qdc_measures.py --rows 100000 --dim 128
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rows", type=int, default=100_000)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--nn_rows", type=int, default=20_000)
  ap.add_argument("--naive_rows", type=int, default=2_000)
  ap.add_argument("--out", default="/tmp/qdc_bench/qdc_measures.json")
  args = ap.parse_args(argv)
  info = _common.machine_info()
  from qdc_jax.data import lab_tasks  # pylint: disable=g-import-not-at-top
  from qdc_jax.qdc import measures as M  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = (rng.normal(size=(args.rows, 16)) @ rng.normal(size=(16, args.dim))
       + 0.3 * rng.normal(size=(args.rows, args.dim))).astype(np.float32)
  M.dispersion(x[:64]), M.vendi(x[:64]), M.nn_distance(x[:2048])  # compile
  res = {"machine": info, "rows": args.rows, "dim": args.dim, "seconds": {}, "values": {}}
  for name, fn in (("dispersion", lambda: M.dispersion(x)), ("vendi", lambda: M.vendi(x)),
                   ("nn_distance", lambda: float(M.nn_distance(x[:args.nn_rows]).mean()))):
    v, s = _timed(fn)
    res["seconds"][name], res["values"][name] = s, v
  texts = [p.text for p in lab_tasks.student_problems(args.rows, seed=0)]
  toks = [M.words(t) for t in texts]
  v, s = _timed(lambda: float(M.self_bleu_per_row(toks).mean()))
  res["seconds"]["self_bleu"], res["values"]["self_bleu"] = s, v

  m = args.naive_rows
  xs = x[:m].astype(np.float64)

  def naive_geometry():
    u = xs / np.linalg.norm(xs, axis=1, keepdims=True)
    s = u @ u.T
    lam = np.linalg.eigvalsh(s / m)
    return 1 - (s.sum() - m) / (m * (m - 1)), lam

  _, s = _timed(naive_geometry)
  res["seconds"][f"naive_geometry_{m}"] = s
  res["seconds"]["naive_geometry_extrapolated"] = s * (args.rows / m) ** 3  # eigh is O(N^3)
  try:
    from nltk.translate import bleu_score  # pylint: disable=g-import-not-at-top
    few = toks[:200]
    sm = bleu_score.SmoothingFunction().method1
    _, s = _timed(lambda: [bleu_score.sentence_bleu(few[:i] + few[i + 1:], h,
                                                    smoothing_function=sm)
                           for i, h in enumerate(few)])
    res["seconds"]["nltk_self_bleu_200"] = s
    res["seconds"]["nltk_self_bleu_extrapolated"] = s * (args.rows / 200) ** 2
  except ImportError:
    pass
  res["load_end"] = _common.load_average()
  for k, v in res["seconds"].items():
    print(f"{k:32s} {v:12.2f} s")
  _common.write_json(args.out, res)


if __name__ == "__main__":
  main()
