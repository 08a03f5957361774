r"""PPO memory with and without Hydra / LoRA: bytes held, and the compiled update's footprint.

1. Bytes of parameters + Adam state that PPO holds, from shapes only (`jax.eval_shape` of
   `qdc_jax.rl.ppo.split_params` and the optimiser init), so the Gemma sizes need no memory.
   "Naive" is the layout without sharing: a full policy, a full reference and a full-size value
   model, Adam moments for policy and value model.
2. `--compile`: the PPO update step (`ppo.ppo_update`, jitted with the state donated as in
   `experiments/ppo.py`) lowered and compiled from `jax.ShapeDtypeStruct`s only (no array is
   allocated), and XLA's `memory_analysis()` of the executable: argument, output, alias
   (donated state reused for the output) and temp bytes, argument + output + temp - alias, and
   the runtime's own peak estimate. Temporaries are counted from the executable's buffer
   assignment: logical buffers in temp allocations, those of >= 1 MiB, and those exactly the
   size of a d_model x d_ff MLP weight (what a merged W + a @ b, its gradient, a weight
   gradient or an Adam update of that matrix occupies). "before" is the merged-LoRA
   forward pass that `qdc_jax.rl.ppo` used until the unmerged form (kept in this script only,
   `merged_lora_forward`); "after" is the library's forward. Compile memory numbers do not
   depend on machine load; compile times do.

  python benchmarks/ppo_memory.py                     # bytes: lab_student, gemma2_2b, gemma2_9b
  python benchmarks/ppo_memory.py --models=gemma2_27b --value_layers=4
  python benchmarks/ppo_memory.py --models= --compile --compile_model=gemma2_2b \
      --rows=8 --minibatch_size=4 --seq_len=128 --epochs=2 --out=/tmp/qdc_bench/ppo_memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from qdc_jax.models import configs, heads, transformer
from qdc_jax.rl import ppo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def abstract_params(cfg):
  model = transformer.Transformer(cfg)
  return jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))


def layouts(cfg, value_layers: int, lora_rank: int, frozen_frac: float) -> dict:
  """key -> (label, Spec)."""
  frozen_layers = int(cfg.num_layers * frozen_frac)
  value_layers = min(value_layers, cfg.num_layers)
  spec = functools.partial(ppo.Spec, cfg, value_layers=value_layers)
  return {"full": ("full fine-tune", spec()),
          "hydra": (f"Hydra (bottom {frozen_layers} frozen)", spec(frozen_layers=frozen_layers)),
          "lora": (f"LoRA r={lora_rank}", spec(lora_rank=lora_rank)),
          "hydra_lora": ("Hydra + LoRA", spec(frozen_layers=frozen_layers, lora_rank=lora_rank))}


def measure(name: str, value_layers: int, lora_rank: int, frozen_frac: float) -> list[dict]:
  cfg = configs.get_model_config(name)
  params = abstract_params(cfg)
  rows = []
  for label, spec in layouts(cfg, value_layers, lora_rank, frozen_frac).values():
    tr, fr = jax.eval_shape(lambda p, s=spec: ppo.split_params(p, s, jax.random.PRNGKey(0)),
                            params)
    opt = jax.eval_shape(optax.adam(1e-6).init, tr)
    b = ppo.param_bytes(tr, fr, opt, spec)
    rows.append({"model": name, "layout": label, **b["held"], "naive": b["naive"]["total"],
                 "ratio": b["ratio"]})
  return rows


# ---------------------------------------------------------------------------------------------
# BEFORE: the merged-LoRA forward pass as `qdc_jax.rl.ppo.forward` had it (every adapted
# weight rebuilt as W + scale * a @ b inside the step; its gradient is weight-sized too). Kept
# here only to measure it against the library's unmerged form.


def _merged_lora_before(base: dict, lora: dict, scale: float) -> dict:
  out = dict(base)
  for name, modules in lora.items():
    layer = dict(out[name])
    for module, weights in modules.items():
      sub = dict(layer[module])
      for weight, ab in weights.items():
        w = sub[weight]
        sub[weight] = w + (scale * jnp.tensordot(ab["a"], ab["b"], axes=1)).astype(w.dtype)
      layer[module] = sub
    out[name] = layer
  return out


def merged_lora_forward(trainable, frozen, batch, spec, *, with_reference=False):
  """BEFORE: `ppo.forward` with the policy's top blocks merged (W + scale * a @ b)."""
  cfg = spec.config
  model = transformer.Transformer(cfg)
  n, f, b = cfg.num_layers, spec.frozen_layers, spec.branch
  tok, pos, seg = batch["inputs"], batch["positions"], batch["segment_ids"]

  def run(params, first, last, hidden):
    return model.apply({"params": params}, tok, pos, seg, layers=(first, last),
                       hidden_BxTxD=hidden)[0]

  pp = {**frozen["bottom"],
        **_merged_lora_before(frozen["top"], trainable["lora"], spec.lora_scale)}
  h_f = h_b = None
  if f:
    if b < f:
      h_b = run(pp, 0, b, None)
      h_f = run(pp, b, f, h_b)
    else:
      h_f = run(pp, 0, f, None)
    h_f = jax.lax.stop_gradient(h_f)
  if b >= f:
    h_b = h_f if (b == f and f) else run(pp, f, b, h_f)
    logits = run(pp, b, n, h_b)
  else:
    logits = run(pp, f, n, h_f)
  out = {}
  out["logp"], out["entropy"] = ppo._token_logp(logits, batch["targets"])  # pylint: disable=protected-access
  out["values"] = heads.ValueBranch(cfg, b).apply({"params": trainable["value"]}, h_b, pos, seg)
  if with_reference:
    ref_logits = run(ppo.reference_params(frozen), f, n, h_f)
    out["ref_logp"], _ = ppo._token_logp(jax.lax.stop_gradient(ref_logits), batch["targets"])  # pylint: disable=protected-access
  return out


# ---------------------------------------------------------------------------------------------
# Compiled footprint.


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  out = shift = 0
  while True:
    byte = buf[i]
    i += 1
    out |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return out, i


def _fields(buf: bytes):
  """(field number, value) of one protobuf message (varints as ints, the rest as bytes)."""
  i = 0
  while i < len(buf):
    key, i = _varint(buf, i)
    num, wire = key >> 3, key & 7
    if wire == 0:
      val, i = _varint(buf, i)
    elif wire == 2:
      n, i = _varint(buf, i)
      val, i = buf[i:i + n], i + n
    elif wire == 1:
      val, i = buf[i:i + 8], i + 8
    elif wire == 5:
      val, i = buf[i:i + 4], i + 4
    else:
      raise ValueError(f"protobuf wire type {wire}")
    yield num, val


def temp_buffers(proto: bytes) -> list[int]:
  """Sizes of the logical buffers placed in temp allocations of a serialized XLA
  BufferAssignmentProto (field numbers of xla/service/hlo.proto: buffer_allocations = 3;
  BufferAllocationProto: is_thread_local 3, is_entry_computation_parameter 5, maybe_live_out 7,
  assigned 9, is_tuple 11, is_constant 12; Assigned.size 3)."""
  sizes = []
  for num, alloc in _fields(proto):
    if num != 3:
      continue
    flags, assigned = {}, []
    for f, v in _fields(alloc):
      if f == 9:
        assigned.append(dict(_fields(v)).get(3, 0))
      else:
        flags[f] = v
    if not any(flags.get(k) for k in (3, 5, 7, 11, 12)):
      sizes.extend(assigned)
  return sizes


def update_inputs(cfg, spec, hyper, tx, rows: int, seq_len: int):
  """ShapeDtypeStructs of (state, frozen, experience, rng) for `ppo.ppo_update`."""
  params = abstract_params(cfg)
  tr, fr = jax.eval_shape(lambda p: ppo.split_params(p, spec, jax.random.PRNGKey(0)), params)
  state = jax.eval_shape(lambda t: ppo.init_state(t, tx), tr)
  i32, f32 = jnp.int32, jnp.float32
  exp = {k: jax.ShapeDtypeStruct((rows, seq_len), i32)
         for k in ("inputs", "targets", "positions", "segment_ids")}
  exp.update({k: jax.ShapeDtypeStruct((rows, seq_len), f32)
              for k in ("action_mask", "old_logp", "old_values", "advantages", "returns")})
  exp["last_index"] = jax.ShapeDtypeStruct((rows,), i32)
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return state, fr, exp, rng


def mlp_weight_sizes(cfg) -> set[int]:
  """Bytes of one d_model x d_ff matrix (an MLP weight, or its merged copy or gradient) in
  float32 and in the param dtype. The attention matrices are left out of the count: at these
  shapes some [tokens, d_ff] activations have exactly their size."""
  n = cfg.d_model * cfg.d_ff
  return {4 * n, jnp.dtype(cfg.param_dtype).itemsize * n}


def compile_update(cfg, spec, hyper, rows, seq_len, forward=None) -> dict:
  tx = optax.adam(1e-6)
  args = update_inputs(cfg, spec, hyper, tx, rows, seq_len)
  step = jax.jit(functools.partial(ppo.ppo_update, spec=spec, hyper=hyper, tx=tx),
                 donate_argnums=(0,))
  patch = (mock.patch.object(ppo, "forward", forward) if forward is not None
           else contextlib.nullcontext())
  with patch:
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  m = compiled.memory_analysis()
  temps = temp_buffers(m.serialized_buffer_assignment_proto)
  weight_sizes = mlp_weight_sizes(cfg)
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
         "peak_sum": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                      - m.alias_size_in_bytes),
         "peak_api": getattr(m, "peak_memory_in_bytes", None),
         "generated_code": m.generated_code_size_in_bytes,
         "temp_buffers": len(temps), "temp_buffers_1mib": sum(s >= 2**20 for s in temps),
         "temp_buffers_mlp_sized": sum(s in weight_sizes for s in temps),
         "lower_s": t1 - t0, "compile_s": t2 - t1}
  del compiled, lowered
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="lab_student,gemma2_2b,gemma2_9b",
                  help="models of the bytes table ('' to skip it)")
  ap.add_argument("--value_layers", type=int, default=4)
  ap.add_argument("--lora_rank", type=int, default=128)
  ap.add_argument("--frozen_frac", type=float, default=0.5)
  ap.add_argument("--compile", action="store_true", help="also compile the PPO update")
  ap.add_argument("--compile_model", default="gemma2_2b")
  ap.add_argument("--param_dtype", default="", help="override the config's param dtype")
  ap.add_argument("--dtype", default="", help="override the config's activation dtype")
  ap.add_argument("--rows", type=int, default=8, help="rollout rows of the update")
  ap.add_argument("--minibatch_size", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=128, help="T of inputs/targets")
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--layouts", default="full,lora,hydra_lora",
                  help="layouts to compile: full, hydra, lora, hydra_lora")
  ap.add_argument("--out", default="/tmp/qdc_bench/ppo_memory.json")
  args = ap.parse_args()
  info = _common.machine_info()
  print(f"# ppo_memory  {info['date']}  load {info['loadavg_1_5_15']}  {info['cpu']} x "
        f"{info['cores']}")
  gib = lambda x: f"{x / 2**30:,.2f} GiB" if x > 2**27 else f"{x / 2**20:,.2f} MiB"
  payload = {"machine": info, "args": vars(args), "bytes": [], "compiled": []}
  if args.models:
    print("| model | layout | trainable | frozen (incl. reference) | Adam | total | naive | "
          "total / naive |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
      for r in measure(name, args.value_layers, args.lora_rank, args.frozen_frac):
        payload["bytes"].append(r)
        print(f"| {r['model']} | {r['layout']} | {gib(r['trainable'])} | {gib(r['frozen'])} | "
              f"{gib(r['optimizer'])} | {gib(r['total'])} | {gib(r['naive'])} | "
              f"{r['ratio']:.2f} |")
  if args.compile:
    over = {k: v for k, v in (("param_dtype", args.param_dtype), ("dtype", args.dtype)) if v}
    cfg = configs.get_model_config(args.compile_model, **over)
    hyper = ppo.Hyper(epochs=args.epochs, minibatch_size=args.minibatch_size)
    specs = layouts(cfg, args.value_layers, args.lora_rank, args.frozen_frac)
    print(f"\n## {args.compile_model} PPO update, compiled abstractly: rows {args.rows}, "
          f"minibatch {args.minibatch_size}, T {args.seq_len}, epochs {args.epochs}, params "
          f"{cfg.param_dtype}, compute {cfg.dtype}, value_layers {args.value_layers}, "
          f"frozen_frac {args.frozen_frac}, LoRA r={args.lora_rank}; load "
          f"{[round(x, 2) for x in _common.load_average()]}\n")
    rows = []
    for key in args.layouts.split(","):
      label, spec = specs[key]
      variants = [("after (unmerged)", None), ("before (merged)", merged_lora_forward)] \
          if spec.lora_rank else [("-", None)]
      for form, fwd in variants:
        r = {"layout": label, "form": form,
             **compile_update(cfg, spec, hyper, args.rows, args.seq_len, fwd),
             "load_1m": round(_common.load_average()[0], 2)}
        rows.append(r)
        payload["compiled"].append(r)
        print(f"compiled {label} {form}: {r['compile_s']:.0f} s, load {r['load_1m']}",
              flush=True)
    table = [{**r, **{k: gib(r[k]) for k in ("argument", "output", "alias", "temp",
                                             "peak_sum", "peak_api") if r[k] is not None}}
             for r in rows]
    print()
    print(_common.format_table(table, [
        ("layout", "layout", ""), ("form", "LoRA form", ""), ("argument", "argument", ""),
        ("output", "output", ""), ("alias", "alias", ""), ("temp", "temp", ""),
        ("peak_sum", "arg + out + temp - alias", ""), ("peak_api", "peak (XLA)", ""),
        ("temp_buffers", "temp buffers", "d"), ("temp_buffers_1mib", ">= 1 MiB", "d"),
        ("temp_buffers_mlp_sized", "d x d_ff-sized", "d"),
        ("lower_s", "lower s", ".1f"), ("compile_s", "compile s", ".1f")]))
  _common.write_json(args.out, payload)


if __name__ == "__main__":
  main()
