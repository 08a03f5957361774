"""QDC measures of any datasets, side by side: quality, diversity and complexity.

  load      each path of --config.data.paths (SPARQ archive / workdir, phase-2 set, EI or SFT
            records, GSM8K / MATH / SVAMP / AIME files, generic question/solution/answer rows,
            `lab:SPLIT:N`; `qdc/datasets.py`), optionally a seeded sample of data.max_rows
  skills    skill-sets of every row by one annotator for all datasets (so coverage compares):
            the lab oracle, the rows' recorded skill-sets, or an instruction model; the
            vocabulary is the skills.num_skills most common over all datasets
  embed     mean-pooled hidden states of each question (or solution) under a model directory
            (`embed.mean_pooled_embeddings`)
  student   (opt-in) K rollouts of the student on a seeded sample of rows -> solve rate and
            SPARQ's QUALITY (`sparq.quality.verify`)
  orm       (opt-in) a trained reward model's score of each solution
  measure   `qdc.profile.profile` per dataset, cached as it lands (qdc_profiles.json): a
            killed run redoes at most the dataset it was on
  report    report.md (side-by-side table), report.json, histograms.png, qd_scatter.png,
            coverage.png (SPARQ archives: unique skill-sets over the rounds)

Every process loads the same files and computes the same numbers; model calls go through the
mesh (global arrays in, replicated results back); process 0 writes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time

import jax
import numpy as np
from absl import logging

from qdc_jax import config_lib
from qdc_jax import embed
from qdc_jax import storage
from qdc_jax.qdc import datasets as datasets_lib
from qdc_jax.qdc import profile as profile_lib
from qdc_jax.qdc import report as report_lib
from qdc_jax.rl import common
from qdc_jax.sparq import agents, quality
from qdc_jax.sparq import skills as skills_lib

REPORT = "report.json"
CACHE = "qdc_profiles.json"
SETTINGS_FILE = "qdc_settings.json"
ANNOTATORS = ("auto", "oracle", "recorded", "lm", "none")
FIELDS = ("question", "solution", "question_solution")


def _split(value) -> list[str]:
  if isinstance(value, (list, tuple)):
    return [str(v).strip() for v in value if str(v).strip()]
  return [v.strip() for v in str(value).split(",") if v.strip()]


def load_datasets(config) -> list[datasets_lib.Dataset]:
  dc = config.data
  paths = _split(dc.paths)
  if not paths:
    raise ValueError("No datasets: set --config.data.paths=A.jsonl,B.jsonl (files, SPARQ "
                     "workdirs or archives, or lab:SPLIT:N)")
  kinds, names = _split(dc.kinds), _split(dc.names)
  for what, got in (("kinds", kinds), ("names", names)):
    if got and len(got) != len(paths):
      raise ValueError(f"--config.data.{what} has {len(got)} entries for {len(paths)} paths; "
                       f"give one per path (comma-separated) or none")
  out = []
  for i, p in enumerate(paths):
    ds = datasets_lib.load(p, kinds[i] if kinds else "auto", names[i] if names else "")
    if dc.max_rows and len(ds.rows) > dc.max_rows:
      keep = np.sort(np.random.default_rng(config.seed).choice(len(ds.rows), dc.max_rows,
                                                               replace=False))
      ds.notes.append(f"a seeded sample of {dc.max_rows} of its {len(ds.rows)} rows")
      ds.rows = [ds.rows[j] for j in keep]
    out.append(ds)
  seen = [d.name for d in out]
  if len(set(seen)) != len(seen):
    raise ValueError(f"Two datasets share a name ({seen}); set --config.data.names")
  return out


def fingerprint(sets: list[datasets_lib.Dataset]) -> str:
  """What the datasets hold (their rows' question, solution and answer): a cached result is
  reused only for the same rows, so a file rewritten or an archive grown is measured again."""
  h = hashlib.sha256()
  for d in sets:
    h.update(json.dumps([d.name, d.kind, [(r.question, r.solution, r.answer) for r in d.rows]]
                        ).encode())
  return h.hexdigest()[:16]


def skill_sets(config, sets: list[datasets_lib.Dataset], mesh, rules):
  """(per dataset: its rows' skill-sets of at most k skills, or None; per dataset: every known
  skill of each row, or None; the source name)."""
  sc = config.skills
  kind = sc.annotator
  if kind not in ANNOTATORS:
    raise ValueError(f"--config.skills.annotator={kind!r}; choose one of {ANNOTATORS}")
  rows = [r for d in sets for r in d.rows]
  if kind == "auto":
    lab = np.mean([skills_lib.OracleAnnotator().annotate([r.question])[0] != [] for r in rows])
    recorded = all(r.skill_set is not None for r in rows)
    kind = "oracle" if lab >= 0.5 else "recorded" if recorded else "none"
    logging.info("skills.annotator=auto -> %s (%.0f%% of questions in the lab language)",
                 kind, 100 * lab)
  if kind == "none":
    return [None] * len(sets), [None] * len(sets), kind
  if kind == "recorded":
    return [[tuple(r.skill_set or ()) for r in d.rows] for d in sets], [None] * len(sets), kind
  if kind == "oracle":
    ann = skills_lib.OracleAnnotator().annotate([r.question for r in rows])
  else:
    if not sc.model_dir:
      raise ValueError("--config.skills.annotator=lm needs --config.skills.model_dir (an "
                       "instruction model directory)")
    lm = agents.load_lm(sc.model_dir, "", mesh, rules, sc.tokenizer_path)
    ann = agents.LMAnnotator(lm, k=sc.k).annotate([r.question for r in rows],
                                                  [r.solution for r in rows])
  vocab = skills_lib.SkillVocabulary.from_seed(ann, m=sc.num_skills)
  flat, _ = skills_lib.skill_sets_of(vocab, ann, k=sc.k)
  full = [tuple(sorted(vocab.split(a)[0])) for a in ann]
  capped, every, at = [], [], 0
  for d in sets:
    capped.append(flat[at:at + len(d.rows)])
    every.append(full[at:at + len(d.rows)])
    at += len(d.rows)
  return capped, every, kind


def cached_skill_sets(cache: common.ResultCache, config, sets, mesh, rules):
  """`skill_sets`, computed once: they need every dataset at once (one vocabulary) and an LM
  annotator is costly, so a resumed run reads them back (keyed by the rows of all datasets)."""
  capped, every, source = cache.get(f"skills@{fingerprint(sets)}",
                                    functools.partial(skill_sets, config, sets, mesh, rules),
                                    describe=lambda v: f"annotator {v[2]}")

  def tuples(per_dataset):  # JSON gives lists back
    return [None if s is None else [tuple(x) for x in s] for s in per_dataset]

  return tuples(capped), tuples(every), source


def _texts(ds: datasets_lib.Dataset, field: str) -> list[str]:
  if field not in FIELDS:
    raise ValueError(f"--config.embed.field={field!r}; choose one of {FIELDS}")
  if field == "question":
    return [r.question for r in ds.rows]
  if field == "solution":  # a row without a solution is embedded by its question (noted)
    return [r.solution or r.question for r in ds.rows]
  return [r.question + "\n" + (r.solution or "") for r in ds.rows]


def embeddings(config, ds, lm) -> tuple[np.ndarray, np.ndarray]:
  ec = config.embed
  ids = [lm.tokenizer.encode(t, add_bos=True) for t in _texts(ds, ec.field)]
  vecs, truncated = embed.mean_pooled_embeddings(
      lm.params, ids, model=lm.model, layer=None if ec.layer < 0 else ec.layer,
      batch_size=ec.batch_size, max_tokens=ec.max_tokens or None, skip_first=1, mesh=lm.mesh,
      rules=lm.rules,
      param_shardings=lm.param_shardings)
  if ec.field == "solution" and any(r.solution is None for r in ds.rows):
    ds.notes.append(f"embeddings: {sum(r.solution is None for r in ds.rows)} rows without a "
                    f"solution embedded by their question")
  if truncated:
    ds.notes.append(f"embeddings: {truncated} rows cut to their first {ec.max_tokens or 'max_len'} "
                    f"tokens")
  n = len(ds.rows)
  nn_rows = np.arange(n)
  if ec.nn_max_rows and n > ec.nn_max_rows:
    nn_rows = np.sort(np.random.default_rng(config.seed).choice(n, ec.nn_max_rows,
                                                                replace=False))
  return vecs, nn_rows


def student_rates(config, ds, student: agents.LMStudent) -> dict:
  sc = config.student
  with_answer = [i for i, r in enumerate(ds.rows) if r.answer is not None]
  rows = with_answer
  if sc.max_rows and len(rows) > sc.max_rows:
    rows = sorted(np.random.default_rng(config.seed).choice(rows, sc.max_rows,
                                                            replace=False).tolist())
  outs = student.solve([ds.rows[i].question for i in rows], sc.k,
                       jax.random.PRNGKey(config.seed)) if rows else []
  ver = [quality.verify(o, ds.rows[i].answer, sc.t_low, sc.t_high) for i, o in zip(rows, outs)]
  return {"rows": [int(i) for i in rows], "solve_rate": [v.solve_rate for v in ver],
          "quality": [v.quality for v in ver], "k": sc.k, "eligible": len(with_answer)}


def orm_scores(config, ds, scorer) -> list:
  idx = [i for i, r in enumerate(ds.rows) if r.solution]
  scores = scorer.final_scores([agents.student_prompt(ds.rows[i].question, config.prompt_format)
                                for i in idx],
                               [ds.rows[i].solution for i in idx]) if idx else []
  out = [None] * len(ds.rows)
  for i, s in zip(idx, scores):
    out[i] = float(s)
  return out


def measure(config, ds, skill, every, source, emb_lm, student, scorer) -> dict:
  """The profile of one dataset, with the model-made parts computed first."""
  t0 = time.perf_counter()
  vecs, nn_rows = embeddings(config, ds, emb_lm) if emb_lm is not None else (None, None)
  rates = student_rates(config, ds, student) if config.student.enabled else None
  orm = orm_scores(config, ds, scorer) if scorer is not None else None
  p = profile_lib.profile(ds, skill_sets=skill, skill_source=source, all_skills=every,
                          skill_k=config.skills.k, embeddings=vecs, nn_rows=nn_rows,
                          student=rates, orm_scores=orm)
  p["seconds"] = time.perf_counter() - t0
  return p


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["data.paths", "skills.annotator", "embed.model_dir",
                              "student.enabled"])
  storage.makedirs(workdir)
  common.check_settings(workdir, config.to_dict(), record=False, filename=SETTINGS_FILE)
  t_start = time.time()
  sets = load_datasets(config)
  data_fp = fingerprint(sets)
  done = common.finished_report(workdir, REPORT)
  if done is not None and done.get("fingerprint") == data_fp:
    return done
  if done is not None:
    logging.info("The datasets changed since %s was written: measuring again (unchanged ones "
                 "come from the cache)", REPORT)
  mesh, rules = config_lib.make_mesh(config.mesh)
  common.check_settings(workdir, config.to_dict(), filename=SETTINGS_FILE)
  logging.info("QDC of %s", ", ".join(f"{d.name} ({d.kind}, {len(d.rows)} rows)" for d in sets))
  cache = common.ResultCache(storage.join(workdir, CACHE))
  sk, every, source = cached_skill_sets(cache, config, sets, mesh, rules)
  ec, sc = config.embed, config.student
  emb_lm = None
  if ec.model_dir != "none":
    emb_lm = agents.load_lm(ec.model_dir, "lab_student", mesh, rules, ec.tokenizer_path)
  student = scorer = None
  if sc.enabled:
    student_lm = agents.load_lm(sc.model_dir, "lab_student", mesh, rules, sc.tokenizer_path)
    student = agents.LMStudent(student_lm, config.prompt_format, sc.temperature,
                               sc.max_new_tokens, sc.batch_size)
  if config.orm.model_dir:
    from qdc_jax.rl import reward_models  # pylint: disable=g-import-not-at-top
    scorer = reward_models.load(config.orm.model_dir, mesh=mesh, rules=rules)
  profiles, info = {}, {}
  for ds, skill, all_skills in zip(sets, sk, every):
    profiles[ds.name] = cache.get(
        f"{ds.name}@{fingerprint([ds])}",
        functools.partial(measure, config, ds, skill, all_skills, source, emb_lm, student,
                          scorer),
        describe=lambda p: f"{p['n']} rows, {p['seconds']:.1f} s")
    info[ds.name] = {"path": ds.path, "kind": ds.kind,
                     "coverage": (profile_lib.coverage_over_rounds(ds, skill)
                                  if skill is not None else None),
                     "downstream": datasets_lib.downstream_scores(ds.path)}
  report = report_lib.write(workdir, profiles, info, config.to_dict())
  report["seconds"] = time.time() - t_start
  report["fingerprint"] = data_fp
  storage.write_json(storage.join(workdir, REPORT), report)
  logging.info("Wrote %s", storage.join(workdir, "report.md"))
  return report
