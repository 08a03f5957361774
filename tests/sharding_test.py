"""Sharding on 8 fake CPU devices: mesh construction, rule-driven partitioning, and a train
step on a (2, 2, 2) mesh that matches the single-device step."""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qdc_jax import optim, sharding, train
from qdc_jax.models import configs
from qdc_jax.models import transformer as T


def test_mesh_fill_and_errors():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh((2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh((-1, 1, 1)).shape)["data"] == 8
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.make_mesh((3, 2, 2))
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh((-1, -1, 2))
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.rules_from_config([("heads", "model")])


def _setup():
  cfg = configs.get_model_config("lab_tiny", num_heads=4, num_kv_heads=2)
  model = T.Transformer(cfg)
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=1, total_steps=10, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1, grad_clip=1.0)))
  rng = np.random.default_rng(0)
  b, t = 8, 16
  batch = {"inputs": rng.integers(0, 128, (b, t)), "targets": rng.integers(0, 128, (b, t)),
           "loss_mask": (rng.random((b, t)) > 0.3), "positions": np.tile(np.arange(t), (b, 1)),
           "segment_ids": np.ones((b, t))}
  return model, tx, {k: np.asarray(v, np.int32) for k, v in batch.items()}


def test_parameters_partitioned_as_rules_say():
  model, tx, _ = _setup()
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  state, shardings = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                              seq_len=16, mesh=mesh, rules=rules)
  p = state["params"]
  # Logical names in the model -> mesh axes through DEFAULT_RULES.
  assert p["embedding"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
  assert p["layer_0"]["attn"]["q"].sharding.spec == P("fsdp", "tensor", None)
  assert p["layer_0"]["attn"]["o"].sharding.spec == P("tensor", None, "fsdp")
  assert p["layer_0"]["mlp"]["down"].sharding.spec == P("tensor", "fsdp")
  assert p["layer_0"]["pre_attn_norm"]["scale"].sharding.spec == P(None)
  # Each device really holds a quarter of the (vocab, embed) table.
  shard = p["embedding"].addressable_shards[0].data
  assert shard.shape == (128 // 2, 64 // 2)
  # Optimiser moments follow their parameters.
  mu = state["opt_state"][1][0].mu
  assert mu["layer_0"]["attn"]["q"].sharding.spec == P("fsdp", "tensor", None)
  # A different rule list moves the parameters.
  rules2 = (("embed", None), ("heads", "fsdp")) + tuple(
      r for r in rules if r[0] not in ("embed", "heads"))
  state2, _ = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx, seq_len=16,
                                       mesh=mesh, rules=rules2)
  assert state2["params"]["layer_0"]["attn"]["q"].sharding.spec == P(None, "fsdp", None)


def test_train_step_on_222_mesh_matches_single_device():
  model, tx, batch = _setup()
  results = {}
  for shape in [(1, 1, 1), (2, 2, 2)]:
    mesh = sharding.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    rules = sharding.DEFAULT_RULES
    state, sh = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                         seq_len=16, mesh=mesh, rules=rules)
    step = train.jit_train_step(
        functools.partial(train.train_step, model=model, tx=tx, accum_steps=2), sh, mesh,
        rules)
    losses = []
    for i in range(3):
      state, metrics = step(state, sharding.put_batch(batch, mesh, rules),
                            jax.random.PRNGKey(i))
      losses.append(float(metrics["loss"]))
    assert state["params"]["layer_0"]["attn"]["q"].sharding.mesh.shape == mesh.shape
    results[shape] = (losses, jax.device_get(state["params"]))
  (l1, p1), (l8, p8) = results[(1, 1, 1)], results[(2, 2, 2)]
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  assert l1[2] < l1[0]  # the steps did train
  # Sharded matmuls sum in another order; Adam turns a near-zero gradient's rounding into up
  # to a full lr-sized step, so a few coordinates may differ by ~1e-4 after three steps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4), p1, p8)


def test_accumulation_equals_one_large_batch():
  model, tx, batch = _setup()
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  out = []
  for accum in (1, 4):
    state, sh = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                         seq_len=16, mesh=mesh, rules=rules)
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, accum_steps=accum))
    state, m = step(state, batch, jax.random.PRNGKey(0))
    out.append((float(m["loss"]), jax.device_get(state["params"])))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out[0][1], out[1][1])


def test_bf16_parameters_train_in_bf16():
  # bf16 parameters keep bf16 gradients and optimiser moments (a float32 loss denominator
  # used to promote them, and the non-finite guard's branches then disagreed on dtypes), and
  # the step tracks a float32 step from the same (rounded) start.
  model, tx, batch = _setup()
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  cfg16 = model.config.replace(param_dtype="bfloat16")
  model16 = T.Transformer(cfg16)
  state, _ = train.create_train_state(jax.random.PRNGKey(0), model=model16, tx=tx,
                                      seq_len=16, mesh=mesh, rules=rules)
  state32 = {**state, "params": jax.tree.map(lambda x: x.astype(np.float32), state["params"]),
             "opt_state": tx.init(jax.tree.map(lambda x: x.astype(np.float32),
                                               state["params"]))}
  new, m = jax.jit(functools.partial(train.train_step, model=model16, tx=tx))(
      state, batch, jax.random.PRNGKey(0))
  new32, m32 = jax.jit(functools.partial(train.train_step, model=model, tx=tx))(
      state32, batch, jax.random.PRNGKey(0))
  assert {x.dtype for x in jax.tree.leaves(new["params"])} == {np.dtype(jax.numpy.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(new["opt_state"]) if x.ndim} == {np.dtype(jax.numpy.bfloat16)}
  assert not bool(new["nonfinite"])
  np.testing.assert_allclose(float(m["loss"]), float(m32["loss"]), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), b,
                                                       atol=2e-2),
               new["params"], new32["params"])
