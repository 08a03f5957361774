"""SPARQ phase 1 with stand-in roles (fast), and the real experiment killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qdc_jax import chat
from qdc_jax.data import arith
from qdc_jax.sparq import agents, loop, skills
from qdc_jax.sparq.archive import Archive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import sparq as sparq_config  # pylint: disable=g-import-not-at-top,wrong-import-position


class CountingStudent:
  """Solves a lab problem correctly with probability p; records every call."""

  def __init__(self, p=0.5):
    self.p, self.calls = p, []

  def solve(self, questions, k, rng):
    self.calls.append((len(questions), k))
    r = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**30)))
    return [[arith.problem_from_text(q).solution if r.random() < self.p
             else "1+1=2\nThe answer is 2." for _ in range(k)] for q in questions]


def _run(tmp_path, strategy, rounds=4, student=None):
  c = sparq_config.get_config("smoke")
  c.sparq.strategy, c.sparq.rounds = strategy, rounds
  c.sparq.working_set_size, c.sparq.niche_limit = 6, 2
  student = student or CountingStudent()
  roles = loop.Roles(agents.ProgrammaticGenerator(), student, skills.OracleAnnotator(),
                     lambda q, a: bool(arith.oracle(q, a).valid))
  seeds = [loop.Seed(p.text, p.solution, str(p.answer))
           for p in arith.make_split("in_dist", 32, 0)]
  archive = Archive(str(tmp_path / strategy))
  return loop.run_rounds(archive, seeds, roles, c.sparq), student, archive


@pytest.mark.parametrize("strategy", ["static_uniform", "static_diverse", "dynamic_uniform",
                                      "dynamic_diverse"])
def test_rounds_ids_parents_and_quality(tmp_path, strategy):
  items, student, archive = _run(tmp_path, strategy)
  assert [it.id for it in items] == list(range(32 + 4 * 8))
  assert archive.rounds_committed() == 5  # seeds + 4 rounds
  # One batched student call per round: every readable child x K rows.
  assert student.calls == [(8, 4)] * 4
  children = [it for it in items if it.round > 0]
  by_id = {it.id: it for it in items}
  for it in children:
    assert it.parent_id < it.id and it.valid is True  # programmatic children are valid
    expected = (1 - it.solve_rate) if 0.1 <= it.solve_rate <= 0.9 else 0.0
    assert it.quality == pytest.approx(expected)
    assert len(it.successful_solutions) == it.num_correct
  parents = [by_id[it.parent_id] for it in children]
  if strategy.startswith("static"):
    assert all(p.round == 0 for p in parents)  # W is the seed set
  else:
    # Children with QUALITY > 0 enter W and are mutated in later rounds.
    assert any(p.round > 0 for p in parents)
    assert all(p.quality > 0 for p in parents if p.round > 0)


def test_resume_in_process_equals_uninterrupted(tmp_path):
  full, _, _ = _run(tmp_path / "a", "dynamic_diverse", rounds=4)
  _run(tmp_path / "b", "dynamic_diverse", rounds=2)
  resumed, student, _ = _run(tmp_path / "b", "dynamic_diverse", rounds=4)
  assert len(student.calls) == 2  # only the missing rounds ran
  assert [i.to_json() for i in resumed] == [i.to_json() for i in full]


class FakeAnnotatorLM:
  """Stands in for an instruction-tuned annotator model (`agents.LM`); records its prompts.

  Behaves as real models do: asked free-form, it names skills its own way, and not the same
  way twice (the seed set in its words, any later problem in others, which are then unknown
  skills); offered a list, it picks the listed skills the problem needs (its oracle skills),
  writing them with stray case and whitespace.
  """

  def __init__(self, seed_questions):
    self.seed_questions, self.prompts = set(seed_questions), []

  def generate(self, prompts, *, k, temperature, max_new_tokens, rng, batch_size):
    del temperature, max_new_tokens, rng, batch_size
    assert k == 1
    self.prompts.extend(prompts)
    return [[self._reply(p) + chat.END_OF_TURN] for p in prompts]

  def _reply(self, prompt):
    offered, question = _annotator_prompt_parts(prompt)
    names = [s.replace("_", " ") for s in arith.oracle(question, None).skills]
    picked = [n for n in names if n in offered]
    if picked:
      return ", ".join(f"  {n.upper()}  " if i % 2 else n.title().replace(" ", "   ")
                       for i, n in enumerate(picked))
    if question in self.seed_questions:
      return ", ".join(n.title() for n in names)
    return ", ".join(f"working with {n}" for n in names)


def _annotator_prompt_parts(prompt):
  """(the instructions, with any offered skills, lower-cased; the problem)."""
  head, body = prompt.split("\n\nProblem:\n", 1)
  question = body.split("\n\nSolution:\n", 1)[0].split(chat.END_OF_TURN, 1)[0]
  return head.lower(), question.strip()


def _run_lm_annotated(workdir, rounds):
  """Lab roles except the annotator: an `agents.LMAnnotator` over a fresh FakeAnnotatorLM."""
  c = sparq_config.get_config("smoke")
  c.sparq.strategy, c.sparq.rounds = "dynamic_diverse", rounds
  seeds = [loop.Seed(p.text, p.solution, str(p.answer))
           for p in arith.make_split("in_dist", 32, 0)]
  lm = FakeAnnotatorLM([s.question for s in seeds])
  annotator = agents.LMAnnotator(lm, k=c.sparq.max_skills_per_problem)
  roles = loop.Roles(agents.ProgrammaticGenerator(), CountingStudent(), annotator)
  archive = Archive(str(workdir))
  items = loop.run_rounds(archive, seeds, roles, c.sparq)
  vocab = skills.SkillVocabulary.from_json(archive.load_state(0)["vocabulary"])
  assert annotator.vocabulary is None  # the caller's annotator is left free-form
  return items, vocab, lm, c.sparq


def _expected_skill_set(question, vocab, k):
  # Independent of SkillVocabulary: the oracle's skills in the vocabulary, k most common.
  names = [s.replace("_", " ") for s in arith.oracle(question, None).skills]
  known = sorted((vocab.skills.index(n) for n in names if n in vocab.skills))[:k]
  return tuple(sorted(vocab.skills[i] for i in known))


def _check_children(items, lm, vocab, sc, rounds):
  children = [it for it in items if it.round in rounds and not it.parse_error]
  assert children
  child_prompts = [p for p in lm.prompts if _annotator_prompt_parts(p)[1] not in
                   lm.seed_questions]
  assert len(child_prompts) == len(children)
  for prompt in child_prompts:  # every child's prompt offers every vocabulary skill
    offered = _annotator_prompt_parts(prompt)[0]
    assert all(f"- {s}\n" in offered + "\n" for s in vocab.skills)
  for it in children:  # replies naming listed skills, in any case and spacing, are known
    assert it.skill_set and it.skill_set == _expected_skill_set(it.question, vocab,
                                                                 sc.max_skills_per_problem)


def test_lm_annotator_labels_children_with_the_seed_vocabulary(tmp_path):
  items, vocab, lm, sc = _run_lm_annotated(tmp_path / "run", rounds=2)
  # The vocabulary is the seeds' free-form names (the fake's spelling, normalised).
  assert set(vocab.skills) == {s.replace("_", " ") for it in items if it.round == 0
                               for s in arith.oracle(it.question, None).skills}
  seed_prompts = lm.prompts[:32]
  assert [_annotator_prompt_parts(p)[1] for p in seed_prompts] == [
      it.question for it in items if it.round == 0]
  for prompt in seed_prompts:  # round 0 stays free-form: that is what builds the vocabulary
    assert not any(s in _annotator_prompt_parts(prompt)[0] for s in vocab.skills)
  assert all(it.skill_set for it in items if it.round == 0)
  _check_children(items, lm, vocab, sc, rounds={1, 2})
  children = [it for it in items if it.round > 0]
  assert skills.coverage(it.skill_set for it in children) > 1


def test_lm_annotator_after_resume_gets_the_restored_vocabulary(tmp_path):
  full, _, _, _ = _run_lm_annotated(tmp_path / "full", rounds=2)
  _, vocab, first_lm, _ = _run_lm_annotated(tmp_path / "resumed", rounds=1)  # killed here
  # A new process: a fresh annotator that has never seen the seeds.
  items, vocab_after, lm, sc = _run_lm_annotated(tmp_path / "resumed", rounds=2)
  assert vocab_after == vocab
  assert len(first_lm.prompts) == 32 + 8 and len(lm.prompts) == 8  # only round 2 is annotated
  _check_children(items, lm, vocab, sc, rounds={2})
  assert [i.to_json() for i in items] == [i.to_json() for i in full]


def test_annotators_with_vocabulary():
  vocab = skills.SkillVocabulary(skills=("addition", "large numbers"), counts=(2, 1))
  free = agents.LMAnnotator(lm=None, k=2)
  given = free.with_vocabulary(vocab)
  assert given.vocabulary == ("addition", "large numbers") and free.vocabulary is None
  assert (given.lm, given.k) == (free.lm, free.k)
  oracle = skills.OracleAnnotator()
  assert oracle.with_vocabulary(vocab) is oracle
  assert isinstance(given, skills.SkillAnnotator) and isinstance(oracle, skills.SkillAnnotator)
  assert given.annotate([]) == []


def _sparq_cmd(workdir):
  return [sys.executable, "-m", "qdc_jax.main", "--config=configs/sparq.py:smoke",
          f"--workdir={workdir}"]


def _archive_rows(workdir):
  return [i.to_json() for i in Archive(os.path.join(workdir, "archive")).load_items()]


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
  # One CPU device, as a user's run has (conftest gives this process 8 fake ones).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  # The first run fills the persistent compilation cache (conftest), so the killed runs are
  # faster than it: the kill times come from a second, warm run, which is also the reference
  # (and must equal the first: same archive from a cold and a warm start).
  cold, ref = tmp_path / "cold", tmp_path / "ref"
  for workdir in (cold, ref):
    t0 = time.time()
    done = subprocess.run(_sparq_cmd(workdir), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    duration = time.time() - t0
  assert _archive_rows(cold) == _archive_rows(ref)
  rng = np.random.default_rng(0)
  work = tmp_path / "killed"
  kills = 0
  for attempt in range(12):
    proc = subprocess.Popen(_sparq_cmd(work), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill within the first 90% of a full run's time: start-up, rounds, distillation, eval.
    if kills < 3:
      try:
        proc.wait(timeout=float(rng.uniform(0.3, 0.9)) * duration)
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        continue
    assert proc.wait(timeout=900) == 0
    break
  assert kills >= 1
  assert _archive_rows(work) == _archive_rows(ref)  # nothing lost, nothing duplicated
  for name in ("eval_baseline.json", "eval_sparq.json"):
    a = json.loads((ref / name).read_text())["results"]
    b = json.loads((work / name).read_text())["results"]
    for split in a:
      for key in ("pass@1", "greedy_accuracy"):
        assert a[split][key] == b[split][key]
  rows = [json.loads(l) for l in (work / "sparq_metrics.jsonl").read_text().splitlines()]
  # Every round logged exactly once, kills or not.
  assert [r["step"] for r in rows] == list(range(1, sparq_config.get_config("smoke")
                                                 .sparq.rounds + 1))
