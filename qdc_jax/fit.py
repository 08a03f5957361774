"""The one training loop every LM workload shares (pretraining, SFT, EI, distillation).

Resumable: the checkpoint holds {step, params, opt_state} plus the data iterator's state, so
a run killed at any point restarts from the newest checkpoint and sees exactly the batches it
would have seen (same params as an uninterrupted run). A non-finite loss or gradient stops
the run with the last good checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from qdc_jax import checkpoint as ckpt_lib
from qdc_jax import metrics_log
from qdc_jax import optim
from qdc_jax import sharding as sharding_lib
from qdc_jax import storage
from qdc_jax import train
from qdc_jax.data import pipeline
from qdc_jax.models import transformer


class NonFiniteError(FloatingPointError):
  """Raised when training produced a NaN/inf loss or gradient."""


@dataclasses.dataclass
class FitResult:
  params: Any
  param_shardings: Any
  step: int
  eval_metrics: dict


def default_train_config() -> ml_collections.ConfigDict:
  """Knobs of `fit`; experiments embed this as `config.train`."""
  c = ml_collections.ConfigDict()
  c.steps = 1000  # total optimiser steps (also the cosine schedule length)
  c.stop_at_step = -1  # stop early at this step (as if pre-empted); -1 = run to `steps`
  c.batch_size = 32  # global batch (sequences); split over processes and micro-batches
  c.accum_steps = 1  # gradient accumulation micro-batches per step
  c.seq_len = 128  # tokens per row
  c.pack = False  # first-fit pack several examples per row
  c.train_on_prompt = False  # also put loss on prompt tokens
  c.seed = 0  # parameter init and data order
  c.log_every = 25
  c.eval_every = 0  # 0 = only at the end
  c.save_every = 200
  c.keep = 2  # checkpoints kept
  c.async_checkpoint = True
  c.opt = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1, grad_clip=1.0))
  return c


def _optimizer(tc):
  opt = ml_collections.ConfigDict(tc.opt.to_dict())
  opt.total_steps = tc.steps
  return optim.make_optimizer(opt)


def evaluate(params, eval_fn, batches, mesh, rules) -> dict:
  """Token-level loss / accuracy over every eval batch (sums, so ragged batches are exact)."""
  totals = None
  for b in batches:
    out = eval_fn(params, sharding_lib.put_global(b, mesh, rules))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    return {}
  totals = sharding_lib.to_host(totals)
  n = max(float(totals["tokens"]), 1.0)
  return {"eval_loss": float(totals["loss_sum"]) / n, "eval_accuracy":
          float(totals["correct"]) / n, "eval_tokens": float(totals["tokens"])}


def fit(tc: ml_collections.ConfigDict, *, model: transformer.Transformer,
        train_records: Sequence[dict], tokenizer, workdir: str, mesh, rules,
        eval_records: Optional[Sequence[dict]] = None, init_params: Any = None,
        name: str = "train") -> FitResult:
  """Train `model` on (prompt, completion) records; checkpoints in `<workdir>/checkpoints`.

  `init_params` (e.g. a base model for SFT) is used only when no checkpoint exists yet.
  """
  tx = _optimizer(tc)
  if tc.batch_size % tc.accum_steps:
    raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by "
                     f"train.accum_steps={tc.accum_steps}")
  data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if (tc.batch_size // tc.accum_steps) % data_shards:
    raise ValueError(f"train batch {tc.batch_size} / accum_steps {tc.accum_steps} must be "
                     f"divisible by the data x fsdp mesh axes ({data_shards} devices); change "
                     f"the batch size or --config.mesh.shape")
  rng = jax.random.PRNGKey(tc.seed)
  abstract = train.abstract_train_state(rng, model=model, tx=tx, seq_len=tc.seq_len,
                                        mesh=mesh, rules=rules)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  ckpt = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), save_every=tc.save_every,
                               keep=tc.keep, async_save=tc.async_checkpoint)
  # Every process runs the same pipeline of *global* batches and transfers only the rows its
  # devices hold (put_global): the batches, and so the run, do not depend on the number of
  # processes, and a run may resume on another host count. Host cost: each host tokenises
  # the global batch (cheap next to a step at any size this runs at).
  data = pipeline.lm_dataset(train_records, tokenizer, seq_len=tc.seq_len,
                             batch_size=tc.batch_size, pack=tc.pack, seed=tc.seed,
                             train_on_prompt=tc.train_on_prompt, shard_index=0, shard_count=1)
  start = ckpt.latest_step()
  if start is not None:
    state, extra = ckpt.restore(abstract)
    pipeline.restore_iterator_state(data, extra["data"])
    logging.info("Resumed from %s at step %d", ckpt.directory, start)
  else:
    start = 0
    if init_params is not None:
      opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(init_params)
      # Every leaf placed as the step returns it (scalars replicated on the mesh): a fresh
      # scalar on the default device would make step 2 a cache miss and compile the step again.
      state = {"step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
               # A copy: the step donates its state, and the caller keeps its params.
               "params": jax.device_put(init_params, shardings["params"], may_alias=False),
               "opt_state": opt_state,
               "nonfinite": jax.device_put(jnp.zeros((), jnp.bool_), shardings["nonfinite"])}
    else:
      state, _ = train.create_train_state(rng, model=model, tx=tx, seq_len=tc.seq_len,
                                          mesh=mesh, rules=rules)
  step_fn = train.jit_train_step(
      functools.partial(train.train_step, model=model, tx=tx, accum_steps=tc.accum_steps),
      shardings, mesh, rules)
  eval_fn = train.jit_eval_step(functools.partial(train.eval_step, model=model),
                                shardings["params"], mesh, rules)
  # All eval records on every process, in the same padded batches: the same collective
  # calls everywhere.
  eval_data = (pipeline.eval_batches(list(eval_records), tokenizer, seq_len=tc.seq_len,
                                     batch_size=tc.batch_size // tc.accum_steps)
               if eval_records else [])
  end = tc.steps if tc.stop_at_step < 0 else min(tc.steps, tc.stop_at_step)
  log = metrics_log.MetricLogger(workdir, name=name, total_steps=tc.steps, start_step=start)
  tokens_per_step = tc.batch_size * tc.seq_len
  eval_metrics: dict = {}

  def check_finite(step):
    if bool(sharding_lib.to_host(state["nonfinite"])):
      ckpt.wait()
      raise NonFiniteError(
          f"Non-finite loss or gradient at or before step {step}; stopped without saving. "
          f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. "
          f"Lower train.opt.lr, raise train.opt.warmup_steps or check the data.")

  try:
    for step in range(start + 1, end + 1):
      batch = sharding_lib.put_global(next(data), mesh, rules)
      state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
      is_save = step % tc.save_every == 0 or step == end
      if step % tc.log_every == 0 or is_save:
        log.write(step, sharding_lib.to_host(metrics), items_per_step=tokens_per_step)
        check_finite(step)
      if eval_data and tc.eval_every and step % tc.eval_every == 0:
        eval_metrics = evaluate(state["params"], eval_fn, eval_data, mesh, rules)
        log.write(step, eval_metrics, console=True)
      if is_save:
        ckpt.maybe_save(step, state, {"data": pipeline.iterator_state_to_json(data)},
                        force=True)
    if eval_data and end > start and (not tc.eval_every or end % tc.eval_every):
      eval_metrics = evaluate(state["params"], eval_fn, eval_data, mesh, rules)
      log.write(end, eval_metrics)
  finally:
    ckpt.close()
    log.close()
  return FitResult(params=state["params"], param_shardings=shardings["params"],
                   step=max(end, start), eval_metrics=eval_metrics)


def load_params(workdir: str, *, model: transformer.Transformer, tc, mesh, rules,
                step: Optional[int] = None):
  """Params of a `fit` run's checkpoint (e.g. a shipped asset), restored into shardings."""
  tx = _optimizer(tc)
  abstract = train.abstract_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                        seq_len=tc.seq_len, mesh=mesh, rules=rules)
  with ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), save_every=1) as c:
    state, _ = c.restore(abstract, step=step)
  return state["params"], jax.tree.map(lambda a: a.sharding, abstract["params"])
