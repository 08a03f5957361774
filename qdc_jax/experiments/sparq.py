"""SPARQ end to end: quality-diversity generation, phase-2 filtering, distillation, evaluation.

  phase 1  rounds of: select b parents from W (strategy C) -> generator mutates each ->
           the student verifies every child K times (one batched sampler call) ->
           QUALITY from the solve-rate band -> skill-sets -> W updated (strategy U) ->
           the round committed to the archive (resumable at any kill).
  phase 2  items with QUALITY > 0 -> (question, successful student solution) pairs, optionally
           through a budgeted filter (quality / diversity / qd / random).
  distill  fine-tune the student on the pairs (the shared `fit` loop, resumable).
  evaluate baseline vs SPARQ student: in-distribution pass@1 and OOD pass@n, n <= K.
  report   report.md + report.json + PNGs in the workdir.

On the lab (default) the generator and student are the shipped lab models, the annotator is
the oracle, and validity is exact. The `gemma` preset takes model, tokenizer and dataset paths
from flags.
"""

from __future__ import annotations

import hashlib
import json
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from qdc_jax import chat
from qdc_jax import config_lib
from qdc_jax import fit
from qdc_jax import metrics_log
from qdc_jax import registry
from qdc_jax import storage
from qdc_jax.data import arith, lab_tasks
from qdc_jax.eval import solve
from qdc_jax.sparq import agents, filters, loop, report, skills
from qdc_jax.sparq.archive import Archive


def _seeds(config) -> list[loop.Seed]:
  dc = config.data
  if dc.seed_source == "lab":
    problems = lab_tasks.without(arith.make_split("in_dist", dc.num_seeds, seed=dc.seed),
                                 lab_tasks.test_problems("in_dist", config.eval.test_size)
                                 + lab_tasks.test_problems("ood", config.eval.test_size))
    return [loop.Seed(p.text, p.solution, str(p.answer)) for p in problems]
  from qdc_jax.data import math_tasks  # pylint: disable=g-import-not-at-top
  examples = math_tasks.load(dc.seed_source, dc.seed_path,
                             flag="--config.data.seed_path")[:dc.num_seeds or None]
  return [loop.Seed(e.question, e.solution or "", e.answer) for e in examples]


def _eval_sets(config, student: agents.LMStudent) -> dict:
  """split -> (prompts, references, ks); every split gets eval.k samples per problem, so
  in-distribution pass@1 is the unbiased mean over k samples, not one draw."""
  ec = config.eval
  ks_ood = tuple(x for x in (1, 2, 4, 8, 16, 32, 64, 96) if x <= ec.k)
  if config.data.seed_source == "lab":
    out = {}
    for split, ks in (("in_dist", (1,)), ("ood", ks_ood)):
      problems = lab_tasks.test_problems(split, ec.test_size)
      out[split] = ([student.prompt(p.text) for p in problems], [p.answer for p in problems],
                    ks)
    return out
  from qdc_jax.data import math_tasks  # pylint: disable=g-import-not-at-top
  out = {}
  for split, name, path, ks in (("in_dist", "math", ec.in_dist_path, (1,)),
                                ("ood", "aime", ec.ood_path, ks_ood)):
    if path:
      ex = math_tasks.load(name, path, flag=f"--config.eval.{split}_path")
      ex = ex[:ec.test_size or None]
      out[split] = ([student.prompt(e.question) for e in ex], [e.answer for e in ex], ks)
  return out


def _evaluate(lm, student, sets, config, path, key: dict) -> dict:
  """Metrics per split, cached in `path` under `key` (what was evaluated and how): a resume
  reuses them only if nothing that shapes them changed."""
  key = {**key, "eval": config.eval.to_dict(), "max_new_tokens": student.max_new_tokens,
         "seed": config.sparq.seed}
  cached = storage.read_json(path)
  if cached and cached.get("key") == key:
    return cached["results"]
  out = {}
  for split, (prompts, refs, ks) in sets.items():
    k = config.eval.k
    m, _ = solve.solve_and_score(
        lm.params, prompts, refs, model=lm.model, tokenizer=lm.tokenizer, k=k,
        temperature=config.eval.temperature, max_new_tokens=student.max_new_tokens, ks=ks,
        rng=jax.random.PRNGKey(config.sparq.seed), batch_size=student.batch_size,
        mesh=lm.mesh, rules=lm.rules, param_shardings=lm.param_shardings)
    out[split] = m
  storage.write_json(path, {"key": key, "results": out})
  return out


PHASE2_FILE = "phase2.jsonl"


def phase2_records(items, config, student: agents.LMStudent, exclude_prompts=()
                   ) -> list[dict]:
  """(question, successful solution) training records; questions equal to an evaluation
  problem are dropped (a mutated child can land on a test problem). Each record keeps what
  the archive knows of its item (question, solution, answer, quality, skill_set, item_id), so
  the phase-2 set written to PHASE2_FILE is a dataset the QDC measures read directly."""
  exclude = set(exclude_prompts)
  children = [it for it in items if it.round > 0 and student.prompt(it.question or "")
              not in exclude]
  fc = config.phase2
  if fc.filter == "none":
    picked = filters.phase2_pairs(children)
  else:
    select = registry.get("filter", fc.filter)
    rng = np.random.default_rng(config.sparq.seed)
    kwargs = {"mean": fc.quality_mean} if fc.filter == "quality" else {}
    selected = select(children, fc.budget, rng, **kwargs)
    picked = filters.training_pairs(selected, rng)
  return [{"prompt": student.prompt(it.question), "completion": s, "question": it.question,
           "solution": s, "answer": it.intended_answer, "quality": it.quality,
           "solve_rate": it.solve_rate, "skill_set": list(it.skill_set), "item_id": it.id,
           "round": it.round, "strategy": it.strategy}
          for it, s in picked]


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["sparq.rounds", "sparq.k", "phase2.filter", "distill.steps"])
  mesh, rules = config_lib.make_mesh(config.mesh)
  sc = config.sparq
  t_start = time.time()
  student_lm = agents.load_lm(config.student.model_dir, "lab_student", mesh, rules,
                        config.student.tokenizer_path)
  if config.generator.same_as_student:  # self-improvement: one model plays both roles
    gen_lm = student_lm
  else:
    gen_lm = agents.load_lm(config.generator.model_dir, "lab_generator", mesh, rules,
                      config.generator.tokenizer_path)
  if config.prompt_format == "gemma_chat":
    for lm in {id(student_lm): student_lm, id(gen_lm): gen_lm}.values():
      lm.extra_stop_ids = chat.chat_stop_ids(lm.tokenizer)
  generator = agents.LMGenerator(gen_lm, config.prompt_format, config.generator.temperature,
                                 config.generator.max_new_tokens, sc.parents_per_round)
  student = agents.LMStudent(student_lm, config.prompt_format, config.student.temperature,
                             config.student.max_new_tokens, sc.parents_per_round,
                             config.student.get("slots", 0))
  if config.annotator.kind == "oracle":
    annotator = skills.OracleAnnotator()
  else:
    annotator = agents.LMAnnotator(
        agents.load_lm(config.annotator.model_dir, "", mesh, rules, config.annotator.tokenizer_path),
        k=sc.max_skills_per_problem)
  validity = None
  if config.data.seed_source == "lab":
    validity = lambda q, a: bool(arith.oracle(q, a).valid)
  roles = loop.Roles(generator, student, annotator, validity)

  archive = Archive(storage.join(workdir, "archive"))
  seeds = _seeds(config)
  logger = metrics_log.MetricLogger(workdir, name="sparq", total_steps=sc.rounds,
                                    start_step=max(archive.rounds_committed() - 1, 0),
                                    unit="rounds")
  try:
    items = loop.run_rounds(archive, seeds, roles, sc, logger=logger)
  finally:
    logger.close()
  t_phase1 = time.time() - t_start

  sets = _eval_sets(config, student)
  records = phase2_records(items, config, student,
                           [p for prompts, _, _ in sets.values() for p in prompts])
  logging.info("Phase 2: %d training pairs (filter %s)", len(records), config.phase2.filter)
  storage.write_rows(storage.join(workdir, PHASE2_FILE), records)
  baseline = _evaluate(student_lm, student, sets, config,
                       storage.join(workdir, "eval_baseline.json"), {"model": "baseline"})
  result = {"baseline": baseline}
  if records:
    # The training pairs alone key the distillation (the records' other fields describe them).
    records_hash = hashlib.sha256(json.dumps(
        [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    ).encode()).hexdigest()[:16]
    tc = config.distill
    if tc.steps < 0:  # -1: one epoch over the phase-2 pairs (the thesis's setting)
      tc = ml_collections.ConfigDict(tc.to_dict())
      tc.steps = max(1, -(-len(records) // tc.batch_size))
    distilled = fit.fit(tc, model=student_lm.model, train_records=records,
                        tokenizer=student_lm.tokenizer,
                        # Other phase-2 data (more rounds, another filter): a fresh run.
                        workdir=storage.join(workdir, f"distill_{records_hash}"), mesh=mesh,
                        rules=rules,
                        init_params=student_lm.params, name="distill")
    sparq_lm = agents.LM(student_lm.model, distilled.params, student_lm.tokenizer, mesh, rules,
                         distilled.param_shardings, student_lm.extra_stop_ids)
    result["sparq"] = _evaluate(sparq_lm, student, sets, config,
                                storage.join(workdir, "eval_sparq.json"),
                                {"model": "sparq", "distill_step": distilled.step,
                                 "records": records_hash})
  else:
    logging.warning("No item reached QUALITY > 0: nothing to distill.")
  result["timing"] = {"phase1_s": t_phase1, "total_s": time.time() - t_start,
                      **archive.latest_state().get("times", {})}
  result["num_training_pairs"] = len(records)
  report.write_report(workdir, items, result, config)
  return result
