"""A decoder-only transformer covering GPT-2 and Gemma-2 behind one Config.

Pure Linen: `model.init(rng, tokens)` -> variables, `model.apply(variables, tokens, ...)`.
Parameters and activations carry logical axis names only; `qdc_jax.sharding` maps them to a
mesh with a short rule list from the config.

Three modes share the layer code:
- training / scoring (`cache=None`): causal attention inside each packed segment;
- cached decoding (`cache` given): the T new tokens of row b are written into cache slots
  `positions[b, 0] .. positions[b, 0] + T - 1` and attend to every slot <= their position.
  Slot index == absolute position, so rows of different prompt lengths decode side by side
  and RoPE / sliding windows need no extra bookkeeping. The sampler's prefill fills such a
  cache for the prompts;
- decoding with a shared prompt cache (`init_shared_cache`): the S samples of a prompt read
  one copy of its keys and values and write their own tokens into slots of their own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Cache = dict[str, Any]  # {'layer_i': {'k': .., 'v': .., ...}, ...}

# Finite instead of -inf: a padding query whose keys are all masked then gets a uniform
# (ignored) softmax instead of NaNs that would poison gradients through `where`.
_NEG_INF = -2.3819763e38


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and features of a decoder. Named instances live in `models/configs.py`."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  # 'rmsnorm' is Gemma's x * (1 + scale); 'layernorm' is GPT-2's with bias.
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  # 'geglu' = gelu(x W_gate) * (x W_up) (Gemma); 'gelu' = gelu(x W_in) (GPT-2).
  mlp: str = "geglu"
  # 'rope' (Gemma) or 'learned' (GPT-2, table of max_len rows).
  position: str = "rope"
  rope_base: float = 10_000.0
  max_len: int = 8192
  # Gemma-2 normalises the outputs of attention and MLP again before the residual add.
  post_norms: bool = True
  # Per-layer attention kinds, repeated to num_layers: 'local' = sliding window, 'global'.
  layer_pattern: tuple[str, ...] = ("local", "global")
  sliding_window: Optional[int] = 4096
  attn_softcap: Optional[float] = 50.0
  final_softcap: Optional[float] = 30.0
  # Queries are scaled by query_pre_attn_scalar**-0.5 (None -> head_dim).
  query_pre_attn_scalar: Optional[float] = None
  embed_scale: bool = True  # multiply token embeddings by sqrt(d_model)
  tie_embeddings: bool = True
  use_bias: bool = False  # biases on projections and MLP (GPT-2)
  dtype: str = "float32"  # activation / matmul dtype
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each block in the backward pass
  # Run the blocks as a `lax.scan` over groups of len(layer_pattern) layers (their parameters
  # stacked inside the call), so compile time does not grow with depth. The parameter tree
  # keeps one `layer_i` entry per block either way: checkpoints, imports and exports, LoRA,
  # Hydra pieces and per-layer hidden states do not depend on this switch.
  scan_layers: bool = False

  def __post_init__(self):
    problems = []
    if self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                      f"{self.num_kv_heads}")
    if self.norm not in ("rmsnorm", "layernorm"):
      problems.append(f"norm={self.norm!r} (choose 'rmsnorm' or 'layernorm')")
    if self.mlp not in ("geglu", "gelu"):
      problems.append(f"mlp={self.mlp!r} (choose 'geglu' or 'gelu')")
    if self.position not in ("rope", "learned"):
      problems.append(f"position={self.position!r} (choose 'rope' or 'learned')")
    bad = [k for k in self.layer_pattern if k not in ("local", "global")]
    if bad:
      problems.append(f"layer_pattern has {bad} (use 'local' or 'global')")
    if "local" in self.layer_pattern and not self.sliding_window:
      problems.append("layer_pattern has 'local' layers but sliding_window is not set")
    if self.position == "rope" and self.head_dim % 2:
      problems.append(f"RoPE needs an even head_dim, got {self.head_dim}")
    if problems:
      raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

  def attention_kind(self, layer: int) -> str:
    return self.layer_pattern[layer % len(self.layer_pattern)]

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def _param(module: nn.Module, name: str, init, shape, names, dtype):
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _softcap(x: Array, cap: Optional[float]) -> Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


class Norm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    pdt = jnp.dtype(cfg.param_dtype)
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rmsnorm":
      # Gemma stores scale around zero and applies (1 + scale).
      scale = _param(self, "scale", nn.initializers.zeros, (x.shape[-1],), ("norm",), pdt)
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
      y = y * (1.0 + scale.astype(jnp.float32))
    else:
      scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), pdt)
      bias = _param(self, "bias", nn.initializers.zeros, (x.shape[-1],), ("norm",), pdt)
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale + bias
    return y.astype(x.dtype)


def apply_rope(x_BxTxNxH: Array, positions_BxT: Array, base: float) -> Array:
  """Rotary embedding, rotating the first half of each head against the second half."""
  half = x_BxTxNxH.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x_BxTxNxH.shape[-1])
  angle = positions_BxT.astype(jnp.float32)[:, :, None, None] * freq  # B,T,1,half
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def _write_cache(cache_BxKxSxH: Array, new_BxTxKxH: Array, start_B: Array) -> Array:
  """Row b's T new keys (or values) into slots start_B[b] .. start_B[b]+T-1.

  The cache is stored [B, K, S, H] (batch dims of the attention dots leading), so decoding
  reads it without the per-step transpose of the whole cache a [B, S, K, H] layout costs
  (31% of sampler op time on CPU; docs/benchmarks.md); only the T new entries move.
  """
  def write_row(c, x, s):
    return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, s, 0))
  return jax.vmap(write_row)(cache_BxKxSxH, new_BxTxKxH.transpose(0, 2, 1, 3), start_B)


class Attention(nn.Module):
  config: ModelConfig
  kind: str  # 'local' or 'global'

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache, prefix_lengths_R=None):
    cfg = self.config
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nn.initializers.normal(stddev=d ** -0.5)
    wq = _param(self, "q", init, (d, n, h), ("embed", "heads", "head_dim"), pdt)
    wk = _param(self, "k", init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
    wv = _param(self, "v", init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
    wo = _param(self, "o", nn.initializers.normal(stddev=(n * h) ** -0.5), (n, h, d),
                ("heads", "head_dim", "embed"), pdt)
    # 2-D matmuls on [B*T, D]: with 3-D einsums XLA:CPU transposes activation gradients in
    # the backward pass (1.2-1.4x slower train steps; docs/benchmarks.md).
    b0, t0 = x_BxTxD.shape[:2]
    x2 = x_BxTxD.reshape(b0 * t0, d)
    q = (x2 @ wq.astype(dt).reshape(d, n * h)).reshape(b0, t0, n, h)
    kk = (x2 @ wk.astype(dt).reshape(d, k * h)).reshape(b0, t0, k, h)
    v = (x2 @ wv.astype(dt).reshape(d, k * h)).reshape(b0, t0, k, h)
    if cfg.use_bias:
      zeros = nn.initializers.zeros
      q = q + _param(self, "q_bias", zeros, (n, h), ("heads", "head_dim"), pdt).astype(dt)
      kk = kk + _param(self, "k_bias", zeros, (k, h), ("kv_heads", "head_dim"), pdt).astype(dt)
      v = v + _param(self, "v_bias", zeros, (k, h), ("kv_heads", "head_dim"), pdt).astype(dt)
    if cfg.position == "rope":
      q = apply_rope(q, positions_BxT, cfg.rope_base)
      kk = apply_rope(kk, positions_BxT, cfg.rope_base)
    q = q * jnp.asarray(cfg.query_scale, dt)
    q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", None))

    if cache is not None and "prefix_k" in cache:
      return self._attend_shared_prefix(q, kk, v, positions_BxT, cache, prefix_lengths_R, wo)
    if cache is None:
      keys, values = kk, v
      t = x_BxTxD.shape[1]
      idx = jnp.arange(t)
      mask = (idx[None, :, None] >= idx[None, None, :])  # causal by index, 1,T,S
      mask = mask & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
      key_pos = positions_BxT
      new_cache = None
      kv_spec = "bskh"  # keys/values [B, S=T, K, H]
    else:
      start = positions_BxT[:, 0]
      keys = _write_cache(cache["k"], kk, start)
      values = _write_cache(cache["v"], v, start)
      new_cache = {"k": keys, "v": values}
      s = keys.shape[2]
      kv_spec = "bksh"  # the cache layout [B, K, S, H]
      key_pos = jnp.broadcast_to(jnp.arange(s)[None, :], (x_BxTxD.shape[0], s))
      mask = key_pos[:, None, :] <= positions_BxT[:, :, None]
      keys, values = keys.astype(dt), values.astype(dt)
    if self.kind == "local":
      mask = mask & (positions_BxT[:, :, None] - key_pos[:, None, :] < cfg.sliding_window)

    b, t = q.shape[:2]
    q = q.reshape(b, t, k, n // k, h)  # grouped-query attention
    logits = jnp.einsum(f"btkgh,{kv_spec}->bkgts", q, keys, preferred_element_type=jnp.float32)
    logits = _softcap(logits, cfg.attn_softcap)
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum(f"bkgts,{kv_spec}->btkgh", probs, values).reshape(b, t, n, h)
    return self._project_out(out, wo), new_cache

  def _project_out(self, out_BxTxNxH, wo):
    cfg = self.config
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t, n, h = out_BxTxNxH.shape
    d = cfg.d_model
    out = nn.with_logical_constraint(out_BxTxNxH, ("act_batch", "act_len", "act_heads", None))
    y = (out.reshape(b * t, n * h) @ wo.astype(dt).reshape(n * h, d)).reshape(b, t, d)
    if cfg.use_bias:
      y = y + _param(self, "o_bias", nn.initializers.zeros, (d,), ("norm",), pdt).astype(dt)
    return y

  def _attend_shared_prefix(self, q, kk, v, positions_BxT, cache, prefix_lengths_R, wo):
    """Decoding with one copy of each prompt's cache for its S samples (`init_shared_cache`).

    Rows r = b*S + s (prompt b, sample s) read the prompt's keys/values from `prefix_k/v`
    [B, K, P, H] (slots = positions 0..P-1, valid below the row's prompt length) and their
    own generated ones from `k/v` [B*S, K, N, H] (slot j = position prefix_length + j). One
    softmax spans both score blocks (a shared max and denominator): the same attention, up to
    float rounding, as over one full cache per row.
    """
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    r, t, n, h = q.shape
    k = cfg.num_kv_heads
    g = n // k
    plen = prefix_lengths_R.astype(jnp.int32)
    keys = _write_cache(cache["k"], kk, positions_BxT[:, 0] - plen)
    values = _write_cache(cache["v"], v, positions_BxT[:, 0] - plen)
    new_cache = {**cache, "k": keys, "v": values}
    pk, pv = cache["prefix_k"].astype(dt), cache["prefix_v"].astype(dt)
    bp, p = pk.shape[0], pk.shape[2]
    s = r // bp
    gen_pos = plen[:, None] + jnp.arange(keys.shape[2], dtype=jnp.int32)[None]  # R, N
    gen_mask = gen_pos[:, None, :] <= positions_BxT[:, :, None]  # R, T, N
    pre_pos = jnp.arange(p, dtype=jnp.int32)
    pre_mask = jnp.broadcast_to(pre_pos[None, None, :] < plen[:, None, None], (r, t, p))
    if self.kind == "local":
      w = cfg.sliding_window
      gen_mask = gen_mask & (positions_BxT[:, :, None] - gen_pos[:, None, :] < w)
      pre_mask = pre_mask & (positions_BxT[:, :, None] - pre_pos[None, None, :] < w)
    # Scores in the dots' own output layouts ([prompt, kv head, sample*t*group, slot] for the
    # prompt block, [row, kv head, group*t, slot] for the row's own slots), merged by one
    # softmax over both blocks: a shared max and denominator, no concatenation of the scores
    # and no transposes of anything slot-sized.
    qp = q.reshape(bp, s, t, k, g, h).transpose(0, 3, 1, 2, 4, 5).reshape(bp, k, s * t * g, h)
    pre = jnp.einsum("bkqh,bkph->bkqp", qp, pk, preferred_element_type=jnp.float32)
    q5 = q.reshape(r, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(r, k, g * t, h)
    gen = jnp.einsum("bkqh,bknh->bkqn", q5, keys.astype(dt), preferred_element_type=jnp.float32)
    # masks [R, T, P|N] -> the layouts above
    pre_m = pre_mask.reshape(bp, s, t, 1, 1, p).transpose(0, 3, 1, 2, 4, 5)
    pre = jnp.where(pre_m, _softcap(pre, cfg.attn_softcap).reshape(bp, k, s, t, g, p), _NEG_INF)
    gen_m = gen_mask[:, None, None]  # R, 1, 1, T, N
    gen = jnp.where(gen_m, _softcap(gen, cfg.attn_softcap).reshape(r, k, g, t, -1), _NEG_INF)
    # per (row, head, t): max and denominator over both blocks, in the prompt block's layout
    pre_max = pre.max(-1)  # bp, k, s, t, g
    gen_max = gen.max(-1).reshape(bp, s, k, g, t).transpose(0, 2, 1, 4, 3)
    m = jax.lax.stop_gradient(jnp.maximum(pre_max, gen_max))
    e_pre = jnp.exp(pre - m[..., None])
    m_gen = m.transpose(0, 2, 1, 4, 3).reshape(r, k, g, t)
    e_gen = jnp.exp(gen - m_gen[..., None])
    denom = e_pre.sum(-1) + e_gen.sum(-1).reshape(bp, s, k, g, t).transpose(0, 2, 1, 4, 3)
    o_pre = jnp.einsum("bkqp,bkph->bkqh", (e_pre / denom[..., None]).astype(dt).reshape(
        bp, k, s * t * g, p), pv)  # bp, k, s*t*g, h
    d_gen = denom.transpose(0, 2, 1, 4, 3).reshape(r, k, g, t)
    o_gen = jnp.einsum("bkqn,bknh->bkqh", (e_gen / d_gen[..., None]).astype(dt).reshape(
        r, k, g * t, -1), values.astype(dt))  # r, k, g*t, h
    out = (o_pre.reshape(bp, k, s, t, g, h).transpose(0, 2, 3, 1, 4, 5).reshape(r, t, k, g, h)
           + o_gen.reshape(r, k, g, t, h).transpose(0, 3, 1, 2, 4))
    return self._project_out(out.reshape(r, t, n, h), wo), new_cache


class Mlp(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, f = cfg.d_model, cfg.d_ff
    b, t = x_BxTxD.shape[:2]
    x_BxTxD = x_BxTxD.reshape(b * t, d)
    w_up = _param(self, "up", nn.initializers.normal(d ** -0.5), (d, f), ("embed", "mlp"), pdt)
    hid = jnp.einsum("md,df->mf", x_BxTxD, w_up.astype(dt))
    if cfg.use_bias:
      hid = hid + _param(self, "up_bias", nn.initializers.zeros, (f,), ("mlp",), pdt).astype(dt)
    if cfg.mlp == "geglu":
      w_gate = _param(self, "gate", nn.initializers.normal(d ** -0.5), (d, f), ("embed", "mlp"),
                      pdt)
      hid = jax.nn.gelu(jnp.einsum("md,df->mf", x_BxTxD, w_gate.astype(dt))) * hid
    else:
      hid = jax.nn.gelu(hid)
    hid = nn.with_logical_constraint(hid.reshape(b, t, f), ("act_batch", "act_len", "act_mlp"))
    hid = hid.reshape(b * t, f)
    w_down = _param(self, "down", nn.initializers.normal(f ** -0.5), (f, d), ("mlp", "embed"), pdt)
    y = jnp.einsum("mf,fd->md", hid, w_down.astype(dt)).reshape(b, t, d)
    if cfg.use_bias:
      y = y + _param(self, "down_bias", nn.initializers.zeros, (d,), ("norm",), pdt).astype(dt)
    return y


class Block(nn.Module):
  config: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache, prefix_lengths=None):
    cfg = self.config
    h, new_cache = Attention(cfg, self.kind, name="attn")(
        Norm(cfg, name="pre_attn_norm")(x), positions, segment_ids, cache, prefix_lengths)
    if cfg.post_norms:
      h = Norm(cfg, name="post_attn_norm")(h)
    x = x + h
    h = Mlp(cfg, name="mlp")(Norm(cfg, name="pre_mlp_norm")(x))
    if cfg.post_norms:
      h = Norm(cfg, name="post_mlp_norm")(h)
    x = x + h
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    return x, new_cache


class Transformer(nn.Module):
  """Decoder. `__call__` returns (logits_BxTxV, new_cache or None)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: Array, positions_BxT: Optional[Array] = None,
               segment_ids_BxT: Optional[Array] = None, cache: Optional[Cache] = None,
               *, return_hidden: bool = False, logits_index_B: Optional[Array] = None,
               layers: Optional[tuple[int, int]] = None,
               hidden_BxTxD: Optional[Array] = None, with_hidden: bool = False):
    """`logits_index_B` keeps one position per row before the vocabulary readout
    (logits come back [B, 1, V]): prefill needs only the last prompt token, and the full
    [B, P, V] f32 logits of a 256k vocabulary would dwarf everything else.

    Pieces of the stack (PPO's frozen bottom shared by policy, reference and value branch):
    `layers=(a, b)` runs blocks a..b-1 only, starting from `hidden_BxTxD` (the residual
    stream entering block a) instead of the embeddings when given. With b < num_layers the
    residual stream leaving block b-1 comes back (no final norm, no readout); only the
    parameters of the pieces that run are needed.

    `with_hidden` returns ((logits, final hidden states), cache): heads that read the hidden
    states beside the readout (ILQL's Q and V heads) without a second pass.
    """
    cfg = self.config
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t = tokens_BxT.shape
    first, last = layers if layers is not None else (0, cfg.num_layers)
    if not 0 <= first <= last <= cfg.num_layers:
      raise ValueError(f"layers={layers} is not a range within 0..{cfg.num_layers}")
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((b, t), jnp.int32)
    # With the sqrt(d) input scale, std d^-0.5 gives unit-scale inputs and O(1) tied logits.
    emb_std = cfg.d_model ** -0.5 if cfg.embed_scale else 0.02
    embedding = None
    if hidden_BxTxD is None or (last == cfg.num_layers and cfg.tie_embeddings
                                and not return_hidden):
      embedding = _param(self, "embedding", nn.initializers.normal(stddev=emb_std),
                         (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
    if hidden_BxTxD is not None:
      x = hidden_BxTxD.astype(dt)
    else:
      if first != 0:
        raise ValueError(f"layers={layers} starts after block 0: pass hidden_BxTxD")
      x = jnp.take(embedding, tokens_BxT, axis=0).astype(dt)
      if cfg.embed_scale:
        x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
      if cfg.position == "learned":
        table = _param(self, "pos_embedding", nn.initializers.normal(stddev=0.02),
                       (cfg.max_len, cfg.d_model), (None, "embed"), pdt)
        x = x + jnp.take(table, positions_BxT, axis=0).astype(dt)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

    block_cls = nn.remat(Block) if cfg.remat else Block
    new_cache = None
    prefix_lengths = None
    if cache is not None:
      new_cache = {k: v for k, v in cache.items() if not k.startswith("layer_")}
      prefix_lengths = cache.get("prefix_lengths")
    period = len(cfg.layer_pattern)
    groups = (last - first) // period
    if cfg.scan_layers and groups > 1 and not self.is_initializing():
      x, scanned = _scan_blocks(cfg, nn.meta.unbox(self.variables["params"]), x, positions_BxT,
                                segment_ids_BxT, cache, prefix_lengths, first, groups)
      if cache is not None:
        new_cache.update(scanned)
      first += groups * period  # the rest (fewer than a period) runs unrolled
    for i in range(first, last):
      name = f"layer_{i}"
      x, c = block_cls(cfg, cfg.attention_kind(i), name=name)(
          x, positions_BxT, segment_ids_BxT, None if cache is None else cache[name],
          prefix_lengths)
      if cache is not None:
        new_cache[name] = c
    if last < cfg.num_layers:
      return x, new_cache
    x = Norm(cfg, name="final_norm")(x)
    if logits_index_B is not None:
      x = jnp.take_along_axis(x, logits_index_B[:, None, None].astype(jnp.int32), axis=1)
    if return_hidden:
      return x, new_cache
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embedding.astype(dt),
                          preferred_element_type=jnp.float32)
    else:
      head = _param(self, "lm_head", nn.initializers.normal(cfg.d_model ** -0.5),
                    (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)
      logits = jnp.einsum("btd,dv->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
    logits = _softcap(logits.astype(jnp.float32), cfg.final_softcap)
    logits = nn.with_logical_constraint(logits, ("act_batch", "act_len", "act_vocab"))
    if with_hidden:
      return (logits, x), new_cache
    return logits, new_cache


def _scan_blocks(cfg: ModelConfig, params: dict, x, positions, segment_ids, cache,
                 prefix_lengths, first: int, groups: int):
  """Blocks first .. first + groups * period - 1 as one `lax.scan` over `groups` steps.

  Step g runs the `period` = len(layer_pattern) blocks first + g*period + j (so every step
  sees the same attention kinds), reading their parameters (and caches) from trees stacked
  along a leading axis here. Returns (x, {layer name: new cache} or {}).
  """
  period = len(cfg.layer_pattern)
  names = [[f"layer_{first + g * period + j}" for g in range(groups)] for j in range(period)]
  kinds = [cfg.attention_kind(first + j) for j in range(period)]
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  xs_params = [stack([params[n] for n in names[j]]) for j in range(period)]
  xs_cache = None if cache is None else [stack([cache[n] for n in names[j]])
                                         for j in range(period)]

  def step(x, xs):
    p, c = xs
    out = []
    for j in range(period):
      x, cj = Block(cfg, kinds[j], parent=None).apply(
          {"params": p[j]}, x, positions, segment_ids, None if c is None else c[j],
          prefix_lengths)
      out.append(cj)
    return x, (None if c is None else out)

  if cfg.remat:
    step = jax.checkpoint(step, prevent_cse=False)
  x, ys = jax.lax.scan(step, x, (xs_params, xs_cache))
  if cache is None:
    return x, {}
  return x, {names[j][g]: jax.tree.map(lambda y, g=g: y[g], ys[j])
             for j in range(period) for g in range(groups)}


CACHE_AXES = ("cache_batch", "act_kv_heads", "cache_len", None)  # [B, K, S, H]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
  """Zero KV cache for `batch` rows and `max_len` slots per layer."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return {f"layer_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for i in range(cfg.num_layers)}


def cache_logical_axes(cfg: ModelConfig, shared_prefix: bool = False) -> dict:
  """Logical axes of `init_cache` (or, with `shared_prefix`, `init_shared_cache`) trees."""
  if not shared_prefix:
    return {f"layer_{i}": {"k": CACHE_AXES, "v": CACHE_AXES} for i in range(cfg.num_layers)}
  layer = {"k": CACHE_AXES, "v": CACHE_AXES, "prefix_k": CACHE_AXES, "prefix_v": CACHE_AXES}
  return {"prefix_lengths": ("cache_batch",),
          **{f"layer_{i}": layer for i in range(cfg.num_layers)}}


def init_shared_cache(cfg: ModelConfig, prefix: Cache, prefix_lengths_R: Array,
                      max_new: int, dtype: Any = None) -> Cache:
  """A decode cache whose R = B*S rows share their prompt's cache: `prefix` (an `init_cache`
  tree of B prompts, filled by a prefill) is kept once, and each row gets `max_new` slots of
  its own for generated tokens (slot j = position prefix_lengths_R[r] + j).

  The K samples of a prompt then read one copy of its keys and values: R*(P+N) cache slots
  become B*P + R*N (docs/benchmarks.md states the bytes for gemma2_9b).
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  rows = prefix_lengths_R.shape[0]
  shape = (rows, cfg.num_kv_heads, max_new, cfg.head_dim)
  out: Cache = {"prefix_lengths": prefix_lengths_R.astype(jnp.int32)}
  for i in range(cfg.num_layers):
    c = prefix[f"layer_{i}"]
    out[f"layer_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                         "prefix_k": c["k"], "prefix_v": c["v"]}
  return out


def count_params(params) -> int:
  """Number of parameters of a (possibly abstract, possibly boxed) parameter tree."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
  return int(sum(math.prod(x.shape) for x in leaves))
