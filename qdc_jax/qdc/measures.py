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
  nn_distance     per row, the cosine distance to the nearest other row (`embed.knn`,
                  blocked exact neighbours; the caller samples rows for very large sets and
                  says so): low values mean near-duplicates.
Zero vectors have no direction: the embedding measures refuse them.
Tokenisation for the text measures is `words`: lower-cased runs of letters/digits and single
punctuation marks.
"""

from __future__ import annotations

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
  two rows; a row with no tokens scores 0 (nltk's brevity penalty for an empty hypothesis).

  Vectorised and exact: n-grams become integer ids level by level (an (n-1)-gram's id and the
  next token); then per (n-gram, row) counts, and per n-gram its largest count, the row
  holding it and the second largest: the clip count against "every row but this one" is the
  second largest for the holder, the largest for every other row. The closest other length
  comes from the sorted lengths with the row's own length taken out once."""
  n_rows = len(token_lists)
  if n_rows < 2:
    raise ValueError(f"self-BLEU needs at least 2 rows, got {n_rows}")
  vocab: dict = {}
  flat = np.asarray([vocab.setdefault(t, len(vocab)) for toks in token_lists for t in toks],
                    np.int64)
  lengths = np.asarray([len(t) for t in token_lists], np.int64)
  row_all = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
  num = np.zeros((max_n, n_rows))
  den = np.zeros((max_n, n_rows))
  total = len(flat)
  gram = flat  # id of the n-gram starting at each position; -1 where it leaves its row
  for n in range(1, max_n + 1):
    if n > 1:
      m = total - n + 1
      if m <= 0:
        break
      prev = gram[:m]
      ok = (prev >= 0) & (row_all[:m] == row_all[n - 1:n - 1 + m])
      gram = np.full(m, -1, np.int64)
      if ok.any():
        keys = prev[ok] * (len(vocab) + 1) + flat[n - 1:n - 1 + m][ok]
        gram[ok] = np.unique(keys, return_inverse=True)[1].reshape(-1)
    valid = gram >= 0
    if not valid.any():
      break
    key = gram[valid] * n_rows + row_all[:len(gram)][valid]
    pairs, counts = np.unique(key, return_counts=True)
    g, r = pairs // n_rows, pairs % n_rows
    order = np.lexsort((-counts, g))  # by n-gram, largest count first
    g, r, c = g[order], r[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
    sizes = np.diff(np.append(starts, len(g)))
    second = np.where(sizes > 1, c[np.minimum(starts + 1, len(g) - 1)], 0)
    best, holder = np.repeat(c[starts], sizes), np.repeat(r[starts], sizes)
    clip = np.where(r == holder, np.repeat(second, sizes), best)
    num[n - 1] = np.bincount(r, weights=np.minimum(c, clip), minlength=n_rows)
    den[n - 1] = np.bincount(r, weights=c, minlength=n_rows)
  # Closest other row's length (ties: the shorter).
  srt = np.sort(lengths)
  lo = np.searchsorted(srt, lengths, "left")
  hi = np.searchsorted(srt, lengths, "right")
  below = np.where(lo > 0, srt[np.maximum(lo - 1, 0)], -1)
  above = np.where(hi < n_rows, srt[np.minimum(hi, n_rows - 1)], -1)
  ref = np.where(hi - lo >= 2, lengths,
                 np.where((above < 0) | ((below >= 0) & (lengths - below <= above - lengths)),
                          below, above))
  c_len = lengths.astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    bp = np.where(lengths > ref, 1.0, np.exp(1.0 - ref / c_len))
    d = np.maximum(1.0, den)
    p = np.where(num > 0, num / d, BLEU_EPSILON / d)
    out = bp * np.exp(np.log(p).sum(axis=0) / max_n)
  # nltk: an empty hypothesis, or one with no matching unigram, scores 0.
  return np.where((lengths == 0) | (num[0] == 0), 0.0, out)


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
  zero = int(np.sum(~np.any(x != 0, axis=1)))
  if zero:
    raise ValueError(f"{zero} of {x.shape[0]} embeddings are zero vectors (no direction for a "
                     f"cosine measure); drop those rows")
  return x


def dispersion(x_NxD) -> float:
  """Mean pairwise cosine distance 1 - cos(x_i, x_j) over ordered pairs i != j (exact; in
  [0, 2], clamped against float rounding)."""
  x = _check_points(x_NxD, 2)
  n = x.shape[0]
  s2, self_sim, _ = _unit_gram(x)
  return float(np.clip(1.0 - (float(s2) - float(self_sim)) / (n * (n - 1)), 0.0, 2.0))


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
  sd = float(v.std(ddof=1)) if len(v) > 1 else None
  half = 1.96 * sd / math.sqrt(len(v)) if sd is not None else None
  return {"n": int(len(v)), "mean": float(v.mean()), "std": sd,
          "ci95": None if half is None else [float(v.mean() - half), float(v.mean() + half)],
          "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
