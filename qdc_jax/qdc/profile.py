"""The QDC profile of one dataset: per-row values and the dataset-level measures.

Model-free parts are computed here from the rows; the parts that need a model (embeddings,
student solve rates, reward-model scores, LM skill annotations) are computed by the caller
(`experiments/qdc.py`) and passed in, so this module is plain host code that every process runs
identically.

Quality     correct: the row's solution reaches its answer (`answers.is_correct`); lab_valid:
            the oracle's verdict that the answer is the question's true value (rows whose
            question is in the lab language); student_solve_rate and sparq_quality (the
            SPARQ verifier: K student rollouts against the answer); orm_score; the source's
            recorded quality / solve rate (SPARQ).
Diversity   skill coverage (unique skill-sets) and DIV (unique skills); distinct-1..4 and
            self-BLEU of the questions; embedding dispersion, Vendi score, nearest-neighbour
            cosine distance; exact, and the lab's operation-trace, diversity of the solutions;
            unique questions.
Complexity  reasoning steps (operations in the solution, `eval.metrics.operation_trace`),
            skills per problem, question / solution length in words, the lab tree's
            operations and largest literal's digits.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np

from qdc_jax.data import answers, arith
from qdc_jax.eval import metrics as eval_metrics
from qdc_jax.qdc import measures
from qdc_jax.qdc.datasets import Dataset
from qdc_jax.sparq import skills as skills_lib

# Per-row values that get a histogram, and the dataset-level measures in the report's order.
ROW_MEASURES = ("correct", "lab_valid", "student_solve_rate", "sparq_quality", "orm_score",
                "recorded_quality", "num_skills", "steps", "lab_ops", "lab_max_digits",
                "question_words", "solution_words", "nn_distance")


def _lab(question: str):
  try:
    tree = arith.parse(question)
  except Exception:  # pylint: disable=broad-except
    return None
  return tree


def per_row(ds: Dataset, skill_sets: Optional[Sequence[tuple]],
            all_skills: Optional[Sequence[tuple]] = None) -> dict[str, list]:
  """Model-free per-row values (None where a row has no such value)."""
  out = collections.defaultdict(list)
  for i, r in enumerate(ds.rows):
    has_sol = r.solution is not None
    out["correct"].append(
        float(answers.is_correct(r.solution, r.answer)) if has_sol and r.answer is not None
        else None)
    tree = _lab(r.question)
    lab_ok = tree is not None
    out["lab_parses"].append(float(lab_ok))
    out["lab_valid"].append(float(arith.oracle(r.question, r.answer).valid)
                            if lab_ok and r.answer is not None else None)
    out["lab_ops"].append(arith.num_ops(tree) if lab_ok else None)
    out["lab_max_digits"].append(arith.max_digits(tree) if lab_ok else None)
    out["lab_op_names"].append([s.op for s in _safe_trace(tree)] if lab_ok else [])
    out["steps"].append(len(eval_metrics.operation_trace(r.solution)) if has_sol else None)
    out["question_words"].append(len(measures.words(r.question)))
    out["solution_words"].append(len(measures.words(r.solution)) if has_sol else None)
    out["recorded_quality"].append(r.recorded_quality)
    sk = all_skills if all_skills is not None else skill_sets
    out["num_skills"].append(len(sk[i]) if sk is not None else None)
  return dict(out)


def _safe_trace(tree) -> list:
  try:
    return arith.trace(tree)
  except Exception:  # pylint: disable=broad-except  (an undefined op: no trace)
    return []


def _mean(values) -> Optional[float]:
  return measures.summary(values)["mean"]


def profile(ds: Dataset, *, skill_sets: Optional[Sequence[tuple]], skill_source: str,
            all_skills: Optional[Sequence[tuple]] = None, skill_k: Optional[int] = None,
            embeddings: Optional[np.ndarray] = None, nn_rows: Optional[np.ndarray] = None,
            student: Optional[dict] = None, orm_scores: Optional[Sequence] = None) -> dict:
  """Every measure of one dataset.

  Args:
    ds: the dataset.
    skill_sets: per row, its skill-set of at most `skill_k` skills (the thesis's; None: no
      annotator for this data).
    skill_source: where the skill-sets came from ('oracle', 'recorded', 'lm').
    all_skills: per row, every known skill (uncut; None: the skill-sets are all there is).
    skill_k: the cap of `skill_sets`, for the notes.
    embeddings: [N, D] row embeddings (None: no embedding measures).
    nn_rows: the row indices the nearest-neighbour distance was measured on (a sample when
      the set is large); embeddings of exactly those rows are used.
    student: {'rows': indices, 'solve_rate': [...], 'quality': [...], 'k': K} of the rows the
      student solved (a sample), or None.
    orm_scores: per row, the reward model's score of its solution (NaN/None without one).

  Returns:
    {"n": rows, "measures": {name: value}, "summaries": {name: summary dict},
     "rows": {name: per-row list}, "notes": [how each sampled measure was sampled]}.
  """
  n = len(ds.rows)
  rows = per_row(ds, skill_sets, all_skills)
  notes = list(ds.notes)
  m: dict = {"rows": n}
  # Quality.
  m["correct"] = _mean(rows["correct"])
  m["lab_parse_rate"] = _mean(rows["lab_parses"])
  m["lab_valid"] = _mean(rows["lab_valid"])
  m["recorded_quality"] = _mean(rows["recorded_quality"])
  m["recorded_solve_rate"] = _mean([r.recorded_solve_rate for r in ds.rows])
  if student is not None:
    full_rate = [None] * n
    full_q = [None] * n
    for j, i in enumerate(student["rows"]):
      full_rate[i], full_q[i] = student["solve_rate"][j], student["quality"][j]
    rows["student_solve_rate"], rows["sparq_quality"] = full_rate, full_q
    m["student_solve_rate"] = _mean(full_rate)
    m["sparq_quality"] = _mean(full_q)
    m["sparq_quality_positive"] = _mean([float(q > 0) for q in student["quality"]])
    if len(student["rows"]) < n:
      picked = (f"a seeded sample of {len(student['rows'])}" if len(student["rows"]) <
                student["eligible"] else f"all {len(student['rows'])}")
      notes.append(f"student solve rate: K={student['k']} rollouts on {picked} of the "
                   f"{student['eligible']} rows with an answer ({n} rows in all)")
  if orm_scores is not None:
    rows["orm_score"] = [None if s is None or not np.isfinite(s) else float(s)
                         for s in orm_scores]
    m["orm_score"] = _mean(rows["orm_score"])
  # Diversity.
  if skill_sets is not None:
    m["skill_coverage"] = skills_lib.coverage(skill_sets)
    m["skill_div"] = skills_lib.div(all_skills if all_skills is not None else skill_sets)
    notes.append(f"skill-sets from {skill_source}")
    if all_skills is not None:
      m["skill_coverage_all"] = skills_lib.coverage(all_skills)
      cut = sum(len(a) > len(s) for a, s in zip(all_skills, skill_sets))
      if cut:
        notes.append(f"{cut} of {n} rows have more than k={skill_k} skills: their skill-set "
                     f"keeps the k most common ('skill coverage', the thesis's); 'skill "
                     f"coverage, all skills' and 'skills per problem' count every skill")
  toks = [measures.words(r.question) for r in ds.rows]
  for k in (1, 2, 3, 4):
    m[f"distinct_{k}"] = measures.distinct_n(toks, k)
  if n >= 2:
    m["self_bleu"] = float(np.mean(measures.self_bleu_per_row(toks)))  # exact, every row
  m["unique_questions"] = eval_metrics.exact_diversity([r.question for r in ds.rows]) / n
  sols = [r.solution for r in ds.rows if r.solution is not None]
  if sols:
    m["solutions_exact_diversity"] = eval_metrics.exact_diversity(sols) / len(sols)
    m["solutions_trace_diversity"] = eval_metrics.trace_diversity(sols) / len(sols)
  if embeddings is not None and n >= 2:
    m["embedding_dispersion"] = measures.dispersion(embeddings)
    m["vendi"] = measures.vendi(embeddings)
    sub = np.arange(n) if nn_rows is None else np.asarray(nn_rows)
    nn = measures.nn_distance(embeddings[sub])
    full = [None] * n
    for j, i in enumerate(sub):
      full[int(i)] = float(nn[j])
    rows["nn_distance"] = full
    m["nn_distance"] = float(nn.mean())
    if len(sub) < n:
      notes.append(f"nearest-neighbour distance: within a seeded sample of {len(sub)} of {n} "
                   f"rows")
  # Complexity.
  m["steps"] = _mean(rows["steps"])
  m["num_skills"] = _mean(rows["num_skills"])
  m["question_words"] = _mean(rows["question_words"])
  m["solution_words"] = _mean(rows["solution_words"])
  m["lab_ops"] = _mean(rows["lab_ops"])
  m["lab_max_digits"] = _mean(rows["lab_max_digits"])
  op_counts = collections.Counter(op for ops in rows["lab_op_names"] for op in ops)
  if op_counts:
    total = sum(op_counts.values())
    m["lab_op_mix"] = {op: op_counts[op] / total for op in arith.OPS if op_counts[op]}
  if ds.dropped:
    notes.append(f"rows left out: {ds.dropped}")
  summaries = {k: measures.summary(v) for k, v in rows.items()
               if k in ROW_MEASURES and any(x is not None for x in v)}
  return {"n": n, "measures": m, "summaries": summaries,
          "rows": {k: rows[k] for k in ROW_MEASURES if k in rows}, "notes": notes}


def coverage_over_rounds(ds: Dataset, skill_sets: Sequence[tuple]) -> Optional[list]:
  """[(round, cumulative unique skill-sets, cumulative rows)] for rows that carry a round
  (SPARQ archives), else None."""
  if not ds.rows or ds.rows[0].round is None:
    return None
  by_round = collections.defaultdict(list)
  for r, s in zip(ds.rows, skill_sets):
    by_round[r.round].append(tuple(s))
  seen, count, out = set(), 0, []
  for rnd in sorted(by_round):
    seen.update(s for s in by_round[rnd] if s)
    count += len(by_round[rnd])
    out.append((int(rnd), len(seen), count))
  return out
