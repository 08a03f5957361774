"""Model tests: published parameter counts and a naive NumPy reference forward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdc_jax.models import configs
from qdc_jax.models import transformer as T

# Published totals: Gemma-2 (Hugging Face release, 256000-row vocabulary, tied embeddings) and
# GPT-2 small (tied embeddings, 1024 learned positions).
PUBLISHED = {
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320,
    "gpt2_125m": 124_439_808,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts_without_allocating(name):
  cfg = configs.get_model_config(name)
  model = T.Transformer(cfg)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(jax.tree.map(lambda x: x, abstract)))
  assert T.count_params(abstract["params"]) == PUBLISHED[name]


def test_unknown_config_and_field_errors_name_choices():
  with pytest.raises(ValueError, match="gemma2_2b"):
    configs.get_model_config("gemma3")
  with pytest.raises(ValueError, match="num_layers"):
    configs.get_model_config("lab_tiny", num_layer=3)
  with pytest.raises(ValueError, match="num_kv_heads"):
    configs.get_model_config("lab_tiny", num_heads=4, num_kv_heads=3)


# ---------------------------------------------------------------- naive NumPy reference


def _np_norm(x, p, cfg):
  if cfg.norm == "rmsnorm":
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * (1 + p["scale"])
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p["bias"]


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _np_rope(x, pos, base):  # x [T, H]
  h = x.shape[-1] // 2
  out = np.empty_like(x)
  for t in range(x.shape[0]):
    for i in range(h):
      ang = pos[t] * base ** (-2.0 * i / x.shape[-1])
      a, b = x[t, i], x[t, i + h]
      out[t, i] = a * math.cos(ang) - b * math.sin(ang)
      out[t, i + h] = b * math.cos(ang) + a * math.sin(ang)
  return out


def _np_forward(params, tokens, cfg):
  """One sequence, explicit loops over heads and query positions, float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  t = len(tokens)
  pos = np.arange(t)
  x = p["embedding"][tokens]
  if cfg.embed_scale:
    x = x * math.sqrt(cfg.d_model)
  if cfg.position == "learned":
    x = x + p["pos_embedding"][pos]
  group = cfg.num_heads // cfg.num_kv_heads
  for li in range(cfg.num_layers):
    lp = p[f"layer_{li}"]
    a = lp["attn"]
    h = _np_norm(x, lp["pre_attn_norm"], cfg)
    heads = []
    for n in range(cfg.num_heads):
      kv = n // group
      q = h @ a["q"][:, n]
      k = h @ a["k"][:, kv]
      v = h @ a["v"][:, kv]
      if cfg.use_bias:
        q, k, v = q + a["q_bias"][n], k + a["k_bias"][kv], v + a["v_bias"][kv]
      if cfg.position == "rope":
        q, k = _np_rope(q, pos, cfg.rope_base), _np_rope(k, pos, cfg.rope_base)
      q = q * (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
      o = np.zeros_like(q)
      for i in range(t):
        lo = 0
        if cfg.attention_kind(li) == "local":
          lo = max(0, i - cfg.sliding_window + 1)
        s = k[lo:i + 1] @ q[i]
        if cfg.attn_softcap:
          s = cfg.attn_softcap * np.tanh(s / cfg.attn_softcap)
        w = np.exp(s - s.max())
        o[i] = (w / w.sum()) @ v[lo:i + 1]
      heads.append(o @ a["o"][n])
    att = sum(heads) + (a["o_bias"] if cfg.use_bias else 0)
    if cfg.post_norms:
      att = _np_norm(att, lp["post_attn_norm"], cfg)
    x = x + att
    m = lp["mlp"]
    h = _np_norm(x, lp["pre_mlp_norm"], cfg)
    up = h @ m["up"] + (m["up_bias"] if cfg.use_bias else 0)
    hid = _np_gelu(h @ m["gate"]) * up if cfg.mlp == "geglu" else _np_gelu(up)
    y = hid @ m["down"] + (m["down_bias"] if cfg.use_bias else 0)
    if cfg.post_norms:
      y = _np_norm(y, lp["post_mlp_norm"], cfg)
    x = x + y
  x = _np_norm(x, p["final_norm"], cfg)
  logits = x @ p["embedding"].T
  if cfg.final_softcap:
    logits = cfg.final_softcap * np.tanh(logits / cfg.final_softcap)
  return logits


def _random_params(model, seq_len, seed=0):
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, seq_len), jnp.int32))["params"]
  params = T.nn.meta.unbox(params)
  # Non-zero norm scales and biases so every convention (1 + scale, biases) is exercised.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else x
            for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_forward_matches_naive_reference(family):
  if family == "gemma2":
    # Window 4 < sequence 12: local layers must really be local; soft-caps small enough to
    # bite; query_pre_attn_scalar != head_dim; GQA with 2 query heads per KV head.
    cfg = configs.get_model_config("lab_tiny", sliding_window=4, attn_softcap=3.0,
                                   final_softcap=2.0, query_pre_attn_scalar=24, num_layers=3)
  else:
    cfg = configs.get_model_config("gpt2_tiny", num_layers=2)
  model = T.Transformer(cfg)
  params = _random_params(model, 12)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 12)
  logits, _ = model.apply({"params": params}, jnp.asarray(tokens)[None])
  ref = _np_forward(params, tokens, cfg)
  np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=2e-4, rtol=2e-4)


def test_packed_segments_do_not_attend_to_each_other():
  cfg = configs.get_model_config("lab_tiny")
  model = T.Transformer(cfg)
  params = _random_params(model, 16)
  rng = np.random.default_rng(1)
  a, b = rng.integers(3, 100, 7), rng.integers(3, 100, 9)
  packed = np.concatenate([a, b])[None]
  positions = np.concatenate([np.arange(7), np.arange(9)])[None]
  segments = np.asarray([[1] * 7 + [2] * 9])
  out, _ = model.apply({"params": params}, packed, positions, segments)
  alone_a, _ = model.apply({"params": params}, a[None])
  alone_b, _ = model.apply({"params": params}, b[None])
  np.testing.assert_allclose(out[0, :7], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 7:], alone_b[0], atol=1e-5)


@pytest.mark.parametrize("family,layers,remat", [("gemma2", 5, False), ("gemma2", 4, True),
                                                 ("gpt2", 3, False)])
def test_scanned_layers_match_the_naive_reference_and_the_unrolled_stack(family, layers, remat):
  # scan_layers changes how the blocks run, not the parameter tree or what they compute:
  # the same logits as the numpy reference (5 Gemma layers = 2 scanned local/global pairs +
  # 1 unrolled), the same gradients as the unrolled stack, the same Hydra pieces.
  if family == "gemma2":
    cfg = configs.get_model_config("lab_tiny", sliding_window=4, attn_softcap=3.0,
                                   final_softcap=2.0, num_layers=layers, remat=remat)
  else:
    cfg = configs.get_model_config("gpt2_tiny", num_layers=layers)
  plain, scanned = T.Transformer(cfg), T.Transformer(cfg.replace(scan_layers=True))
  params = _random_params(plain, 12)
  assert jax.tree.structure(params) == jax.tree.structure(_random_params(scanned, 12))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
  logits, _ = scanned.apply({"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(logits[0]), _np_forward(params, tokens[0], cfg),
                             atol=2e-4, rtol=2e-4)

  def loss(p, model):
    return jnp.mean(model.apply({"params": p}, jnp.asarray(tokens))[0] ** 2)

  g_plain = jax.jit(jax.grad(lambda p: loss(p, plain)))(params)
  g_scan = jax.jit(jax.grad(lambda p: loss(p, scanned)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               g_plain, g_scan)
  # A piece of the stack (PPO's frozen bottom / value branch): blocks 1 .. L-1 from the
  # residual stream leaving block 0.
  h0 = plain.apply({"params": params}, jnp.asarray(tokens), layers=(0, 1))[0]
  want = plain.apply({"params": params}, jnp.asarray(tokens), layers=(1, layers),
                     hidden_BxTxD=h0)[0]
  got = scanned.apply({"params": params}, jnp.asarray(tokens), layers=(1, layers),
                      hidden_BxTxD=h0)[0]
  np.testing.assert_allclose(got, want, atol=1e-5)
