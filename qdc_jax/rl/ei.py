"""Expert Iteration (thesis 3.2): the host-side pieces, pure functions over strings.

One round i of EI, given K sampled completions per training question from the current policy:
  R_i = per question, the samples whose final answer is correct, de-duplicated;
  D_i = R_i U D_{i-1}, de-duplicated again;
  the next policy = the BASE model fine-tuned on D_i (the experiment does that part).
Rounds continue until validation maj@1 saturates (`saturated`).

Records are {'prompt', 'completion'} dicts, what `qdc_jax.fit` trains on. Two records are the
same when their prompts are equal and their completions are equal up to whitespace
(`metrics.normalize_text`), so '3+4=7\\nThe answer is 7.' and '3+4=7 \\nThe answer is  7.'
are one solution; the first one seen is kept, spelled as sampled.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from qdc_jax.data import answers
from qdc_jax.data import arith
from qdc_jax.eval import metrics

Record = dict  # {'prompt': str, 'completion': str}
IsCorrect = Callable[[str, Any], bool]


def record_key(r: Mapping[str, str]) -> tuple[str, str]:
  """What makes two training records the same solution of the same question."""
  return r["prompt"], metrics.normalize_text(r["completion"])


def dedupe(records: Iterable[Mapping[str, str]]) -> list[Record]:
  """`records` without repeats (`record_key`), first occurrence kept, order kept."""
  seen, out = set(), []
  for r in records:
    key = record_key(r)
    if key not in seen:
      seen.add(key)
      out.append({"prompt": r["prompt"], "completion": r["completion"]})
  return out


KEEP_RULES = ("answer", "answer_and_steps")


def steps_hold(text: str) -> bool:
  """Whether every `lhs=value` step a lab solution writes is true arithmetic.

  Read with `arith.parse_solution` (up to the first answer line); a step whose left side is
  not a well-formed lab step counts as wrong. Text without lab steps passes (nothing to check).
  """
  return all(arith.evaluate_step(lhs) == value
             for lhs, value in arith.parse_solution(text).steps)


def correct_flags(references: Sequence[Any], samples: Sequence[Sequence[str]], *,
                  keep: str = "answer",
                  is_correct: IsCorrect = answers.is_correct) -> list[list[bool]]:
  """Per question, per sample: whether EI keeps it.

  keep='answer' is the thesis's sparse reward (the final answer equals the reference).
  keep='answer_and_steps' also requires `steps_hold`: on the lab a right answer reached through
  wrong arithmetic (a lucky `mod` or `min`) is a false positive the oracle can see.
  """
  if keep not in KEEP_RULES:
    raise ValueError(f"Unknown keep rule {keep!r}; choose one of {KEEP_RULES}")
  if len(references) != len(samples):
    raise ValueError(f"{len(references)} references but {len(samples)} sample lists")
  return [[bool(is_correct(s, ref)) and (keep == "answer" or steps_hold(s)) for s in ks]
          for ref, ks in zip(references, samples)]


def correct_records(prompts: Sequence[str], samples: Sequence[Sequence[str]],
                    flags: Sequence[Sequence[bool]]) -> list[Record]:
  """R_i: the correct samples of each question as records, de-duplicated.

  Args:
    prompts: per question, the prompt the policy was shown.
    samples: per question, the K completions sampled for it.
    flags: per question, per sample, whether it is correct (`correct_flags`).

  Returns:
    Records in question order, then sample order.
  """
  if not len(prompts) == len(samples) == len(flags):
    raise ValueError(f"{len(prompts)} prompts, {len(samples)} sample lists, {len(flags)} "
                     f"flag lists: one of each per question")
  out = []
  for p, ks, fs in zip(prompts, samples, flags):
    if len(ks) != len(fs):
      raise ValueError(f"{len(ks)} samples but {len(fs)} flags for prompt {p[:60]!r}")
    out += [{"prompt": p, "completion": s} for s, ok in zip(ks, fs) if ok]
  return dedupe(out)


def union(previous: Sequence[Mapping[str, str]],
          new: Sequence[Mapping[str, str]]) -> list[Record]:
  """D_i = R_i U D_{i-1}: every record of D_{i-1} (first, in its order), then the new ones."""
  return dedupe(list(previous) + list(new))


def saturated(history: Sequence[float], *, min_gain: float, patience: int) -> bool:
  """Whether EI should stop: the last `patience` rounds all failed to improve.

  `history` is validation maj@1 per round, history[0] being the initial policy. A round
  improves when its value beats the best value before it by more than `min_gain`. With fewer
  than `patience` rounds after the initial policy nothing has saturated yet.
  """
  if patience < 1:
    raise ValueError(f"patience must be >= 1, got {patience}")
  stale = 0
  best = history[0] if history else 0.0
  for v in history[1:]:
    stale = 0 if v > best + min_gain else stale + 1
    best = max(best, v)
  return len(history) > patience and stale >= patience


def best_round(history: Sequence[float]) -> int:
  """Index of the highest validation maj@1; ties go to the earliest (fewest rollouts)."""
  if not history:
    raise ValueError("best_round needs at least one round")
  return max(range(len(history)), key=lambda i: (history[i], -i))


def rollouts_after(rounds: int, num_questions: int, k: int) -> int:
  """Cumulative sampled completions after `rounds` rounds of K samples per question."""
  return rounds * num_questions * k


def per_question_stats(prompts: Sequence[str], round_records: Sequence[Mapping[str, str]],
                       dataset: Sequence[Mapping[str, str]]) -> dict:
  """How much of the train set the round solved and how D grew."""
  solved = {r["prompt"] for r in round_records}
  covered = {r["prompt"] for r in dataset}
  n = max(len(prompts), 1)
  return {"questions_solved": len(solved) / n, "questions_covered": len(covered) / n,
          "unique_correct": len(round_records), "dataset_size": len(dataset)}
