"""SPARQ prompts for language models, and reading generator and annotator replies."""
import time

import pytest

from qdc_jax import chat
from qdc_jax.sparq import prompts as P

EOT = chat.END_OF_TURN


def test_prompts_are_single_user_turns():
  for prompt in (P.generator_prompt("What is 2+3?", "2+3=5. \\boxed{5}"),
                 P.student_prompt("What is 2+3?"),
                 P.annotator_prompt("What is 2+3?", "2+3=5", ["addition", "counting"]),
                 P.annotator_prompt("What is 2+3?")):
    assert prompt.startswith("<start_of_turn>user\n")
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    assert prompt.count("<start_of_turn>") == 2
    assert "What is 2+3?" in prompt
  assert "Problem: <the new problem>" in P.generator_prompt("q")
  assert "\\boxed{}" in P.student_prompt("q")
  assert "at most 3 skills" in P.annotator_prompt("q")


def test_annotator_prompt_offers_the_vocabulary_or_asks_free_form():
  vocab = ["addition", "large numbers", "multi step"]
  offered = P.annotator_prompt("What is 2+3?", "2+3=5", vocabulary=vocab, k=2)
  head, problem = offered.split("\n\nProblem:\n")
  assert "at most 2 skills from the list" in head
  assert head.endswith("Skills:\n- addition\n- large numbers\n- multi step")
  assert problem.startswith("What is 2+3?\n\nSolution:\n2+3=5")
  for free in (P.annotator_prompt("What is 2+3?"), P.annotator_prompt("q", vocabulary=[])):
    head = free.split("\n\nProblem:\n")[0]
    assert "one to four words" in head and "Skills:" not in head and "addition" not in head


def test_annotator_reply():
  assert P.parse_annotator_reply(f"Algebra, Geometry{EOT}\nmore text") == ["algebra",
                                                                           "geometry"]
  assert P.parse_annotator_reply(None) == []


@pytest.mark.parametrize("reply, question, answer", [
    # Typical.
    ("Problem: Tom has 3 apples and buys 4 more. How many does he have?\n"
     "Solution: 3 + 4 = 7.\nAnswer: 7",
     "Tom has 3 apples and buys 4 more. How many does he have?", "7"),
    # Markdown, preamble, multi-line sections, end of turn and trailing junk.
    ("Sure! Here is a new problem.\n\n**Problem:**\nFind $x$ if $2x + 1 = 9$.\n"
     "Give your answer as an integer.\n\n**Solution:**\nSubtract 1: $2x = 8$.\nSo $x=4$.\n\n"
     f"**Answer:** $4${EOT}\n<start_of_turn>user\nProblem: ignored\nAnswer: 99",
     "Find $x$ if $2x + 1 = 9$.\nGive your answer as an integer.", "4"),
    # Headings, boxed answer in the Answer section.
    ("## New Problem\nCompute $\\frac{1}{2} + \\frac{1}{3}$.\n## Solution\nCommon denominator."
     "\n## Final Answer\n$\\boxed{\\frac{5}{6}}$",
     "Compute $\\frac{1}{2} + \\frac{1}{3}$.", "\\frac{5}{6}"),
    # No Answer line: the solution's boxed answer.
    ("Question: What is 6 times 7?\nSolution: 6*7 = 42, so the answer is $\\boxed{42}$.",
     "What is 6 times 7?", "42"),
    # "The final answer is" phrase in the solution; bold label with the colon outside.
    ("**Problem**: A square has side 5. What is its area?\n**Solution**: 5^2 = 25. "
     "The final answer is 25.", "A square has side 5. What is its area?", "25"),
    # Several problems: the first one with its own answer.
    ("Problem 1: What is 1+1?\nAnswer: 2\nProblem 2: What is 2+2?\nAnswer: 4",
     "What is 1+1?", "2"),
    # Words that merely start like a label are text, not labels.
    ("Problem: Answer the following: what is 10 - 3?\nAnswer choices are not given.\n"
     "Answer: 7.", "Answer the following: what is 10 - 3?\nAnswer choices are not given.",
     "7"),
    # Units and a trailing period stay in the answer text (answers_equal reads units).
    ("problem: Ann walks 3 km then 2 km. How far?\nanswer: 5 km.",
     "Ann walks 3 km then 2 km. How far?", "5 km"),
])
def test_good_replies(reply, question, answer):
  got = P.parse_lm_generator_reply(reply)
  assert got.error == ""
  assert got.question == question
  assert got.intended_answer == answer


@pytest.mark.parametrize("reply, error", [
    (None, "not_text"),
    (b"Problem: x", "not_text"),
    ("", "empty_reply"),
    (f"   {EOT}Problem: hidden", "empty_reply"),
    ("I cannot help with that.", "no_problem"),
    ("Answer: 5", "no_problem"),
    ("Problem:\nAnswer: 5", "empty_problem"),
    ("Problem: What is 2+2?", "no_answer"),
    ("Problem: What is 2+2?\nSolution: it is four\nAnswer:", "no_answer"),
    ("Problem: What is 2+2?\nAnswer: " + "9" * 500, "answer_too_long"),
    ("Problem: " + "long " * 2000 + "\nAnswer: 1", "problem_too_long"),
    ("Problem: x\nAnswer: 1\n" + "y" * (P.MAX_REPLY_CHARS + 1), "reply_too_long"),
])
def test_bad_replies(reply, error):
  assert P.parse_lm_generator_reply(reply).error == error


def test_adversarial_replies_are_fast_and_never_raise():
  nasty = [
      "Problem:" * 5000,
      "\\boxed{" * 10000 + "Problem: a\nAnswer: \\boxed{" * 100,
      "**" * 20000,
      "Problem: q\nAnswer: $",
      "Problem: q\nAnswer: \\boxed{}",
      "#" * 40000 + " Problem: q",
      "Problem: q\n" + "Answer" + " " * 40000 + "x",
      "\x00\ud800Problem: q\nAnswer: 1",
  ]
  for text in nasty:
    start = time.monotonic()
    got = P.parse_lm_generator_reply(text)
    assert time.monotonic() - start < 2.0
    assert isinstance(got, P.LMChild)
    assert got.error or (got.question and got.intended_answer)
