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


def _sparq_cmd(workdir):
  return [sys.executable, "-m", "qdc_jax.main", "--config=configs/sparq.py:smoke",
          f"--workdir={workdir}"]


def _archive_rows(workdir):
  return [i.to_json() for i in Archive(os.path.join(workdir, "archive")).load_items()]


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
  # One CPU device, as a user's run has (conftest gives this process 8 fake ones).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  ref = tmp_path / "ref"
  t0 = time.time()
  done = subprocess.run(_sparq_cmd(ref), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  duration = time.time() - t0
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
