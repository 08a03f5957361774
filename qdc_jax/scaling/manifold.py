"""Data on a manifold of known dimension, with a known Lipschitz target (thesis 2.3's setting).

The theory behind the scaling laws: a beta-Hoelder target on a d-dimensional manifold is
learned at rate n^(-2 beta / (2 beta + d)). This module makes such data with d known by
construction, so the estimators and (later) the rates can be checked against the truth:

- latent z ~ Uniform[0, 1]^d;
- the manifold: x = A phi(z) in `ambient` dimensions, phi(z) = [z, sin(2 pi z) / 4, cos(2 pi z) / 4]
  (smooth and injective: z is the first block of phi), A a fixed random Gaussian matrix
  (full column rank for ambient >= 3d), so x has intrinsic dimension exactly d;
- the target: y = sum_j c_j |w_j . z - b_j| with unit w_j and sum_j |c_j| = 1: Lipschitz
  (beta = 1) with constant at most 1 and no smoother (it has kinks), plus optional noise.

`python -m qdc_jax.scaling.manifold` prints the estimated ID (Levina-Bickel MLE and TwoNN,
batches of 4096) against the true d.

The regression half (`columns`, `OBJECTIVE`): a point's `ambient` coordinates enter the shared
transformer as `chunks` tokens of ambient / chunks values each (`models.heads.Regressor`), and
the loss is the squared error against the target standardised by the training set's mean and
standard deviation (so a loss of 1 is the constant predictor's, whatever d).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from qdc_jax import train


@dataclasses.dataclass(frozen=True)
class ManifoldData:
  x: np.ndarray  # [n, ambient] float32 points on the manifold
  y: np.ndarray  # [n] float32 targets
  z: np.ndarray  # [n, d] latent coordinates
  embedding: np.ndarray  # A [3d, ambient]: x = phi(z) @ A


def make(n: int, dim: int, ambient: int, *, problem_seed: int = 0, sample_seed: int = 1,
         pieces: int = 8, noise: float = 0.0) -> ManifoldData:
  """n points of the dim-dimensional manifold in `ambient` dimensions with their targets.

  The manifold (A) and the target (w, b, c) depend on (dim, ambient, problem_seed) only, so
  draws with other `sample_seed`s and sizes are train and test sets of one problem.
  """
  if dim < 1 or ambient < 3 * dim:
    raise ValueError(f"need dim >= 1 and ambient >= 3 * dim for an injective embedding, got "
                     f"dim={dim}, ambient={ambient}")
  prob = np.random.default_rng(problem_seed)
  a = prob.normal(size=(3 * dim, ambient)) / np.sqrt(3 * dim)
  w = prob.normal(size=(pieces, dim))
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  b = prob.uniform(-0.5, 0.5, pieces) + w @ np.full(dim, 0.5)  # kinks cross the cube
  c = prob.normal(size=pieces)
  c /= np.abs(c).sum()
  rng = np.random.default_rng(sample_seed)
  z = rng.uniform(0.0, 1.0, (n, dim))
  phi = np.concatenate([z, np.sin(2 * np.pi * z) / 4, np.cos(2 * np.pi * z) / 4], axis=1)
  y = np.abs(z @ w.T - b) @ c
  if noise:
    y = y + rng.normal(0.0, noise, n)
  return ManifoldData((phi @ a).astype(np.float32), y.astype(np.float32), z, a)


def columns(data: ManifoldData, chunks: int, mean: float, std: float) -> dict[str, np.ndarray]:
  """`pipeline.array_dataset` rows: x [n, chunks, ambient / chunks], standardised y, weight 1."""
  n, ambient = data.x.shape
  if ambient % chunks:
    raise ValueError(f"ambient={ambient} is not divisible by chunks={chunks}")
  return {"x": data.x.reshape(n, chunks, ambient // chunks),
          "y": ((data.y - mean) / std).astype(np.float32), "weight": np.ones(n, np.float32)}


def regression_loss_sums(params, batch, *, model):
  """Sum of weighted squared errors; `tokens` counts the weighted rows (padding rows: 0)."""
  pred = model.apply({"params": params}, batch["x"])
  w = batch["weight"].astype(jnp.float32)
  return jnp.sum(w * (pred - batch["y"]) ** 2), {"tokens": jnp.sum(w)}


def _point_inputs(_, *, chunks: int, width: int) -> tuple:
  return (jnp.zeros((1, chunks, width), jnp.float32),)


def objective(chunks: int, width: int) -> train.Objective:
  return train.Objective(regression_loss_sums,
                         functools.partial(_point_inputs, chunks=chunks, width=width))


def id_against_truth(dims: Sequence[int] = (2, 4, 8, 16, 32), *, n: int = 8192,
                     ambient: int = 128, k: int = 20, seed: int = 0) -> list[dict]:
  """Estimated intrinsic dimension (MLE mean / harmonic, TwoNN; batches of 4096) of manifold
  points of each true dimension."""
  from qdc_jax.scaling import intrinsic_dim  # pylint: disable=g-import-not-at-top
  rows = []
  for d in dims:
    x = make(n, d, max(ambient, 3 * d), problem_seed=seed, sample_seed=seed + 1).x
    row = {"true_dim": d, "points": n, "ambient": max(ambient, 3 * d)}
    for name, kw in (("mle_mean", dict(estimator="mle", aggregation="mean")),
                     ("mle_harmonic", dict(estimator="mle", aggregation="harmonic")),
                     ("twonn", dict(estimator="twonn"))):
      est = intrinsic_dim.estimate_in_batches(x, k=k, batch=4096, seed=seed, **kw)
      row[name] = est.dimension
      row[name + "_interval"] = est.interval
    rows.append(row)
  return rows


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  from qdc_jax import storage  # pylint: disable=g-import-not-at-top
  table = id_against_truth()
  print("| true d | MLE (mean) | MLE (harmonic) | TwoNN |")
  print("|---|---|---|---|")
  for r in table:
    print(f"| {r['true_dim']} | {r['mle_mean']:.2f} | {r['mle_harmonic']:.2f} | "
          f"{r['twonn']:.2f} |")
  if len(sys.argv) > 1:  # a JSON path (local or gs://)
    storage.write_json(sys.argv[1], table)
