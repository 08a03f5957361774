"""Expert Iteration (thesis 3.2), round by round, resumable at any kill.

  round 0   the initial policy (config.init_from, '' = the base) measured on task.val
  round i   sample K completions per train question at T (one batched sampler call set, one
            compiled shape) -> samples.jsonl
            R_i = correct (answers.is_correct vs the item's answer; ei.keep='answer_and_steps'
            also checks every written step on the lab), de-duplicated;
            D_i = R_i U D_{i-1}, de-duplicated -> dataset.jsonl
            refit FROM THE BASE params on D_i with the SFT hyper-parameters (config.train;
            `qdc_jax.fit`, checkpoints in round_<i>/checkpoints)
            measure on task.val: maj@1 (greedy), maj@K, pass@K, diversity -> done.json (last)
  stop      when val maj@1 saturates (rl.ei.saturated) or after ei.rounds rounds
  end       the round with the best val maj@1 -> <workdir>/model, measured on every test split;
            rl_report.json (algorithm "ei"), ei_curve.png, ei_metrics.jsonl + TensorBoard.

The thesis refits the *pretrained* model each round; the lab has no separate pretrained model,
so its base (config.base) is the shipped student, which is also the initial policy.

Restarts: a round with done.json is read back, not redone; saved samples are reused (never
resampled); a half-done fit resumes from its newest checkpoint. Samples, D_i and the metrics
are written atomically, so the report of a killed-and-resumed run equals an uninterrupted
run's. A workdir made with settings that shape the results differently is refused
(ei_settings.json holds them); the round budget and stopping rule may change on a resume.
"""

from __future__ import annotations

import json
import time

import jax
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from qdc_jax import config_lib  # pylint: disable=wrong-import-position
from qdc_jax import fit  # pylint: disable=wrong-import-position
from qdc_jax import metrics_log  # pylint: disable=wrong-import-position
from qdc_jax import model_io
from qdc_jax import sampling  # pylint: disable=wrong-import-position
from qdc_jax import storage
from qdc_jax.rl import common  # pylint: disable=wrong-import-position
from qdc_jax.rl import ei as ei_lib  # pylint: disable=wrong-import-position

SETTINGS_FILE = "ei_settings.json"
TIMING_FILE = "ei_timing.json"
CURVE_PNG = "ei_curve.png"
# Knobs that decide only how many rounds run (each round's content does not depend on them),
# or only logging / checkpoint cadence: they may change on a resume.
_NOT_FINGERPRINTED = {"ei": ("rounds", "patience", "min_gain", "stop_after_round", "variant",
                             "prune_checkpoints", "slots"),
                      "train": ("stop_at_step", "log_every", "save_every", "keep",
                                "async_checkpoint")}


def settings(config) -> dict:
  """The settings that shape a run's results (fingerprinted against its workdir)."""
  out = {"base": config.base, "init_from": config.init_from, "task": config.task.to_dict(),
         "train": config.train.to_dict(), "ei": config.ei.to_dict(),
         "eval": config.eval.to_dict()}
  for section, keys in _NOT_FINGERPRINTED.items():
    for k in keys:
      out[section].pop(k, None)
  return json.loads(json.dumps(out, default=list))  # tuples -> lists, as read back


def check_settings(workdir: str, config, *, record: bool = True) -> None:
  """Refuse a workdir made with other settings; record them on the first run (`record`)."""
  common.check_settings(workdir, settings(config), record=record, filename=SETTINGS_FILE)


def check_config(config) -> None:
  """Fail before loading anything when a required setting or path is missing."""
  config_lib.require(config, ["base", "init_from", "task.name", "train.steps", "ei.k",
                              "ei.rounds", "eval.k"])
  if not config.base:
    raise ValueError("Set --config.base to the model directory every EI round fine-tunes "
                     "(thesis: the pretrained model; a qdc_jax.model_io directory, or "
                     "'asset:lab_student')")
  common.check_task(config.task)
  if config.ei.k < 1 or config.ei.rounds < 0:
    raise ValueError(f"ei.k={config.ei.k} must be >= 1 and ei.rounds={config.ei.rounds} >= 0")


def _round_dir(workdir: str, i: int) -> str:
  return storage.join(workdir, f"round_{i}")


def _prompt_pad(policy: common.Policy, prompts) -> int:
  """One pad length for every rollout batch (the prompt length, up to a multiple of 64)."""
  longest = max(len(policy.tokenizer.encode(p, add_bos=True)) for p in prompts)
  return -(-longest // 64) * 64


def rollouts(params, task: common.Task, *, policy: common.Policy, c, round_index: int,
             mesh, rules) -> list[list[str]]:
  """K completions per train question at c.temperature: one sampler call per batch of
  c.batch_size questions, every call the same shape."""
  prompts = [it.prompt for it in task.train]
  sp = sampling.SamplingParams(max_new_tokens=c.max_new_tokens, num_samples=c.k,
                               temperature=c.temperature)
  return sampling.generate_text(
      params, prompts, model=policy.model, tokenizer=policy.tokenizer, sp=sp,
      rng=jax.random.fold_in(jax.random.PRNGKey(c.seed), round_index),
      batch_size=c.batch_size, mesh=mesh, rules=rules, param_shardings=policy.shardings,
      pad_multiple=_prompt_pad(policy, prompts), fixed_batch=True,
      stop_strings=tuple(c.get("stop_strings", ())), slots=c.get("slots", 0))


def train_config(tc, dataset, tokenizer):
  """`config.train` for a refit on `dataset`. With `epochs` > 0 the steps cover that many
  passes; packed rows hold several records, so then an epoch is the rows a perfect packing
  fills (all tokens / seq_len), not one row per record."""
  units = len(dataset)
  if tc.get("epochs", 0) > 0 and tc.pack:
    tokens = sum(len(tokenizer.encode(r["prompt"], add_bos=True))
                 + len(tokenizer.encode(r["completion"])) + 1 for r in dataset)
    units = -(-tokens // tc.seq_len)
  return common.resolve_train(tc, units)


def _round_params(workdir: str, i: int, done: dict, *, config, base: common.Policy,
                  init_params, mesh, rules):
  """The policy of finished round i (0 = the initial policy), read back from disk."""
  if i == 0:
    return init_params
  if done["dataset_size"] == 0:
    return base.params  # nothing to fit on: the round's policy is the base itself
  tc = common.resolve_train(config.train, done["dataset_size"])
  tc.steps = done["steps"]  # the schedule length it was trained with
  params, _ = fit.load_params(_round_dir(workdir, i), model=base.model, tc=tc, mesh=mesh,
                              rules=rules)
  return params


def _prune(workdir: str, done: dict) -> None:
  """Delete the fit checkpoints of finished rounds other than the two latest (the running
  round samples with the latest; a kill before the next round's done.json needs the one
  before) and the best so far (exported at the end): at Gemma scale each holds the model
  and its Adam state."""
  rounds = sorted(done)
  best = rounds[ei_lib.best_round([done[j]["val"]["maj@1"] for j in rounds])]
  for j in rounds[1:-2]:
    if j != best:
      storage.rmtree(storage.join(_round_dir(workdir, j), "checkpoints"))


def plot_curve(curve: list[dict], k_eval: int, path: str, title: str) -> None:
  """Val maj@1 / maj@K / pass@K vs rollouts (log x; the initial policy as dashed lines) and
  vs round."""
  keys = [("maj@1", "maj@1 (greedy)"), (f"maj@{k_eval}", f"maj@{k_eval}"),
          (f"pass@{k_eval}", f"pass@{k_eval}")]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  later = [p for p in curve if p["rollouts"] > 0]
  for n, (key, label) in enumerate(keys):
    color = f"C{n}"
    if later:
      ax1.plot([p["rollouts"] for p in later], [p[key] for p in later], marker="o",
               color=color, label=label)
    ax1.axhline(curve[0][key], color=color, ls="--", lw=1, alpha=0.7)
    ax2.plot([p["round"] for p in curve], [p[key] for p in curve], marker="o", color=color,
             label=label)
  if later:
    ax1.set_xscale("log")
  ax1.set_xlabel("rollouts (sampled completions; dashed: initial policy)")
  ax2.set_xlabel("EI round (0 = initial policy)")
  ax2.set_xticks([p["round"] for p in curve])
  for ax in (ax1, ax2):
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  ax2.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  check_config(config)
  c, ec = config.ei, config.eval
  storage.makedirs(workdir)
  check_settings(workdir, config, record=False)  # refuse early, before loading anything
  mesh, rules = config_lib.make_mesh(config.mesh)
  task = common.load_task(config.task)
  if not task.train or not task.val:
    raise ValueError(f"EI needs train and validation questions; task {config.task.name!r} "
                     f"gave {len(task.train)} / {len(task.val)}")
  base = common.load_policy(config.base, mesh=mesh, rules=rules)
  init_params = base.params
  if config.init_from:
    init = common.load_policy(config.init_from, mesh=mesh, rules=rules)
    if init.model.config != base.model.config or not model_io.same_tokenizer(
        init.meta.get("tokenizer"), base.meta.get("tokenizer")):
      raise ValueError(f"init_from={config.init_from} and base={config.base} differ in model "
                       f"config or tokenizer; EI refits the base, so they must match")
    init_params = init.params
  check_settings(workdir, config)  # recorded after the loads: a bad path needs no fresh dir
  prompts = [it.prompt for it in task.train]
  n_q = len(task.train)
  evaluate = lambda params, items: common.evaluate(params, items, policy=base, ec=ec,
                                                   mesh=mesh, rules=rules)

  # Rounds finished by an earlier process: read back, and log only the ones after them.
  finished = 0
  while storage.read_json(storage.join(_round_dir(workdir, finished + 1), "done.json")) and (
      finished + 1 <= c.rounds):
    finished += 1
  round0_done = storage.exists(storage.join(_round_dir(workdir, 0), "done.json"))
  log = metrics_log.MetricLogger(workdir, name="ei", total_steps=c.rounds,
                                 start_step=finished if round0_done else -1, unit="rounds")
  timing = storage.read_json(storage.join(workdir, TIMING_FILE)) or {}
  t_start = time.time()

  def finish_round(i: int, record: dict) -> None:
    """Log first, done.json last: a kill in between re-logs the round (the logger drops rows
    after the last finished round on restart), so each round is logged once."""
    row = {"rollouts": record["rollouts"], **{f"val/{k}": v for k, v in record["val"].items()},
           **{f"data/{k}": v for k, v in record.get("stats", {}).items()}}
    log.write(i, row, console=False)
    logging.info("EI round %d | rollouts %d | val %s | %s", i, record["rollouts"],
                 {k: round(v, 4) for k, v in record["val"].items() if v is not None},
                 record.get("stats", {}))
    storage.write_json(storage.join(_round_dir(workdir, i), "done.json"), record)
    timing[f"round_{i}"] = record["seconds"]
    storage.write_json(storage.join(workdir, TIMING_FILE), timing)

  done: dict[int, dict] = {}
  try:
    # Round 0: the initial policy.
    storage.makedirs(_round_dir(workdir, 0))
    rec = storage.read_json(storage.join(_round_dir(workdir, 0), "done.json"))
    if rec is None:
      t0 = time.time()
      m, _ = evaluate(init_params, task.val)
      rec = {"round": 0, "rollouts": 0, "val": common.headline(m, ec.k), "val_full": m,
             "dataset_size": 0, "seconds": {"eval": time.time() - t0}}
      finish_round(0, rec)
    done[0] = rec
    params = init_params  # the current policy, when it is in memory
    params_round = 0
    stopped = "rounds"
    for i in range(1, c.rounds + 1):
      if 0 <= c.stop_after_round < i:
        logging.info("Stopping after round %d (ei.stop_after_round); re-run without it to "
                     "continue.", c.stop_after_round)
        return {"stopped_after_round": c.stop_after_round}
      history = [done[j]["val"]["maj@1"] for j in range(i)]
      if ei_lib.saturated(history, min_gain=c.min_gain, patience=c.patience):
        stopped = "saturated"
        break
      rdir = _round_dir(workdir, i)
      rec = storage.read_json(storage.join(rdir, "done.json"))
      if rec is not None:
        done[i] = rec
        continue
      storage.makedirs(rdir)
      if params_round != i - 1:
        params = _round_params(workdir, i - 1, done[i - 1], config=config, base=base,
                               init_params=init_params, mesh=mesh, rules=rules)
        params_round = i - 1
      seconds = {}
      # 1. Rollouts (reused when an earlier process saved them).
      t0 = time.time()
      samples_path = storage.join(rdir, "samples.jsonl")
      rows = storage.read_rows(samples_path)
      if rows is None:
        samples = rollouts(params, task, policy=base, c=c, round_index=i, mesh=mesh,
                           rules=rules)
        rows = [{"prompt": it.prompt, "answer": it.answer, "samples": s}
                for it, s in zip(task.train, samples)]
        storage.write_rows(samples_path, rows)
        seconds["sample"] = time.time() - t0
      if [r["prompt"] for r in rows] != prompts or any(len(r["samples"]) != c.k for r in rows):
        raise ValueError(f"{samples_path} does not match this task's train questions x "
                         f"ei.k={c.k}; delete it to resample")
      # 2. R_i, D_i.
      flags = ei_lib.correct_flags([it.answer for it in task.train],
                                   [r["samples"] for r in rows], keep=c.keep)
      new = ei_lib.correct_records(prompts, [r["samples"] for r in rows], flags)
      previous = storage.read_rows(
          storage.join(_round_dir(workdir, i - 1), "dataset.jsonl")) or []
      dataset = ei_lib.union(previous, new)
      data_path = storage.join(rdir, "dataset.jsonl")
      saved = storage.read_rows(data_path)
      if saved is None:
        storage.write_rows(data_path, dataset)
      elif saved != dataset:
        raise ValueError(f"{data_path} differs from D_{i} rebuilt from its samples; the "
                         f"round directory is corrupt: delete {rdir} to redo the round")
      stats = ei_lib.per_question_stats(prompts, new, dataset)
      stats["sample_accuracy"] = sum(map(sum, flags)) / (n_q * c.k)
      # 3. Refit the base on D_i.
      t0 = time.time()
      if dataset:
        tc = train_config(config.train, dataset, base.tokenizer)
        result = fit.fit(tc, model=base.model, train_records=dataset,
                         tokenizer=base.tokenizer, workdir=rdir, mesh=mesh, rules=rules,
                         init_params=base.params, name="train")
        if not result.finished(tc):  # train.stop_at_step: a deliberate stop
          logging.info("Round %d fit stopped at step %d of %d; re-run to resume.", i,
                       result.step, tc.steps)
          return {"stopped_in_round": i, "step": result.step}
        params, steps = result.params, tc.steps
      else:
        logging.warning("Round %d: no correct sample yet (D_%d is empty); the round's policy "
                        "is the base model", i, i)
        params, steps = base.params, 0
      params_round = i
      seconds["fit"] = time.time() - t0
      # 4. Validation.
      t0 = time.time()
      m, _ = evaluate(params, task.val)
      seconds["eval"] = time.time() - t0
      rec = {"round": i, "rollouts": ei_lib.rollouts_after(i, n_q, c.k),
             "val": common.headline(m, ec.k), "val_full": m, "stats": stats,
             "dataset_size": len(dataset), "steps": steps, "seconds": seconds}
      finish_round(i, rec)
      done[i] = rec
      if c.prune_checkpoints:
        _prune(workdir, done)
  finally:
    log.close()

  # The end: the best round by val maj@1 -> model, test splits, report, plot.
  rounds = sorted(done)
  history = [done[j]["val"]["maj@1"] for j in rounds]
  best = rounds[ei_lib.best_round(history)]
  best_params = (params if best == params_round else
                 _round_params(workdir, best, done[best], config=config, base=base,
                               init_params=init_params, mesh=mesh, rules=rules))
  common.export(storage.join(workdir, "model"), base, best_params,
                notes={"algorithm": "ei", "variant": c.variant, "round": best,
                       "base": config.base, "init_from": config.init_from or config.base,
                       "rollouts": done[best]["rollouts"]})
  t0 = time.time()
  final = {}
  for split, items in task.test.items():
    m, _ = evaluate(best_params, items)
    final[split] = common.headline(m, ec.k)
    logging.info("test %s (round %d): %s", split, best, final[split])
  timing["test_eval"] = time.time() - t0
  curve = [{"round": j, "rollouts": done[j]["rollouts"], **done[j]["val"]} for j in rounds]
  report = {
      "algorithm": "ei", "variant": c.variant, "seed": c.seed, "k": ec.k,
      "curve": curve, "final": final,
      "notes": {
          "samples_per_question": c.k, "rollout_temperature": c.temperature,
          "keep": c.keep,
          "eval_temperature": ec.temperature, "train_questions": n_q,
          "val_questions": len(task.val), "rounds": rounds[-1], "stopped": stopped,
          "best_round": best, "base": config.base, "init_from": config.init_from or config.base,
          "dataset_size": [done[j]["dataset_size"] for j in rounds],
          "fit_steps": [done[j].get("steps", 0) for j in rounds],
          "train": {"batch_size": config.train.batch_size, "lr": config.train.opt.lr,
                    "epochs": config.train.epochs,
                    "steps": None if config.train.epochs > 0 else config.train.steps},
          "data": {str(j): done[j].get("stats", {}) for j in rounds if j > 0},
      },
  }
  storage.write_json(storage.join(workdir, common.REPORT_FILE), report)
  plot_curve(curve, ec.k, storage.join(workdir, CURVE_PNG),
             f"EI {c.variant} ({config.task.name}): K={c.k}, {n_q} questions, "
             f"best round {best}")
  timing["last_process_seconds"] = time.time() - t_start
  storage.write_json(storage.join(workdir, TIMING_FILE), timing)
  logging.info("EI done: %d rounds (%s), best round %d, val maj@1 %s", rounds[-1], stopped,
               best, [round(h, 4) for h in history])
  return report
