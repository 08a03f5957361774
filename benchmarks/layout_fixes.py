r"""Paired measurements of proposed layout fixes to qdc_jax/models/transformer.py (CPU).

The core module is NOT modified: its source is read, patched in memory with exact string
replacements and loaded as a separate module (the script stops if a snippet it patches has
changed). Each variant is compiled in the same process and the timed calls alternate between
variants, so all see the same machine load. Outputs must agree (loss / grad norm of the
first train step, sampled tokens for the same key) before anything is timed.

Fixes:
  flat2d     - the projection and MLP matmuls on 2-D [B*T, D] activations instead of 3-D
               einsums ("btd,df->btf"): XLA:CPU otherwise emits, in the backward pass, a
               transposing copy fused with the GeGLU-derivative elementwise chain.
  cache_bksh - flat2d + the KV cache stored [B, K, S, H] instead of [B, S, K, H]: the decode
               attention einsums then need no per-step transpose of the whole cache.
  +fast_argmax (sampler only) - Gumbel-max sampling with max + min-index instead of the
               variadic argmax reduction inside jax.random.categorical (same tokens).

  python benchmarks/layout_fixes.py --what=train --model=bench_d512 --shape=16x256
  python benchmarks/layout_fixes.py --what=sample
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

FLAT2D = [
    ('''    q = jnp.einsum("btd,dnh->btnh", x_BxTxD, wq.astype(dt))
    kk = jnp.einsum("btd,dkh->btkh", x_BxTxD, wk.astype(dt))
    v = jnp.einsum("btd,dkh->btkh", x_BxTxD, wv.astype(dt))''',
     '''    b0, t0 = x_BxTxD.shape[:2]
    x2 = x_BxTxD.reshape(b0 * t0, d)
    q = (x2 @ wq.astype(dt).reshape(d, n * h)).reshape(b0, t0, n, h)
    kk = (x2 @ wk.astype(dt).reshape(d, k * h)).reshape(b0, t0, k, h)
    v = (x2 @ wv.astype(dt).reshape(d, k * h)).reshape(b0, t0, k, h)'''),
    ('''    y = jnp.einsum("btnh,nhd->btd", out, wo.astype(dt))''',
     '''    y = (out.reshape(b * t, n * h) @ wo.astype(dt).reshape(n * h, d)).reshape(b, t, d)'''),
    ('''    d, f = cfg.d_model, cfg.d_ff
    w_up''', '''    d, f = cfg.d_model, cfg.d_ff
    b, t = x_BxTxD.shape[:2]
    x_BxTxD = x_BxTxD.reshape(b * t, d)
    w_up'''),
    ('''jnp.einsum("btd,df->btf", x_BxTxD, w_up.astype(dt))''',
     '''jnp.einsum("md,df->mf", x_BxTxD, w_up.astype(dt))'''),
    ('''jnp.einsum("btd,df->btf", x_BxTxD, w_gate.astype(dt))''',
     '''jnp.einsum("md,df->mf", x_BxTxD, w_gate.astype(dt))'''),
    ('''    hid = nn.with_logical_constraint(hid, ("act_batch", "act_len", "act_mlp"))''',
     '''    hid = nn.with_logical_constraint(hid.reshape(b, t, f), ("act_batch", "act_len", "act_mlp"))
    hid = hid.reshape(b * t, f)'''),
    ('''    y = jnp.einsum("btf,fd->btd", hid, w_down.astype(dt))''',
     '''    y = jnp.einsum("mf,fd->md", hid, w_down.astype(dt)).reshape(b, t, d)'''),
]

CACHE_BKSH = [
    ('''    return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (s, 0, 0))''',
     '''    return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, s, 0))'''),
    ('''  return jax.vmap(write_row)(cache_BxSxKxH, new_BxTxKxH, start_B)''',
     '''  return jax.vmap(write_row)(cache_BxSxKxH, new_BxTxKxH.transpose(0, 2, 1, 3), start_B)'''),
    ('''      keys, values = kk, v
''', '''      keys, values = kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
'''),
    ('''      s = keys.shape[1]''', '''      s = keys.shape[2]'''),
    ('''"btkgh,bskh->bkgts"''', '''"btkgh,bksh->bkgts"'''),
    ('''"bkgts,bskh->btkgh"''', '''"bkgts,bksh->btkgh"'''),
    ('''CACHE_AXES = ("cache_batch", "cache_len", "act_kv_heads", None)''',
     '''CACHE_AXES = ("cache_batch", "act_kv_heads", "cache_len", None)'''),
    ('''  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)''',
     '''  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)'''),
]


def patched_module(name: str, patches):
  from qdc_jax.models import transformer
  src = open(transformer.__file__).read()
  for old, new in patches:
    if src.count(old) != 1:
      raise SystemExit(f"transformer.py changed; cannot apply patch for:\n{old}")
    src = src.replace(old, new)
  spec = importlib.util.spec_from_loader(name, loader=None)
  mod = importlib.util.module_from_spec(spec)
  mod.__file__ = f"<patched {name}>"
  sys.modules[name] = mod  # dataclasses look their module up while the class is built
  exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102
  return mod


def fast_choose_tokens(logits_BxV, rng, sp):
  """Same tokens as jax.random.categorical (Gumbel-max), argmax as max + min index."""
  import jax
  import jax.numpy as jnp
  x = logits_BxV.astype(jnp.float32) / sp.temperature
  x = x + jax.random.gumbel(rng, x.shape, jnp.float32)
  m = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1).astype(jnp.int32)


def alternate(fns: dict, rounds: int, pause_s: float) -> dict:
  times = {k: [] for k in fns}
  for i in range(rounds):
    for k, fn in fns.items():
      time.sleep(pause_s)
      t0 = time.perf_counter()
      fn(i)
      times[k].append(time.perf_counter() - t0)
  return times


def train_variants(args):
  import jax
  from qdc_jax import optim, sharding, train
  from qdc_jax.models import configs, transformer
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_step as ts  # the benchmark's batch and optimizer settings

  cfg = configs.get_model_config(args.model)
  b, t = (int(x) for x in args.shape.lower().split("x"))
  batch_np = ts.make_batch(cfg.vocab_size, b, t)
  tx = optim.make_optimizer(ts.OPT)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  batch = sharding.put_batch(batch_np, mesh, rules)
  key = jax.random.PRNGKey(1)
  mods = {"current": transformer, "flat2d": patched_module("t_flat2d", FLAT2D)}
  fns, first = {}, {}
  for label, mod in mods.items():
    model = mod.Transformer(cfg)
    state, sh = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                         seq_len=t, mesh=mesh, rules=rules)
    step = train.jit_train_step(functools.partial(train.train_step, model=model, tx=tx), sh,
                                mesh, rules)
    state, m = step(state, batch, key)
    first[label] = (float(m["loss"]), float(m["grad_norm"]))
    state, _ = step(state, batch, key)
    jax.block_until_ready(state)
    holder = [state]

    def one(i, step=step, holder=holder):
      s, _ = step(holder[0], batch, key)
      jax.block_until_ready(s)
      holder[0] = s
    fns[label] = one
  ref = first["current"]
  for label, (loss, gn) in first.items():
    assert abs(loss - ref[0]) < 1e-4 and abs(gn - ref[1]) < 1e-3 * ref[1], (label, first)
  return fns, {"first_step_loss_gradnorm": first,
               "tokens_per_call": b * t, "what": f"{args.model} {b}x{t} train step"}


def sample_variants(args):
  import jax
  import jax.numpy as jnp
  from qdc_jax import sampling
  from qdc_jax.models import configs, transformer

  cfg = configs.get_model_config("lab_tiny", vocab_size=128)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, 128, (64, 32)).astype(np.int32)
  lengths = np.full((64,), 32, np.int32)
  sp = sampling.SamplingParams(max_new_tokens=64, num_samples=16, eos_id=-1)
  bksh = patched_module("t_bksh", FLAT2D + CACHE_BKSH)
  variants = {"current": (transformer, sampling.choose_tokens),
              "cache_bksh": (bksh, sampling.choose_tokens),
              "cache_bksh+fast_argmax": (bksh, fast_choose_tokens)}
  orig = (sampling.transformer, sampling.choose_tokens)
  fns, toks = {}, {}
  try:
    for label, (mod, choose) in variants.items():
      sampling.transformer, sampling.choose_tokens = mod, choose  # read at trace time
      model = mod.Transformer(cfg)
      params = transformer.nn.meta.unbox(
          model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"])
      fn = jax.jit(functools.partial(sampling.sample, model=model, sp=sp))
      toks[label] = np.asarray(fn(params, prompts, lengths, jax.random.PRNGKey(0)).tokens)

      def one(i, fn=fn, params=params):
        jax.block_until_ready(fn(params, prompts, lengths, jax.random.PRNGKey(i + 1)))
      fns[label] = one
  finally:
    sampling.transformer, sampling.choose_tokens = orig
  same = {k: bool((v == toks["current"]).all()) for k, v in toks.items()}
  assert all(same.values()), same
  return fns, {"same_tokens": same, "tokens_per_call": 64 * 16 * 64,
               "what": "lab_tiny sampler, 1024 rows x 64 new tokens"}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--what", choices=["train", "sample"], default="train")
  ap.add_argument("--model", default="bench_d512")
  ap.add_argument("--shape", default="16x256", help="train: BxT")
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--pause_s", type=float, default=0.2)
  ap.add_argument("--out", default="/tmp/qdc_bench/layout_fixes.json")
  args = ap.parse_args(argv)
  info = _common.machine_info()
  fns, meta = (train_variants if args.what == "train" else sample_variants)(args)
  times = alternate(fns, args.rounds, args.pause_s)
  base = float(np.median(times["current"]))
  rows = [{"variant": k, "median_s": float(np.median(v)), "best_s": min(v),
           "tok_s": meta["tokens_per_call"] / float(np.median(v)),
           "speedup": base / float(np.median(v))} for k, v in times.items()]
  print(f"# {meta['what']}; {info['date']} load {info['loadavg_1_5_15']} -> "
        f"{[round(x, 2) for x in _common.load_average()]}")
  print(_common.format_table(rows, [("variant", "variant", ""), ("median_s", "median s", ".3f"),
                                    ("best_s", "best s", ".3f"), ("tok_s", "tok/s", ",.0f"),
                                    ("speedup", "speedup vs current", ".2f")]))
  _common.write_json(args.out, {"machine": info, "args": vars(args), "meta": meta,
                                "times": times, "rows": rows})


if __name__ == "__main__":
  main()
