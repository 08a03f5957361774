"""Low-rank adaptation (LoRA) of the transformer's projection and MLP matrices, functionally.

A LoRA tree mirrors the parameter tree for the adapted matrices only: for a weight W with
input axes I and output axes O (e.g. attention `q` [d, heads, head_dim]: I = [d]; `o`
[heads, head_dim, d]: I = [heads, head_dim]) it holds `a` [*I, r] and `b` [r, *O], and the
adapted layer computes

    x @ W + scale * (x @ a) @ b        (scale = alpha / r)

`apply` runs any function of the parameter tree (a model's `apply`) that way: W + a @ b never
exists, in the forward pass or as a gradient (the gradients are those of a and b only, through
the [tokens, r] product), and an update too small for W's dtype (bf16) still moves the output,
since the low-rank path runs in float32 next to the base product instead of being rounded into
W (with bf16 activations the layer's output is still rounded to bf16). `b` starts at zero, so the output equals the base model's until training moves it. The base
tree is never written, so a frozen base doubles as PPO's reference policy.

`merge` builds the plain tree W + scale * a @ b for what needs ordinary weights: the sampler,
exports. It is not on the training path.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.extend.core as jex
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


def merge(base: dict, lora: dict, scale: float) -> dict:
  """`base` with every adapted weight replaced by W + scale * a @ b (a new tree), for the
  sampler and exports; summed in float32 and rounded to W's dtype once."""
  out = dict(base)
  for name, modules in lora.items():
    layer = dict(out[name])
    for module, weights in modules.items():
      sub = dict(layer[module])
      for weight, ab in weights.items():
        w = sub[weight]
        d = scale * jnp.tensordot(ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32), 1)
        sub[weight] = (w.astype(jnp.float32) + d).astype(w.dtype)
      layer[module] = sub
    out[name] = layer
  return out


def scale(alpha: float, rank: int) -> float:
  """alpha / r (alpha <= 0 means alpha = r, i.e. scale 1)."""
  return 1.0 if alpha <= 0 else alpha / rank


def num_params(lora: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(lora))))


# ---------------------------------------------------------------------------------------------
# Unmerged application.
#
# The model reads each weight through `self.param` and uses it as `x @ w.astype(dt).reshape(..)`
# (or an einsum): a chain of dtype casts and reshapes ending in one dot_general. `apply` traces
# the function to a jaxpr and evaluates it with every adapted weight carried as a `_Factored`
# (w, a, b) value: casts and reshapes act on w and on the factors' shapes, and the dot_general
# becomes dot(x, w) + scale * dot(dot(x, a), b). Every other use of an adapted weight is an
# error, so nothing silently falls back to building the merged matrix. Sub-jaxprs (jit calls)
# are inlined; rematerialised blocks (`remat`) are re-wrapped in jax.checkpoint.


@jax.tree_util.register_pytree_node_class
class _Factored:
  """The matrix w + scale * tensordot(a, b, 1), unmerged: `a` [*in, r], `b` [r, *out]."""

  def __init__(self, w, a, b, name):
    self.w, self.a, self.b, self.name = w, a, b, name

  def tree_flatten(self):
    return (self.w, self.a, self.b), self.name

  @classmethod
  def tree_unflatten(cls, name, children):
    return cls(*children, name)


def apply(fn: Callable[..., Any], params: dict, lora: dict, scale_: float, *args) -> Any:
  """fn(params, *args) with every weight in `lora` computed as x @ W + scale * (x @ a) @ b.

  `fn` must be traceable with abstract arguments (a model's `apply` is); pass every array it
  reads through `args` rather than closing over it. Layers of `lora` that `fn` does not run
  cost nothing.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  wanted = {(name, module, weight): ab for name, modules in lora.items()
            for module, weights in modules.items() for weight, ab in weights.items()}
  values = []
  for path, leaf in leaves:
    key = tuple(getattr(k, "key", None) for k in path)
    ab = wanted.pop(key, None)
    values.append(leaf if ab is None else _Factored(leaf, ab["a"], ab["b"], "/".join(key)))
  if wanted:
    raise ValueError(f"LoRA weights {sorted('/'.join(k) for k in wanted)} are not in the "
                     f"parameter tree")
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *args)
  flat_args = [*values, *jax.tree_util.tree_leaves(args)]
  outs = _eval(closed.jaxpr, closed.consts, flat_args, float(scale_))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def _eval(jaxpr, consts, args, scale_: float) -> list:
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(x, _Factored) for x in invals):
      outs = _eval_factored(eqn, invals, scale_)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = x
  outs = [read(v) for v in jaxpr.outvars]
  leaked = [x.name for x in outs if isinstance(x, _Factored)]
  if leaked:
    raise ValueError(f"LoRA: adapted weights {leaked} are returned by the function; only "
                     f"their products with activations can be computed unmerged")
  return outs


def _eval_factored(eqn, invals, scale_: float):
  """One equation with an adapted weight among its inputs."""
  name = eqn.primitive.name
  params = eqn.params
  if name == "convert_element_type":
    (f,) = invals  # the base weight changes dtype; the factors stay float32
    return _Factored(eqn.primitive.bind(f.w, **params), f.a, f.b, f.name)
  if name == "reshape" and params.get("dimensions") is None:
    (f,) = invals
    new = tuple(params["new_sizes"])
    n_in, n_out = math.prod(f.a.shape[:-1]), math.prod(f.b.shape[1:])
    split = next((k for k in range(len(new) + 1)
                  if math.prod(new[:k]) == n_in and math.prod(new[k:]) == n_out), None)
    if split is None:
      raise ValueError(f"LoRA: {f.name} is reshaped to {new}, which mixes its input and "
                       f"output axes ({f.a.shape[:-1]} -> {f.b.shape[1:]})")
    r = f.a.shape[-1]
    return _Factored(jnp.reshape(f.w, new), f.a.reshape(new[:split] + (r,)),
                     f.b.reshape((r,) + new[split:]), f.name)
  if name == "dot_general":
    x, f = invals
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if isinstance(x, _Factored) or lb or rb or sorted(rc) != list(range(f.a.ndim - 1)):
      raise ValueError(f"LoRA: {[v.name for v in invals if isinstance(v, _Factored)]} used "
                       f"in a dot_general {params['dimension_numbers']} that is not "
                       f"activations @ weight over the weight's input axes")
    base = eqn.primitive.bind(x, f.w, **params)
    # The low-rank path in float32: bf16 would round small updates away here too.
    xa = jax.lax.dot_general(x.astype(jnp.float32), f.a.astype(jnp.float32),
                             ((tuple(lc), tuple(rc)), ((), ())), precision=params["precision"])
    low = jnp.tensordot(xa * scale_, f.b.astype(jnp.float32), axes=1)
    return (base.astype(jnp.float32) + low).astype(base.dtype)
  if name in ("jit", "pjit", "closed_call", "core_call"):
    sub = params.get("jaxpr") if name != "closed_call" else params["call_jaxpr"]
    if isinstance(sub, jex.ClosedJaxpr):
      return _eval(sub.jaxpr, sub.consts, invals, scale_)
    return _eval(sub, [], invals, scale_)
  if name in ("remat2", "checkpoint"):
    body = lambda *xs: _eval(params["jaxpr"], [], xs, scale_)
    return jax.checkpoint(body, prevent_cse=params["prevent_cse"],
                          policy=params["policy"])(*invals)
  used = [x.name for x in invals if isinstance(x, _Factored)]
  raise ValueError(f"LoRA: adapted weights {used} reach `{name}`; the unmerged form handles "
                   f"only casts, reshapes and x @ W")
