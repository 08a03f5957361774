"""Lab tasks, model directories and the lab experiments end to end (tiny settings)."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from qdc_jax import model_io
from qdc_jax.data import arith, lab_tasks
from qdc_jax.eval import metrics
from qdc_jax.experiments import evaluate, lm
from qdc_jax.models import configs
from qdc_jax.models import transformer as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import arith_lab  # pylint: disable=g-import-not-at-top,wrong-import-position
import evaluate as evaluate_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_generator_records_round_trip_through_the_parser():
  parents = arith.make_split("in_dist", 50, seed=3)
  records = lab_tasks.generator_records(parents, seed=0)
  assert len(records) >= 45
  for rec in records:
    child = lab_tasks.parse_generator_output(rec["completion"])
    assert child.error == ""
    verdict = arith.oracle(child.question, child.intended_answer)
    assert verdict.parses and verdict.valid  # programmatic mutations are always valid
    assert rec["prompt"].startswith("Parent: ") and rec["prompt"].endswith("\nChild:\n")


@pytest.mark.parametrize("text,error", [
    ("Compute 3 + 4.", "no_solution_marker"),
    ("\nSolution:\n3+4=7\nThe answer is 7.", "empty_question"),
    ("Compute 3 + 4.\nSolution:\n3+4=7", "no_answer_line"),
    (None, "not_text"),
])
def test_parse_generator_output_reports_reasons(text, error):
  assert lab_tasks.parse_generator_output(text).error == error


def test_test_problems_never_train():
  config = arith_lab.get_config("smoke")
  config.data.train_size = 3000
  train, _ = lm.lab_records(config.data)
  tests = {p.text for s in ("in_dist", "ood")
           for p in lab_tasks.test_problems(s, config.data.test_size)}
  questions = {arith.Problem.from_record(r).text for r in train}
  assert not questions & tests
  # 10% of training problems come from the 'bridge' split (3-4 ops); in_dist has <= 3 ops,
  # so 4-op problems are about half of the bridge share.
  steps = [arith.problem_from_text(q).num_steps for q in questions]
  assert max(steps) == 4
  assert 0.03 < np.mean([s >= 4 for s in steps]) < 0.08


def test_model_dir_round_trip(tmp_path):
  cfg = configs.get_model_config("lab_tiny")
  model = T.Transformer(cfg)
  params = T.nn.meta.unbox(model.init(jax.random.PRNGKey(1), np.zeros((1, 4), np.int32))
                           ["params"])
  model_io.save_model(str(tmp_path), cfg, params,
                      tokenizer={"kind": "char", "alphabet": arith.ALPHABET})
  cfg2, params2, tok, _, _ = model_io.load_model(str(tmp_path))
  assert cfg2 == cfg and tok.vocab_size <= cfg.vocab_size
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(params2))
  with pytest.raises(FileNotFoundError, match="model.json"):
    model_io.load_model(str(tmp_path / "nope"))


def test_generator_smoke_then_evaluate_smoke(tmp_path):
  """Train + export + measure a (tiny) generator and student, then evaluate the student."""
  gen = lm.run(arith_lab.get_config("generator_smoke"), str(tmp_path / "gen"))
  g = gen["generator"]
  assert g["n"] == 8 and 0 <= g["valid_rate"] <= g["parse_rate"] <= 1
  assert sum(g["failures"].values()) + round(g["parse_rate"] * 8) == 8

  student = arith_lab.get_config("smoke")
  student.mesh.shape = (2, 2, 2)  # every mesh axis in use, as the multi-process test runs it
  lm.run(student, str(tmp_path / "student"))
  config = evaluate_config.get_config("smoke")
  config.model_dir = str(tmp_path / "student" / "model")
  report = evaluate.run(config, str(tmp_path))
  for split in ("in_dist", "ood"):
    m = report["results"][split]
    assert m["num_problems"] == 8
    assert m["pass@1"] <= m["pass@2"] <= m["pass@4"] <= 1.0
  saved = json.loads((tmp_path / "eval_report.json").read_text())
  assert saved["results"]["ood"]["pass@4"] == report["results"]["ood"]["pass@4"]
  assert (tmp_path / "pass_at_k.png").stat().st_size > 1000
  examples = json.loads((tmp_path / "eval_examples.json").read_text())
  # Each example's greedy completion scores as the report says, by an independent check.
  first = examples["in_dist"][0]
  assert metrics.summarize([[first["greedy"]]], [first["reference"]], [1])["pass@1"] in (0, 1)
