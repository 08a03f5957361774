"""Return-conditioned RL (thesis 3.3), offline, decision-transformer style.

  data      the policy samples S solutions per train question (one sampler call); every step
            but the last gets K rollouts from its prefix (one sampler call over all prefixes of
            the data set); a step is [GOOD] if its mean rollout return >= T, else [BAD] (the
            last step's return is the solution's own correctness). Written atomically to
            rcrl_data.jsonl, then balanced (config.rcrl.balance) into rcrl_train.jsonl.
  train     fine-tune the BASE params (not the policy's: the thesis resets, as for EI) on the
            labelled text with the SFT hyper-parameters; the shared `fit` loop, resumable. The
            char tokenizer gains the label characters (append-only); export <workdir>/model.
  evaluate  val and test splits, sampled step by step conditioned on [GOOD] (labels stripped
            before scoring; `rcrl.conditioned_generate` forces the label before every line in
            one KV-cached sampler call): maj@1 (greedy), maj@K, pass@K at T=0.7, diversity;
            the base and the RCRL model sampled unconditionally for comparison. Each result is cached in
            rcrl_evals.json as it lands, rl_report.json is written last.

Re-running on a finished workdir does nothing new; a workdir made with other settings is
refused (rcrl_settings.json), naming the keys that differ.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position

from qdc_jax import config_lib  # pylint: disable=wrong-import-position
from qdc_jax import fit  # pylint: disable=wrong-import-position
from qdc_jax import sampling  # pylint: disable=wrong-import-position
from qdc_jax import storage
from qdc_jax.data import answers  # pylint: disable=wrong-import-position
from qdc_jax.eval import metrics  # pylint: disable=wrong-import-position
from qdc_jax.rl import common  # pylint: disable=wrong-import-position
from qdc_jax.rl import rcrl  # pylint: disable=wrong-import-position

SETTINGS_FILE = "rcrl_settings.json"
DATA_FILE = "rcrl_data.jsonl"
TRAIN_FILE = "rcrl_train.jsonl"
EVALS_FILE = "rcrl_evals.json"
# Knobs that may change between a run and its resume (they do not change any result).
RESUMABLE_KEYS = ("train.stop_at_step",)
# Prompt lengths are padded to a multiple of this: few compiled sampler shapes across calls.
PAD_MULTIPLE = 128


# ---------------------------------------------------------------------------------------------
# Workdir bookkeeping.


def check_settings(config, workdir: str, record: bool = False) -> None:
  """Refuse a workdir made with other settings; `record` the settings of a fresh one (done
  right before its first result is written, so a run that fails on a bad flag first does not
  pin the workdir to that flag)."""
  common.check_settings(workdir, config.to_dict(), may_change=RESUMABLE_KEYS, record=record,
                        filename=SETTINGS_FILE)


# ---------------------------------------------------------------------------------------------
# Data: solutions, rollouts, labels.


def build_dataset(policy: common.Policy, items, rc, *, mesh, rules) -> list[rcrl.Labelled]:
  """S solutions per item, K rollouts per non-final step, labels; two sampler calls in all."""
  key = jax.random.PRNGKey(rc.seed)
  common_kw = dict(model=policy.model, tokenizer=policy.tokenizer, batch_size=rc.batch_size,
                   mesh=mesh, rules=rules, param_shardings=policy.shardings,
                   pad_multiple=PAD_MULTIPLE)
  sp = sampling.SamplingParams(max_new_tokens=rc.max_new_tokens,
                               num_samples=rc.samples_per_question, temperature=rc.temperature)
  t0 = time.perf_counter()
  sols = sampling.generate_text(policy.params, [it.prompt for it in items], sp=sp, rng=key,
                                **common_kw)
  flat = [(q, s, text) for q, texts in enumerate(sols) for s, text in enumerate(texts)]
  t1 = time.perf_counter()
  logging.info("rcrl data: %d solutions in %.1fs; rolling out each step x %d", len(flat),
               t1 - t0, rc.rollouts_per_step)
  groups = rcrl.step_rollouts(
      policy.params, [items[q].prompt for q, _, _ in flat],
      [rcrl.split_steps(text) for _, _, text in flat],
      sp=dataclasses.replace(sp, num_samples=rc.rollouts_per_step),
      rng=jax.random.fold_in(key, 1), **common_kw)
  logging.info("rcrl data: rollouts in %.1fs", time.perf_counter() - t1)
  return [rcrl.label_solution(question=q, sample=s, prompt=items[q].prompt,
                              answer=items[q].answer, solution=text, rollouts=groups[j],
                              is_correct=answers.is_correct, threshold=rc.threshold,
                              keep_rollouts=rc.keep_rollouts)
          for j, (q, s, text) in enumerate(flat)]


def rollouts_drawn(data, k: int) -> int:
  """Samples drawn for data and labels: every solution plus K per non-final step."""
  return len(data) + k * sum(max(len(d.steps) - 1, 0) for d in data)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def score(params, items, *, model, tokenizer, shardings, ec, conditioned: bool, sc, mesh,
          rules) -> dict:
  """Greedy + K samples per item (conditioned on [GOOD] step by step, or plain), labels
  stripped, `metrics.summarize`d: {"metrics", "examples"}. Plain samples also report how they
  use the labels."""
  prompts, refs = [it.prompt for it in items], [it.answer for it in items]
  rng = jax.random.PRNGKey(ec.seed)
  kw = dict(model=model, tokenizer=tokenizer, batch_size=ec.batch_size, mesh=mesh,
            rules=rules, param_shardings=shardings, pad_multiple=PAD_MULTIPLE)
  t0 = time.perf_counter()
  if conditioned:
    step_kw = dict(step_tokens=sc.step_tokens, max_steps=sc.max_steps,
                   max_new_tokens=ec.max_new_tokens, **kw)
    greedy = rcrl.conditioned_generate(params, prompts, greedy=True, rng=rng, **step_kw)
    samples = rcrl.conditioned_generate(params, prompts, num_samples=ec.k,
                                        temperature=ec.temperature,
                                        rng=jax.random.fold_in(rng, 1), **step_kw)
  else:
    greedy = sampling.generate_text(
        params, prompts, sp=sampling.SamplingParams(max_new_tokens=ec.max_new_tokens,
                                                    greedy=True), rng=rng, **kw)
    samples = sampling.generate_text(
        params, prompts, sp=sampling.SamplingParams(max_new_tokens=ec.max_new_tokens,
                                                    num_samples=ec.k,
                                                    temperature=ec.temperature),
        rng=jax.random.fold_in(rng, 1), **kw)
  seconds = time.perf_counter() - t0
  strip = rcrl.strip_labels
  m = metrics.summarize([[strip(s) for s in row] for row in samples], refs,
                        tuple(k for k in ec.ks if k <= ec.k),
                        greedy=[strip(g[0]) for g in greedy])
  m["seconds"] = seconds
  if not conditioned:
    # The thesis's remark: unconditioned, the model writes [BAD] and then valid steps anyway.
    flat = [(s, ref) for row, ref in zip(samples, refs) for s in row]
    with_bad = [answers.is_correct(strip(s), ref) for s, ref in flat if rcrl.BAD in s]
    m["labels/with_bad_share"] = len(with_bad) / max(len(flat), 1)
    m["labels/with_bad_accuracy"] = float(np.mean(with_bad)) if with_bad else None
    m["labels/with_good_share"] = float(np.mean([rcrl.GOOD in s for s, _ in flat]))
  examples = [{"prompt": p, "reference": r, "greedy": g[0], "sample": s[0]}
              for p, r, g, s in list(zip(prompts, refs, greedy, samples))[:3]]
  return {"metrics": m, "examples": examples}


def _headline(entry: dict) -> dict:
  """The log line of a `score` result: its maj / pass / greedy numbers."""
  return {k: round(v, 3) for k, v in entry["metrics"].items()
          if isinstance(v, float) and k.startswith(("maj", "pass", "greedy"))}


def plot(results: dict, k: int, path: str) -> None:
  """Per test split: base vs RCRL conditioned on [GOOD] vs RCRL unconditioned."""
  splits = sorted(results)
  cols = ["maj@1", f"maj@{k}", f"pass@{k}"]
  fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(4.5 * max(len(splits), 1), 3.4),
                           squeeze=False)
  for ax, split in zip(axes[0], splits):
    runs = results[split]
    width = 0.8 / max(len(runs), 1)
    for j, (name, h) in enumerate(runs.items()):
      ax.bar(np.arange(len(cols)) + j * width, [h.get(c) or 0.0 for c in cols], width,
             label=name)
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2)
    ax.set_xticklabels(cols)
    ax.set_ylim(0, 1)
    ax.set_title(split)
    ax.grid(alpha=0.3, axis="y")
  axes[0][0].set_ylabel("accuracy")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["policy", "base", "task.name", "rcrl.samples_per_question",
                              "rcrl.rollouts_per_step", "rcrl.balance", "train.steps",
                              "eval.k", "sample.step_tokens", "compare_on_test"])
  for key in ("policy", "base"):
    if not config[key]:
      raise ValueError(f"--config.{key} is required: a model directory (e.g. "
                       f"<ei workdir>/model) or 'asset:lab_student'")
  if config.rcrl.balance not in rcrl.BALANCE_MODES:
    raise ValueError(f"Unknown rcrl.balance {config.rcrl.balance!r}; choose one of "
                     f"{', '.join(rcrl.BALANCE_MODES)}")
  storage.makedirs(workdir)
  check_settings(config, workdir)
  report_path = storage.join(workdir, common.REPORT_FILE)
  done = common.finished_report(workdir)
  if done is not None:
    return done
  rc, ec, sc = config.rcrl, config.eval, config.sample
  t_start = time.time()
  mesh, rules = config_lib.make_mesh(config.mesh)
  task = common.load_task(config.task)
  base = common.load_policy(config.base, mesh=mesh, rules=rules)
  same = common.resolve_model_dir(config.policy) == common.resolve_model_dir(config.base)
  tok_meta, tokenizer = rcrl.extend_tokenizer(base.meta.get("tokenizer") or {}, rcrl.LABELS,
                                              base.model.config.vocab_size, directory=workdir)
  evals = common.ResultCache(storage.join(workdir, EVALS_FILE))
  cached = lambda name, fn: evals.get(name, fn, describe=_headline)["metrics"]

  # -- Data: labelled solutions (all-or-nothing, atomic), then the balanced records.
  data_path = storage.join(workdir, DATA_FILE)
  if not storage.exists(data_path):
    policy = base if same else common.load_policy(config.policy, mesh=mesh, rules=rules)
    check_settings(config, workdir, record=True)
    t0 = time.perf_counter()
    data = build_dataset(policy, task.train, rc, mesh=mesh, rules=rules)
    storage.write_rows(data_path, [d.to_json() for d in data])
    evals.put("data_seconds", time.perf_counter() - t0)
    del policy
  data = [rcrl.Labelled.from_json(r) for r in storage.read_rows(data_path)]
  chosen, stats = rcrl.balance(data, rc.balance, rc.seed)
  records = [rcrl.make_record(data[i], cut) for i, cut in chosen]
  if not records:
    raise ValueError(f"No training records after balance={rc.balance!r} ({stats})")
  storage.write_rows(storage.join(workdir, TRAIN_FILE), records)
  n_rollouts = rollouts_drawn(data, rc.rollouts_per_step)
  logging.info("rcrl labels: %s; %d rollouts drawn", stats, n_rollouts)

  # -- The base before training (round 0 of the curve).
  base_kw = dict(model=base.model, tokenizer=base.tokenizer, shardings=base.shardings, ec=ec,
                 conditioned=False, sc=sc, mesh=mesh, rules=rules)
  base_val = cached("base/val", lambda: score(base.params, task.val, **base_kw))
  base_test = {s: cached(f"base/{s}", lambda its=its: score(base.params, its, **base_kw))
               for s, its in task.test.items() if config.compare_on_test}

  # -- Train from the base params, export with the label-writing tokenizer.
  model_dir = storage.join(workdir, "model")
  tc = common.resolve_train(config.train, len(records))
  if not storage.exists(storage.join(model_dir, "model.json")):
    t0 = time.perf_counter()
    init = base.params
    if rc.init_label_embeddings:
      init = rcrl.init_label_embeddings(init, base.meta.get("tokenizer") or {}, tok_meta)
    result = fit.fit(tc, model=base.model, train_records=records, tokenizer=tokenizer,
                     workdir=workdir, mesh=mesh, rules=rules, init_params=init, name="rcrl")
    if not result.finished(tc):  # stopped early (train.stop_at_step): resume later
      logging.info("Stopped at step %d of %d; not exporting.", result.step, tc.steps)
      return {"stopped_at_step": result.step}
    trained = dataclasses.replace(base, meta={**base.meta, "tokenizer": tok_meta})
    common.export(model_dir, trained, result.params,
                  notes={"algorithm": "rcrl", "labels": list(rcrl.LABELS),
                         "policy": config.policy, "base": config.base, "steps": result.step,
                         "records": len(records), "balance": rc.balance})
    evals.put("train_seconds", time.perf_counter() - t0)
    del result
  del base
  rl = common.load_policy(model_dir, mesh=mesh, rules=rules)

  # -- Evaluate: conditioned on [GOOD] (the RCRL numbers), and plain sampling (comparison).
  rl_kw = dict(model=rl.model, tokenizer=rl.tokenizer, shardings=rl.shardings, ec=ec, sc=sc,
               mesh=mesh, rules=rules)
  val = cached("rcrl/val", lambda: score(rl.params, task.val, conditioned=True, **rl_kw))
  test = {s: cached(f"rcrl/{s}", lambda its=its: score(rl.params, its, conditioned=True,
                                                       **rl_kw))
          for s, its in task.test.items()}
  uncond = {}
  if sc.unconditioned:
    uncond["val"] = cached("unconditioned/val",
                           lambda: score(rl.params, task.val, conditioned=False, **rl_kw))
    for s, its in (task.test.items() if config.compare_on_test else ()):
      uncond[s] = cached(f"unconditioned/{s}", lambda its=its: score(
          rl.params, its, conditioned=False, **rl_kw))

  head = lambda m: common.headline(m, ec.k)
  label_use = {s: {k: m[k] for k in m if k.startswith("labels/")} for s, m in uncond.items()}
  report = {
      "algorithm": "rcrl", "variant": f"balance={rc.balance}", "seed": rc.seed, "k": ec.k,
      "curve": [{"round": 0, "rollouts": 0, **head(base_val)},
                {"round": 1, "rollouts": n_rollouts, **head(val)}],
      "final": {s: head(m) for s, m in test.items()},
      "notes": {
          "policy": config.policy, "base": config.base, "labels": stats,
          "rollouts": {"total": n_rollouts, "solutions": len(data),
                       "step_rollouts": n_rollouts - len(data)},
          "train": {"records": len(records), "steps": tc.steps},
          "base_final": {s: head(m) for s, m in base_test.items()},
          "unconditioned": {s: head(m) for s, m in uncond.items()},
          "unconditioned_label_use": label_use,
          "seconds": {"data": evals.values.get("data_seconds"),
                      "train": evals.values.get("train_seconds"),
                      "this_invocation": time.time() - t_start},
      },
  }
  to_plot = {s: {**({"base": head(base_test[s])} if s in base_test else {}),
                 "rcrl [GOOD]": head(test[s]),
                 **({"rcrl unconditioned": head(uncond[s])} if s in uncond else {})}
             for s in test}
  if to_plot:
    plot(to_plot, ec.k, storage.join(workdir, "rcrl.png"))
  storage.write_json(report_path, report)
  logging.info("rcrl: val %s | test %s", report["curve"][-1], report["final"])
  return report
