"""Embeddings and exact nearest neighbours: the intrinsic dimension of text (scaling laws)
reads them, and the QDC measures (embedding dispersion, Vendi score, nearest-neighbour
distance; `mean_pooled_embeddings`) share them.

`hidden_states` / `sampled_token_embeddings` embed token sequences with any model directory's
transformer at any layer (the thesis's 1024-token windows, 32 tokens per document).

`knn` finds the k nearest neighbours of every point of a set by blocked pairwise distances
and a running `lax.top_k`: one [query block, key block] tile of distances exists at a time,
so 100k points (or more) fit in a few hundred MB whatever k. Candidates are ranked by the
matmul form |q|^2 + |x|^2 - 2 q.x on mean-centred points with full-precision matmuls (the
form cancels when distances are small next to the norms; centring removes a shared offset,
and HIGHEST keeps TPU/GPU from bf16/TF32 passes); the distances returned are recomputed
directly from the points, so the small distances that intrinsic-dimension estimators take
logs of are accurate.

Metrics: 'euclidean' |x - y|, and 'cosine' as the chord |x/|x| - y/|y|| = sqrt(2 (1 - cos)):
the same neighbours as 1 - cos, but a distance that scales linearly with the angle, as the
estimators assume (1 - cos grows with its square and would halve every estimate).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qdc_jax import sharding as sharding_lib

METRICS = ("euclidean", "cosine")


class Neighbours(NamedTuple):
  distances: jax.Array  # [N, k] ascending; a point is never its own neighbour
  indices: jax.Array  # [N, k] int32 row indices into the set


def _normalise(x: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.where(norm > 0, norm, 1.0)


@functools.partial(jax.jit, static_argnames=("k", "metric", "block"))
def _knn(x_NxD: jax.Array, *, k: int, metric: str, block: int) -> Neighbours:
  n, d = x_NxD.shape
  pts = _normalise(x_NxD) if metric == "cosine" else x_NxD
  pts = pts - jnp.mean(pts, axis=0, keepdims=True)  # distances are translation-invariant
  nb = -(-n // block)
  padded = jnp.zeros((nb * block, d), pts.dtype).at[:n].set(pts)
  sq = jnp.sum(padded * padded, axis=-1)
  ids = jnp.arange(nb * block, dtype=jnp.int32)
  key_blocks = padded.reshape(nb, block, d)
  key_sq, key_ids = sq.reshape(nb, block), ids.reshape(nb, block)

  def one_query_block(args):
    q, q_sq, q_ids = args  # [block, D], [block], [block]

    def merge(carry, key):
      best_s, best_i = carry  # scores = -squared distance, larger is nearer
      kx, k_sq, k_ids = key
      dots = jnp.matmul(q, kx.T, precision=jax.lax.Precision.HIGHEST)
      score = -(q_sq[:, None] + k_sq[None, :] - 2.0 * dots)  # - squared distance
      bad = (k_ids[None, :] >= n) | (k_ids[None, :] == q_ids[:, None])  # padding, self
      score = jnp.where(bad, -jnp.inf, score)
      s, i = jax.lax.top_k(score, min(k, block))
      both_s = jnp.concatenate([best_s, s], axis=1)
      both_i = jnp.concatenate([best_i, k_ids[i]], axis=1)
      top_s, pos = jax.lax.top_k(both_s, k)
      return (top_s, jnp.take_along_axis(both_i, pos, axis=1)), None

    init = (jnp.full((block, k), -jnp.inf, pts.dtype), jnp.zeros((block, k), jnp.int32))
    (_, idx), _ = jax.lax.scan(merge, init, (key_blocks, key_sq, key_ids))
    # Exact distances of the chosen neighbours, then re-sorted (ties of the ranking aside,
    # the order only changes where the matmul form was inexact).
    nbr = padded[idx]  # [block, k, D]
    dist = jnp.sqrt(jnp.sum(jnp.square(q[:, None, :] - nbr), axis=-1))
    order = jnp.argsort(dist, axis=1)
    return (jnp.take_along_axis(dist, order, axis=1),
            jnp.take_along_axis(idx, order, axis=1))

  dist, idx = jax.lax.map(one_query_block, (key_blocks, key_sq, key_ids))
  return Neighbours(dist.reshape(nb * block, k)[:n], idx.reshape(nb * block, k)[:n])


def knn(x_NxD, k: int, *, metric: str = "euclidean", block: int = 1024) -> Neighbours:
  """The k nearest neighbours of each of the N points (excluding the point itself).

  `metric`: 'euclidean' (|x - y|) or 'cosine' (the chord between the unit vectors,
  sqrt(2 (1 - cos)); zero vectors stay at the origin). Duplicate points are each other's
  neighbours at distance 0.
  Exact in float64 when x is float64 (enable jax_enable_x64); `block` bounds memory: one
  [block, block] tile of scores and a [block, k, D] gather exist at a time.
  """
  if metric not in METRICS:
    raise ValueError(f"metric={metric!r}; choose one of {METRICS}")
  x = jnp.asarray(x_NxD)
  if x.ndim != 2:
    raise ValueError(f"knn needs a [N, D] array of points, got shape {x.shape}")
  n = x.shape[0]
  if not 1 <= k < n:
    raise ValueError(f"k={k} neighbours need 1 <= k < N = {n} points")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if not bool(jnp.all(jnp.isfinite(x))):
    bad = int(np.sum(~np.all(np.isfinite(np.asarray(x)), axis=1)))
    raise ValueError(f"{bad} of {n} points have NaN or infinite coordinates; drop them first")
  block = int(max(k, min(block, n)))
  return _knn(x, k=k, metric=metric, block=block)


# ------------------------------------------------------------------ model embeddings of text


def hidden_states(params, tokens_BxT, *, model, layer: Optional[int] = None) -> jax.Array:
  """Token embeddings [B, T, D] of a model: `layer=l` for 0 <= l < num_layers is the raw
  residual stream leaving block l-1 (l = 0: the input embeddings scaled as the blocks see
  them); `layer=None` or `num_layers` is the final layer *after the final norm* (what the
  readout sees, the thesis's "final-layer embeddings"), not the raw stream."""
  cfg = model.config
  if layer is None or layer == cfg.num_layers:
    return model.apply({"params": params}, tokens_BxT, return_hidden=True)[0]
  if not 0 <= layer < cfg.num_layers:
    raise ValueError(f"layer={layer}: choose 0..{cfg.num_layers} (or None for the final one)")
  return model.apply({"params": params}, tokens_BxT, layers=(0, layer))[0]


def sampled_token_embeddings(params, docs: Sequence[Sequence[int]], *, model,
                             layer: Optional[int] = None, context: int = 1024,
                             per_doc: int = 32, seed: int = 0, batch_size: int = 32,
                             positions: Optional[tuple[int, int]] = None, mesh=None,
                             rules=None, param_shardings=None) -> np.ndarray:
  """The thesis's text sample for intrinsic dimension: for each document a random window of
  `context` tokens (the whole document when shorter), embedded by the model (`layer`), and
  `per_doc` of its positions drawn without replacement (all of them when fewer); every
  document's vectors together, shuffled. Returns float32 [sum_docs min(per_doc, len), D].

  `positions=(lo, hi)` draws only window positions lo <= i < hi (the context-position
  ablation; documents with fewer positions there give fewer vectors, none gives none).

  Seeded: the same (seed, docs) give the same windows, positions and order. Documents are
  batched (`batch_size` rows per jitted call, padded to one shape); on a mesh every process
  passes the same `docs` and gets the same array back.
  """
  docs = [list(d) for d in docs]
  if not docs or any(len(d) == 0 for d in docs):
    raise ValueError("sampled_token_embeddings needs non-empty token lists")
  rng = np.random.default_rng(seed)
  width = min(context, max(len(d) for d in docs))
  windows, picks = [], []
  for d in docs:
    start = int(rng.integers(0, len(d) - width + 1)) if len(d) > width else 0
    w = d[start:start + width]
    windows.append(w)
    lo, hi = positions or (0, len(w))
    allowed = np.arange(min(lo, len(w)), min(hi, len(w)))
    picks.append(np.sort(rng.choice(allowed, size=min(per_doc, len(allowed)), replace=False)))
  fn = _embed_fn(model, layer, mesh, rules, param_shardings)
  min_rows = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  rows = max(min_rows, -(-min(batch_size, len(docs)) // min_rows) * min_rows)
  m = max(1, max(len(p) for p in picks))
  out = []
  for b0 in range(0, len(docs), rows):
    chunk = windows[b0:b0 + rows]
    toks = np.zeros((rows, width), np.int32)
    at = np.zeros((rows, m), np.int32)  # positions to keep, gathered on the device
    for i, w in enumerate(chunk):
      toks[i, :len(w)] = w
      at[i, :len(picks[b0 + i])] = picks[b0 + i]
    if mesh is not None:
      rules = rules or sharding_lib.DEFAULT_RULES
      toks, at = sharding_lib.put_global(toks, mesh, rules), sharding_lib.put_global(
          at, mesh, rules)
    hid = sharding_lib.to_host(fn(params, toks, at))  # [rows, m, D]
    for i in range(len(chunk)):
      out.append(hid[i, :len(picks[b0 + i])])
  vecs = np.concatenate(out).astype(np.float32)
  if not len(vecs):
    raise ValueError(f"No token at window positions {positions} in any of the {len(docs)} "
                     f"documents")
  return vecs[rng.permutation(len(vecs))]


def mean_pooled_embeddings(params, token_lists: Sequence[Sequence[int]], *, model,
                           layer: Optional[int] = None, batch_size: int = 64,
                           max_tokens: Optional[int] = None, skip_first: int = 0, mesh=None,
                           rules=None, param_shardings=None) -> tuple[np.ndarray, int]:
  """One vector per sequence: its hidden states at `layer` (see `hidden_states`; None = the
  final layer after the final norm) averaged over its tokens, leaving out the first
  `skip_first` (e.g. 1 for a BOS token, whose state is the same in every row). The QDC
  measures' embeddings.

  Sequences longer than `max_tokens` (default: the model's max_len) keep their first
  max_tokens tokens; the count of truncated ones is returned with the [N, D] float32 array.
  Batched (`batch_size` rows per jitted call, sorted by length and padded at the end to a
  multiple of 64 tokens, so only a few shapes compile; the model is causal, so padding after a
  row's tokens does not change them). On a mesh every process passes the same lists and gets
  the same array back.
  """
  limit = int(min(max_tokens or model.config.max_len, model.config.max_len))
  seqs = [list(t)[:limit] for t in token_lists]
  if not seqs or any(len(t) <= skip_first for t in seqs):
    raise ValueError(f"mean_pooled_embeddings needs token lists longer than skip_first="
                     f"{skip_first}")
  truncated = sum(len(t) > limit for t in token_lists)
  fn = _embed_fn(model, layer, mesh, rules, param_shardings, pooled=True, skip=skip_first)
  min_rows = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  rows = max(min_rows, -(-min(batch_size, len(seqs)) // min_rows) * min_rows)
  order = np.argsort([len(t) for t in seqs], kind="stable")
  out = np.zeros((len(seqs), model.config.d_model), np.float32)
  for b0 in range(0, len(seqs), rows):
    idx = order[b0:b0 + rows]
    width = min(limit, -(-max(len(seqs[i]) for i in idx) // 64) * 64)
    toks = np.zeros((rows, width), np.int32)
    lens = np.ones((rows,), np.int32)
    for r, i in enumerate(idx):
      toks[r, :len(seqs[i])] = seqs[i]
      lens[r] = len(seqs[i])
    if mesh is not None:
      rules = rules or sharding_lib.DEFAULT_RULES
      toks, lens = sharding_lib.put_global(toks, mesh, rules), sharding_lib.put_global(
          lens, mesh, rules)
    out[idx] = sharding_lib.to_host(fn(params, toks, lens))[:len(idx)]
  return out, truncated


_EMBED_FNS: dict = {}


def _embed_fn(model, layer, mesh, rules, param_shardings, pooled: bool = False, skip: int = 0):
  """The jitted embedding program: (params, tokens [B, T], at) -> the hidden states at the
  positions `at` [B, M] (pooled=False), or averaged over positions skip <= t < at [B]
  (pooled)."""
  key = (model, layer, mesh, None if rules is None else tuple(map(tuple, rules)),
         sharding_lib.shardings_key(param_shardings), pooled, skip)
  if key not in _EMBED_FNS:
    def fn(params, toks_BxT, at):
      hid = hidden_states(params, toks_BxT, model=model, layer=layer)
      if pooled:
        pos = jnp.arange(toks_BxT.shape[1])[None, :]
        mask = ((pos >= skip) & (pos < at[:, None])).astype(jnp.float32)
        total = jnp.einsum("btd,bt->bd", hid.astype(jnp.float32), mask)
        return total / jnp.maximum(at - skip, 1)[:, None].astype(jnp.float32)
      return jnp.take_along_axis(hid, at[:, :, None], axis=1)

    if mesh is None:
      _EMBED_FNS[key] = jax.jit(fn)
    else:
      rules = rules or sharding_lib.DEFAULT_RULES
      batch2 = sharding_lib.batch_sharding(mesh, rules, 2)
      at_sharding = sharding_lib.batch_sharding(mesh, rules, 1) if pooled else batch2
      _EMBED_FNS[key] = sharding_lib.jit_sharded(
          fn, mesh, rules, in_shardings=(param_shardings, batch2, at_sharding),
          out_shardings=sharding_lib.batch_sharding(mesh, rules, 2 if pooled else 3))
  return _EMBED_FNS[key]
