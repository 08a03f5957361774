"""GLoRe (thesis 3.4): outcome / step-wise reward models and global / local refinement.

  data       the student samples S solutions per train question and, for test, a greedy draft
             plus `best_of` samples per test question (one sampler call each); every step but
             the last gets K rollouts from its prefix (one call over all prefixes of a set).
             Lab items also get the oracle's first wrong step. train_solutions.jsonl,
             test_solutions.jsonl (atomic, all-or-nothing).
  rewards    ORM, balanced ORM and SORM (`reward_models`), each a reward head on the student's
             trunk trained by `fit` with the BCE objective; <workdir>/<kind>/model.
  refiners   global and local refinement records (`glore`), each an SFT of the student (the
             [BAD] marker added to its tokenizer); <workdir>/refine_<name>/model.
  evaluate   reward models' step and final-answer accuracy against rollout-made test labels
             and the oracle; first-error localisation; the refinement table (draft, global,
             local, ORM rerank of {draft, global, local}, ORM best-of-N, oracle rerank) overall
             and on incorrect drafts; maj@k / pass@k / rerank@k of the student with the ORM.
             Each result is cached in glore_evals.json as it lands; report.md, report.json and
             glore.png are written last.

Re-running on a finished workdir does nothing new; a workdir made with other settings is
refused (glore_settings.json), naming the keys that differ.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position

from qdc_jax import config_lib  # pylint: disable=wrong-import-position
from qdc_jax import fit  # pylint: disable=wrong-import-position
from qdc_jax import sampling  # pylint: disable=wrong-import-position
from qdc_jax import storage  # pylint: disable=wrong-import-position
from qdc_jax.data import answers  # pylint: disable=wrong-import-position
from qdc_jax.data import arith  # pylint: disable=wrong-import-position
from qdc_jax.data import pipeline  # pylint: disable=wrong-import-position
from qdc_jax.models import heads  # pylint: disable=wrong-import-position
from qdc_jax.rl import common  # pylint: disable=wrong-import-position
from qdc_jax.rl import glore  # pylint: disable=wrong-import-position
from qdc_jax.rl import rcrl  # pylint: disable=wrong-import-position
from qdc_jax.rl import reward_models  # pylint: disable=wrong-import-position

SETTINGS_FILE = "glore_settings.json"
EVALS_FILE = "glore_evals.json"
RESUMABLE_KEYS = ("rm_train.stop_at_step", "refine_train.stop_at_step")
PAD_MULTIPLE = 128  # prompt lengths padded to a multiple of this: few sampler shapes
REFINERS = ("global", "local")


def check_settings(config, workdir: str, record: bool = False) -> None:
  common.check_settings(workdir, config.to_dict(), may_change=RESUMABLE_KEYS, record=record,
                        filename=SETTINGS_FILE)


# ---------------------------------------------------------------------------------------------
# Data: solutions, their step rollouts, the oracle.


def build_solutions(policy, items, gc, *, greedy_draft: bool, seed: int, is_lab: bool, mesh,
                    rules) -> list[reward_models.Solution]:
  """Per item: [greedy draft +] S samples; K rollouts per non-final step of each (none when
  `gc.rollouts_per_step` is 0)."""
  key = jax.random.PRNGKey(seed)
  kw = dict(model=policy.model, tokenizer=policy.tokenizer, batch_size=gc.batch_size,
            mesh=mesh, rules=rules, param_shardings=policy.shardings,
            pad_multiple=PAD_MULTIPLE, slots=gc.slots, stop_strings=gc.stop_strings)
  prompts = [it.prompt for it in items]
  sp = sampling.SamplingParams(max_new_tokens=gc.max_new_tokens, num_samples=gc.samples,
                               temperature=gc.temperature)
  t0 = time.perf_counter()
  texts = sampling.generate_text(policy.params, prompts, sp=sp, rng=key, **kw)
  if greedy_draft:
    greedy = sampling.generate_text(
        policy.params, prompts, sp=sampling.SamplingParams(max_new_tokens=gc.max_new_tokens,
                                                           greedy=True),
        rng=jax.random.fold_in(key, 2), **kw)
    texts = [g + t for g, t in zip(greedy, texts)]
  flat = [(q, s, rcrl.split_steps(t)) for q, row in enumerate(texts) for s, t in enumerate(row)]
  t1 = time.perf_counter()
  logging.info("glore data: %d solutions in %.1fs; rolling out each step x %d", len(flat),
               t1 - t0, gc.rollouts_per_step)
  if gc.rollouts_per_step:
    groups = rcrl.step_rollouts(
        policy.params, [items[q].prompt for q, _, _ in flat], [steps for _, _, steps in flat],
        sp=dataclasses.replace(sp, num_samples=gc.rollouts_per_step),
        rng=jax.random.fold_in(key, 1), **kw)
    logging.info("glore data: rollouts in %.1fs", time.perf_counter() - t1)
  else:  # solutions only (the preference pairs need no rollouts)
    groups = [[[] for _ in steps[:-1]] for _, _, steps in flat]
  out = []
  for j, (q, s, steps) in enumerate(flat):
    it = items[q]
    checks, verifiers = reward_models.check_rollouts(steps, groups[j], it.answer,
                                                     answers.is_correct)
    oracle = arith.first_wrong_step(arith.parse(it.question), steps) if is_lab else None
    out.append(reward_models.Solution(
        question=q, sample=s, prompt=it.prompt, answer=it.answer, steps=steps,
        correct=bool(answers.is_correct("\n".join(steps), it.answer)),
        rollout_checks=checks, verifiers=verifiers, oracle_first_wrong=oracle))
  return out


def solutions(path, build) -> list[reward_models.Solution]:
  """The solutions at `path`, built and written (atomically) first if absent."""
  if not storage.exists(path):
    storage.write_rows(path, [s.to_json() for s in build()])
  return reward_models.read_solutions(path)


# ---------------------------------------------------------------------------------------------
# Training: reward models and refiners (each resumable through fit's checkpoints).


def held_out(q: int) -> bool:
  """Questions whose rows only measure the held-out loss (a tenth)."""
  return q % 10 == 9


def train_reward_model(kind, data, student, tc, workdir, *, seed, consistency, mesh, rules):
  """Trains one reward model; returns its directory, or None if stopped early."""
  out_dir = storage.join(workdir, kind, "model")
  if storage.exists(storage.join(out_dir, "model.json")):
    return out_dir
  idx, labels, mask = reward_models.training_labels(data, kind, seed, consistency)
  if not any(any(m) for m in mask):
    raise ValueError(f"No {kind} training labels ({len(data)} solutions): balancing needs both "
                     f"correct and incorrect samples; raise glore.train.samples or "
                     f"task.train_size")
  rows = [(data[i].prompt, data[i].steps, l, m) for i, l, m in zip(idx, labels, mask)]
  train_rows = [r for i, r in zip(idx, rows) if not held_out(data[i].question)]
  eval_rows = [r for i, r in zip(idx, rows) if held_out(data[i].question)]
  tc = common.resolve_train(tc, len(train_rows))
  cols, cut = reward_models.encode(student.tokenizer, train_rows, tc.seq_len)
  eval_cols, _ = reward_models.encode(student.tokenizer, eval_rows, tc.seq_len)
  if cut:
    logging.warning("%s: %d step labels past seq_len=%d are not trained", kind, cut, tc.seq_len)
  model = heads.RewardModel(student.model.config)
  result = fit.fit(tc, model=model, workdir=storage.join(workdir, kind), mesh=mesh,
                   rules=rules, data=pipeline.array_dataset(cols, batch_size=tc.batch_size,
                                                            seed=seed),
                   eval_data=pipeline.array_eval_batches(eval_cols, batch_size=tc.batch_size)
                   if eval_rows else None,
                   objective=reward_models.OBJECTIVE,
                   init_params=reward_models.init_params(student.params), name=kind)
  if not result.finished(tc):
    return None
  reward_models.save(out_dir, model.config, result.params,
                     tokenizer_meta=student.meta.get("tokenizer"),
                     notes={"algorithm": kind, "objective": "bce",
                            "transform": {"kind": "sigmoid"}, "rows": len(train_rows),
                            "steps": result.step,
                            "labels": int(np.sum([np.sum(m) for m in mask])),
                            "labels_cut": cut, "student": student.path})
  return out_dir


def train_refiner(name, records, student, tc, workdir, *, mesh, rules):
  out_dir = storage.join(workdir, f"refine_{name}", "model")
  if storage.exists(storage.join(out_dir, "model.json")):
    return out_dir
  if not records:
    raise ValueError(f"No {name} refinement records: the student found no correct sample for "
                     f"any question with an incorrect one; use more glore.train.samples")
  old_meta = student.meta.get("tokenizer") or {}
  tok_meta, tokenizer = rcrl.extend_tokenizer(old_meta, (glore.MARKER,),
                                              student.model.config.vocab_size,
                                              directory=workdir)
  tc = common.resolve_train(tc, len(records))
  result = fit.fit(tc, model=student.model, train_records=records, tokenizer=tokenizer,
                   workdir=storage.join(workdir, f"refine_{name}"), mesh=mesh, rules=rules,
                   init_params=rcrl.init_label_embeddings(student.params, old_meta, tok_meta),
                   name=f"refine_{name}")
  if not result.finished(tc):
    return None
  common.export(out_dir, dataclasses.replace(student, meta={**student.meta,
                                                            "tokenizer": tok_meta}),
                result.params, notes={"algorithm": f"glore_{name}", "records": len(records),
                                      "steps": result.step, "student": student.path})
  return out_dir


# ---------------------------------------------------------------------------------------------
# Evaluation.


def auc(scores, labels) -> Optional[float]:
  """Area under the ROC curve (Mann-Whitney, ties counted half); None with one class only.
  Threshold-free, so models trained on balanced labels are not penalised for their prior."""
  s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
  keep = ~np.isnan(s)
  s, y = s[keep], y[keep]
  pos, neg = s[y], s[~y]
  if not len(pos) or not len(neg):
    return None
  greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return float(greater / (len(pos) * len(neg)))


def reward_model_accuracy(scores, test, *, has_oracle: bool) -> dict:
  """Step-level accuracy (P > 0.5) and AUC against SORM-style test labels (rollouts,
  post-processed) and, on the lab, the oracle; final-answer accuracy and AUC (the last step's
  score against the solution's correctness)."""
  sc_all, y_sorm, y_oracle, last, y_final = [], [], [], [], []
  for sc, s in zip(scores, test):
    if not s.steps:
      continue
    sc_all += list(sc)
    y_sorm += reward_models.sorm_labels(s)
    if has_oracle:
      y_oracle += reward_models.oracle_labels(s)
    last.append(sc[-1])
    y_final.append(s.correct)
  sc_all, last = np.asarray(sc_all), np.asarray(last)
  acc = lambda p, y: float(np.mean((p > 0.5) == np.asarray(y, bool))) if len(y) else None
  return {"step_accuracy_rollout_labels": acc(sc_all, y_sorm),
          "step_accuracy_oracle": acc(sc_all, y_oracle) if has_oracle else None,
          "final_accuracy": acc(last, y_final),
          "step_auc_rollout_labels": auc(sc_all, y_sorm),
          "step_auc_oracle": auc(sc_all, y_oracle) if has_oracle else None,
          "final_auc": auc(last, y_final),
          "steps": len(y_sorm), "solutions": len(y_final)}


def localisation(scores, drafts) -> dict:
  """On incorrect drafts (lab): how often the first step scored <= 0.5 is the oracle's first
  wrong step (an unfinished draft's error is its last step: it stops without an answer)."""
  hits, none = [], 0
  for sc, s in zip(scores, drafts):
    if s.correct or not s.steps or s.oracle_first_wrong is None:
      continue
    pred = glore.first_error(sc)
    none += pred is None
    hits.append(pred == _true_first_error(s))
  return {"accuracy": float(np.mean(hits)) if hits else None, "drafts": len(hits),
          "no_error_found": none}


def _true_first_error(s) -> int:
  return min(s.oracle_first_wrong, len(s.steps) - 1)


def baseline_localisation(drafts) -> dict:
  """Trivial guesses for comparison: always the first step, always the last."""
  rows = [s for s in drafts if not s.correct and s.steps and s.oracle_first_wrong is not None]
  if not rows:
    return {"first_step": None, "last_step": None}
  return {"first_step": float(np.mean([_true_first_error(s) == 0 for s in rows])),
          "last_step": float(np.mean([_true_first_error(s) == len(s.steps) - 1
                                      for s in rows]))}


def refine(refiner, drafts, bad_at, *, gc, mesh, rules) -> list[str]:
  """Greedy refinements of the drafts with bad_at[i] set (the others keep their draft)."""
  todo = [i for i, b in enumerate(bad_at) if b is not None]
  prompts = [glore.refine_prompt(drafts[i].prompt, drafts[i].steps, bad_at[i]) for i in todo]
  out = [d.text for d in drafts]
  texts = sampling.generate_text(
      refiner.params, prompts, sp=sampling.SamplingParams(max_new_tokens=gc.max_new_tokens,
                                                          greedy=True),
      rng=jax.random.PRNGKey(0), model=refiner.model, tokenizer=refiner.tokenizer,
      batch_size=gc.batch_size, mesh=mesh, rules=rules, param_shardings=refiner.shardings,
      pad_multiple=PAD_MULTIPLE, stop_strings=gc.stop_strings) if prompts else []
  for i, t in zip(todo, texts):
    out[i] = "\n".join(rcrl.split_steps(t[0]))
  return out


def _best(scores) -> int:
  """Index of the highest score (NaN never wins; ties: the first)."""
  s = np.asarray(scores, np.float64)
  return int(np.argmax(np.where(np.isnan(s), -np.inf, s)))


def refinement_table(drafts, candidates: dict, orm_scores: dict, best_of: list) -> dict:
  """Accuracy of each strategy, overall and on incorrect drafts."""
  ok = {name: np.asarray([answers.is_correct(t, d.answer) for t, d in zip(texts, drafts)])
        for name, texts in candidates.items()}
  stacked = np.stack([orm_scores[n] for n in candidates])
  pick = np.argmax(np.where(np.isnan(stacked), -np.inf, stacked), axis=0)
  names = list(candidates)
  rows = {name: ok[name] for name in names}
  rows["orm_rerank(draft, global, local)"] = np.asarray(
      [ok[names[p]][i] for i, p in enumerate(pick)])
  rows["oracle_rerank(draft, global, local)"] = np.any(np.stack([ok[n] for n in names]), 0)
  rows[f"orm_best_of_{len(best_of[0][0]) if best_of else 0}"] = np.asarray(
      [bool(texts) and answers.is_correct(texts[_best(sc)], d.answer)
       for (texts, sc), d in zip(best_of, drafts)])
  wrong = ~ok["draft"]
  return {name: {"all": float(v.mean()), "incorrect_drafts": float(v[wrong].mean())
                 if wrong.any() else None} for name, v in rows.items()} | {
                     "counts": {"drafts": len(drafts), "incorrect_drafts": int(wrong.sum())}}


def plot(report: dict, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  table = {k: v for k, v in report["refinement"].items() if k != "counts"}
  names = list(table)
  x = np.arange(len(names))
  for j, col in enumerate(("all", "incorrect_drafts")):
    axes[0].bar(x + 0.4 * j, [table[n][col] or 0.0 for n in names], 0.4, label=col)
  axes[0].set_xticks(x + 0.2)
  axes[0].set_xticklabels([n.replace("(draft, global, local)", "(d,g,l)") for n in names],
                          rotation=30, ha="right", fontsize=8)
  axes[0].set_ylim(0, 1)
  axes[0].set_ylabel("accuracy")
  axes[0].set_title("refinement")
  axes[0].legend(fontsize=8)
  rms = report["reward_models"]
  cols = ("step_accuracy_rollout_labels", "step_accuracy_oracle", "final_accuracy")
  x = np.arange(len(cols))
  for j, (kind, m) in enumerate(rms.items()):
    axes[1].bar(x + 0.27 * j, [m[c] or 0.0 for c in cols], 0.27, label=kind)
  axes[1].set_xticks(x + 0.27)
  axes[1].set_xticklabels(["step (rollout labels)", "step (oracle)", "final answer"], fontsize=8)
  axes[1].set_ylim(0, 1)
  axes[1].set_title("reward models on test solutions")
  axes[1].legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)


def report_markdown(r: dict) -> str:
  lines = [f"# GLoRe on {r['task']} (seed {r['seed']})", "",
           f"Student `{r['student']}`; {r['data']['train_solutions']} train solutions, "
           f"{r['data']['test_solutions']} test solutions, K = {r['k_rollouts']} rollouts per "
           f"step ({r['data']['rollouts']} rollouts in all). Stage wall times: "
           + ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["stage_seconds"].items())
           + f"; this invocation {r['seconds'] / 60:.1f} min.", "",
           "## Reward models on test solutions", "",
           "Accuracy at P > 0.5, AUC in brackets (threshold-free: balanced training moves a "
           "model's prior to 0.5, which costs accuracy on an unbalanced test set).", "",
           "| model | step acc. (rollout labels) | step acc. (oracle) | final-answer acc. | "
           "first-error localisation |", "|---|---|---|---|---|"]
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  for kind, m in r["reward_models"].items():
    loc = r["localisation"].get(kind)
    lines.append(f"| {kind} | {fmt(m['step_accuracy_rollout_labels'])} "
                 f"[{fmt(m['step_auc_rollout_labels'])}] | {fmt(m['step_accuracy_oracle'])} "
                 f"[{fmt(m['step_auc_oracle'])}] | {fmt(m['final_accuracy'])} "
                 f"[{fmt(m['final_auc'])}] | " + (f"{fmt(loc['accuracy'])} ({loc['drafts']} "
                                                  f"drafts) |" if loc else "- |"))
  b = r["localisation"].get("baselines")
  if b:
    lines += ["", f"Localisation baselines: always the first step {fmt(b['first_step'])}, "
              f"always the last step {fmt(b['last_step'])}."]
  lines += ["",
            "## Refinement (greedy drafts of the test questions)", "",
            "| strategy | accuracy | on incorrect drafts |", "|---|---|---|"]
  for name, v in r["refinement"].items():
    if name != "counts":
      lines.append(f"| {name} | {fmt(v['all'])} | {fmt(v['incorrect_drafts'])} |")
  c = r["refinement"]["counts"]
  lines += ["", f"{c['drafts']} drafts, {c['incorrect_drafts']} incorrect.", "",
            "## The student with the ORM as a verifier", "",
            "| " + " | ".join(r["student_eval"]) + " |",
            "|" + "---|" * len(r["student_eval"]),
            "| " + " | ".join(fmt(v) if isinstance(v, float) or v is None else str(v)
                              for v in r["student_eval"].values()) + " |", ""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["student", "task.name", "glore.train.samples",
                              "glore.rollouts_per_step", "rm_train.steps", "refine_train.steps",
                              "eval.k", "test_split"])
  if not config.student:
    raise ValueError("--config.student is required: a model directory or 'asset:lab_student'")
  storage.makedirs(workdir)
  check_settings(config, workdir)
  report_path = storage.join(workdir, "report.json")
  done = common.finished_report(workdir, "report.json")
  if done is not None:
    return done
  t_start = time.time()
  gc = config.glore
  mesh, rules = config_lib.make_mesh(config.mesh)
  task = common.load_task(config.task)
  if config.test_split not in task.test:
    raise ValueError(f"test_split={config.test_split!r} is not a test split of task "
                     f"{config.task.name!r}: one of {sorted(task.test)}")
  test_items = task.test[config.test_split]
  is_lab = config.task.name == "lab"
  student = common.load_policy(config.student, mesh=mesh, rules=rules)
  check_settings(config, workdir, record=True)
  evals = common.ResultCache(storage.join(workdir, EVALS_FILE))

  # -- Data.
  kw = dict(gc=None, is_lab=is_lab, mesh=mesh, rules=rules)
  kw_train = {**kw, "gc": _sampling(gc, gc.train)}
  kw_test = {**kw, "gc": _sampling(gc, gc.test)}
  paths = {n: storage.join(workdir, f"{n}_solutions.jsonl") for n in ("train", "test")}
  train = evals.timed("train_data", paths["train"], lambda: solutions(paths["train"], lambda: (
      build_solutions(student, task.train, greedy_draft=False, seed=config.seed, **kw_train))))
  test = evals.timed("test_data", paths["test"], lambda: solutions(paths["test"], lambda: (
      build_solutions(student, test_items, greedy_draft=True, seed=config.seed + 1,
                      **kw_test))))
  drafts = [s for s in test if s.sample == 0]  # the greedy draft of each test question
  best_of = [[s for s in test if s.question == d.question and s.sample > 0] for d in drafts]

  # -- Reward models.
  rm_dirs = {}
  for kind in reward_models.LABEL_KINDS:
    rm_dirs[kind] = evals.timed(kind, storage.join(workdir, kind, "model", "model.json"),
                          lambda k=kind: train_reward_model(
                              k, train, student, config.rm_train, workdir, seed=config.seed,
                              consistency=gc.consistency, mesh=mesh, rules=rules))
    if rm_dirs[kind] is None:
      return {"stopped": kind}
  # -- Refiners.
  records = {"global": glore.global_records(train, config.seed),
             "local": glore.local_records(train, config.seed)}
  for name in REFINERS:
    storage.write_rows(storage.join(workdir, f"refine_{name}.jsonl"), records[name])
  ref_dirs = {}
  for name in REFINERS:
    ref_dirs[name] = evals.timed(f"refine_{name}",
                           storage.join(workdir, f"refine_{name}", "model", "model.json"),
                           lambda n=name: train_refiner(n, records[n], student,
                                                        config.refine_train, workdir,
                                                        mesh=mesh, rules=rules))
    if ref_dirs[name] is None:
      return {"stopped": f"refine_{name}"}

  # -- Evaluate. Models load only for results not cached yet (one at a time at full scale).
  loaded: dict = {}

  def scorer(kind):
    if kind not in loaded:
      loaded.clear()
      loaded[kind] = reward_models.load(rm_dirs[kind], mesh=mesh, rules=rules,
                                        batch_size=gc.batch_size)
    return loaded[kind]

  step_scores = {k: [np.asarray(x, np.float64) for x in evals.get(
      f"scores/{k}", lambda k=k: [list(map(float, x)) for x in scorer(k).step_scores(
          [t.prompt for t in test], [t.steps for t in test])])] for k in rm_dirs}
  draft_idx = [i for i, s in enumerate(test) if s.sample == 0]
  rm_acc = {k: reward_model_accuracy(sc, test, has_oracle=is_lab)
            for k, sc in step_scores.items()}
  loc = {}
  if is_lab:  # only the lab knows the first wrong step
    loc = {k: localisation([sc[i] for i in draft_idx], drafts) for k, sc in step_scores.items()}
    loc["baselines"] = baseline_localisation(drafts)

  sorm_draft = [step_scores["sorm"][i] for i in draft_idx]
  bad_at = {"global": [0 if d.steps else None for d in drafts],
            "local": [glore.first_error(sc) if d.steps else None
                      for sc, d in zip(sorm_draft, drafts)]}
  refined = {}
  for name in REFINERS:
    refined[name] = evals.get(f"refined/{name}", lambda n=name: refine(
        common.load_policy(ref_dirs[n], mesh=mesh, rules=rules), drafts, bad_at[n],
        gc=kw_test["gc"], mesh=mesh, rules=rules))
  candidates = {"draft": [d.text for d in drafts], **refined}
  orm_scores = {n: np.asarray(evals.get(f"orm/{n}", lambda t=texts: list(map(
      float, scorer("orm").final_scores([d.prompt for d in drafts], t)))), np.float64)
                for n, texts in candidates.items()}
  where = {(s.question, s.sample): i for i, s in enumerate(test)}
  best = [([s.text for s in row], [float(step_scores["orm"][where[s.question, s.sample]][-1])
                                   if s.steps else 0.5 for s in row]) for row in best_of]
  table = refinement_table(drafts, candidates, orm_scores, best)
  student_eval = evals.get("student_eval", lambda: common.headline(common.evaluate(
      student.params, test_items, policy=student, ec=config.eval, mesh=mesh, rules=rules,
      scorer=scorer("orm").final_scores)[0], config.eval.k))
  loaded.clear()

  report = {
      "algorithm": "glore", "task": config.task.name, "split": config.test_split,
      "seed": config.seed, "student": config.student, "k_rollouts": gc.rollouts_per_step,
      "data": {"train_solutions": len(train), "test_solutions": len(test),
               "train_correct": float(np.mean([s.correct for s in train])),
               "rollouts": sum(len(g) for s in train + test for g in s.rollout_checks),
               "refine_records": {n: len(r) for n, r in records.items()},
               "sorm_positive_share": float(np.mean([l for s in train
                                                     for l in reward_models.sorm_labels(s)]))},
      "reward_models": rm_acc, "localisation": loc, "refinement": table,
      "local_refinement_applied": int(sum(b is not None for b in bad_at["local"])),
      "student_eval": student_eval, "seconds": time.time() - t_start,  # this invocation
      "stage_seconds": evals.values.get("seconds", {}),  # each stage, when it ran
  }
  storage.write_text(storage.join(workdir, "report.md"), report_markdown(report))
  plot(report, storage.join(workdir, "glore.png"))
  storage.write_json(report_path, report)
  logging.info("glore: %s", report["refinement"])
  return report


@dataclasses.dataclass(frozen=True)
class Sampling:
  """The sampler settings of one data set (train or test)."""
  batch_size: int
  slots: int
  max_new_tokens: int
  temperature: float
  samples: int
  rollouts_per_step: int
  stop_strings: tuple


def _sampling(gc, part) -> Sampling:
  return Sampling(batch_size=gc.batch_size, slots=gc.slots, max_new_tokens=gc.max_new_tokens,
                  temperature=gc.temperature, samples=part.samples,
                  rollouts_per_step=gc.rollouts_per_step,
                  stop_strings=tuple(gc.stop_strings))
