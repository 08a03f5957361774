"""GLoRe (thesis 3.4): global and local refinement of a draft, and where its first error is.

A refiner reads the question, a draft with the marker [BAD] put before the step it should
change, and writes a whole new solution after `SEPARATOR`:

  Question: ...\nSolution:\n17+5=22\n[BAD]22*3=68\nThe answer is 68.\nRevision:\n17+5=22\n...

  global  [BAD] before the first step: "something is wrong somewhere". Trained on (incorrect
          student sample -> a correct sample of the same question).
  local   [BAD] before the first step a step-wise reward model scores <= 0.5. Trained on
          (incorrect sample with [BAD] before its first SORM-negative step j -> the prefix
          S_1..S_j that SORM verified, continued by the correct, consistent rollout that
          verified it); j = 0 falls back to a correct sample, as in global data.

Everything here is host-side text work.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from qdc_jax.rl import rcrl
from qdc_jax.rl import reward_models

MARKER = rcrl.BAD  # the one label token both refiners see ([BAD])
SEPARATOR = "\nRevision:\n"  # between the marked draft and the refinement (lab characters)


def marked_draft(steps: Sequence[str], bad_at: int) -> str:
  """The draft's steps with MARKER before step `bad_at` (0 = the start, global)."""
  if not 0 <= bad_at <= max(len(steps) - 1, 0):
    raise ValueError(f"bad_at={bad_at} is not a step of a {len(steps)}-step draft")
  return "\n".join(s if i != bad_at else MARKER + s for i, s in enumerate(steps))


def refine_prompt(prompt: str, steps: Sequence[str], bad_at: int) -> str:
  return prompt + marked_draft(steps, bad_at) + SEPARATOR


def first_error(scores: Sequence[float], threshold: float = 0.5) -> Optional[int]:
  """The first step whose P(correct) is <= threshold; None if every step scores above it."""
  for i, s in enumerate(scores):
    if s <= threshold:
      return i
  return None


def _correct_by_question(data: Sequence[reward_models.Solution]) -> dict[int, list[int]]:
  out: dict[int, list[int]] = {}
  for i, s in enumerate(data):
    if s.correct and s.steps:
      out.setdefault(s.question, []).append(i)
  return out


def global_records(data: Sequence[reward_models.Solution], seed: int = 0) -> list[dict]:
  """{'prompt', 'completion'} per incorrect sample whose question has a correct sample."""
  rng = np.random.default_rng(seed)
  good = _correct_by_question(data)
  out = []
  for s in data:
    if s.correct or not s.steps or s.question not in good:
      continue
    target = data[int(rng.choice(good[s.question]))]
    out.append({"prompt": refine_prompt(s.prompt, s.steps, 0), "completion": target.text})
  return out


def local_records(data: Sequence[reward_models.Solution], seed: int = 0) -> list[dict]:
  """{'prompt', 'completion'} per incorrect sample with a verified prefix before its first
  SORM-negative step (or, with j = 0, a correct sample of its question)."""
  rng = np.random.default_rng(seed)
  good = _correct_by_question(data)
  out = []
  for s in data:
    if s.correct or not s.steps:
      continue
    labels = reward_models.sorm_labels(s)  # always with the consistency check
    j = labels.index(False)  # an incorrect solution's last step is negative
    if j == 0:
      if s.question not in good:
        continue
      completion = data[int(rng.choice(good[s.question]))].text
    else:
      suffix = s.verifiers[j - 1]  # P_j was verified itself: labels after j are negative
      if suffix is None:
        raise ValueError(f"question {s.question} sample {s.sample}: step {j - 1} is positive "
                         f"but has no verifying rollout")
      completion = "\n".join(list(s.steps[:j]) + rcrl.split_steps(suffix))
    out.append({"prompt": refine_prompt(s.prompt, s.steps, j), "completion": completion})
  return out
