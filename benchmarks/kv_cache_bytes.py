"""Bytes of the sampler's KV cache with and without prompt sharing, from the code's own shapes.

`jax.eval_shape` of `sampling.prefill` (abstract parameters: no memory, runs on any CPU in
seconds) gives the cache the sampler really builds: the K samples of a prompt share one copy
of its keys and values, and own N slots each for their tokens (B*P + B*K*N slots per layer).
The cache before prompt sharing copied the prompt to every row (B*K*(P+N) slots), as
`transformer.init_cache(cfg, B*K, P+N)` does.

  python benchmarks/kv_cache_bytes.py --model gemma2_9b --samples 96 --prompt_len 512 \
      --new_tokens 1024
"""

import argparse
import functools
import json
import math


def cache_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="gemma2_9b")
  ap.add_argument("--prompts", type=int, default=1)
  ap.add_argument("--samples", type=int, default=96)
  ap.add_argument("--prompt_len", type=int, default=512)
  ap.add_argument("--new_tokens", type=int, default=1024)
  ap.add_argument("--dtype", default="bfloat16")
  args = ap.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from qdc_jax import sampling  # pylint: disable=g-import-not-at-top
  from qdc_jax.models import configs, transformer  # pylint: disable=g-import-not-at-top

  cfg = configs.get_model_config(args.model, dtype=args.dtype, param_dtype=args.dtype)
  model = transformer.Transformer(cfg)
  b, k, p, n = args.prompts, args.samples, args.prompt_len, args.new_tokens
  params = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"])
  prompts = jax.ShapeDtypeStruct((b, p), jnp.int32)
  lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
  _, shared, _ = jax.eval_shape(functools.partial(
      sampling.prefill, model=model, num_samples=k, max_new_tokens=n), params, prompts, lengths)
  copied = jax.eval_shape(lambda: transformer.init_cache(cfg, b * k, p + n))
  res = {"model": args.model, "dtype": args.dtype, "prompts": b, "samples": k,
         "prompt_len": p, "new_tokens": n, "shared_bytes": cache_bytes(shared),
         "copied_bytes": cache_bytes(copied)}
  res["saved_bytes"] = res["copied_bytes"] - res["shared_bytes"]
  for name in ("copied", "shared", "saved"):
    v = res[f"{name}_bytes"]
    print(f"{name:7s} {v:>16,d} B = {v / 1e9:8.2f} GB = {v / 2**30:8.2f} GiB")
  print(f"shared / copied = {res['shared_bytes'] / res['copied_bytes']:.3f}")
  print(json.dumps(res))


if __name__ == "__main__":
  main()
