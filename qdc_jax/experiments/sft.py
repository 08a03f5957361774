"""SFT: fine-tune a policy on (question, reference solution) pairs, then measure it.

  init policy --eval on val--> curve point 0
  fit on sft_records(task.train) (the shared resumable loop; <workdir>/checkpoints)
  export -> <workdir>/model; eval on val (curve point 1) and on every test split (final)
  -> <workdir>/rl_report.json (algorithm "sft")

SFT samples nothing, so both curve points sit at 0 rollouts. A kill at any point resumes: the
fit from its newest checkpoint, the evaluations are recomputed (deterministic given the seeds).
"""

from __future__ import annotations

import time

from absl import logging

from qdc_jax import config_lib
from qdc_jax import fit
from qdc_jax import storage
from qdc_jax.rl import common


def check_config(config) -> None:
  """Fail before loading anything when a required path is missing."""
  config_lib.require(config, ["init_from", "task.name", "train.steps", "eval.k"])
  if not config.init_from:
    raise ValueError("Set --config.init_from to the model directory to fine-tune (a "
                     "qdc_jax.model_io directory, e.g. a converted Gemma checkpoint, or "
                     "'asset:lab_student')")
  common.check_task(config.task)


def run(config, workdir: str) -> dict:
  check_config(config)
  mesh, rules = config_lib.make_mesh(config.mesh)
  task = common.load_task(config.task)
  records = common.sft_records(task.train)
  if not records:
    raise ValueError(f"No training question of task {config.task.name!r} has a reference "
                     f"solution; SFT needs them")
  policy = common.load_policy(config.init_from, mesh=mesh, rules=rules)
  # Recorded once the inputs load; a resume with other settings is refused.
  common.check_settings(workdir, config.to_dict(), may_change=("mesh", "train.stop_at_step"))
  tc = common.resolve_train(config.train, len(records))
  ec = config.eval
  logging.info("SFT: %d records, %d steps of batch %d; val %d, test %s", len(records),
               tc.steps, tc.batch_size, len(task.val),
               {s: len(v) for s, v in task.test.items()})
  evaluate = lambda params, items: common.evaluate(params, items, policy=policy, ec=ec,
                                                   mesh=mesh, rules=rules)
  t0 = time.time()
  init_val, _ = evaluate(policy.params, task.val)
  result = fit.fit(tc, model=policy.model, train_records=records,
                   tokenizer=policy.tokenizer, workdir=workdir, mesh=mesh, rules=rules,
                   init_params=policy.params, name="sft")
  if not result.finished(tc):  # train.stop_at_step: a deliberate stop, resume later
    logging.info("Stopped at step %d of %d; not exporting.", result.step, tc.steps)
    return {"step": result.step}
  common.export(storage.join(workdir, "model"), policy, result.params,
                notes={"algorithm": "sft", "init_from": config.init_from, "steps": tc.steps,
                       "records": len(records)})
  val, _ = evaluate(result.params, task.val)
  final = {}
  for split, items in task.test.items():
    m, _ = evaluate(result.params, items)
    final[split] = common.headline(m, ec.k)
    logging.info("test %s: %s", split, final[split])
  report = {
      "algorithm": "sft", "variant": config.task.name, "seed": config.seed, "k": ec.k,
      "curve": [{"round": 0, "rollouts": 0, **common.headline(init_val, ec.k)},
                {"round": 1, "rollouts": 0, **common.headline(val, ec.k)}],
      "final": final,
      "notes": {"init_from": config.init_from, "train_records": len(records),
                "steps": tc.steps, "batch_size": tc.batch_size, "lr": tc.opt.lr,
                "eval_temperature": ec.temperature},
  }
  logging.info("val maj@1 %.3f -> %.3f (%.0f s)", report["curve"][0]["maj@1"],
               report["curve"][1]["maj@1"], time.time() - t0)
  storage.write_json(storage.join(workdir, common.REPORT_FILE), report)
  return report
