"""Unmerged LoRA (x @ W + scale * (x @ a) @ b) against the naive merged weights W + scale * a @ b
computed here in numpy: outputs, gradients, no full-size product in the traced computation,
small updates surviving a bf16 base, and the guard against unsupported uses."""

import functools

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

from qdc_jax.models import configs
from qdc_jax.models import lora as lora_lib
from qdc_jax.models import transformer
from qdc_jax.rl import ppo

SCALE = 0.5


def _model(name="lab_tiny", **kw):
  cfg = configs.get_model_config(name, **kw)
  model = transformer.Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                         ["params"])
  return cfg, model, params


def _lora(params, layers, b_std, seed=3):
  """LoRA tree with random (non-zero) b, so the adapted model differs from the base."""
  lo = lora_lib.init(jax.random.PRNGKey(seed), params, 4, layers)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 100))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: b_std * jax.random.normal(next(keys), x.shape)
      if path[-1].key == "b" else x, lo)


def _naive_merge(params, lo, scale, dtype=np.float32):
  """W + scale * a @ b in float64 numpy, rounded once to `dtype`."""
  out = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  for name, modules in lo.items():
    for module, weights in modules.items():
      for weight, ab in weights.items():
        a = np.asarray(ab["a"], np.float64)
        b = np.asarray(ab["b"], np.float64)
        out[name][module][weight] = out[name][module][weight] + scale * np.tensordot(a, b, 1)
  return jax.tree.map(lambda x: jnp.asarray(x.astype(dtype)), out)


def _tokens(b=2, t=9):
  return jax.random.randint(jax.random.PRNGKey(7), (b, t), 0, 128)


def _unmerged_logits(model, params, lo, tok):
  fn = lambda p, x: model.apply({"params": p}, x)[0]
  return lora_lib.apply(fn, params, lo, SCALE, tok)


@pytest.mark.parametrize("name,kw", [("lab_tiny", dict(num_layers=3)),
                                     ("lab_tiny", dict(num_layers=3, remat=True)),
                                     ("gpt2_tiny", dict(num_layers=3))])
def test_unmerged_forward_equals_naive_merge(name, kw):
  cfg, model, params = _model(name, **kw)
  lo = _lora(params, [1, 2], b_std=0.3)
  tok = _tokens()
  unmerged = jax.jit(functools.partial(_unmerged_logits, model))
  plain = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  got = unmerged(params, lo, tok)
  want = plain(_naive_merge(params, lo, SCALE), tok)
  base = plain(params, tok)
  assert float(jnp.abs(want - base).max()) > 0.1  # the adapter really changes the model
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
  # b = 0 (LoRA at init): exactly the base model's computation up to float32 rounding.
  zero = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if p[-1].key == "b" else x, lo)
  np.testing.assert_allclose(unmerged(params, zero, tok), base, rtol=1e-6, atol=1e-6)


def test_gradients_equal_naive_merge():
  cfg, model, params = _model(num_layers=3)
  lo = _lora(params, [0, 2], b_std=0.3)
  tok = _tokens()
  cot = jax.random.normal(jax.random.PRNGKey(9), (2, 9, cfg.vocab_size))

  def unmerged(lo):
    return jnp.sum(_unmerged_logits(model, params, lo, tok) * cot)

  def merged(lo):  # naive: build W + scale * a @ b in the forward pass
    p = jax.tree.map(lambda x: x, params)
    for name, modules in lo.items():
      for module, weights in modules.items():
        for weight, ab in weights.items():
          p[name][module][weight] = params[name][module][weight] + SCALE * jnp.tensordot(
              ab["a"], ab["b"], 1)
    return jnp.sum(model.apply({"params": p}, tok)[0] * cot)

  got = jax.jit(jax.grad(unmerged))(lo)
  want = jax.jit(jax.grad(merged))(lo)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert float(jnp.abs(w).max()) > 0
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.abs(w).max()))


def _dot_and_add_shapes(jaxpr, out=None):
  """Output shapes of every dot_general / add in a jaxpr and its sub-jaxprs."""
  out = set() if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "add", "add_any"):
      out.update(tuple(v.aval.shape) for v in eqn.outvars)
    for p in eqn.params.values():
      for j in (p if isinstance(p, (tuple, list)) else [p]):
        if isinstance(j, jex.ClosedJaxpr):
          _dot_and_add_shapes(j.jaxpr, out)
        elif isinstance(j, jex.Jaxpr):
          _dot_and_add_shapes(j, out)
  return out


def test_no_full_size_weight_or_gradient_is_built():
  """Neither W + a @ b nor a weight-sized gradient appears in the traced loss + gradient:
  every dot_general / add output has a shape other than the adapted weights' (3-D or 2-D)."""
  cfg, model, params = _model(num_layers=2)
  lo = _lora(params, [1], b_std=0.3)
  tok = _tokens()  # 2 x 9 = 18 rows: no activation shares a weight's shape
  weight_shapes = set()
  for (module, weight), n_in in lora_lib.TARGETS.items():
    w = params["layer_1"][module][weight]
    weight_shapes |= {w.shape, (int(np.prod(w.shape[:n_in])), int(np.prod(w.shape[n_in:])))}

  def loss(lo, merged):
    if merged:
      p = {**params, "layer_1": jax.tree.map(lambda x: x, params["layer_1"])}
      for module, weights in lo["layer_1"].items():
        for weight, ab in weights.items():
          p["layer_1"][module][weight] = p["layer_1"][module][weight] + jnp.tensordot(
              ab["a"], ab["b"], 1)
      return jnp.sum(model.apply({"params": p}, tok)[0])
    return jnp.sum(_unmerged_logits(model, params, lo, tok))

  shapes = lambda merged: _dot_and_add_shapes(
      jax.make_jaxpr(jax.grad(functools.partial(loss, merged=merged)))(lo).jaxpr)
  assert shapes(True) & weight_shapes  # the naive form builds them (the check can fail)
  assert not shapes(False) & weight_shapes


def test_small_update_survives_a_bf16_base():
  """bf16 weights, float32 compute: an adapter update far below bf16 resolution of W moves
  PPO's policy log-probs as the exact float32 merge says. Merging it into bf16 weights (the
  earlier forward pass) rounds most of it away.

  Run eagerly: under jit, XLA:CPU computes bf16 adds in float32 and may skip the rounding
  (xla_allow_excess_precision), which hides the loss on CPU but not on native-bf16 hardware."""
  cfg, model, params = _model(num_layers=2, param_dtype="bfloat16")
  spec = ppo.Spec(cfg, value_layers=1, lora_rank=4, lora_alpha=4 * SCALE)
  trainable, frozen = ppo.split_params(params, spec, jax.random.PRNGKey(1))
  trainable["lora"] = _lora(params, [0, 1], b_std=3e-4)
  batch = jax.tree.map(jnp.asarray, ppo.rollout_batch(
      [[1, 5, 6], [1, 7], [1, 9, 9], [1, 3]], [[8, 9, 2], [10, 11, 12, 2], [4], [6, 6]], 10, 0))
  got = ppo.forward(trainable, frozen, batch, spec)["logp"]

  f32_model = transformer.Transformer(cfg.replace(param_dtype="float32"))

  @functools.partial(jax.jit, static_argnums=1)
  def logp(p, m):
    logits = m.apply({"params": p}, batch["inputs"], batch["positions"],
                     batch["segment_ids"])[0]
    return jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None],
                               -1)[..., 0]

  base = logp(params, model)
  exact = logp(_naive_merge(params, trainable["lora"], SCALE), f32_model)
  rounded = logp(_naive_merge(params, trainable["lora"], SCALE, dtype=jnp.bfloat16), model)
  effect = float(jnp.abs(exact - base).max())
  assert effect > 1e-4  # well above float32 noise
  assert float(jnp.abs(got - exact).max()) < 0.02 * effect
  # The same update merged into bf16 weights mostly vanishes.
  assert float(jnp.abs(rounded - exact).max()) > 0.5 * effect


def test_unsupported_uses_raise():
  w = jnp.arange(24.0).reshape(4, 6)
  params = {"layer_0": {"mlp": {"up": w}}}
  lo = {"layer_0": {"mlp": {"up": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 6))}}}}
  x = jnp.ones((3, 4))
  ok = lora_lib.apply(lambda p, x: x @ p["layer_0"]["mlp"]["up"], params, lo, 0.5, x)
  np.testing.assert_allclose(ok, x @ (w + 0.5 * jnp.ones((4, 6)) * 2), rtol=1e-6)
  with pytest.raises(ValueError, match="reach `mul`"):
    lora_lib.apply(lambda p, x: x @ (2 * p["layer_0"]["mlp"]["up"]), params, lo, 0.5, x)
  with pytest.raises(ValueError, match="mixes its input and output axes"):
    lora_lib.apply(lambda p, x: x[:, :2] @ p["layer_0"]["mlp"]["up"].reshape(2, 12),
                   params, lo, 0.5, x)
  with pytest.raises(ValueError, match="not activations @ weight"):
    lora_lib.apply(lambda p, x: p["layer_0"]["mlp"]["up"] @ jnp.ones((6, 2)), params, lo,
                   0.5, x)
  with pytest.raises(ValueError, match="returned by the function"):
    lora_lib.apply(lambda p, x: p["layer_0"]["mlp"]["up"], params, lo, 0.5, x)
  with pytest.raises(ValueError, match="not in the parameter tree"):
    lora_lib.apply(lambda p, x: x, {"layer_0": {"mlp": {}}}, lo, 0.5, x)


def test_unmerged_forward_on_a_sharded_mesh():
  """Hydra + LoRA forward with FSDP x tensor-sharded base weights on 8 fake devices equals
  the plain model on the naively merged weights."""
  from qdc_jax import sharding
  cfg = configs.get_model_config("lab_tiny", num_layers=3)
  model = transformer.Transformer(cfg)
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  params, _ = sharding.init_sharded(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"],
      mesh, rules)
  assert not params["layer_2"]["mlp"]["up"].sharding.is_fully_replicated
  spec = ppo.Spec(cfg, value_layers=1, frozen_layers=1, lora_rank=4, lora_alpha=4 * SCALE)
  trainable, frozen = ppo.split_params(params, spec, jax.random.PRNGKey(1))
  trainable["lora"] = _lora(params, [1, 2], b_std=0.3)
  batch = jax.tree.map(jnp.asarray, ppo.rollout_batch(
      [[1, 5, 6], [1, 7], [1, 9, 9], [1, 3]], [[8, 9, 2], [10, 11, 12, 2], [4], [6, 6]], 10, 0))
  batch = sharding.put_global(batch, mesh, rules)
  with sharding.activation_rules(mesh, rules):
    got = jax.jit(functools.partial(ppo.forward, spec=spec))(trainable, frozen, batch)["logp"]
  host = jax.tree.map(np.asarray, params)
  logits = jax.jit(lambda p: model.apply({"params": p}, batch["inputs"], batch["positions"],
                                         batch["segment_ids"])[0])(
      _naive_merge(host, jax.tree.map(np.asarray, trainable["lora"]), SCALE))
  want = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None],
                             -1)[..., 0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5)
