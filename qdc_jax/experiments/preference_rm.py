"""Preference reward model (thesis 3.2, trlX): Bradley-Terry on (prompt, chosen, rejected).

  pairs     lab (default): the student samples S solutions per train and per test question
            (`glore.build_solutions` without rollouts; the oracle's first wrong step on each),
            paired per question by `reward_models.solution_pairs` (correct over incorrect; the
            tie-break `pairs.tie_break` orders two incorrect ones by their first wrong step).
            Files: `data.train_path` / `data.test_path`, JSONL preference rows
            (`reward_models.read_pairs`: {"prompt", "chosen", "rejected"} or Anthropic HH
            {"chosen", "rejected"} dialogues). train_pairs.jsonl / test_pairs.jsonl (atomic).
  train     a reward head on the student's trunk (`reward_models.init_params`), trained by `fit`
            with the Bradley-Terry objective; a tenth of the training questions (or rows) give
            the held-out loss. <workdir>/model: kind "reward_model", objective
            "bradley_terry", transform "standardise" (mean and std of the head on the training
            completions), which PPO's `--config.reward.name=model` applies.
  evaluate  held-out pairwise accuracy with a 95% interval (bootstrap over questions), per pair
            kind; on the lab also the AUC of the score for correct vs incorrect test solutions
            and the accuracy of best-of-S picked by the model. report.md, report.json,
            preference_rm.png.

Re-running on a finished workdir does nothing new; a workdir made with other settings is
refused (preference_rm_settings.json), naming the keys that differ.
"""

from __future__ import annotations

import time
from typing import Optional

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position

from qdc_jax import config_lib  # pylint: disable=wrong-import-position
from qdc_jax import fit  # pylint: disable=wrong-import-position
from qdc_jax import storage  # pylint: disable=wrong-import-position
from qdc_jax.data import pipeline  # pylint: disable=wrong-import-position
from qdc_jax.experiments import glore as glore_exp  # pylint: disable=wrong-import-position
from qdc_jax.models import heads  # pylint: disable=wrong-import-position
from qdc_jax.rl import common  # pylint: disable=wrong-import-position
from qdc_jax.rl import reward_models  # pylint: disable=wrong-import-position

SETTINGS_FILE = "preference_rm_settings.json"
RESUMABLE_KEYS = ("train.stop_at_step",)
TRANSFORM_ROWS = 512  # training completions the standardise transform is measured on


def _sampling(c, samples: int) -> glore_exp.Sampling:
  return glore_exp.Sampling(batch_size=c.batch_size, slots=c.slots,
                            max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                            samples=samples, rollouts_per_step=0,
                            stop_strings=tuple(c.stop_strings))


def lab_solutions(path, student, items, c, *, samples, seed, mesh, rules):
  """S student solutions per item (the oracle's first wrong step on each), read from `path`
  or sampled and written there first."""
  return glore_exp.solutions(path, lambda: glore_exp.build_solutions(
      student, items, _sampling(c, samples), greedy_draft=False, seed=seed, is_lab=True,
      mesh=mesh, rules=rules))


def pairs_file(path, make) -> list[reward_models.Pair]:
  if not storage.exists(path):
    storage.write_rows(path, [p.to_json() for p in make()])
  return [reward_models.Pair.from_json(r) for r in storage.read_rows(path)]


def held_out(pair: reward_models.Pair, index: int) -> bool:
  """A tenth of the training pairs give the held-out loss: by question on the lab (its pairs
  share a prompt), by row otherwise."""
  return (pair.question if pair.question >= 0 else index) % 10 == 9


def train_model(pairs, student, tc, workdir, *, seed, mesh, rules):
  """Trains the preference model; its directory, or None if stopped early."""
  out_dir = storage.join(workdir, "model")
  if storage.exists(storage.join(out_dir, "model.json")):
    return out_dir
  train_pairs = [p for i, p in enumerate(pairs) if not held_out(p, i)]
  eval_pairs = [p for i, p in enumerate(pairs) if held_out(p, i)]
  if not train_pairs:
    raise ValueError(f"No training pairs ({len(pairs)} in all): the lab needs questions with "
                     f"both correct and incorrect samples; raise pairs.samples or "
                     f"task.train_size")
  tc = common.resolve_train(tc, len(train_pairs))
  cols, cut = reward_models.encode_pairs(student.tokenizer, train_pairs, tc.seq_len)
  if cut:
    logging.warning("preference_rm: %d of %d pairs end past seq_len=%d and are not trained",
                    cut, len(train_pairs), tc.seq_len)
  model = heads.RewardModel(student.model.config)
  result = fit.fit(tc, model=model, workdir=storage.join(workdir, "train"), mesh=mesh,
                   rules=rules, data=pipeline.array_dataset(cols, batch_size=tc.batch_size,
                                                            seed=seed),
                   eval_data=pipeline.array_eval_batches(reward_models.encode_pairs(
                       student.tokenizer, eval_pairs, tc.seq_len)[0],
                       batch_size=tc.batch_size) if eval_pairs else None,
                   objective=reward_models.BRADLEY_TERRY,
                   init_params=reward_models.init_params(student.params),
                   name="preference_rm")
  if not result.finished(tc):
    return None
  # The transform: the head's logits on (up to TRANSFORM_ROWS) training completions.
  scorer = reward_models.Scorer(model, result.params, student.tokenizer, mesh=mesh, rules=rules,
                                param_shardings=result.param_shardings)
  sample = [(p.prompt, t) for p in train_pairs[:TRANSFORM_ROWS // 2]
            for t in (p.chosen, p.rejected)]
  logits = scorer.final_logits([a for a, _ in sample], [b for _, b in sample])
  transform = reward_models.standardise_transform(logits[~np.isnan(logits)])
  reward_models.save(out_dir, model.config, result.params,
                     tokenizer_meta=student.meta.get("tokenizer"),
                     notes={"algorithm": "preference_rm", "objective": "bradley_terry",
                            "transform": transform, "pairs": len(train_pairs),
                            "pairs_cut": cut, "steps": result.step, "student": student.path})
  return out_dir


def bootstrap_interval(values, groups, *, seed: int, rounds: int = 2000
                       ) -> Optional[list[float]]:
  """95% percentile interval of the mean of `values`, resampling whole groups (the pairs of
  one question are not independent); None with fewer than two groups."""
  values, groups = np.asarray(values, np.float64), np.asarray(groups)
  ids = np.unique(groups)
  if len(ids) < 2:
    return None
  by = [values[groups == g] for g in ids]
  rng = np.random.default_rng(seed)
  means = []
  for _ in range(rounds):
    pick = rng.integers(0, len(by), len(by))
    means.append(np.concatenate([by[i] for i in pick]).mean())
  return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def pairwise_accuracy(scorer, pairs, *, seed: int) -> dict:
  """Share of pairs whose chosen completion scores higher (ties count half), overall and per
  pair kind, with 95% intervals. A pair with a side the model cannot score (an empty
  completion, or one ending past max_len: NaN) is left out and counted in `unscored`."""
  if not pairs:
    return {"pairs": 0}
  prompts = [p.prompt for p in pairs]
  chosen = scorer.final_logits(prompts, [p.chosen for p in pairs])
  rejected = scorer.final_logits(prompts, [p.rejected for p in pairs])
  scored = ~(np.isnan(chosen) | np.isnan(rejected))
  unscored = int((~scored).sum())
  pairs = [p for p, ok in zip(pairs, scored) if ok]
  chosen, rejected = chosen[scored], rejected[scored]
  if not pairs:
    return {"pairs": 0, "unscored": unscored}
  hit = np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))
  groups = [p.question if p.question >= 0 else i for i, p in enumerate(pairs)]
  out = {"pairs": len(pairs), "unscored": unscored, "accuracy": float(hit.mean()),
         "interval": bootstrap_interval(hit, groups, seed=seed),
         "margins": (chosen - rejected).tolist()}
  for why in sorted({p.why for p in pairs}):
    m = np.asarray([p.why == why for p in pairs])
    out[why] = {"pairs": int(m.sum()), "accuracy": float(hit[m].mean()),
                "interval": bootstrap_interval(hit[m], np.asarray(groups)[m], seed=seed)}
  return out


def solution_scores(scorer, test) -> dict:
  """Lab: does the score separate correct from incorrect test solutions, and does the
  model's best-of-S beat a random sample's accuracy?"""
  z = scorer.final_logits([s.prompt for s in test], [s.text for s in test])
  correct = np.asarray([s.correct for s in test], bool)
  by_q: dict = {}
  for i, s in enumerate(test):
    by_q.setdefault(s.question, []).append(i)
  picks = [max(idx, key=lambda i: (np.nan_to_num(z[i], nan=-np.inf), -i))
           for idx in by_q.values()]
  return {"auc": glore_exp.auc(z, correct), "sample_accuracy": float(correct.mean()),
          "best_of_accuracy": float(correct[picks].mean()),
          "oracle_best_of": float(np.mean([correct[idx].any() for idx in by_q.values()])),
          "solutions": len(test)}


def plot(report: dict, path: str) -> None:
  margins = np.asarray(report["test"].get("margins", []), np.float64)
  fig, ax = plt.subplots(figsize=(5, 3.2))
  if len(margins):
    ax.hist(margins, bins=30, color="tab:blue")
  ax.axvline(0.0, color="k", lw=0.8)
  acc = report["test"].get("accuracy", float("nan"))
  ax.set(xlabel="r(chosen) - r(rejected), held-out pairs", ylabel="pairs",
         title=f"Bradley-Terry reward model: pairwise accuracy {acc:.3f}")
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)


def report_markdown(r: dict) -> str:
  t = r["test"]

  def row(name, d):
    iv = d.get("interval")
    iv = "n/a" if iv is None else f"[{iv[0]:.3f}, {iv[1]:.3f}]"
    return f"| {name} | {d['pairs']} | {d.get('accuracy', float('nan')):.3f} | {iv} |"

  lines = [f"# Preference reward model ({r['source']}, seed {r['seed']})", "",
           f"Student `{r['student']}`; {r['data']['train_pairs']} training pairs, "
           f"{t['pairs']} held-out pairs ({t.get('unscored', 0)} more left out: a side the "
           f"model cannot score); transform {r['transform']}.", "",
           "| held-out pairs | n | pairwise accuracy | 95% interval (bootstrap over questions) |",
           "|---|---|---|---|", row("all", t)]
  lines += [row(k, v) for k, v in t.items() if isinstance(v, dict)]
  if r.get("solutions"):
    s = r["solutions"]
    auc = "n/a" if s["auc"] is None else f"{s['auc']:.3f}"
    lines += ["", f"Test solutions ({s['solutions']}): AUC of the score for correct vs "
              f"incorrect {auc}; accuracy of a sample {s['sample_accuracy']:.3f}, of the "
              f"model's best-of-{r['samples']} {s['best_of_accuracy']:.3f}, of an oracle's "
              f"{s['oracle_best_of']:.3f}."]
  lines += ["", f"Wall time {r['seconds']:.0f} s.", ""]
  return "\n".join(lines)


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["student", "data.train_path", "data.test_path", "pairs.samples",
                              "pairs.tie_break", "train.steps"])
  if not config.student:
    raise ValueError("--config.student is required: a model directory or 'asset:lab_student'")
  if bool(config.data.train_path) != bool(config.data.test_path):
    raise ValueError("Give both --config.data.train_path and --config.data.test_path "
                     "(preference JSONL files), or neither (lab pairs)")
  storage.makedirs(workdir)
  common.check_settings(workdir, config.to_dict(), may_change=RESUMABLE_KEYS, record=False,
                        filename=SETTINGS_FILE)
  report_path = storage.join(workdir, "report.json")
  done = common.finished_report(workdir, "report.json")
  if done is not None:
    return done
  t_start = time.time()
  mesh, rules = config_lib.make_mesh(config.mesh)
  from_files = bool(config.data.train_path)
  if not from_files:
    task = common.load_task(config.task)
  student = common.load_policy(config.student, mesh=mesh, rules=rules)
  common.check_settings(workdir, config.to_dict(), may_change=RESUMABLE_KEYS, record=True,
                        filename=SETTINGS_FILE)

  # -- Pairs.
  pc, test = config.pairs, []
  paths = {n: storage.join(workdir, f"{n}_pairs.jsonl") for n in ("train", "test")}
  if from_files:
    train_pairs = pairs_file(paths["train"], lambda: reward_models.read_pairs(
        config.data.train_path, config.data.limit))
    test_pairs = pairs_file(paths["test"], lambda: reward_models.read_pairs(
        config.data.test_path, config.data.limit))
  else:
    kw = dict(samples=pc.samples, mesh=mesh, rules=rules)
    train = lab_solutions(storage.join(workdir, "train_solutions.jsonl"), student, task.train,
                          pc, seed=config.seed, **kw)
    test = lab_solutions(storage.join(workdir, "test_solutions.jsonl"), student,
                         task.test[config.test_split], pc, seed=config.seed + 1, **kw)
    make = lambda data: reward_models.solution_pairs(  # pylint: disable=g-long-lambda
        data, max_per_question=pc.max_per_question, seed=config.seed, tie_break=pc.tie_break)
    train_pairs = pairs_file(paths["train"], lambda: make(train))
    test_pairs = pairs_file(paths["test"], lambda: make(test))
  logging.info("preference_rm: %d train pairs, %d test pairs", len(train_pairs), len(test_pairs))

  # -- Train.
  model_dir = train_model(train_pairs, student, config.train, workdir, seed=config.seed,
                          mesh=mesh, rules=rules)
  if model_dir is None:
    return {"stopped": "train"}

  # -- Evaluate.
  scorer = reward_models.load(model_dir, mesh=mesh, rules=rules, batch_size=pc.batch_size)
  report = {
      "algorithm": "preference_rm", "source": "files" if from_files else "lab",
      "seed": config.seed, "student": config.student, "samples": pc.samples,
      "data": {"train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
               "train_kinds": {w: sum(p.why == w for p in train_pairs)
                               for w in sorted({p.why for p in train_pairs})}},
      "transform": scorer.transform,
      "test": pairwise_accuracy(scorer, test_pairs, seed=config.seed),
      "solutions": solution_scores(scorer, test) if test else None,
      "truncated_scores": scorer.truncated, "seconds": time.time() - t_start,
  }
  storage.write_text(storage.join(workdir, "report.md"), report_markdown(report))
  plot(report, storage.join(workdir, "preference_rm.png"))
  storage.write_json(report_path, report)
  logging.info("preference_rm: held-out pairwise accuracy %.3f %s",
               report["test"].get("accuracy", float("nan")), report["test"].get("interval"))
  return report
