r"""Bytes of parameters + Adam state that PPO holds, with and without Hydra / LoRA.

Computed from shapes only (`jax.eval_shape` of `qdc_jax.rl.ppo.split_params` and the optimiser
init), so the Gemma sizes need no memory:

  python benchmarks/ppo_memory.py                     # lab_student, gemma2_2b, gemma2_9b
  python benchmarks/ppo_memory.py --models=gemma2_27b --value_layers=4

"Naive" is the layout without sharing: a full policy, a full reference and a full-size value
model, Adam moments for policy and value model.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from qdc_jax.models import configs, transformer
from qdc_jax.rl import ppo


def measure(name: str, value_layers: int, lora_rank: int, frozen_frac: float) -> list[dict]:
  cfg = configs.get_model_config(name)
  model = transformer.Transformer(cfg)
  params = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
  frozen_layers = int(cfg.num_layers * frozen_frac)
  rows = []
  for label, kw in (("full fine-tune", {}),
                    (f"Hydra (bottom {frozen_layers} frozen)", dict(frozen_layers=frozen_layers)),
                    (f"LoRA r={lora_rank}", dict(lora_rank=lora_rank)),
                    ("Hydra + LoRA", dict(frozen_layers=frozen_layers, lora_rank=lora_rank))):
    spec = ppo.Spec(cfg, value_layers=min(value_layers, cfg.num_layers), **kw)
    tr, fr = jax.eval_shape(lambda p, s=spec: ppo.split_params(p, s, jax.random.PRNGKey(0)),
                            params)
    opt = jax.eval_shape(optax.adam(1e-6).init, tr)
    b = ppo.param_bytes(tr, fr, opt, spec)
    rows.append({"model": name, "layout": label, **b["held"], "naive": b["naive"]["total"],
                 "ratio": b["ratio"]})
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="lab_student,gemma2_2b,gemma2_9b")
  ap.add_argument("--value_layers", type=int, default=4)
  ap.add_argument("--lora_rank", type=int, default=128)
  ap.add_argument("--frozen_frac", type=float, default=0.5)
  args = ap.parse_args()
  gib = lambda x: f"{x / 2**30:,.2f} GiB" if x > 2**27 else f"{x / 2**20:,.2f} MiB"
  print("| model | layout | trainable | frozen (incl. reference) | Adam | total | naive | "
        "total / naive |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    for r in measure(name, args.value_layers, args.lora_rank, args.frozen_frac):
      print(f"| {r['model']} | {r['layout']} | {gib(r['trainable'])} | {gib(r['frozen'])} | "
            f"{gib(r['optimizer'])} | {gib(r['total'])} | {gib(r['naive'])} | "
            f"{r['ratio']:.2f} |")


if __name__ == "__main__":
  main()
