"""Intrinsic-dimension estimators against scikit-dimension 0.5 and naive numpy references."""

import warnings

import jax
import numpy as np
import pytest
import skdim  # a test dependency (setup.py extras "test"): the reference implementation

from qdc_jax import embed
from qdc_jax.scaling import intrinsic_dim as idim


def _manifold(n, d, ambient, seed=0, curved=True):
  """n points on a d-dimensional manifold in `ambient` dimensions (curved: sin/cos charts)."""
  rng = np.random.default_rng(seed)
  z = rng.uniform(-1, 1, (n, d))
  feats = np.concatenate([z, np.sin(2 * z), np.cos(3 * z)], axis=1) if curved else z
  return feats @ rng.normal(size=(feats.shape[1], ambient))


def _naive_knn(x, k, metric):
  if metric == "cosine":  # the chord between unit vectors, sqrt(2 (1 - cos))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.sqrt(np.maximum(2.0 * (1.0 - u @ u.T), 0.0))
  else:
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
  np.fill_diagonal(dist, np.inf)
  idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(dist, idx, 1), idx


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("block", [64, 1000])  # 64 does not divide 300: padded key blocks
def test_blocked_knn_equals_naive_numpy(metric, block):
  x = _manifold(300, 4, 12, seed=1)
  with jax.enable_x64(True):
    got = embed.knn(x, 7, metric=metric, block=block)
    dist, idx = np.asarray(got.distances), np.asarray(got.indices)
  want_d, want_i = _naive_knn(x, 7, metric)
  np.testing.assert_allclose(dist, want_d, rtol=1e-10, atol=1e-12)
  np.testing.assert_array_equal(idx, want_i)
  # float32: neighbours ranked by the matmul form, distances recomputed exactly.
  got32 = embed.knn(x.astype(np.float32), 7, metric=metric, block=block)
  np.testing.assert_allclose(np.asarray(got32.distances), want_d, rtol=1e-4, atol=1e-6)


def test_float32_ranking_survives_a_large_shared_offset():
  # Distances ~1e-3 of the norms: the matmul form cancels unless the points are centred.
  x = _manifold(400, 4, 16, seed=7) * 1e-2 + 30.0
  want_d, want_i = _naive_knn(x, 10, "euclidean")
  got = embed.knn(x.astype(np.float32), 10)
  assert (np.asarray(got.indices) == want_i).mean() > 0.99
  np.testing.assert_allclose(np.asarray(got.distances), want_d, rtol=1e-3)


def test_cosine_estimates_match_euclidean_on_the_sphere_scale():
  # The chord scales linearly with the angle, so on directions the ID is not halved (1 - cos
  # would halve it): points with a 5-dimensional set of directions, random norms.
  rng = np.random.default_rng(3)
  dirs = _manifold(2000, 5, 20, seed=8)
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  x = dirs * rng.uniform(0.5, 2.0, (2000, 1))
  cos_est = idim.mle(x, 20, metric="cosine").dimension
  euc_est = idim.mle(dirs, 20).dimension  # the directions themselves, euclidean
  assert cos_est == pytest.approx(euc_est, rel=0.03)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-5), (np.float32, 1e-4)])
def test_mle_and_twonn_equal_scikit_dimension(dtype, rtol):
  x = _manifold(1500, 5, 30, seed=2)
  ref = x.astype(np.float64) if dtype == np.float64 else x.astype(np.float32).astype(
      np.float64)
  with jax.enable_x64(dtype == np.float64):
    mean = idim.mle(x.astype(dtype), 20, aggregation="mean")
    harmonic = idim.mle(x.astype(dtype), 20, aggregation="harmonic")
    two = idim.twonn(x.astype(dtype))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want_mean = skdim.id.MLE().fit(ref, n_neighbors=20, comb="mean").dimension_
    want_harm = skdim.id.MLE().fit(ref, n_neighbors=20, comb="mle").dimension_
    want_two = skdim.id.TwoNN().fit(ref).dimension_
  np.testing.assert_allclose(mean.dimension, want_mean, rtol=rtol)
  np.testing.assert_allclose(harmonic.dimension, want_harm, rtol=rtol)
  np.testing.assert_allclose(two.dimension, want_two, rtol=rtol)
  assert mean.points == 1500 and mean.duplicates == 0
  assert 3.5 < mean.dimension < 6.5  # and the estimate is near the truth (5)


def test_duplicates_are_left_out_and_counted_never_nan():
  x = _manifold(400, 3, 10, seed=3)
  x = np.concatenate([x, x[:25]])  # 25 exact copies: 50 points with a zero distance
  est = idim.mle(x, 10)
  assert est.duplicates == 50 and est.points == 375
  clean = idim.mle_from_distances(  # rows 25..399 are the points without a copy
      np.asarray(embed.knn(x, 10).distances)[25:400], "mean")
  assert np.isfinite(est.dimension)
  np.testing.assert_allclose(est.dimension, clean.dimension, rtol=1e-6)
  two = idim.twonn(x)
  assert two.duplicates == 50 and np.isfinite(two.dimension)
  with pytest.raises(ValueError, match="duplicates"):
    idim.mle(np.ones((30, 4)), 5)


def test_batched_procedure_recovers_a_known_dimension_with_an_interval():
  # 6-dimensional flat manifold in 40 dimensions, 3 batches of 1000 points.
  x = _manifold(3200, 6, 40, seed=4, curved=False)
  res = idim.estimate_in_batches(x, k=20, batch=1000, seed=0, bootstrap=200)
  assert len(res.batch_dimensions) == 3
  np.testing.assert_allclose(res.dimension, np.mean(res.batch_dimensions))
  assert res.interval[0] <= res.dimension <= res.interval[1]
  assert 5.0 < res.dimension < 7.0
  assert res.stderr > 0
  # Same seed, same batches, same answer.
  again = idim.estimate_in_batches(x, k=20, batch=1000, seed=0, bootstrap=200)
  assert again.batch_dimensions == res.batch_dimensions


def test_bad_input_names_the_problem():
  with pytest.raises(ValueError, match="metric"):
    embed.knn(np.zeros((10, 3)), 2, metric="manhattan")
  with pytest.raises(ValueError, match="k=10"):
    embed.knn(np.random.default_rng(0).normal(size=(10, 3)), 10)
  x = np.random.default_rng(0).normal(size=(10, 3))
  x[3, 1] = np.nan
  with pytest.raises(ValueError, match="1 of 10 points have NaN"):
    embed.knn(x, 3)
  with pytest.raises(ValueError, match="aggregation"):
    idim.mle(np.random.default_rng(0).normal(size=(50, 3)), 5, aggregation="median")
  with pytest.raises(ValueError, match="discard_fraction"):
    idim.twonn(np.random.default_rng(0).normal(size=(50, 3)), discard_fraction=0.0)
  # Points whose K neighbours are all equidistant (a square lattice's 4 nearest) are counted
  # apart from duplicates.
  grid = np.stack(np.meshgrid(np.arange(12.0), np.arange(12.0)), -1).reshape(-1, 2)
  est = idim.mle(grid, 4)
  assert est.duplicates == 0 and est.degenerate > 0 and np.isfinite(est.dimension)


def test_twonn_interval_resamples_points_even_in_one_batch():
  x = _manifold(1500, 3, 12, seed=9)
  res = idim.estimate_in_batches(x, estimator="twonn", batch=4096, bootstrap=200)
  assert len(res.batch_dimensions) == 1
  lo, hi = res.interval
  assert lo < res.dimension < hi and hi - lo > 1e-3


def test_of_texts_estimates_per_layer_and_reports_impossible_rows():
  texts = idim.lab_texts(60)
  assert len(texts) == 60 and all(t.startswith("Question: ") for t in texts)
  rows = idim.of_texts(texts, layers=(None, 0), position_buckets=(None, (0, 6)), per_doc=8,
                       k=5, batch=1000)
  assert [(r["layer"], r["positions"]) for r in rows] == [
      (4, None), (4, (0, 6)), (0, None), (0, (0, 6))]
  final = rows[0]
  assert final["points"] == 480 and final["batches"] == 1
  assert 1 < final["interval"][0] <= final["dimension"] <= final["interval"][1] < 128
  # Positions 0-5 are "Question" for every text: the embedding table gives one vector per
  # position, every point a duplicate: that row says so and the rest still come.
  assert "duplicates" in rows[3]["error"]
