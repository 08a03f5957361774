"""Pure training and evaluation steps for language models (pretraining and SFT).

`train_step(state, batch, rng) -> (state, metrics)` with config bound by `functools.partial`
and jitted once with explicit shardings (`jit_train_step`). The state is a plain dict
{"step", "params", "opt_state", "nonfinite"}, so orbax saves it as-is.

Batches follow `qdc_jax.data.pipeline`: int32 [B, T] arrays "inputs", "targets",
"loss_mask" (1 on completion targets only), "positions", "segment_ids".
"""

from __future__ import annotations

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


def init_train_state(rng, *, model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  """Boxed (logically annotated) state; use through `create_train_state`."""
  params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "nonfinite": jnp.zeros((), jnp.bool_)}


def create_train_state(rng, *, model, tx, seq_len, mesh, rules):
  """Train state initialised straight into its shardings. Returns (state, shardings)."""
  init = functools.partial(init_train_state, model=model, tx=tx, seq_len=seq_len)
  return sharding_lib.init_sharded(init, mesh, rules, rng)


def abstract_train_state(rng, *, model, tx, seq_len, mesh, rules):
  """Shape/dtype/sharding of the train state, for checkpoint restore without an init."""
  init = functools.partial(init_train_state, model=model, tx=tx, seq_len=seq_len)
  return sharding_lib.abstract_with_shardings(init, mesh, rules, rng)


def train_step(state, batch, rng, *, model: nn.Module, tx: optax.GradientTransformation,
               accum_steps: int = 1):
  """One optimiser step over `batch`, accumulated over `accum_steps` micro-batches.

  The loss is the mean over every loss-masked token of the whole batch (not a mean of
  micro-batch means), so accumulation gives the same update as one large batch.
  A non-finite loss or gradient leaves params and optimiser state untouched and sets the
  sticky `nonfinite` flag; the loop stops on it and keeps the last good checkpoint.
  """
  del rng  # No dropout in these models; kept for the common step signature.
  grad_fn = jax.value_and_grad(functools.partial(loss_sums, model=model), has_aux=True)
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

    zeros = (jnp.zeros(()), {"tokens": jnp.zeros(()), "correct": jnp.zeros(())},
             jax.tree.map(jnp.zeros_like, params))
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
  metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": aux["tokens"],
             "accuracy": aux["correct"] / denom}
  return new_state, metrics


def eval_step(params, batch, *, model: nn.Module):
  """Sums (not means), so batches of any fill can be added up exactly."""
  loss_sum, aux = loss_sums(params, batch, model=model)
  return {"loss_sum": loss_sum, "tokens": aux["tokens"], "correct": aux["correct"]}


def jit_train_step(step_fn: Callable, state_shardings, mesh, rules):
  """Jit a bound step with explicit in/out shardings; the old state is donated."""
  rep = sharding_lib.replicated(mesh)
  return sharding_lib.jit_sharded(
      step_fn, mesh, rules, in_shardings=(state_shardings, sharding_lib.batch_sharding(
          mesh, rules), rep), out_shardings=(state_shardings, rep), donate_argnums=(0,))


def jit_eval_step(step_fn: Callable, param_shardings, mesh, rules):
  return sharding_lib.jit_sharded(
      step_fn, mesh, rules, in_shardings=(param_shardings, sharding_lib.batch_sharding(
          mesh, rules)), out_shardings=sharding_lib.replicated(mesh))
