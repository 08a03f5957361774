"""The one training loop every workload shares (pretraining, SFT, EI, distillation, reward
heads, the scaling chapter's regression).

What is minimised is a `train.Objective` (the next-token loss by default); the data is either
(prompt, completion) records tokenised here, or any checkpointable iterator of global numpy
batches (`data=`, e.g. `pipeline.array_dataset`) with its held-out batches (`eval_data=`).

Resumable: the checkpoint holds {step, params, opt_state} plus the data iterator's state and
the early-stopping record, so a run killed at any point restarts from the newest checkpoint and
sees exactly the batches it would have seen (same params as an uninterrupted run). A
non-finite loss or gradient stops the run with the last good checkpoint kept.

Early stopping (`train.patience` > 0, with `train.eval_every`): the run ends after `patience`
evaluations in a row whose held-out loss is not below the best so far by `train.min_delta`;
the result reports the best held-out loss and its step (the params are the last ones).
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
  stopped_early: bool = False

  def finished(self, tc) -> bool:
    """Ran to `train.steps` or stopped early on held-out loss (not `stop_at_step`)."""
    return self.stopped_early or self.step >= tc.steps


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
  c.patience = 0  # early stopping: evaluations without improvement before stopping; 0 = off
  c.min_delta = 0.0  # an improvement must lower the held-out loss by more than this
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
  """Loss (and every other aux sum, per token) over every eval batch: sums, so ragged
  batches are exact. `correct` is reported as `eval_accuracy`."""
  totals = None
  for b in batches:
    out = eval_fn(params, sharding_lib.put_global(b, mesh, rules))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    return {}
  totals = sharding_lib.to_host(totals)
  n = max(float(totals["tokens"]), 1.0)
  out = {"eval_loss": float(totals["loss_sum"]) / n, "eval_tokens": float(totals["tokens"])}
  for k, v in totals.items():
    if k not in ("loss_sum", "tokens"):
      out["eval_accuracy" if k == "correct" else f"eval_{k}"] = float(v) / n
  return out


@dataclasses.dataclass
class EarlyStopping:
  """The held-out-loss record `fit` keeps in its checkpoints (JSON)."""
  best_loss: float = float("inf")
  best_step: int = -1
  bad_evals: int = 0
  stopped: bool = False

  def update(self, step: int, loss: float, tc) -> None:
    patience = tc.get("patience", 0)
    if loss < self.best_loss - tc.get("min_delta", 0.0):
      self.best_loss, self.best_step, self.bad_evals = loss, step, 0
    else:
      self.bad_evals += 1
      self.stopped = patience > 0 and self.bad_evals >= patience

  def metrics(self) -> dict:
    if self.best_step < 0:
      return {}
    return {"best_eval_loss": self.best_loss, "best_step": self.best_step,
            "stopped_early": self.stopped}


def fit(tc: ml_collections.ConfigDict, *, model, workdir: str, mesh, rules,
        train_records: Optional[Sequence[dict]] = None, tokenizer=None,
        eval_records: Optional[Sequence[dict]] = None, data=None,
        eval_data: Optional[Sequence[dict]] = None,
        objective: train.Objective = train.LM, init_params: Any = None,
        name: str = "train") -> FitResult:
  """Train `model` on (prompt, completion) records (with `tokenizer`), or on `data`, an
  iterator of global numpy batches with `get_state`/`set_state` (grain), held out
  `eval_data`; checkpoints in `<workdir>/checkpoints`.

  `init_params` (e.g. a base model for SFT) is used only when no checkpoint exists yet.
  """
  if (data is None) == (train_records is None):
    raise ValueError("fit takes either train_records (with a tokenizer) or data, not both")
  patience = tc.get("patience", 0)
  if patience and not tc.eval_every:
    raise ValueError(f"train.patience={patience} (early stopping) needs train.eval_every "
                     f"> 0: the held-out loss is what it watches")
  tx = objective.wrap_tx(_optimizer(tc))
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
                                        mesh=mesh, rules=rules, objective=objective)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  ckpt = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), save_every=tc.save_every,
                               keep=tc.keep, async_save=tc.async_checkpoint)
  # Every process runs the same pipeline of *global* batches and transfers only the rows its
  # devices hold (put_global): the batches, and so the run, do not depend on the number of
  # processes, and a run may resume on another host count. Host cost: each host tokenises
  # the global batch (cheap next to a step at any size this runs at).
  if data is None:
    data = pipeline.lm_dataset(train_records, tokenizer, seq_len=tc.seq_len,
                               batch_size=tc.batch_size, pack=tc.pack, seed=tc.seed,
                               train_on_prompt=tc.train_on_prompt, shard_index=0,
                               shard_count=1)
  early = EarlyStopping()
  start = ckpt.latest_step()
  if start is not None:
    state, extra = ckpt.restore(abstract)
    pipeline.restore_iterator_state(data, extra["data"])
    early = EarlyStopping(**extra.get("early_stopping", {}))
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
                                          mesh=mesh, rules=rules, objective=objective)
  step_fn = train.jit_train_step(
      functools.partial(train.train_step, model=model, tx=tx, accum_steps=tc.accum_steps,
                        loss_fn=objective.loss_sums), shardings, mesh, rules)
  eval_fn = train.jit_eval_step(
      functools.partial(train.eval_step, model=model, loss_fn=objective.loss_sums),
      shardings["params"], mesh, rules)
  # All eval records on every process, in the same padded batches: the same collective
  # calls everywhere.
  if eval_data is None:
    eval_data = (pipeline.eval_batches(list(eval_records), tokenizer, seq_len=tc.seq_len,
                                       batch_size=tc.batch_size // tc.accum_steps)
                 if eval_records else [])
  eval_data = list(eval_data)
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

  last = start
  try:
    for step in range(start + 1, end + 1):
      if early.stopped:
        break
      batch = sharding_lib.put_global(next(data), mesh, rules)
      state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
      last = step
      is_save = step % tc.save_every == 0 or step == end
      if step % tc.log_every == 0 or is_save:
        log.write(step, sharding_lib.to_host(metrics), items_per_step=tokens_per_step)
        check_finite(step)
      if eval_data and tc.eval_every and step % tc.eval_every == 0:
        check_finite(step)  # a skipped (non-finite) update must not count as converged
        eval_metrics = evaluate(state["params"], eval_fn, eval_data, mesh, rules)
        early.update(step, eval_metrics["eval_loss"], tc)
        log.write(step, eval_metrics, console=True)
        if early.stopped:
          logging.info("Early stop at step %d: held-out loss %.4f at step %d, not bettered "
                       "in %d evaluations", step, early.best_loss, early.best_step,
                       early.bad_evals)
          is_save = True
      if is_save:
        ckpt.maybe_save(step, state, {"data": pipeline.iterator_state_to_json(data),
                                      "early_stopping": dataclasses.asdict(early)},
                        force=True)
    if eval_data and last > start and (not tc.eval_every or last % tc.eval_every):
      eval_metrics = evaluate(state["params"], eval_fn, eval_data, mesh, rules)
      log.write(last, eval_metrics)
  finally:
    ckpt.close()
    log.close()
  if early.stopped and not eval_metrics:  # resumed after the stop: nothing left to run
    eval_metrics = evaluate(state["params"], eval_fn, eval_data, mesh, rules)
  eval_metrics = {**eval_metrics, **early.metrics()}
  done = end if not early.stopped else max(last, start)
  return FitResult(params=state["params"], param_shardings=shardings["params"],
                   step=max(done, start), eval_metrics=eval_metrics, stopped_early=early.stopped)


def load_params(workdir: str, *, model: transformer.Transformer, tc, mesh, rules,
                step: Optional[int] = None, objective: train.Objective = train.LM):
  """Params of a `fit` run's checkpoint (e.g. a shipped asset, or an early-stopped run's best
  step: keep >= patience + 1 checkpoints saved at every evaluation), restored into
  shardings."""
  tx = objective.wrap_tx(_optimizer(tc))
  abstract = train.abstract_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                        seq_len=tc.seq_len, mesh=mesh, rules=rules,
                                        objective=objective)
  with ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), save_every=1) as c:
    state, _ = c.restore(abstract, step=step)
  return state["params"], jax.tree.map(lambda a: a.sharding, abstract["params"])
