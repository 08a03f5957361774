"""SPARQ quality: solve-rate, the inclusive band in exact arithmetic, and verification."""
import fractions

import numpy as np
import pytest

from qdc_jax.sparq import quality as Q

F = fractions.Fraction


def _naive(c: int, k: int) -> float:
  # Independent reference: integer cross-multiplication of c/k against 1/10 and 9/10.
  return (k - c) / k if 10 * c >= k and 10 * c <= 9 * k else 0.0


@pytest.mark.parametrize("k", [10, 16, 20, 30])
def test_counts_match_the_exact_band_for_every_count(k):
  for c in range(k + 1):
    assert Q.quality_from_counts(c, k) == _naive(c, k), (c, k)
  np.testing.assert_array_equal(Q.qualities(np.arange(k + 1), k),
                                [_naive(c, k) for c in range(k + 1)])


def test_boundaries_are_inclusive_and_exact():
  # K=10: 1/10 and 9/10 sit exactly on the edges and are in; 0 and 10 are out.
  assert Q.quality_from_counts(1, 10) == 0.9
  assert Q.quality_from_counts(9, 10) == 0.1  # not 0.09999999999999998
  assert Q.quality_from_counts(0, 10) == 0.0
  assert Q.quality_from_counts(10, 10) == 0.0
  # K=16: 1/16 < 0.1 and 15/16 > 0.9 are out; 2/16 and 14/16 are the extreme ones in.
  assert Q.quality_from_counts(1, 16) == 0.0
  assert Q.quality_from_counts(2, 16) == 0.875
  assert Q.quality_from_counts(14, 16) == 0.125
  assert Q.quality_from_counts(15, 16) == 0.0
  # Floats are read as their decimals: the float 0.1 is 1/10, inside the band.
  assert Q.quality(0.1) == 0.9 and Q.quality(0.9) == 0.1
  assert Q.quality(Q.solve_rate(9, 10)) == 0.1
  assert Q.quality(F(1, 10)) == 0.9 and Q.quality("9/10") == 0.1
  assert Q.quality(0.0999999) == 0.0 and Q.quality(0.9000001) == 0.0
  # Custom band, as strings or floats.
  assert Q.quality_from_counts(3, 10, t_low="0.3", t_high=0.3) == 0.7
  assert Q.quality_from_counts(4, 10, t_low=0.3, t_high=0.3) == 0.0


def test_vectorised_broadcasts_and_validates():
  c = np.array([[0, 1], [2, 16]])
  k = np.array([[10, 10], [16, 16]])
  np.testing.assert_array_equal(Q.qualities(c, k), [[0.0, 0.9], [0.875, 0.0]])
  np.testing.assert_array_equal(Q.qualities_from_rates([0.1, 0.5, 0.95]), [0.9, 0.5, 0.0])
  with pytest.raises(ValueError):
    Q.qualities([3], 2)
  with pytest.raises(ValueError):
    Q.qualities([0.5], 2)


@pytest.mark.parametrize("call", [
    lambda: Q.solve_rate(3, 2), lambda: Q.solve_rate(0, 0), lambda: Q.quality(1.5),
    lambda: Q.quality(float("nan")), lambda: Q.quality(0.5, t_low=0.6, t_high=0.4)])
def test_bad_inputs_raise(call):
  with pytest.raises(ValueError):
    call()


def test_is_correct_uses_final_answer_equivalence():
  assert Q.is_correct("2+5=7\nThe answer is 7.", 7)
  assert Q.is_correct("so x = \\boxed{\\frac{1}{2}}", "0.5")
  assert not Q.is_correct("The answer is 8.", "7")
  assert not Q.is_correct("no final answer here 7", "7")
  assert not Q.is_correct("The answer is 7.", None)


def test_verify_scores_k_rollouts():
  rollouts = ["The answer is 7."] * 3 + ["The answer is 6."] * 13
  v = Q.verify(rollouts, "7")
  assert (v.k, v.num_correct) == (16, 3)
  assert v.solve_rate == 3 / 16 and v.quality == 13 / 16
  assert v.successful_solutions == ("The answer is 7.",) * 3
  assert Q.verify(rollouts, None).quality == 0.0
