"""Pure training and evaluation steps (pretraining, SFT, reward heads, regression).

`train_step(state, batch, rng) -> (state, metrics)` with config bound by `functools.partial`
and jitted once with explicit shardings (`jit_train_step`). The state is a plain dict
{"step", "params", "opt_state", "nonfinite"}, so orbax saves it as-is.

What is minimised is an `Objective`: `loss_sums(params, batch, *, model) -> (loss_sum, aux)`
with `aux["tokens"]` the normaliser (loss-bearing tokens, rows, ...) and any other sums, plus
`init_args(seq_len)`, the example inputs `model.init` takes. `LM` is the next-token loss on
`qdc_jax.data.pipeline` batches: int32 [B, T] arrays "inputs", "targets", "loss_mask" (1 on
completion targets only), "positions", "segment_ids".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from qdc_jax import sharding as sharding_lib

PyTree = Any


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood (f32)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def loss_sums(params, batch, *, model: nn.Module):
  """Sum of masked token losses and the statistics needed to normalise over micro-batches."""
  logits, _ = model.apply({"params": params}, batch["inputs"], batch["positions"],
                          batch["segment_ids"])
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = token_losses(logits, batch["targets"])
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  return jnp.sum(nll * mask), {"tokens": jnp.sum(mask), "correct": jnp.sum(correct * mask)}


def _token_inputs(seq_len: int) -> tuple:
  return (jnp.zeros((1, seq_len), jnp.int32),)


def _same_tx(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  return tx


@dataclasses.dataclass(frozen=True)
class Objective:
  """What `fit` minimises (see the module docstring). `aux` sums named "correct" are reported
  as "accuracy"; every other aux sum `k` as `k` / tokens. `wrap_tx` turns fit's optimiser
  into the one the objective needs (ILQL: Polyak-averaged target heads, frozen blocks)."""
  loss_sums: Callable
  init_args: Callable[[int], tuple] = _token_inputs
  wrap_tx: Callable[[optax.GradientTransformation], optax.GradientTransformation] = _same_tx


LM = Objective(loss_sums)


def normalised_aux(aux: dict) -> dict:
  """aux sums -> per-token metrics ("correct" -> "accuracy"), "tokens" kept as the count."""
  denom = jnp.maximum(aux["tokens"], 1.0)
  out = {"tokens": aux["tokens"]}
  for k, v in aux.items():
    if k != "tokens":
      out["accuracy" if k == "correct" else k] = v / denom
  return out


def init_train_state(rng, *, model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
                     objective: Objective = LM):
  """Boxed (logically annotated) state; use through `create_train_state`."""
  params = model.init(rng, *objective.init_args(seq_len))["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "nonfinite": jnp.zeros((), jnp.bool_)}


def create_train_state(rng, *, model, tx, seq_len, mesh, rules, objective: Objective = LM):
  """Train state initialised straight into its shardings. Returns (state, shardings)."""
  init = functools.partial(init_train_state, model=model, tx=tx, seq_len=seq_len,
                           objective=objective)
  return sharding_lib.init_sharded(init, mesh, rules, rng)


def abstract_train_state(rng, *, model, tx, seq_len, mesh, rules, objective: Objective = LM):
  """Shape/dtype/sharding of the train state, for checkpoint restore without an init."""
  init = functools.partial(init_train_state, model=model, tx=tx, seq_len=seq_len,
                           objective=objective)
  return sharding_lib.abstract_with_shardings(init, mesh, rules, rng)


def train_step(state, batch, rng, *, model: nn.Module, tx: optax.GradientTransformation,
               accum_steps: int = 1, loss_fn: Callable = loss_sums):
  """One optimiser step over `batch`, accumulated over `accum_steps` micro-batches.

  The loss is the mean over every loss-masked token of the whole batch (not a mean of
  micro-batch means), so accumulation gives the same update as one large batch.
  A non-finite loss or gradient leaves params and optimiser state untouched and sets the
  sticky `nonfinite` flag; the loop stops on it and keeps the last good checkpoint.
  """
  del rng  # No dropout in these models; kept for the common step signature.
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model), has_aux=True)
  params = state["params"]
  if accum_steps == 1:
    (loss_sum, aux), grads = grad_fn(params, batch)
  else:
    # Strided micro-batches (rows i, i+A, i+2A, ...): each one spans every data shard, so
    # all devices work on every micro-step instead of 1/A of them.
    micro = jax.tree.map(
        lambda x: x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]
                            ).swapaxes(0, 1), batch)

    def body(carry, mb):
      (l, a), g = grad_fn(params, mb)
      return jax.tree.map(jnp.add, carry, (l, a, g)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, params, first)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    zeros = (zeros[0][0], zeros[0][1], zeros[1])
    (loss_sum, aux, grads), _ = jax.lax.scan(body, zeros, micro)
  denom = jnp.maximum(aux["tokens"], 1.0)
  # In the parameters' dtype: a float32 denominator would promote bf16 gradients (and with
  # them the optimiser moments) to float32, and the non-finite guard's two branches disagree.
  grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
  loss = loss_sum / denom
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~state["nonfinite"]
  new_params, new_opt_state = jax.lax.cond(
      ok, lambda: (new_params, new_opt_state), lambda: (params, state["opt_state"]))
  new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": new_opt_state,
               "nonfinite": ~ok}
  metrics = {"loss": loss, "grad_norm": grad_norm, **normalised_aux(aux)}
  return new_state, metrics


def eval_step(params, batch, *, model: nn.Module, loss_fn: Callable = loss_sums):
  """Sums (not means), so batches of any fill can be added up exactly."""
  loss_sum, aux = loss_fn(params, batch, model=model)
  return {"loss_sum": loss_sum, **aux}


def jit_train_step(step_fn: Callable, state_shardings, mesh, rules):
  """Jit a bound step with explicit in/out shardings; the old state is donated."""
  rep = sharding_lib.replicated(mesh)
  # Rank-1 spec: the leading (batch) axis sharded, whatever the rank of each batch leaf.
  return sharding_lib.jit_sharded(
      step_fn, mesh, rules, in_shardings=(state_shardings, sharding_lib.batch_sharding(
          mesh, rules, 1), rep), out_shardings=(state_shardings, rep), donate_argnums=(0,))


def jit_eval_step(step_fn: Callable, param_shardings, mesh, rules):
  return sharding_lib.jit_sharded(
      step_fn, mesh, rules, in_shardings=(param_shardings, sharding_lib.batch_sharding(
          mesh, rules, 1)), out_shardings=sharding_lib.replicated(mesh))
