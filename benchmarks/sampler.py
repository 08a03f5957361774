r"""Sampler throughput: qdc_jax KV-cache sampler vs a naive no-cache decode vs HF generate.

Workload: a tiny Gemma-2 (the `lab_tiny` shapes by default: d=64, 2 layers, 4 query / 2 KV
heads of dim 16, d_ff=256, window 32, vocab 128), `num_prompts` prompts of `prompt_len` random tokens, K samples
each (rows = num_prompts * K), `new_tokens` generated per row at temperature 1.0 without
top-k/top-p. There is no early stop: the qdc sampler gets an EOS id that never occurs (-1),
HF gets min_new_tokens = max_new_tokens.

  (a) qdc_jax.sampling.jit_sample: prefill once per prompt; the K rows of a prompt share
      one copy of its KV cache and own `new_tokens` slots each; one jitted while_loop of
      single-token cached decode steps;
  (a0) before: the same sampler as it was before prompt sharing (2026-12-02, 28bbe2d: the
      prompt's cache copied to each of its K rows; `_common.sample_before`), checked to
      sample the same tokens as (a) for the same key;
  (b) naive: the same qdc Transformer without a cache, the whole [rows, prompt+new] padded
      sequence recomputed every step, all steps inside one jitted fori_loop;
  (c) Hugging Face transformers Gemma2ForCausalLM.generate (eager attention, which is the
      implementation that applies Gemma-2's attention soft-cap; random init;
      use_cache=True; do_sample=True, top_k=0, top_p=1.0), torch.set_num_threads(2).

Reported: generated tokens/s (rows * new_tokens / wall time of the whole call, prefill
included), and the ratios qdc/naive and qdc/HF.

  python benchmarks/sampler.py
  python benchmarks/sampler.py --hf_rows=256 --out=/tmp/x.json   # fewer HF rows, per token

Not a test; prints a markdown table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def time_rounds(fns: dict, args) -> dict:
  """Rounds of one timed call of each implementation (qdc, naive, HF, qdc, ...), so that all
  see the same machine load; `fns[k](i)` runs call i (a fresh seed) and blocks."""
  times = {k: [] for k in fns}
  for i in range(args.rounds):
    for k, fn in fns.items():
      for j in range(args.qdc_calls_per_round if k == "qdc" else 1):
        time.sleep(args.pause_s)
        t0 = time.perf_counter()
        fn(1000 * i + j + 1)
        times[k].append(time.perf_counter() - t0)
  return times


def setup_before(cfg, params, prompts, lengths, args, want_tokens):
  import jax  # pylint: disable=g-import-not-at-top
  from qdc_jax import sampling  # pylint: disable=g-import-not-at-top
  from qdc_jax.models import transformer  # pylint: disable=g-import-not-at-top
  sp = sampling.SamplingParams(max_new_tokens=args.new_tokens, num_samples=args.samples,
                               temperature=1.0, eos_id=-1, pad_id=0)
  fn = jax.jit(functools.partial(_common.sample_before, model=transformer.Transformer(cfg),
                                 sp=sp))
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(params, prompts, lengths, jax.random.PRNGKey(0)))
  compile_s = time.perf_counter() - t0
  same = bool((np.asarray(out.tokens) == want_tokens).all())
  assert same, "the 'before' sampler samples other tokens than today's for the same key"

  def call(i):
    jax.block_until_ready(fn(params, prompts, lengths, jax.random.PRNGKey(i)))
  return call, {"rows": out.tokens.shape[0], "compile_plus_first_s": compile_s,
                "same_tokens_as_qdc": same}


def setup_qdc(model, params, prompts, lengths, args):
  import jax
  from qdc_jax import sampling
  sp = sampling.SamplingParams(max_new_tokens=args.new_tokens, num_samples=args.samples,
                               temperature=1.0, eos_id=-1, pad_id=0)
  fn = sampling.jit_sample(model, sp)
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(params, prompts, lengths, jax.random.PRNGKey(0)))
  compile_s = time.perf_counter() - t0
  lens = np.asarray(out.lengths)
  assert lens.min() == args.new_tokens, "a row stopped early"
  rows = out.tokens.shape[0]

  def call(i):
    jax.block_until_ready(fn(params, prompts, lengths, jax.random.PRNGKey(i)))

  return call, {"rows": rows, "compile_plus_first_s": compile_s,
                "tokens_key0": np.asarray(out.tokens)}


def naive_sample_fn(model, prompt_len: int, new_tokens: int):
  """Jitted no-cache sampler: recompute the full padded [rows, P + N] sequence per step."""
  import jax
  import jax.numpy as jnp

  total = prompt_len + new_tokens

  def run(params, prompts_RxP, rng):
    rows = prompts_RxP.shape[0]
    seq = jnp.zeros((rows, total), jnp.int32).at[:, :prompt_len].set(prompts_RxP)

    def body(i, seq):
      logits, _ = model.apply({"params": params}, seq)  # causal: padding after i is ignored
      last = jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, axis=1, keepdims=False)
      tok = jax.random.categorical(jax.random.fold_in(rng, i), last, axis=-1)
      return jax.lax.dynamic_update_slice(seq, tok.astype(jnp.int32)[:, None],
                                          (0, prompt_len + i))

    seq = jax.lax.fori_loop(0, new_tokens, body, seq)
    return seq[:, prompt_len:]

  return jax.jit(run)


def setup_naive(model, params, prompts_rows, args):
  import jax
  fn = naive_sample_fn(model, args.prompt_len, args.new_tokens)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(params, prompts_rows, jax.random.PRNGKey(0)))
  compile_s = time.perf_counter() - t0

  def call(i):
    jax.block_until_ready(fn(params, prompts_rows, jax.random.PRNGKey(i)))

  return call, {"rows": prompts_rows.shape[0], "compile_plus_first_s": compile_s}


def hf_config(cfg, attn_implementation: str = "eager"):
  from transformers import Gemma2Config
  n = cfg.num_layers
  kinds = [cfg.attention_kind(i) for i in range(n)]
  return Gemma2Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=n, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      hidden_activation="gelu_pytorch_tanh", max_position_embeddings=cfg.max_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
      query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
      sliding_window=cfg.sliding_window, attn_logit_softcapping=cfg.attn_softcap,
      final_logit_softcapping=cfg.final_softcap, tie_word_embeddings=cfg.tie_embeddings,
      layer_types=["sliding_attention" if k == "local" else "full_attention" for k in kinds],
      pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=True,
      attn_implementation=attn_implementation)


def setup_hf(cfg, prompts_np, args):
  import torch
  from transformers import Gemma2ForCausalLM, GenerationConfig

  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  hcfg = hf_config(cfg, args.hf_attn)
  model = Gemma2ForCausalLM(hcfg).eval()
  n_prompts = max(1, args.hf_rows // args.samples)
  ids = torch.from_numpy(prompts_np[:n_prompts].astype(np.int64))
  mask = torch.ones_like(ids)
  gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                         num_return_sequences=args.samples, use_cache=True, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)

  def call(i, ids=ids, mask=mask, gen=gen):
    torch.manual_seed(i)
    with torch.inference_mode():
      return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)

  # Warm-up on a small batch (lazy inits, allocator), then the measured shape once.
  warm = GenerationConfig(**{**gen.to_dict(), "max_new_tokens": 4, "min_new_tokens": 4})
  call(0, ids=ids[:1], mask=mask[:1], gen=warm)
  t0 = time.perf_counter()
  out = call(0)
  first_s = time.perf_counter() - t0
  rows = out.shape[0]
  assert out.shape[1] == args.prompt_len + args.new_tokens, out.shape
  return call, {"rows": rows, "first_s": first_s,
                "attn_implementation": model.config._attn_implementation,
                "threads": torch.get_num_threads()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="lab_tiny", help="qdc_jax model config (Gemma-2 kind)")
  ap.add_argument("--vocab", type=int, default=128)
  ap.add_argument("--num_prompts", type=int, default=64)
  ap.add_argument("--samples", type=int, default=16, help="K samples per prompt")
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=3,
                  help="timing rounds; each times every implementation once (qdc: "
                       "--qdc_calls_per_round)")
  ap.add_argument("--qdc_calls_per_round", type=int, default=2)
  ap.add_argument("--naive_rows", type=int, default=256,
                  help="rows of the naive decode (<= prompts*K; tokens/s is per generated "
                       "token, and its cost is linear in rows)")
  ap.add_argument("--hf_rows", type=int, default=1024,
                  help="rows of the HF run (a multiple of --samples; per-token normalised)")
  ap.add_argument("--pause_s", type=float, default=0.2,
                  help="idle pause before each timed call (spinning thread pools settle)")
  ap.add_argument("--hf_attn", default="eager",
                  help="HF attention implementation; 'eager' applies the soft-cap")
  ap.add_argument("--torch_threads", type=int, default=2)
  ap.add_argument("--skip_before", action="store_true")
  ap.add_argument("--skip_naive", action="store_true")
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--out", default="/tmp/qdc_bench/sampler.json", help="JSON output path")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch
  from qdc_jax.models import configs, transformer

  torch.set_num_threads(args.torch_threads)
  cfg = configs.get_model_config(args.model, vocab_size=args.vocab)
  model = transformer.Transformer(cfg)
  params = transformer.nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, args.prompt_len), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, args.vocab, (args.num_prompts, args.prompt_len)).astype(np.int32)
  lengths = np.full((args.num_prompts,), args.prompt_len, np.int32)
  rows = args.num_prompts * args.samples
  info = _common.machine_info()
  print(f"# sampler benchmark  {info['date']}  load {info['loadavg_1_5_15']}  "
        f"cpu {info['cpu']} x{info['cores']}  XLA_FLAGS={info['xla_flags']!r}")
  print(f"# model {args.model} vocab {args.vocab}: d={cfg.d_model} layers={cfg.num_layers} "
        f"heads={cfg.num_heads}/{cfg.num_kv_heads} head_dim={cfg.head_dim} d_ff={cfg.d_ff} "
        f"window={cfg.sliding_window}; {args.num_prompts} prompts x K={args.samples} = {rows} "
        f"rows, prompt {args.prompt_len}, {args.new_tokens} new tokens", flush=True)

  load0 = _common.load_average()[0]
  fns, infos = {}, {}
  fns["qdc"], infos["qdc"] = setup_qdc(model, params, prompts, lengths, args)
  print(f"# qdc compiled + first call: {infos['qdc']['compile_plus_first_s']:.1f} s", flush=True)
  want_tokens = infos["qdc"].pop("tokens_key0")
  if not args.skip_before:
    fns["before"], infos["before"] = setup_before(cfg, params, prompts, lengths, args,
                                                  want_tokens)
    print("# before: same tokens as qdc for key 0", flush=True)
  if not args.skip_naive:
    n = min(args.naive_rows, rows)
    prompt_rows = np.repeat(prompts, args.samples, axis=0)[:n]
    fns["naive"], infos["naive"] = setup_naive(model, params, prompt_rows, args)
    print(f"# naive compiled + first call: {infos['naive']['compile_plus_first_s']:.1f} s",
          flush=True)
  if not args.skip_hf:
    fns["hf"], infos["hf"] = setup_hf(cfg, prompts, args)
    print(f"# hf first call: {infos['hf']['first_s']:.1f} s", flush=True)
  times = time_rounds(fns, args)
  load1 = _common.load_average()[0]
  results = {k: dict(_common.summarize(times[k]), **infos[k], times=times[k]) for k in fns}

  table = []
  labels = {"qdc": "(a) qdc_jax jit_sample (KV cache)",
            "before": "(a0) before prompt sharing (cache copied to the K rows)",
            "naive": "(b) naive JAX, no cache (jitted, fixed length)",
            "hf": f"(c) HF Gemma2ForCausalLM.generate ({args.hf_attn})"}
  for key, r in results.items():
    r["generated_tokens"] = r["rows"] * args.new_tokens
    r["tok_s"] = r["generated_tokens"] / r["median_s"]
    r["tok_s_best"] = r["generated_tokens"] / r["min_s"]
  for key, r in results.items():
    table.append({"impl": labels[key], "rows": r["rows"], "s": r["median_s"], "n": r["n"],
                  "tok_s": r["tok_s"], "ratio": results["qdc"]["tok_s"] / r["tok_s"],
                  "best": r["min_s"], "tok_s_best": r["tok_s_best"],
                  "ratio_best": results["qdc"]["tok_s_best"] / r["tok_s_best"]})
  ratios = {f"qdc/{k}": results["qdc"]["tok_s"] / v["tok_s"] for k, v in results.items()
            if k != "qdc"}
  ratios.update({f"qdc/{k} (best calls)": results["qdc"]["tok_s_best"] / v["tok_s_best"]
                 for k, v in results.items() if k != "qdc"})
  print(f"\nGenerated tokens/s ({args.new_tokens} new tokens per row, prompt "
        f"{args.prompt_len}, temperature 1.0, no early stop; median wall time per call):")
  print(_common.format_table(table, [
      ("impl", "implementation", ""), ("rows", "rows", "d"), ("s", "s / call", ".3f"),
      ("n", "calls", "d"), ("tok_s", "generated tok/s", ",.0f"),
      ("ratio", "qdc / this", ".2f"), ("best", "best s", ".3f"),
      ("tok_s_best", "tok/s (best call)", ",.0f"), ("ratio_best", "qdc / this (best)", ".2f")]))
  payload = {"benchmark": "sampler", "machine": info, "load1_start": load0, "load1_end": load1,
             "args": vars(args), "results": results, "ratios": ratios,
             "model_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
  _common.write_json(args.out, payload)


if __name__ == "__main__":
  main()
