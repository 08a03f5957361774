"""ILQL (thesis 3.2, trlX): offline RL from (prompt, completion, reward) rows.

  data      lab (default): the policy samples S solutions per train question at temperature T
            (one sampler call), each rewarded 1 if its final answer is right, else 0; files:
            `data.path`, JSONL rows {"prompt", "completion", "reward"}. offline_data.jsonl
            (atomic, once).
  train     `rl.ilql` heads on the policy's trunk, trained by `fit` with the ILQL objective
            (Q / V / CQL / AWR terms, Polyak target heads, optional frozen bottom blocks), in
            `ilql.stages` stages; after each, the validation questions are sampled at
            `eval_beta` (val reward = sample accuracy) with the wall time spent training: the
            max-reward-over-time curve of table 3.2. <workdir>/model (kind "ilql").
  evaluate  the policy before training and the trained model at each beta in `ilql.betas`
            (logits + beta * (min Q^ - V); beta 0 is the trained policy alone) on the test
            splits: maj@1, maj@k, pass@k, sample accuracy. rl_report.json (the RL report
            shape), ilql_curve.png.

Resumable: the data is written once, training resumes from fit's checkpoints, and every
evaluation is cached in ilql_evals.json as it lands; a workdir made with other settings is
refused, naming the keys.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position

from qdc_jax import config_lib  # pylint: disable=wrong-import-position
from qdc_jax import fit  # pylint: disable=wrong-import-position
from qdc_jax import model_io  # pylint: disable=wrong-import-position
from qdc_jax import sampling  # pylint: disable=wrong-import-position
from qdc_jax import storage  # pylint: disable=wrong-import-position
from qdc_jax.data import answers  # pylint: disable=wrong-import-position
from qdc_jax.data import pipeline  # pylint: disable=wrong-import-position
from qdc_jax.rl import common  # pylint: disable=wrong-import-position
from qdc_jax.rl import ilql  # pylint: disable=wrong-import-position

SETTINGS_FILE = "ilql_settings.json"
EVALS_FILE = "ilql_evals.json"
DATA_FILE = "offline_data.jsonl"
RESUMABLE_KEYS = ("train.stop_at_step",)
PAD_MULTIPLE = 128


def offline_rows(config, policy, items, *, mesh, rules) -> list[dict]:
  """Lab: S samples per question from `policy`, rewarded by the final answer's correctness."""
  dc = config.data
  texts = sampling.generate_text(
      policy.params, [it.prompt for it in items], model=policy.model,
      tokenizer=policy.tokenizer,
      sp=sampling.SamplingParams(max_new_tokens=dc.max_new_tokens, num_samples=dc.samples,
                                 temperature=dc.temperature),
      rng=jax.random.PRNGKey(config.seed), batch_size=dc.batch_size, mesh=mesh, rules=rules,
      param_shardings=policy.shardings, pad_multiple=PAD_MULTIPLE)
  return [{"prompt": it.prompt, "completion": t,
           "reward": float(answers.is_correct(t, it.answer))}
          for it, row in zip(items, texts) for t in row]


def read_rows(path: str) -> list[dict]:
  rows = storage.read_rows(path)
  if rows is None:
    raise FileNotFoundError(f"No offline data at {path}")
  for i, r in enumerate(rows):
    bad = [k for k, t in (("prompt", str), ("completion", str), ("reward", (int, float)))
           if not isinstance(r.get(k), t)]
    if bad:
      raise ValueError(f"{path} line {i + 1}: missing or mistyped {bad}; an ILQL row is "
                       f"{{'prompt': str, 'completion': str, 'reward': number}}")
  return rows


def ilql_policy(policy: common.Policy, params, shardings, beta: float) -> common.Policy:
  """A `Policy` that samples from the ILQL model at `beta`."""
  return dataclasses.replace(policy, model=ilql.ILQLModel(policy.model.config, beta=beta),
                             params=params, shardings=shardings)


def _eval_kw(config, mesh, rules):
  return dict(ec=config.eval, mesh=mesh, rules=rules)


def plot(curve, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for ax, key, label in ((axes[0], "step", "optimiser steps"),
                         (axes[1], "train_seconds", "training wall time (s)")):
    ax.plot([c[key] for c in curve], [c["sample_accuracy"] for c in curve], "o-")
    ax.set(xlabel=label, ylabel="validation reward (sample accuracy)")
    ax.grid(alpha=0.3)
  fig.suptitle("ILQL on the lab: reward over training")
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["policy", "task.name", "data.path", "ilql.stages", "ilql.betas",
                              "ilql.eval_beta", "train.steps", "eval.k"])
  if not config.policy:
    raise ValueError("--config.policy is required: a model directory or 'asset:lab_student'")
  storage.makedirs(workdir)
  settings = dict(workdir=workdir, settings=config.to_dict(), may_change=RESUMABLE_KEYS,
                  filename=SETTINGS_FILE)
  common.check_settings(**settings, record=False)
  report_path = storage.join(workdir, common.REPORT_FILE)
  done = common.finished_report(workdir)
  if done is not None:
    return done
  t_start = time.time()
  mesh, rules = config_lib.make_mesh(config.mesh)
  task = common.load_task(config.task)
  policy = common.load_policy(config.policy, mesh=mesh, rules=rules)
  common.check_settings(**settings, record=True)
  evals = common.ResultCache(storage.join(workdir, EVALS_FILE))
  ec = config.eval

  # -- Data.
  data_path = storage.join(workdir, DATA_FILE)
  if not storage.exists(data_path):
    rows = (read_rows(config.data.path) if config.data.path else
            offline_rows(config, policy, task.train, mesh=mesh, rules=rules))
    storage.write_rows(data_path, rows)
  rows = storage.read_rows(data_path)
  mean_reward = sum(r["reward"] for r in rows) / max(len(rows), 1)
  logging.info("ilql data: %d rows, mean reward %.3f", len(rows), mean_reward)

  # -- The policy before training (the curve's first point).
  head = lambda m: common.headline(m, ec.k)
  kw = _eval_kw(config, mesh, rules)
  base_val = evals.get("base/val", lambda: head(common.evaluate(
      policy.params, task.val, policy=policy, **kw)[0]))
  curve = [{"stage": 0, "step": 0, "train_seconds": 0.0, **base_val}]

  # -- Train in stages; validation reward after each.
  ic = config.ilql
  tc = common.resolve_train(config.train, len(rows))
  cols, cut = ilql.encode(policy.tokenizer, [(r["prompt"], r["completion"], r["reward"])
                                             for r in rows], tc.seq_len)
  if cut:
    logging.warning("ilql: %d of %d rows cut at seq_len=%d", cut, len(rows), tc.seq_len)
  hyper = ilql.Hyper(gamma=ic.gamma, tau=ic.tau, cql_scale=ic.cql_scale,
                     awr_scale=ic.awr_scale, awr_beta=ic.awr_beta,
                     awr_max_weight=ic.awr_max_weight)
  objective = ilql.objective(hyper, alpha=ic.alpha, frozen_layers=ic.frozen_layers)
  model = ilql.ILQLModel(policy.model.config, beta=0.0)
  model_dir = storage.join(workdir, "model")
  init = None
  result = None
  for stage in range(1, ic.stages + 1):
    end = -(-tc.steps * stage // ic.stages)
    name = f"stage_{stage}"
    if name not in evals:
      if init is None and not storage.exists(storage.join(model_dir, "model.json")):
        init = ilql.init_params(jax.random.PRNGKey(config.seed), policy.params,
                                policy.model.config)
      stc = ml_collections.ConfigDict(tc.to_dict())
      stc.stop_at_step = end if tc.stop_at_step < 0 else min(end, tc.stop_at_step)
      t0 = time.perf_counter()
      result = None  # the previous stage's params are in its checkpoint; free them first
      result = fit.fit(stc, model=model, workdir=storage.join(workdir, "train"), mesh=mesh,
                       rules=rules, data=pipeline.array_dataset(cols, batch_size=tc.batch_size,
                                                                seed=config.seed),
                       objective=objective, init_params=init, name="ilql")
      seconds = time.perf_counter() - t0
      if result.step < end:
        return {"stopped_at_step": result.step}
      trained = ilql_policy(policy, result.params, result.param_shardings, ic.eval_beta)
      m = head(common.evaluate(result.params, task.val, policy=trained, **kw)[0])
      before = evals.values.get(f"stage_{stage - 1}", {}).get("train_seconds", 0.0)
      evals.put(name, {"stage": stage, "step": result.step,
                       "train_seconds": before + seconds, **m})
    curve.append(evals[name])
  if not storage.exists(storage.join(model_dir, "model.json")):
    if result is None:  # every stage was done before a kill: restore the last checkpoint
      result = fit.fit(tc, model=model, workdir=storage.join(workdir, "train"), mesh=mesh,
                       rules=rules, data=pipeline.array_dataset(cols, batch_size=tc.batch_size,
                                                                seed=config.seed),
                       objective=objective, name="ilql")
    model_io.save_model(model_dir, policy.model.config, result.params,
                        tokenizer=policy.meta.get("tokenizer"), kind="ilql",
                        notes={"algorithm": "ilql", "policy": config.policy,
                               "steps": result.step, "rows": len(rows),
                               "hyper": dataclasses.asdict(hyper), "alpha": ic.alpha,
                               "frozen_layers": ic.frozen_layers})
  del result

  # -- Test: the policy before training and the trained model at each beta.
  cfg, params, _, _, shardings = model_io.load_model(model_dir, mesh=mesh, rules=rules,
                                                     kind="ilql")
  final = {}
  for split, items in task.test.items():
    final[f"base/{split}"] = evals.get(f"base/{split}", lambda its=items: head(
        common.evaluate(policy.params, its, policy=policy, **kw)[0]))
    for beta in ic.betas:
      trained = ilql_policy(policy, params, shardings, float(beta))
      final[f"beta={beta:g}/{split}"] = evals.get(f"beta={beta:g}/{split}",
                                                  lambda its=items, t=trained: head(
          common.evaluate(params, its, policy=t, **kw)[0]))
  best = max(curve, key=lambda c: c["sample_accuracy"])
  report = {
      "algorithm": "ilql", "variant": f"frozen_layers={ic.frozen_layers}", "seed": config.seed,
      "k": ec.k, "curve": [{"round": c["stage"], "rollouts": 0, **c} for c in curve],
      "final": final,
      "notes": {"rows": len(rows), "mean_reward": mean_reward, "rows_cut": cut,
                "steps": tc.steps, "eval_beta": ic.eval_beta,
                "max_val_reward": best["sample_accuracy"],
                "train_seconds_to_max": best["train_seconds"],
                "seconds": time.time() - t_start},
  }
  plot(curve, storage.join(workdir, "ilql_curve.png"))
  storage.write_json(report_path, report)
  logging.info("ilql: %s", {k: round(v.get("sample_accuracy") or 0, 3) for k, v in final.items()})
  return report
