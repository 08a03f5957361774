"""The lab's two model tasks as text: a student that solves, a generator that mutates.

Student: `arith.PROMPT_TEMPLATE` question -> step-by-step solution (arith.Problem.to_record).
Generator: a parent problem with its solution -> a child problem with its intended solution,
trained on the programmatic mutations of `arith.mutate`; the last line of the child's
solution carries its intended answer. A trained generator makes real mistakes (unparseable
children, wrong intended answers), which the oracle measures exactly.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Optional, Sequence

from qdc_jax.data import arith

GENERATOR_PROMPT_TEMPLATE = "Parent: {question}\nSolution:\n{solution}\nChild:\n"
_CHILD_SOLUTION_MARK = "\nSolution:\n"

# Training mix of the student: mostly the in-distribution split, plus a share of slightly
# longer problems with larger numbers, so the OOD split (4-6 ops, 2-3 digits) is hard but
# not out of reach (the lab's analogue of MATH train vs AIME).
BRIDGE = arith.SplitSpec("bridge", min_ops=3, max_ops=4, min_digits=1, max_digits=3,
                         max_value=100_000)


def student_problems(n: int, seed: int, bridge_fraction: float = 0.0) -> list[arith.Problem]:
  """`n` training problems: in-distribution plus `bridge_fraction` of BRIDGE problems."""
  n_bridge = int(round(n * bridge_fraction))
  problems = arith.make_split("in_dist", n - n_bridge, seed)
  rng = random.Random(f"qdc_jax.lab_tasks/bridge/{seed}")
  problems += [arith.generate(rng, BRIDGE) for _ in range(n_bridge)]
  random.Random(seed).shuffle(problems)
  return problems


def generator_prompt(parent: arith.Problem) -> str:
  return GENERATOR_PROMPT_TEMPLATE.format(question=parent.text, solution=parent.solution)


def generator_record(parent: arith.Problem, child: arith.Problem) -> dict:
  return {"prompt": generator_prompt(parent),
          "completion": child.text + _CHILD_SOLUTION_MARK + child.solution}


def generator_records(parents: Sequence[arith.Problem], seed: int) -> list[dict]:
  """One programmatic mutation per parent (kinds drawn uniformly; `combine` pairs parents)."""
  rng = random.Random(f"qdc_jax.lab_tasks/mutations/{seed}")
  out = []
  for i, parent in enumerate(parents):
    kind = rng.choice(arith.MUTATION_KINDS)
    other = parents[(i + 1 + rng.randrange(len(parents) - 1)) % len(parents)]
    try:
      m = arith.mutate(rng, parent, kind=kind, other=other)
    except arith.MutationError:
      continue  # a parent with no valid child of that kind: skip it
    out.append(generator_record(parent, m.child))
  return out


@dataclasses.dataclass(frozen=True)
class GeneratedChild:
  """What could be read from a generator completion."""
  question: Optional[str]
  solution: Optional[str]
  intended_answer: Optional[int]
  error: str = ""  # '' when question and intended answer were both found


def parse_generator_output(text: str) -> GeneratedChild:
  """Split a completion into child question, solution and intended answer; never raises."""
  if not isinstance(text, str):
    return GeneratedChild(None, None, None, "not_text")
  if _CHILD_SOLUTION_MARK not in text:
    return GeneratedChild(text.strip() or None, None, None, "no_solution_marker")
  question, solution = text.split(_CHILD_SOLUTION_MARK, 1)
  question = question.strip()
  if not question:
    return GeneratedChild(None, solution, None, "empty_question")
  answer = arith.parse_solution(solution).answer
  if answer is None:
    return GeneratedChild(question, solution, None, "no_answer_line")
  return GeneratedChild(question, solution, answer)


# Test problems are drawn with their own seed and removed from every training set, so lab
# numbers are always measured on unseen problems.
TEST_SEED = 10_000


def test_problems(split: str, n: int) -> list[arith.Problem]:
  return arith.make_split(split, n, TEST_SEED)


def without(problems: Sequence[arith.Problem], exclude: Sequence[arith.Problem]):
  texts = {p.text for p in exclude}
  return [p for p in problems if p.text not in texts]
