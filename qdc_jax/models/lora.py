"""Low-rank adaptation (LoRA) of the transformer's projection and MLP matrices, functionally.

A LoRA tree mirrors the parameter tree for the adapted matrices only: for a weight W with
input axes I and output axes O (e.g. attention `q` [d, heads, head_dim]: I = [d]; `o`
[heads, head_dim, d]: I = [heads, head_dim]) it holds `a` [*I, r] and `b` [r, *O], and

    W' = W + (alpha / r) * tensordot(a, b, 1).

`b` starts at zero, so W' == W until training moves it. `merge` builds W' for a forward pass;
the base tree is never written, so a frozen base doubles as PPO's reference policy.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

# (module, weight) -> number of leading input axes of the weight.
TARGETS = {("attn", "q"): 1, ("attn", "k"): 1, ("attn", "v"): 1, ("attn", "o"): 2,
           ("mlp", "up"): 1, ("mlp", "gate"): 1, ("mlp", "down"): 1}


def init(rng: jax.Array, base: dict, rank: int, layers: Iterable[int]) -> dict:
  """LoRA tree (float32) for blocks `layers` of `base` (an unboxed Transformer param tree)."""
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  out: dict = {}
  for layer in layers:
    name = f"layer_{layer}"
    if name not in base:
      raise ValueError(f"LoRA layer {layer}: no {name!r} in the parameter tree "
                       f"({sorted(k for k in base if k.startswith('layer_'))})")
    for (module, weight), n_in in TARGETS.items():
      if weight not in base[name].get(module, {}):
        continue  # e.g. GPT-2 blocks have no `gate`
      w = base[name][module][weight]
      in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
      rng, key = jax.random.split(rng)
      a = jax.random.normal(key, in_shape + (rank,), jnp.float32) / math.sqrt(
          math.prod(in_shape))
      b = jnp.zeros((rank,) + out_shape, jnp.float32)
      out.setdefault(name, {}).setdefault(module, {})[weight] = {"a": a, "b": b}
  return out


def delta(ab: dict, scale: float) -> jax.Array:
  return scale * jnp.tensordot(ab["a"], ab["b"], axes=1)


def merge(base: dict, lora: dict, scale: float) -> dict:
  """`base` with every adapted weight replaced by W + scale * a @ b (a new tree)."""
  out = dict(base)
  for name, modules in lora.items():
    layer = dict(out[name])
    for module, weights in modules.items():
      sub = dict(layer[module])
      for weight, ab in weights.items():
        w = sub[weight]
        sub[weight] = (w + delta(ab, scale).astype(w.dtype))
      layer[module] = sub
    out[name] = layer
  return out


def scale(alpha: float, rank: int) -> float:
  """alpha / r (alpha <= 0 means alpha = r, i.e. scale 1)."""
  return 1.0 if alpha <= 0 else alpha / rank


def num_params(lora: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(lora))))
