"""Compile time of the train step and the sampler at Gemma shapes, unrolled vs scanned layers.

Everything is lowered abstractly (`jax.ShapeDtypeStruct` parameters and optimiser state: no
weights are allocated), on whatever backend runs this (CPU here), for the real layer counts
of gemma2_9b (42) and gemma2_27b (46) in bf16. `ModelConfig.scan_layers` runs the blocks as
one `lax.scan` over local/global pairs; the parameter tree is the same either way.

  python benchmarks/compile_time.py --models gemma2_9b,gemma2_27b --out /tmp/qdc_bench/compile.json

Times: `lower` (tracing to StableHLO) and `compile` (XLA), wall seconds. All in one process:
every (model, variant, function) is a program XLA has not seen, so nothing is reused across
rows (set no persistent compilation cache when running this).
"""

import argparse
import functools
import json
import os
import platform
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="gemma2_9b,gemma2_27b")
  ap.add_argument("--what", default="train,sample")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--depths", default="", help="layer counts to sweep (default: the real one)")
  ap.add_argument("--out", default="/tmp/qdc_bench/compile.json")
  args = ap.parse_args(argv)
  load_start = os.getloadavg()

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from qdc_jax import sampling, train  # pylint: disable=g-import-not-at-top
  from qdc_jax.models import configs, transformer  # pylint: disable=g-import-not-at-top

  b, t = args.batch, args.seq_len
  rows = []
  depths = [int(d) for d in args.depths.split(",") if d] or [None]
  for name, depth, scan in [(n, d, s) for n in args.models.split(",") for d in depths
                            for s in (False, True)]:
    layers = {"num_layers": depth} if depth else {}
    cfg = configs.get_model_config(name, dtype="bfloat16", param_dtype="bfloat16",
                                   scan_layers=scan, **layers)
    model = transformer.Transformer(cfg)
    tx = optax.adamw(1e-4)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    for what in args.what.split(","):
      if what == "train":
        state = nn.meta.unbox(jax.eval_shape(functools.partial(
            train.init_train_state, model=model, tx=tx, seq_len=8), jax.random.PRNGKey(0)))
        i32 = jax.ShapeDtypeStruct((b, t), jnp.int32)
        batch = {"inputs": i32, "targets": i32, "positions": i32, "segment_ids": i32,
                 "loss_mask": i32}
        fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
        fargs = (state, batch, rng)
      else:
        params = nn.meta.unbox(jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))))
        sp = sampling.SamplingParams(max_new_tokens=t, num_samples=4)
        fn = jax.jit(functools.partial(sampling.sample, model=model, sp=sp))
        fargs = (params["params"], jax.ShapeDtypeStruct((b, t), jnp.int32),
                 jax.ShapeDtypeStruct((b,), jnp.int32), rng)
      t0 = time.perf_counter()
      lowered = fn.lower(*fargs)
      t1 = time.perf_counter()
      lowered.compile()
      t2 = time.perf_counter()
      row = {"model": name, "layers": cfg.num_layers, "scan_layers": scan, "what": what,
             "lower_s": t1 - t0, "compile_s": t2 - t1}
      rows.append(row)
      print(f"{name:11s} L={cfg.num_layers:3d} {what:6s} scan={scan!s:5s} lower {t1 - t0:6.1f} s  "
            f"compile {t2 - t1:6.1f} s", flush=True)
  res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "backend":
         jax.default_backend(), "jax": jax.__version__, "load_start": load_start,
         "load_end": os.getloadavg(), "batch": b, "seq_len": t, "rows": rows}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
