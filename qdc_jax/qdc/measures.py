"""Quality, diversity and complexity measures of a set of texts (pure functions).

Diversity of texts:
  distinct_n      unique n-grams / all n-grams over the whole set (Li et al. 2016), n = 1..4.
  self_bleu       mean over rows of BLEU-4 of the row against every other row as references
                  (Zhu et al. 2018, Texygen): nltk's `sentence_bleu` with uniform weights and
                  `SmoothingFunction().method1`, computed exactly for every row in time linear
                  in the number of n-grams (each n-gram's two largest per-row counts give its
                  clip count against "all rows but this one"; sorted lengths give the closest
                  reference length), so 100k rows need no sampling.
Diversity of embeddings (rows are unit-normalised first; cosine geometry):
  dispersion      mean pairwise cosine distance 1 - u_i.u_j over i != j, in closed form
                  (|sum u|^2 - N) / (N (N - 1)) is the mean off-diagonal similarity: exact, O(N D).
  vendi           the Vendi score (Friedman & Dieng 2023) of the cosine kernel K = U U^T / N:
                  exp of the entropy of its eigenvalues, which are those of U^T U / N (D x D),
                  so exact at any N in O(N D^2).
  nn_distance     mean cosine distance to the nearest other row (`embed.knn`, blocked exact
                  neighbours), on a seeded sample of at most `max_rows` rows (stated by the
                  caller): low values mean near-duplicates.
Tokenisation for the text measures is `words`: lower-cased runs of letters/digits and single
punctuation marks.
"""

from __future__ import annotations

import bisect
import collections
import math
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qdc_jax import embed

_WORD_RE = re.compile(r"\w+|[^\w\s]")
BLEU_EPSILON = 0.1  # nltk SmoothingFunction().method1's epsilon


def words(text: str) -> list[str]:
  """The tokens the text measures count: lower-cased words, numbers and punctuation marks."""
  return _WORD_RE.findall(str(text).lower())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
  return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_lists: Sequence[Sequence[str]], n: int) -> Optional[float]:
  """Unique n-grams / total n-grams over all rows (None when no row has n tokens)."""
  total, seen = 0, set()
  for toks in token_lists:
    grams = _ngrams(toks, n)
    total += len(grams)
    seen.update(grams)
  return len(seen) / total if total else None


def self_bleu_per_row(token_lists: Sequence[Sequence[str]], max_n: int = 4) -> np.ndarray:
  """BLEU-`max_n` of each row against all the other rows (uniform weights, method1
  smoothing: nltk's `sentence_bleu(others, row, smoothing_function=method1)`). Needs at least
  two rows; a row with no tokens scores 0 (nltk's brevity penalty for an empty hypothesis)."""
  n_rows = len(token_lists)
  if n_rows < 2:
    raise ValueError(f"self-BLEU needs at least 2 rows, got {n_rows}")
  # For each n-gram: its largest per-row count, the row holding it, and the second largest.
  top: dict[tuple, list] = {}
  per_row_counts = []
  for r, toks in enumerate(token_lists):
    counts = collections.Counter(g for n in range(1, max_n + 1) for g in _ngrams(toks, n))
    per_row_counts.append(counts)
    for g, c in counts.items():
      t = top.get(g)
      if t is None:
        top[g] = [c, r, 0]
      elif c > t[0]:
        top[g] = [c, r, t[0]]
      elif c > t[2]:
        t[2] = c
  lengths = sorted(len(t) for t in token_lists)
  out = np.zeros(n_rows, np.float64)
  for r, toks in enumerate(token_lists):
    c_len = len(toks)
    if c_len == 0:
      continue
    num, den = [0] * (max_n + 1), [0] * (max_n + 1)
    for g, c in per_row_counts[r].items():
      best, where, second = top[g]
      clip = second if where == r else best
      num[len(g)] += min(c, clip)
      den[len(g)] += c
    if num[1] == 0:
      continue  # nltk: no matching unigram -> 0
    # Closest other row's length (ties: the shorter), with this row's own length removed.
    ref = _closest_other_length(lengths, c_len)
    bp = 1.0 if c_len > ref else math.exp(1.0 - ref / c_len)
    logs = []
    for n in range(1, max_n + 1):
      d = max(1, den[n])
      p = num[n] / d if num[n] else BLEU_EPSILON / d
      logs.append(math.log(p) / max_n)
    out[r] = bp * math.exp(math.fsum(logs))
  return out


def _closest_other_length(sorted_lengths: list[int], own: int) -> int:
  """The length in `sorted_lengths` minus one copy of `own` closest to `own` (ties: shorter)."""
  i = bisect.bisect_left(sorted_lengths, own)
  # sorted_lengths[i] == own is this row; another row of the same length sits next to it.
  if i + 1 < len(sorted_lengths) and sorted_lengths[i + 1] == own:
    return own
  cands = []
  if i > 0:
    cands.append(sorted_lengths[i - 1])
  if i + 1 < len(sorted_lengths):
    cands.append(sorted_lengths[i + 1])
  return min(cands, key=lambda x: (abs(x - own), x))


# ------------------------------------------------------------------ embedding geometry


@jax.jit
def _unit_gram(x_NxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  x = x_NxD.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  u = x / jnp.where(norm > 0, norm, 1.0)
  s = jnp.sum(u, axis=0)
  gram = jnp.matmul(u.T, u, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(s * s), jnp.sum(u * u), gram


def _check_points(x_NxD, need: int) -> np.ndarray:
  x = np.asarray(x_NxD)
  if x.ndim != 2 or x.shape[0] < need:
    raise ValueError(f"need a [N, D] array with N >= {need}, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("embeddings have NaN or infinite entries")
  return x


def dispersion(x_NxD) -> float:
  """Mean pairwise cosine distance 1 - cos(x_i, x_j) over ordered pairs i != j (exact).
  Zero rows count as similarity 0 to everything."""
  x = _check_points(x_NxD, 2)
  n = x.shape[0]
  s2, self_sim, _ = _unit_gram(x)
  return float(1.0 - (float(s2) - float(self_sim)) / (n * (n - 1)))


def vendi(x_NxD) -> float:
  """Vendi score of the cosine-similarity kernel: exp(-sum_i l_i log l_i), l the eigenvalues
  of K / N with K_ij = cos(x_i, x_j). Between 1 (all rows parallel) and min(N, D)."""
  x = _check_points(x_NxD, 1)
  n = x.shape[0]
  _, _, gram = _unit_gram(x)
  lam = np.linalg.eigvalsh(np.asarray(gram, np.float64) / n)
  lam = lam[lam > 1e-12]
  lam = lam / lam.sum()
  return float(np.exp(-np.sum(lam * np.log(lam))))


def nn_distance(x_NxD, *, block: int = 1024) -> np.ndarray:
  """Per row, the cosine distance 1 - cos to its nearest other row (exact, blocked)."""
  x = _check_points(x_NxD, 2)
  nb = embed.knn(x, 1, metric="cosine", block=block)
  chord = np.asarray(jax.device_get(nb.distances))[:, 0].astype(np.float64)
  return chord * chord / 2.0  # chord^2 = 2 (1 - cos)


# ------------------------------------------------------------------ summaries


def summary(values: Sequence[Optional[float]]) -> dict:
  """Mean, std, 95% interval of the mean (normal approximation), min/median/max of the
  values that are not None/NaN, and how many there were."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if not len(v):
    return {"n": 0, "mean": None}
  sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
  half = 1.96 * sd / math.sqrt(len(v))
  return {"n": int(len(v)), "mean": float(v.mean()), "std": sd,
          "ci95": [float(v.mean() - half), float(v.mean() + half)],
          "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
