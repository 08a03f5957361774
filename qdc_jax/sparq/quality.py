"""SPARQ's quality of a generated problem: one minus the student's solve-rate, inside a band.

Thesis 4.3.1: with K student rollouts S_1..S_K (verifications) of a problem Q whose intended
answer is A,

  SOLVERATE(Q, A) = (1/K) * sum_k is_correct(Q, A, S_k)
  QUALITY(Q, A)   = 1 - SOLVERATE  if T_l <= SOLVERATE <= T_u  else 0,   T_l=0.1, T_u=0.9.

The band removes problems the student never solves (often impossible or wrongly answered),
and trivial ones.

Exact arithmetic: the band test is done on rationals, so the boundaries are inclusive exactly
as written. A count pair (c, K) is the ratio c/K; a float threshold or solve-rate is read as the
decimal it prints as (`0.1` is 1/10, not the binary double just above it). So with K=10, 1
correct (1/10) and 9 correct (9/10) are both inside the band, and their qualities are 0.9 and
0.1 exactly, not 0.8999999999999999 / 0.09999999999999998.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from qdc_jax.data import answers

Fraction = fractions.Fraction

T_LOW = 0.1
T_HIGH = 0.9


def as_fraction(x: Any) -> Fraction:
  """An exact rational for a threshold or solve-rate.

  Args:
    x: int, Fraction, a finite float (read as its shortest decimal repr, so 0.1 -> 1/10),
      a numpy scalar, or a decimal / "p/q" string.

  Returns:
    The value as a Fraction.

  Raises:
    TypeError: bools, None and other types.
    ValueError: NaN, infinities, or an unreadable string.
  """
  if isinstance(x, (bool, np.bool_)) or x is None:
    raise TypeError(f"Not a number: {x!r}")
  if isinstance(x, Fraction):
    return x
  if isinstance(x, numbers.Integral):
    return Fraction(int(x))
  if isinstance(x, numbers.Real):
    f = float(x)
    if not math.isfinite(f):
      raise ValueError(f"Not a finite number: {x!r}")
    return Fraction(repr(f))
  if isinstance(x, str):
    return Fraction(x.strip())
  raise TypeError(f"Not a number: {x!r}")


def _band(t_low: Any, t_high: Any) -> tuple[Fraction, Fraction]:
  lo, hi = as_fraction(t_low), as_fraction(t_high)
  if not 0 <= lo <= hi <= 1:
    raise ValueError(f"Need 0 <= t_low <= t_high <= 1, got {t_low!r}, {t_high!r}")
  return lo, hi


def _check_counts(num_correct: int, k: int) -> None:
  if k <= 0 or not 0 <= num_correct <= k:
    raise ValueError(f"Need k > 0 and 0 <= num_correct <= k, got {num_correct}, {k}")


def solve_rate(num_correct: int, k: int) -> float:
  """SOLVERATE = num_correct / k (the float nearest the exact ratio).

  Raises:
    ValueError: k <= 0 or num_correct outside [0, k].
  """
  _check_counts(num_correct, k)
  return num_correct / k


def quality(solve_rate: Any, t_low: Any = T_LOW, t_high: Any = T_HIGH) -> float:
  """QUALITY = 1 - s if t_low <= s <= t_high (inclusive, exact rationals) else 0.0.

  Args:
    solve_rate: s in [0, 1]: a Fraction (exact; e.g. `Fraction(c, k)`), or a float / string
      read as its decimal (see `as_fraction`).
    t_low: Lower edge of the band (inclusive).
    t_high: Upper edge of the band (inclusive).

  Returns:
    The quality, the float nearest the exact 1 - s inside the band.

  Raises:
    ValueError: s outside [0, 1], or a bad band.
  """
  s = as_fraction(solve_rate)
  lo, hi = _band(t_low, t_high)
  if not 0 <= s <= 1:
    raise ValueError(f"solve_rate must lie in [0, 1], got {solve_rate!r}")
  return float(1 - s) if lo <= s <= hi else 0.0


def quality_from_counts(num_correct: int, k: int, t_low: Any = T_LOW,
                        t_high: Any = T_HIGH) -> float:
  """`quality(num_correct / k)` with the ratio kept exact."""
  _check_counts(num_correct, k)
  return quality(Fraction(num_correct, k), t_low, t_high)


def qualities(num_correct: Any, k: Any, t_low: Any = T_LOW, t_high: Any = T_HIGH) -> np.ndarray:
  """Vectorised `quality_from_counts` over arrays of counts, in exact integer arithmetic.

  The band test `lo.num/lo.den <= c/k` becomes `lo.num * k <= c * lo.den` (and likewise for
  the upper edge), so there is no float rounding at the boundaries.

  Args:
    num_correct: Integer array (any shape) of correct verifications.
    k: Number of verifications; an int or an integer array broadcastable with num_correct.
    t_low: Lower edge of the band (inclusive).
    t_high: Upper edge of the band (inclusive).

  Returns:
    float64 array of qualities, broadcast shape of the inputs.

  Raises:
    ValueError: non-integer counts, k <= 0, or counts outside [0, k].
  """
  c = np.asarray(num_correct)
  kk = np.asarray(k)
  for a in (c, kk):
    if a.size and not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"Counts must be integers, got dtype {a.dtype}")
  c, kk = np.broadcast_arrays(c.astype(np.int64), kk.astype(np.int64))
  if np.any(kk <= 0) or np.any(c < 0) or np.any(c > kk):
    raise ValueError("Need k > 0 and 0 <= num_correct <= k everywhere")
  lo, hi = _band(t_low, t_high)
  inside = ((lo.numerator * kk <= c * lo.denominator) &
            (c * hi.denominator <= hi.numerator * kk))
  # (k - c) / k is one correctly rounded division: the float nearest the exact 1 - c/k,
  # the same value the scalar path returns.
  return np.where(inside, (kk - c) / kk, 0.0)


def qualities_from_rates(solve_rates: Sequence[Any], t_low: Any = T_LOW,
                         t_high: Any = T_HIGH) -> np.ndarray:
  """`quality` of each solve-rate (floats read as decimals); a float64 array."""
  return np.array([quality(s, t_low, t_high) for s in solve_rates], dtype=np.float64)


def is_correct(completion: Any, intended_answer: Any, *, timeout_s: float = 2.0) -> bool:
  """Whether a verification reaches the intended final answer (final-answer equivalence).

  Reads the completion's final answer with `answers.extract_answer` (boxed, `####`, the lab's
  `The answer is N.` line, "the answer is X") and compares it with `answers.answers_equal`
  (exact rationals, then normalised LaTeX, then math-verify). No intended answer (None) or no
  final answer in the completion means incorrect. Never raises.
  """
  if intended_answer is None:
    return False
  return answers.is_correct(completion, intended_answer, timeout_s=timeout_s)


@dataclasses.dataclass(frozen=True)
class Verification:
  """The K verifications of one problem, scored.

  Attributes:
    k: Number of verifications.
    num_correct: How many reached the intended answer.
    solve_rate: num_correct / k.
    quality: QUALITY from the exact counts.
    successful_solutions: The correct verifications, in rollout order (phase 2's training
      solutions).
  """

  k: int
  num_correct: int
  solve_rate: float
  quality: float
  successful_solutions: tuple[str, ...]


def verify(completions: Sequence[str], intended_answer: Any, t_low: Any = T_LOW,
           t_high: Any = T_HIGH, *, timeout_s: float = 2.0) -> Verification:
  """Scores K student completions of one problem against its intended answer.

  Args:
    completions: The K verifications (K >= 1).
    intended_answer: The generator's intended final answer (None: none could be read, so every
      verification is incorrect and the quality is 0).
    t_low: Lower edge of the band.
    t_high: Upper edge of the band.
    timeout_s: Per-comparison bound passed to `answers.answers_equal`.

  Returns:
    The Verification.

  Raises:
    ValueError: no completions.
  """
  successful = tuple(c for c in completions
                     if is_correct(c, intended_answer, timeout_s=timeout_s))
  k, c = len(completions), len(successful)
  return Verification(k=k, num_correct=c, solve_rate=solve_rate(c, k),
                      quality=quality_from_counts(c, k, t_low, t_high),
                      successful_solutions=successful)
