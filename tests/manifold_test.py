"""Manifold data of known dimension: the construction's claims, and the ID estimators on it."""

import numpy as np
import pytest

from qdc_jax.scaling import intrinsic_dim, manifold


@pytest.mark.parametrize("dim", [1, 3, 6])
def test_points_are_an_injective_image_of_the_cube_and_the_target_is_1_lipschitz(dim):
  small = manifold.make(200, dim, 24, problem_seed=5, sample_seed=1)
  big = manifold.make(2000, dim, 24, problem_seed=5, sample_seed=2)
  np.testing.assert_array_equal(small.embedding, big.embedding)  # one problem, two samples
  for data in (small, big):
    # z is recovered linearly from x (A has full column rank): x is a copy of a d-cube.
    phi = data.x.astype(np.float64) @ np.linalg.pinv(data.embedding)
    np.testing.assert_allclose(phi[:, :dim], data.z, atol=1e-4)
    assert np.linalg.matrix_rank(data.embedding) == 3 * dim
  # |f(z) - f(z')| <= |z - z'| over many pairs; and f is not linear (it has kinks).
  rng = np.random.default_rng(0)
  i, j = rng.integers(0, 2000, (2, 5000))
  dz = np.linalg.norm(big.z[i] - big.z[j], axis=1)
  assert np.all(np.abs(big.y[i] - big.y[j]) <= dz + 1e-6)
  design = np.c_[big.z, np.ones(len(big.z))]
  resid = big.y - design @ np.linalg.lstsq(design, big.y, rcond=None)[0]
  assert resid.std() > 1e-3


def test_estimated_id_follows_the_true_dimension():
  rows = manifold.id_against_truth((2, 4, 8), n=4096, ambient=48)
  mle = [r["mle_mean"] for r in rows]
  assert mle == sorted(mle)  # increasing in d
  assert abs(mle[0] - 2) < 0.3 and abs(mle[1] - 4) < 0.6
  assert 5.5 < mle[2] < 9.0  # the MLE's known downward bias grows with d
  for r in rows:
    assert r["mle_mean_interval"][0] <= r["mle_mean"] <= r["mle_mean_interval"][1]


def test_bad_shapes_name_the_problem():
  with pytest.raises(ValueError, match="ambient >= 3 \\* dim"):
    manifold.make(10, 8, 16)
  assert intrinsic_dim.twonn(manifold.make(500, 2, 12).x).dimension == pytest.approx(2, abs=0.4)
