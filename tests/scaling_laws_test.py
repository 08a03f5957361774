"""Scaling-law helpers: closed forms, table 2.1 of the thesis, and the log-log fit vs numpy."""

import numpy as np
import pytest

from qdc_jax.scaling import laws


@pytest.mark.parametrize("d", [2.0, 8.0, 15.6, 18.7, 40.0])
def test_id_free_conversions_follow_from_the_id_predictions(d):
  # With beta = 1, alpha_D = 2/(2+d) and alpha_N = 2/d: the conversions eliminate d exactly.
  a_d, a_n = laws.alpha_d_from_id(d), laws.alpha_n_from_id(d)
  assert laws.alpha_d_from_alpha_n(a_n) == pytest.approx(a_d, rel=1e-12)
  assert laws.alpha_n_from_alpha_d(a_d) == pytest.approx(a_n, rel=1e-12)


def test_thesis_ids_predict_its_exponents():
  # Thesis: ID ~15.6 for OpenWebText at d_model 768 -> alpha_D = 2 / 17.6 = 0.114, inside
  # the 0.10-0.15 it measured.
  assert laws.alpha_d_from_id(15.6) == pytest.approx(0.11364, abs=1e-5)


def test_table_2_1_recomputed_cell_by_cell():
  rows = {(r["model"], r["cell"]): r for r in laws.table_2_1()}
  assert rows[("GPT-2", "alpha_D_from_alpha_N")]["computed"] == pytest.approx(0.076 / 1.076)
  assert rows[("GPT-2", "alpha_N_from_alpha_D")]["computed"] == pytest.approx(0.095 / 0.905)
  assert rows[("Chinchilla", "alpha_D_from_alpha_N")]["computed"] == pytest.approx(0.34 / 1.34)
  assert rows[("Chinchilla", "alpha_N_from_alpha_D")]["computed"] == pytest.approx(0.28 / 0.72)
  # 0.0706 prints as 0.071, 0.1050 as 0.105, 0.254 as 0.25 and 0.389 as 0.39: of the four
  # printed cells (0.070, 0.106, 0.25, 0.33) only Chinchilla's alpha_D follows.
  follows = {k: r["printed_follows"] for k, r in rows.items()}
  assert follows == {("GPT-2", "alpha_D_from_alpha_N"): False,
                     ("GPT-2", "alpha_N_from_alpha_D"): False,
                     ("Chinchilla", "alpha_D_from_alpha_N"): True,
                     ("Chinchilla", "alpha_N_from_alpha_D"): False}


def test_power_law_fit_matches_numpy_polyfit_and_recovers_the_exponent():
  rng = np.random.default_rng(0)
  n = np.logspace(4, 7, 9)
  loss = 3.0 * n ** -0.12 * np.exp(rng.normal(0, 0.01, n.shape))
  fit = laws.fit_power_law(n, loss)
  coef, cov = np.polyfit(np.log(n), np.log(loss), 1, cov=True)
  assert fit.alpha == pytest.approx(-coef[0], rel=1e-10)
  assert fit.log_a == pytest.approx(coef[1], rel=1e-10)
  assert fit.stderr == pytest.approx(np.sqrt(cov[0, 0]), rel=1e-8)
  assert abs(fit.alpha - 0.12) < 3 * fit.stderr + 1e-3
  np.testing.assert_allclose(fit.predict(n), 3.0 * n ** -0.12, rtol=0.03)


def test_bad_fit_input_names_the_problem():
  with pytest.raises(ValueError, match="at least 3 points"):
    laws.fit_power_law([1e3, 1e4], [2.0, 1.5])
  with pytest.raises(ValueError, match="positive and finite"):
    laws.fit_power_law([1e3, 1e4, 1e5], [2.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="All sizes are equal"):
    laws.fit_power_law([1e3, 1e3, 1e3], [2.0, 1.9, 2.1])
  with pytest.raises(ValueError, match="alpha_D"):
    laws.alpha_n_from_alpha_d(1.2)
