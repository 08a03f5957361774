"""SPARQ's verification workload: today's sampler, the sampler before prompt sharing, continuous
batching and HF `generate`, side by side in one run.

The shipped lab student, 32 lab prompts x K = 16 rollouts, up to 160 new tokens, stop at EOS,
temperature 1 (what a SPARQ round asks of the student). Variants:
- plain: `sampling.jit_sample` as it is today (the K rows of a prompt share one copy of its
  KV cache; each row owns 160 slots for its tokens);
- before: the plain sampler as it was before prompt sharing (2026-12-02, commit 28bbe2d):
  the prompt's cache copied to each of its K rows, P + 160 slots per row; rebuilt here from
  today's model code (its full-cache decode path is the one prefill uses);
- grouped: plain, with the prompts grouped by length bucket (`sampling.length_groups`, one
  call per bucket of 64, as `generate_text` does on CPU): a short prompt is not padded to the
  longest; each prompt keeps its key, so the tokens are the plain sampler's (checked); its
  time includes the host work of the calls (padding, copies back), plain's does not;
- stream_S: continuous batching (`sampling.sample_stream`) through S decode rows;
- scanned (--scanned): plain, with the blocks run as a `lax.scan` (`scan_layers=True`);
- hf: HF `Gemma2ForCausalLM.generate` on the same model exported with `gemma_io`
  (left-padded prompts, do_sample, temperature 1, top_k 0, top_p 1, the same EOS and limit;
  `torch.set_num_threads(2)`).
Every JAX variant is checked to return the plain sampler's tokens for the same key before it
is timed; then all variants run interleaved, round by round, and the medians are reported
with the spread.

  python benchmarks/verification.py --rounds 5 --out /tmp/qdc_bench/verification.json
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--samples", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=160)
  ap.add_argument("--slots", default="64,128,256", help="stream variants (decode rows)")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--out", default="/tmp/qdc_bench/verification.json")
  ap.add_argument("--skip_before", action="store_true")
  ap.add_argument("--scanned", action="store_true",
                  help="also the plain sampler with ModelConfig.scan_layers=True")
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--model_rev", default="",
                  help="also the plain sampler with models/transformer.py as of this git "
                  "revision (the same sampling loop): a before/after of the model code")
  ap.add_argument("--hf_rounds", type=int, default=3, help="HF calls (each ~50 s)")
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
  encoded = [tok.encode(t, add_bos=True) for t in texts]
  toks, lens = sampling.pad_prompts(encoded, tok.pad_id, multiple=64)
  sp = sampling.SamplingParams(max_new_tokens=args.new_tokens, num_samples=args.samples,
                               temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                               valid_vocab_size=tok.vocab_size)
  rows = args.prompts * args.samples
  variants = {"plain": 0, **{f"stream_{s}": int(s) for s in args.slots.split(",") if s}}
  fns, info = {}, {}
  want = None
  builders = {name: (lambda slots=slots: sampling.jit_sample(model, sp, slots=slots))
              for name, slots in variants.items()}
  variants["grouped"] = 0
  calls = sampling.length_groups([len(e) for e in encoded], args.prompts, 64)
  info_groups = [(len(idx), width) for idx, width in calls]

  def grouped(run):
    def call(params_, toks_unused, lens_unused, rng):
      del toks_unused, lens_unused
      tokens = np.zeros((rows, args.new_tokens), np.int32)
      for idx, res in sampling.sample_calls(run, params_, encoded,
                                            sampling.prompt_keys(rng, len(encoded)), calls,
                                            pad_id=tok.pad_id, pad_multiple=64):
        for n, i in enumerate(idx):
          k = args.samples
          tokens[i * k:(i + 1) * k] = res.tokens[n * k:(n + 1) * k]
      return sampling.SampleOutput(tokens, None, None)
    return call
  builders["grouped"] = lambda: grouped(sampling.jit_sample(model, sp))
  if args.model_rev:
    name = f"model@{args.model_rev}"
    variants[name] = 0
    old = _common.module_at_revision("qdc_jax/models/transformer.py", args.model_rev)
    builders[name] = lambda: sampling.jit_sample(old.Transformer(cfg), sp)
    builders[f"grouped, {name}"] = lambda: grouped(sampling.jit_sample(old.Transformer(cfg), sp))
    variants[f"grouped, {name}"] = 0
  if args.scanned:
    variants["scanned"] = 0
    scanned = transformer.Transformer(cfg.replace(scan_layers=True))
    builders["scanned"] = lambda: sampling.jit_sample(scanned, sp)
  if not args.skip_before:
    variants["before"] = 0
    builders["before"] = lambda: jax.jit(functools.partial(_common.sample_before, model=model,
                                                                      sp=sp))
  for name, build in builders.items():
    slots = variants[name]
    fn = build()
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(params, toks, lens, jax.random.PRNGKey(0)))
    info[name] = {"slots": slots, "compile_plus_first_s": time.perf_counter() - t0}
    if want is None:
      want = np.asarray(out.tokens)
      lengths = np.asarray(out.lengths)
    assert (np.asarray(out.tokens) == want).all(), f"{name} samples other tokens"
    fns[name] = fn
  if not args.skip_hf:
    fns["hf"], info["hf"] = setup_hf(cfg, params, tok, toks, lens, sp)
  times = {name: [] for name in fns}
  for r in range(args.rounds):
    for name, fn in fns.items():  # interleaved: load drifts hit every variant alike
      if name == "hf" and r >= args.hf_rounds:
        continue
      t0 = time.perf_counter()
      out = fn(params, toks, lens, jax.random.PRNGKey(1 + r))
      if name != "hf" and not name.startswith("grouped"):  # those return finished host arrays
        jax.block_until_ready(out)
      times[name].append(time.perf_counter() - t0)
  res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "load_start": load_start, "load_end": os.getloadavg(), "rows": rows,
         "prompt_len": int(toks.shape[1]),
         "prompt_lengths": sorted(int(n) for n in lens),
         "groups_prompts_rows": info_groups,
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


def setup_hf(cfg, params, tok, toks, lens, sp):
  """HF generate on the same weights (exported with gemma_io), left-padded prompts."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Gemma2ForCausalLM, GenerationConfig  # pylint: disable=g-import-not-at-top
  from qdc_jax.models import gemma_io  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(2)
  tmp = tempfile.mkdtemp(prefix="qdc_hf_")
  gemma_io.params_to_hf_safetensors(params, cfg, tmp, dtype="float32")
  model = Gemma2ForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
  toks, lens = np.asarray(toks), np.asarray(lens)
  p = toks.shape[1]
  left = np.full_like(toks, tok.pad_id)
  mask = np.zeros_like(toks)
  for i, n in enumerate(lens):
    left[i, p - n:], mask[i, p - n:] = toks[i, :n], 1
  ids, mask = torch.from_numpy(left.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
  gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=sp.max_new_tokens, num_return_sequences=sp.num_samples,
                         use_cache=True, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                         eos_token_id=tok.eos_id,
                         # valid_vocab_size: the model's padded rows are never sampled
                         suppress_tokens=list(range(tok.vocab_size, cfg.vocab_size)) or None)
  lengths = []

  def call(params_unused, toks_unused, lens_unused, rng):
    del params_unused, toks_unused, lens_unused
    torch.manual_seed(int(np.asarray(rng).sum()))  # a raw PRNGKey(i): [0, i]
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    new = out[:, p:]
    done = (new == tok.eos_id).int().cumsum(1)
    lengths.append(float(((done == 0) | ((done == 1) & (new == tok.eos_id))).sum(1)
                         .float().mean()))
    return out

  t0 = time.perf_counter()
  call(None, None, None, np.asarray([0, 0], np.uint32))
  return call, {"slots": 0, "compile_plus_first_s": time.perf_counter() - t0,
                "mean_length_per_call": lengths, "attn_implementation": "eager",
                "threads": torch.get_num_threads()}


if __name__ == "__main__":
  main()
