"""SPARQ's verification workload: the plain sampler against continuous batching, one run.

The shipped lab student, 32 lab prompts x K = 16 rollouts, up to 160 new tokens, stop at EOS,
temperature 1 (what a SPARQ round asks of the student). Most solutions are far shorter than
160 tokens, so the plain sampler spends most steps on rows that already stopped; the stream
sampler (`sampling.sample_stream`) refills their slots. Every variant is checked to return the
same tokens as the plain sampler for the same key before it is timed; then the variants run
interleaved, round by round, and the medians are reported with the spread.

  python benchmarks/verification.py --rounds 5 --out /tmp/qdc_bench/verification.json
"""

import argparse
import json
import os
import platform
import statistics
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--samples", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=160)
  ap.add_argument("--slots", default="64,128,256", help="stream variants (decode rows)")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--out", default="/tmp/qdc_bench/verification.json")
  args = ap.parse_args(argv)
  load_start = os.getloadavg()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qdc_jax import model_io, sampling  # pylint: disable=g-import-not-at-top
  from qdc_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from qdc_jax.data import arith  # pylint: disable=g-import-not-at-top
  from qdc_jax.models import transformer  # pylint: disable=g-import-not-at-top

  mesh = sharding_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  cfg, params, tok, _, _ = model_io.load_model(model_io.asset_path("lab_student"),
                                                       mesh=mesh)
  model = transformer.Transformer(cfg)
  problems = arith.make_split("in_dist", args.prompts, seed=123)
  texts = [arith.PROMPT_TEMPLATE.format(question=p.text) for p in problems]
  toks, lens = sampling.pad_prompts([tok.encode(t, add_bos=True) for t in texts], tok.pad_id,
                                    multiple=64)
  sp = sampling.SamplingParams(max_new_tokens=args.new_tokens, num_samples=args.samples,
                               temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                               valid_vocab_size=tok.vocab_size)
  rows = args.prompts * args.samples
  variants = {"plain": 0, **{f"stream_{s}": int(s) for s in args.slots.split(",") if s}}
  fns, info = {}, {}
  want = None
  for name, slots in variants.items():
    fn = sampling.jit_sample(model, sp, slots=slots)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(params, toks, lens, jax.random.PRNGKey(0)))
    info[name] = {"slots": slots, "compile_plus_first_s": time.perf_counter() - t0}
    if want is None:
      want = np.asarray(out.tokens)
      lengths = np.asarray(out.lengths)
    assert (np.asarray(out.tokens) == want).all(), f"{name} samples other tokens"
    fns[name] = fn
  times = {name: [] for name in fns}
  for r in range(args.rounds):
    for name, fn in fns.items():  # interleaved: load drifts hit every variant alike
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, toks, lens, jax.random.PRNGKey(1 + r)))
      times[name].append(time.perf_counter() - t0)
  res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "load_start": load_start, "load_end": os.getloadavg(), "rows": rows,
         "prompt_len": int(toks.shape[1]),
         "max_new_tokens": args.new_tokens,
         "mean_length_key0": float(lengths.mean()), "max_length_key0": int(lengths.max()),
         "variants": {}}
  base = statistics.median(times["plain"])
  for name, ts in times.items():
    med = statistics.median(ts)
    res["variants"][name] = {**info[name], "median_s": med, "min_s": min(ts), "max_s": max(ts),
                             "rollouts_per_s": rows / med, "speedup_vs_plain": base / med}
    print(f"{name:12s} {rows / med:8.1f} rollouts/s  median {med:.3f}s "
          f"[{min(ts):.3f}, {max(ts):.3f}]  x{base / med:.2f}", flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=2)
  print(f"mean solution {lengths.mean():.1f} tokens (max {lengths.max()}); wrote {args.out}")


if __name__ == "__main__":
  main()
