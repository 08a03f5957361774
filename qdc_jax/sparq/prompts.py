"""Prompts for SPARQ's language-model roles (Gemma chat format) and reading their replies.

Three roles (thesis 4.3): the generator G mutates a parent problem with its solution into a
child problem with its intended answer; the student S solves problems (K verifications each);
the annotator names the skills a problem needs. The lab's own models use the plain templates
of `data/lab_tasks.py` instead; these are for instruction-tuned models (gemma-2-*-it).

The generator is asked for

  Problem: <new problem>
  Solution: <step-by-step solution>
  Answer: <final answer only>

and `parse_lm_generator_reply` reads that, tolerating what real models do: markdown labels
(`**Problem:**`, `## Problem`), preambles ("Here is a new problem:"), `Question:` or
`New problem:` for `Problem:`, a `\\boxed{}` answer inside the solution in place of the Answer
line, several problems (the first one with its own solution and answer is used), text after
the end-of-turn marker. It never raises; what it cannot read is reported in `error`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Optional

from qdc_jax import chat
from qdc_jax.data import answers
from qdc_jax.sparq import skills as skills_lib

GENERATOR_INSTRUCTIONS = (
    "You are given a math problem and its solution. Write one new math problem by mutating "
    "the given one: change its numbers or setting, add or remove a reasoning step, or combine "
    "it with another idea. The new problem must be self-contained, well posed, and have a "
    "single final answer. Then solve your new problem step by step.\n\n"
    "Reply in exactly this format and nothing else:\n"
    "Problem: <the new problem>\n"
    "Solution: <the step-by-step solution of the new problem>\n"
    "Answer: <the final answer only>")

STUDENT_INSTRUCTIONS = (
    "Solve the following math problem step by step. Put your final answer in \\boxed{}.")

ANNOTATOR_INSTRUCTIONS = (
    "Which mathematical skills are needed to solve the problem below? {choose} Reply with the "
    "skill names separated by commas and nothing else.")
ANNOTATOR_FREE_FORM = (
    "Name at most {k} skills (short names of one to four words, e.g. 'linear equations').")
ANNOTATOR_FROM_VOCABULARY = (
    "Pick at most {k} skills from the list of skills below, copying their names exactly as "
    "written.")

# Replies longer than this are not problems; reading them is refused, not attempted.
MAX_REPLY_CHARS = 50_000
MAX_PROBLEM_CHARS = 5_000
MAX_ANSWER_CHARS = 200


def generator_prompt(question: str, solution: Optional[str] = None) -> str:
  """The generator's chat prompt for mutating one parent."""
  parent = f"Original problem:\n{question.strip()}"
  if solution:
    parent += f"\n\nOriginal solution:\n{solution.strip()}"
  return chat.user_prompt(f"{GENERATOR_INSTRUCTIONS}\n\n{parent}")


def student_prompt(question: str) -> str:
  """The student's chat prompt for one verification."""
  return chat.user_prompt(f"{STUDENT_INSTRUCTIONS}\n\nProblem:\n{question.strip()}")


def annotator_prompt(question: str, solution: Optional[str] = None,
                     vocabulary: Optional[Sequence[str]] = None,
                     k: int = skills_lib.DEFAULT_K) -> str:
  """The annotator's chat prompt.

  Args:
    question: The problem.
    solution: Its solution, if known (helps name the skills actually used).
    vocabulary: The allowed skills (the seed set's M most common), listed one per line for
      the model to pick from; None (or empty) asks for free-form short names, which is how
      the seed set's own skills are found.
    k: Most skills to name.

  Returns:
    The prompt.
  """
  if vocabulary:
    text = ANNOTATOR_INSTRUCTIONS.format(choose=ANNOTATOR_FROM_VOCABULARY.format(k=k))
    text += "\n\nSkills:\n" + "\n".join(f"- {skill}" for skill in vocabulary)
  else:
    text = ANNOTATOR_INSTRUCTIONS.format(choose=ANNOTATOR_FREE_FORM.format(k=k))
  text += f"\n\nProblem:\n{question.strip()}"
  if solution:
    text += f"\n\nSolution:\n{solution.strip()}"
  return chat.user_prompt(text)


def parse_annotator_reply(generated: Any) -> list[str]:
  """Skill names in an annotator's generated text (up to its end of turn); never raises."""
  if not isinstance(generated, str):
    return []
  return skills_lib.parse_skill_list(chat.parse_model_reply(generated))


@dataclasses.dataclass(frozen=True)
class LMChild:
  """What could be read from a generator reply.

  Attributes:
    question: The child problem, None if none was found.
    solution: Its solution, None if none was labelled.
    intended_answer: The final answer as written (LaTeX allowed), None if none was found.
    error: "" when question and intended answer were both read, else one of: not_text,
      empty_reply, reply_too_long, no_problem, empty_problem, problem_too_long, no_answer,
      answer_too_long.
  """

  question: Optional[str]
  solution: Optional[str]
  intended_answer: Optional[str]
  error: str = ""


_LABELS = {
    "problem": "problem", "new problem": "problem", "question": "problem",
    "new question": "problem", "child problem": "problem", "mutated problem": "problem",
    "solution": "solution", "new solution": "solution",
    "answer": "answer", "final answer": "answer", "intended answer": "answer",
}
_LABEL_ALTERNATION = "|".join(sorted(map(re.escape, _LABELS), key=len, reverse=True))
_LABEL_WORD_RE = re.compile(rf"(?:{_LABEL_ALTERNATION})\b", re.IGNORECASE)
_LABEL_NUMBER_RE = re.compile(r"[ \t]+[0-9]{1,3}\b")
_MARKS = " \t#>*_"


def _label(line: str) -> Optional[tuple[str, str]]:
  """(kind, rest of the line) if the line starts with a section label, else None.

  A label starts the line, optionally after markdown marks (#, >, *, _), may be numbered
  ("Problem 2"), and either ends in a colon (bold marks may sit on either side of it) or is a
  whole heading line ("## Problem"). Matched with string methods and unambiguous regexes, so
  the time is linear in the line's length whatever it contains.
  """
  body = line.lstrip(_MARKS)
  m = _LABEL_WORD_RE.match(body)
  if m is None:
    return None
  kind = _LABELS[m[0].lower()]
  rest = body[m.end():]
  number = _LABEL_NUMBER_RE.match(rest)
  if number:
    rest = rest[number.end():]
  rest = rest.lstrip(" \t*_")
  if not rest:
    return kind, ""
  if rest[0] != ":":
    return None
  # Closing bold after the colon ("**Answer:** 4"), then the content.
  return kind, rest[1:].lstrip(" \t").lstrip("*_").lstrip(" \t")


_EDGE = " \t\r\n"


def _clean_answer(text: str) -> str:
  """The answer line's value: the first non-empty line, without markup and `$` wrappers."""
  boxed = answers.extract_answer(text) if "\\boxed" in text or "\\fbox" in text else None
  if boxed:
    return boxed.strip()
  lines = [ln for ln in text.splitlines() if ln.strip()]
  value = lines[0] if lines else ""
  value = value.replace("**", "").strip(_EDGE)
  if len(value) >= 2 and value.startswith("$") and value.endswith("$"):
    value = value.strip("$").strip(_EDGE)
  return value.rstrip(".").strip(_EDGE)


def _sections(reply: str) -> list[tuple[Optional[str], str]]:
  """(kind, text) per labelled section, in order; kind None for text before any label."""
  out: list[tuple[Optional[str], list[str]]] = [(None, [])]
  for line in reply.splitlines():
    label = _label(line)
    if label:
      out.append((label[0], [label[1]]))
    else:
      out[-1][1].append(line)
  return [(kind, "\n".join(lines).strip(_EDGE)) for kind, lines in out]


def parse_lm_generator_reply(generated: Any) -> LMChild:
  """The child problem and intended answer in a generator's generated text; never raises.

  The reply is cut at its end of turn (`chat.parse_model_reply`). The first `Problem:`
  section is the question; the first `Solution:` and `Answer:` sections after it and before
  any later `Problem:` are its solution and answer. Without an Answer section the answer is
  the solution's final answer (`\\boxed{}`, "the answer is X", ...).

  Args:
    generated: Decoded sample after the generation prompt.

  Returns:
    An LMChild; `error` says what is missing.
  """
  if not isinstance(generated, str):
    return LMChild(None, None, None, "not_text")
  try:
    if len(generated) > MAX_REPLY_CHARS:
      return LMChild(None, None, None, "reply_too_long")
    reply = chat.parse_model_reply(generated)
    if not reply:
      return LMChild(None, None, None, "empty_reply")
    sections = _sections(reply)
    start = next((i for i, (kind, _) in enumerate(sections) if kind == "problem"), None)
    if start is None:
      return LMChild(None, None, None, "no_problem")
    question = sections[start][1]
    solution = answer_text = None
    for kind, text in sections[start + 1:]:
      if kind == "problem":
        break
      if kind == "solution" and solution is None:
        solution = text
      elif kind == "answer" and answer_text is None:
        answer_text = text
    if not question:
      return LMChild(None, solution, None, "empty_problem")
    if len(question) > MAX_PROBLEM_CHARS:
      return LMChild(None, solution, None, "problem_too_long")
    answer = _clean_answer(answer_text) if answer_text else ""
    if not answer and solution:
      answer = (answers.extract_answer(solution) or "").strip(_EDGE)
    if not answer:
      return LMChild(question, solution, None, "no_answer")
    if len(answer) > MAX_ANSWER_CHARS:
      return LMChild(question, solution, None, "answer_too_long")
    return LMChild(question, solution, answer)
  except Exception:  # pylint: disable=broad-except
    return LMChild(None, None, None, "unreadable")  # Never raising is the contract.
