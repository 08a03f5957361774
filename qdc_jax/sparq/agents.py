"""SPARQ's three roles behind small interfaces, with language-model implementations.

- Generator: parents -> children (question, intended answer), one batched sampler call.
- Student: questions -> K solutions each, ONE batched sampler call for all children x K rows.
- Annotator: questions -> raw skill names (the lab's oracle, or a language model).

Each LM role takes a prompt format: "lab" (the plain templates the lab models were trained
on, `data/lab_tasks.py`) or "gemma_chat" (instruction-tuned Gemma, `sparq/prompts.py`).
Unreadable model output is never an exception: it comes back with an error reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence

import jax

from qdc_jax import chat
from qdc_jax import model_io
from qdc_jax import sampling
from qdc_jax.data import arith, lab_tasks
from qdc_jax.sparq import prompts as sparq_prompts
from qdc_jax.sparq import skills as skills_lib


@dataclasses.dataclass(frozen=True)
class Child:
  raw_output: str
  question: Optional[str]
  intended_answer: Optional[str]
  solution: Optional[str]
  error: str = ""


@dataclasses.dataclass
class LM:
  """A model with its params, tokenizer and placement: what every LM role samples from."""
  model: Any
  params: Any
  tokenizer: Any
  mesh: Any = None
  rules: Any = None
  param_shardings: Any = None
  extra_stop_ids: tuple[int, ...] = ()

  def generate(self, prompts: Sequence[str], *, k: int, temperature: float,
               max_new_tokens: int, rng: jax.Array, batch_size: int, slots: int = 0
               ) -> list[list[str]]:
    sp = sampling.SamplingParams(max_new_tokens=max_new_tokens, num_samples=k,
                                 temperature=temperature, greedy=temperature == 0.0,
                                 extra_stop_ids=self.extra_stop_ids)
    # Fixed rows and coarse prompt buckets: one compiled sampler for every round.
    return sampling.generate_text(self.params, prompts, model=self.model,
                                  tokenizer=self.tokenizer, sp=sp, rng=rng,
                                  batch_size=batch_size, mesh=self.mesh, rules=self.rules,
                                  param_shardings=self.param_shardings, pad_multiple=64,
                                  fixed_batch=True, slots=slots)


def student_prompt(question: str, prompt_format: str = "lab") -> str:
  """What the student (and a reward model scoring its solutions) is shown for a question."""
  if prompt_format == "lab":
    return arith.PROMPT_TEMPLATE.format(question=question)
  return sparq_prompts.student_prompt(question)


def load_lm(model_dir: str, default_asset: str, mesh, rules, tokenizer_path: str = "") -> LM:
  """The LM of a model directory ('' = the shipped asset `default_asset`), on the mesh;
  `tokenizer_path` replaces the directory's tokenizer with a SentencePiece file."""
  from qdc_jax.models import transformer  # pylint: disable=g-import-not-at-top
  path = model_dir or model_io.asset_path(default_asset)
  cfg, params, tok, _, shardings = model_io.load_model(path, mesh=mesh, rules=rules)
  if tokenizer_path:
    from qdc_jax import tokenizers  # pylint: disable=g-import-not-at-top
    tok = tokenizers.SentencePieceTokenizer(tokenizer_path)
  if tok is None:
    raise ValueError(f"{path} names no tokenizer; set the tokenizer path flag")
  return LM(transformer.Transformer(cfg), params, tok, mesh, rules, shardings)


class Generator(Protocol):
  def mutate(self, parents: Sequence[tuple[str, Optional[str]]], rng: jax.Array
             ) -> list[Child]:
    """(question, solution) parents -> one child each."""


class Student(Protocol):
  def solve(self, questions: Sequence[str], k: int, rng: jax.Array) -> list[list[str]]:
    """K solutions per question, all in one batched call."""


@dataclasses.dataclass
class LMGenerator:
  lm: LM
  prompt_format: str = "lab"  # 'lab' | 'gemma_chat'
  temperature: float = 1.0
  max_new_tokens: int = 320
  batch_size: int = 64

  def mutate(self, parents, rng):
    if self.prompt_format == "lab":
      texts = [lab_tasks.GENERATOR_PROMPT_TEMPLATE.format(question=q, solution=s or "")
               for q, s in parents]
    else:
      texts = [sparq_prompts.generator_prompt(q, s) for q, s in parents]
    outs = self.lm.generate(texts, k=1, temperature=self.temperature,
                            max_new_tokens=self.max_new_tokens, rng=rng,
                            batch_size=self.batch_size)
    children = []
    for (raw,) in outs:
      if self.prompt_format == "lab":
        c = lab_tasks.parse_generator_output(raw)
        answer = None if c.intended_answer is None else str(c.intended_answer)
      else:
        c = sparq_prompts.parse_lm_generator_reply(raw)
        answer = c.intended_answer
      children.append(Child(raw, c.question, answer, c.solution, c.error))
    return children


@dataclasses.dataclass
class LMStudent:
  lm: LM
  prompt_format: str = "lab"
  temperature: float = 1.0
  max_new_tokens: int = 160
  batch_size: int = 64  # questions per sampler call (x K rows)
  slots: int = 0  # > 0: continuous batching through this many decode rows (same samples)

  def prompt(self, question: str) -> str:
    return student_prompt(question, self.prompt_format)

  def reply(self, text: str) -> str:
    return text if self.prompt_format == "lab" else chat.parse_model_reply(text)

  def solve(self, questions, k, rng):
    outs = self.lm.generate([self.prompt(q) for q in questions], k=k,
                            temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                            rng=rng, batch_size=self.batch_size, slots=self.slots)
    return [[self.reply(t) for t in row] for row in outs]


@dataclasses.dataclass
class LMAnnotator:
  """Skills named by an instruction-tuned model (the thesis used Gemma-2-9b-it).

  Without a vocabulary the model names skills free-form (how the seed set's skills are found);
  `with_vocabulary` gives the annotator that picks from the seed set's M most common skills,
  which is what the SPARQ loop uses for every later problem.
  """
  lm: LM
  vocabulary: Optional[Sequence[str]] = None
  k: int = 3
  max_new_tokens: int = 48
  batch_size: int = 64

  def with_vocabulary(self, vocabulary: skills_lib.SkillVocabulary) -> LMAnnotator:
    return dataclasses.replace(self, vocabulary=tuple(vocabulary.skills))

  def annotate(self, questions, solutions=None):
    if not questions:
      return []
    solutions = solutions or [None] * len(questions)
    texts = [sparq_prompts.annotator_prompt(q, s, vocabulary=self.vocabulary, k=self.k)
             for q, s in zip(questions, solutions)]
    outs = self.lm.generate(texts, k=1, temperature=0.0, max_new_tokens=self.max_new_tokens,
                            rng=jax.random.PRNGKey(0), batch_size=self.batch_size)
    return [sparq_prompts.parse_annotator_reply(chat.parse_model_reply(o[0])) for o in outs]


@dataclasses.dataclass
class ProgrammaticGenerator:
  """The lab's reference generator: `arith.mutate` children, always valid.

  A yardstick for the learned generator (what an error-free mutator would give) and a
  deterministic generator for tests. Parents outside the controlled language get an error.
  """
  seed: int = 0

  def mutate(self, parents, rng):
    import random  # pylint: disable=g-import-not-at-top
    r = random.Random(int(jax.random.randint(rng, (), 0, 2**31 - 1)) + self.seed)
    children = []
    for question, _ in parents:
      try:
        child = arith.mutate(r, arith.problem_from_text(question)).child
      except (arith.ParseError, arith.MutationError, ValueError) as e:
        children.append(Child("", None, None, None, f"programmatic: {e}"[:100]))
        continue
      raw = f"{child.text}\nSolution:\n{child.solution}"
      children.append(Child(raw, child.text, str(child.answer), child.solution))
    return children
