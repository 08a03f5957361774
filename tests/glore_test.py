"""GLoRe: the lab's step oracle, reward-model labels and loss, scoring, refinement data, e2e."""

import json
import os
import random
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdc_jax import fit
from qdc_jax import sharding as sharding_lib
from qdc_jax import tokenizers
from qdc_jax.data import arith
from qdc_jax.experiments import glore as glore_exp
from qdc_jax.models import configs, heads
from qdc_jax.rl import glore, reward_models as rm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import glore as glore_config  # pylint: disable=g-import-not-at-top,wrong-import-position


# ------------------------------------------------------------------ the oracle


def _right_first_solution(tree):
  """A valid solution in another order than `arith.solution`: right subtrees first, and the
  operands of commutative ops written swapped."""
  lines = []

  def visit(node):
    if isinstance(node, arith.Num):
      return node.value
    b = visit(node.right)
    a = visit(node.left)
    value = arith.apply_op(node.op, a, b)
    x, y = (b, a) if node.op in ("+", "*", "min", "max") else (a, b)
    lines.append(arith.format_step(arith.Step(node.op, x, y, value)))
    return value

  visit(tree)
  return lines + [arith.ANSWER_TEMPLATE.format(answer=arith.evaluate(tree))]


def _problems():
  return arith.make_split("in_dist", 150, seed=5) + arith.make_split("ood", 100, seed=6)


def test_oracle_accepts_every_valid_order_and_finds_the_first_wrong_step():
  rng = random.Random(0)
  for p in _problems():
    steps = p.solution.split("\n")
    assert arith.first_wrong_step(p.tree, steps) is None
    assert arith.first_wrong_step(p.tree, _right_first_solution(p.tree)) is None
    assert arith.first_wrong_step(p.tree, steps[:-1]) == len(steps) - 1  # unfinished
    wrong_answer = steps[:-1] + [arith.ANSWER_TEMPLATE.format(answer=p.answer + 1)]
    assert arith.first_wrong_step(p.tree, wrong_answer) == len(steps) - 1
    assert arith.first_wrong_step(p.tree, steps[:1] + steps) is None  # a repeat is harmless
    if len(steps) > 1:
      k = rng.randrange(len(steps) - 1)
      lhs, value = steps[k].rsplit("=", 1)
      bad = list(steps)
      bad[k] = f"{lhs}={int(value) + 7}"  # a wrong result at step k
      assert arith.first_wrong_step(p.tree, bad) == k
      garbled = list(steps)
      garbled[k] = "so we add them"
      assert arith.first_wrong_step(p.tree, garbled) == k


def test_oracle_rejects_a_step_on_a_value_not_computed_yet():
  tree = arith.parse("Compute (2 + 3) * (4 + 5).")
  assert arith.first_wrong_step(tree, ["2+3=5", "4+5=9", "5*9=45", "The answer is 45."]) is None
  assert arith.first_wrong_step(tree, ["5*9=45", "The answer is 45."]) == 0  # 5, 9 not computed
  assert arith.first_wrong_step(tree, ["2+3=5", "3+2=5", "4+5=9", "9*5=45",
                                       "The answer is 45."]) is None
  twin = arith.parse("Compute (3 + 4) * (3 + 4).")  # equal subtrees: one computation
  assert arith.first_wrong_step(twin, ["3+4=7", "7*7=49", "The answer is 49."]) is None
  sub = arith.parse("Compute 10 - 4.")
  assert arith.first_wrong_step(sub, ["4-10=-6", "The answer is 6."]) == 0  # not commutative


# ------------------------------------------------------------------ labels


def _sol(correct, checks, q=0, sample=0, steps=None, oracle=None):
  steps = steps or [f"{i}+1={i + 1}" for i in range(len(checks))] + ["The answer is 9."]
  return rm.Solution(question=q, sample=sample, prompt="Q\n", answer="9", steps=steps,
                     correct=correct, rollout_checks=checks,
                     verifiers=[next(("v" for c, ok in g if c and ok), None) for g in checks],
                     oracle_first_wrong=oracle)


def test_consistency_needs_the_step_result_as_a_whole_number():
  assert rm.step_result("12+7=19") == "19" and rm.step_result("The answer is 4.") is None
  assert rm.consistent("12+7=19", "19*2=38\nThe answer is 38.")
  assert not rm.consistent("12+7=19", "119*2=238\n")
  assert rm.consistent("3-5=-2", "-2+4=2")
  assert not rm.consistent("3-5=-2", "5-2=3")  # the 2 of 5-2 is not the result -2
  assert rm.consistent("The answer is 3.", "anything")


def test_sorm_labels_need_a_consistent_verifier_and_propagate_backwards():
  s = _sol(False, [[(True, False), (False, True)],  # correct but inconsistent: not verified
                   [(False, True), (True, True)],  # verified
                   [(False, True), (False, False)]])
  assert rm.sorm_raw_labels(s) == [False, True, False, False]
  assert rm.sorm_raw_labels(s, consistency=False) == [True, True, False, False]
  assert rm.sorm_labels(s) == [True, True, False, False]  # step 1 verified -> step 0 too
  assert rm.orm_labels(s) == [False] * 4
  ok = _sol(True, [[(False, True)], [(False, True)]])
  assert rm.sorm_labels(ok) == [True, True, True]  # the correct final step propagates
  assert rm.oracle_labels(_sol(False, [[], []], oracle=1)) == [True, False, False]
  assert rm.oracle_labels(_sol(True, [[], []], oracle=None)) == [True, True, True]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balancing_equalises_classes(seed):
  rng = np.random.default_rng(seed)
  data = [_sol(bool(rng.random() < 0.3), [[(bool(rng.random() < 0.5), True)]
                                          for _ in range(int(rng.integers(0, 5)))],
               q=int(rng.integers(0, 12)), sample=i) for i in range(120)]
  keep = rm.balance_per_question(data, seed)
  for q in {d.question for d in data}:
    rows = [data[i] for i in keep if data[i].question == q]
    pos = sum(r.correct for r in rows)
    assert pos == len(rows) - pos
    allq = [d for d in data if d.question == q]
    assert pos == min(sum(d.correct for d in allq), sum(not d.correct for d in allq))
  labels = [rm.sorm_labels(d) for d in data]
  mask = rm.balance_per_step(labels, seed)
  for t in range(max(len(l) for l in labels)):
    chosen = [l[t] for l, m in zip(labels, mask) if len(l) > t and m[t]]
    at_t = [l[t] for l in labels if len(l) > t]
    assert sum(chosen) == len(chosen) - sum(chosen) == min(sum(at_t), len(at_t) - sum(at_t))


# ------------------------------------------------------------------ tokens, loss, scoring

TOK = tokenizers.make_tokenizer("char", alphabet=arith.ALPHABET)


def test_step_end_tokens_point_at_each_steps_last_character():
  steps = ["12+7=19", "19*3=57", "The answer is 57."]
  ids, ends = rm.step_end_tokens(TOK, "Question: x\nSolution:\n", steps)
  text = TOK.decode(ids)
  assert text == "Question: x\nSolution:\n" + "\n".join(steps)
  for e, s in zip(ends, steps):
    assert TOK.decode(ids[:e + 1]).endswith(s)
  # "Q\n" is BOS + 2 tokens: the steps end at 3 + 6, 3 + 14, 3 + 32.
  cols, cut = rm.encode(TOK, [("Q\n", steps, [True, False, True], [True, True, True])], 16)
  assert cut == 2  # the second (16 past 15) and third steps' ends
  assert np.flatnonzero(cols["weights"][0]).tolist() == [9] and cols["labels"][0, 9] == 1
  cols, cut = rm.encode(TOK, [("Q\n", steps, [True, False, True], [True, True, False])], 40)
  assert cut == 0 and np.flatnonzero(cols["weights"][0]).tolist() == [9, 17]
  assert cols["labels"][0, [9, 17]].tolist() == [1.0, 0.0]


def test_bce_loss_matches_numpy():
  cfg = configs.get_model_config("lab_tiny")
  model = heads.RewardModel(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                         ["params"])
  params["head"]["w"] = jax.random.normal(jax.random.PRNGKey(1), (cfg.d_model,))
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(3, 60, (3, 16)).astype(np.int32),
           "labels": (rng.random((3, 16)) < 0.5).astype(np.float32),
           "weights": (rng.random((3, 16)) < 0.4).astype(np.float32)}
  loss, aux = rm.bce_loss_sums(params, batch, model=model)
  z = np.asarray(model.apply({"params": params}, batch["tokens"]), np.float64)
  p = 1 / (1 + np.exp(-z))
  y, w = batch["labels"], batch["weights"]
  want = -np.sum(w * (y * np.log(p) + (1 - y) * np.log(1 - p)))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(aux["tokens"]) == w.sum()
  assert float(aux["correct"]) == np.sum(w * ((z > 0) == (y > 0.5)))


def test_scorer_reads_each_prefix_as_the_model_does_alone(tmp_path):
  cfg = configs.get_model_config("lab_tiny")
  model = heads.RewardModel(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                         ["params"])
  params["head"]["w"] = jax.random.normal(jax.random.PRNGKey(2), (cfg.d_model,))
  rm.save(str(tmp_path / "rm"), cfg, params,
          tokenizer_meta={"kind": "char", "alphabet": arith.ALPHABET})
  mesh = sharding_lib.make_mesh((-1, 1, 1))
  scorer = rm.load(str(tmp_path / "rm"), mesh=mesh, batch_size=2)
  prompts = ["Question: 1+2\nSolution:\n", "Question: 3*4\nSolution:\n", "Question: q\n"]
  sols = [["1+2=3", "The answer is 3."], ["3*4=12", "12-1=11", "The answer is 11."], []]
  got = scorer.step_scores(prompts, sols)
  for prompt, steps, scores in zip(prompts, sols, got):
    assert len(scores) == len(steps)
    for i in range(len(steps)):  # the prefix alone, unpadded
      ids = TOK.encode(prompt + "\n".join(steps[:i + 1]), add_bos=True)
      logit = float(model.apply({"params": params}, jnp.asarray([ids]))[0, -1])
      assert scores[i] == pytest.approx(1 / (1 + np.exp(-logit)), rel=1e-4)
  final = scorer.final_scores(prompts, ["1+2=3\nThe answer is 3.", "3*4=12\n", ""])
  assert final[0] == pytest.approx(got[0][-1]) and final[2] == 0.5


# ------------------------------------------------------------------ refinement data


def test_refinement_records():
  steps_bad = ["2+2=5", "5*2=10", "The answer is 10."]
  wrong = _sol(False, [[(False, True)], [(False, True)]], q=0, sample=0, steps=steps_bad)
  right = _sol(True, [[(True, True)], [(True, True)]], q=0, sample=1,
               steps=["2+2=4", "4*2=8", "The answer is 8."])
  # Step 0 verified by "4*2=8..."-like rollout, step 1 not: local marks step 1.
  late = rm.Solution(question=1, sample=0, prompt="Q2\n", answer="8",
                     steps=["2+2=4", "4*2=9", "The answer is 9."], correct=False,
                     rollout_checks=[[(True, True)], [(False, True)]],
                     verifiers=["4*2=8\nThe answer is 8.", None])
  data = [wrong, right, late]
  g = glore.global_records(data)
  assert g == [{"prompt": "Q\n[BAD]2+2=5\n5*2=10\nThe answer is 10." + glore.SEPARATOR,
                "completion": right.text}]  # question 1 has no correct sample: no record
  loc = glore.local_records(data)
  assert loc[0] == {"prompt": "Q\n[BAD]2+2=5\n5*2=10\nThe answer is 10." + glore.SEPARATOR,
                    "completion": right.text}
  assert loc[1] == {"prompt": "Q2\n2+2=4\n[BAD]4*2=9\nThe answer is 9." + glore.SEPARATOR,
                    "completion": "2+2=4\n4*2=8\nThe answer is 8."}
  assert glore.first_error([0.9, 0.5, 0.2]) == 1 and glore.first_error([0.7, 0.6]) is None


def test_refinement_table_by_hand():
  drafts = [rm.Solution(question=i, sample=0, prompt="Q\n", answer=a, steps=[f"The answer is "
                                                                             f"{d}."],
                        correct=a == d) for i, (a, d) in enumerate([("1", "1"), ("2", "0"),
                                                                    ("3", "0")])]
  cands = {"draft": ["The answer is 1.", "The answer is 0.", "The answer is 0."],
           "global": ["The answer is 0.", "The answer is 2.", "The answer is 0."],
           "local": ["The answer is 1.", "The answer is 0.", "The answer is 3."]}
  orm = {"draft": np.array([0.9, 0.2, 0.5]), "global": np.array([0.1, 0.8, 0.1]),
         "local": np.array([0.5, 0.1, 0.4])}
  best = [(["The answer is 1.", "The answer is 7."], [0.3, 0.9])] * 3
  t = glore_exp.refinement_table(drafts, cands, orm, best)
  assert t["draft"] == {"all": pytest.approx(1 / 3), "incorrect_drafts": 0.0}
  assert t["global"]["incorrect_drafts"] == 0.5 and t["local"]["incorrect_drafts"] == 0.5
  assert t["orm_rerank(draft, global, local)"] == {"all": pytest.approx(2 / 3),
                                                   "incorrect_drafts": 0.5}
  assert t["oracle_rerank(draft, global, local)"]["all"] == 1.0
  assert t["orm_best_of_2"]["all"] == 0.0  # picks "7" everywhere
  assert t["counts"] == {"drafts": 3, "incorrect_drafts": 2}


# ------------------------------------------------------------------ the workload


def test_glore_smoke_resumes_and_reports(tmp_path, monkeypatch):
  c = glore_config.get_config("smoke")
  c.rm_train.stop_at_step = 2  # as if killed while training the first reward model
  out = glore_exp.run(c, str(tmp_path))
  assert out == {"stopped": "orm"} and not (tmp_path / "report.json").exists()
  data = (tmp_path / "train_solutions.jsonl").read_text()
  c.rm_train.stop_at_step = -1
  report = glore_exp.run(c, str(tmp_path))
  assert (tmp_path / "train_solutions.jsonl").read_text() == data  # not sampled again
  for f in ("report.md", "report.json", "glore.png", "orm/model/model.json",
            "sorm/model/model.json", "refine_local/model/model.json"):
    assert (tmp_path / f).exists(), f
  meta = json.loads((tmp_path / "orm/model/model.json").read_text())
  assert meta["kind"] == "reward_model"
  assert "[" in json.loads((tmp_path / "refine_global/model/model.json").read_text()
                           )["tokenizer"]["alphabet"]
  assert report["data"]["train_solutions"] == c.task.train_size * c.glore.train.samples
  drafts = report["refinement"]["counts"]["drafts"]
  assert drafts == c.task.test_size
  assert report["data"]["test_solutions"] == drafts * (1 + c.glore.test.samples)
  for kind in rm.LABEL_KINDS:
    m = report["reward_models"][kind]
    assert 0 <= m["final_accuracy"] <= 1 and m["solutions"] == report["data"]["test_solutions"]
  assert f"rerank@{c.eval.k}" in report["student_eval"]
  rows = [rm.Solution.from_json(json.loads(l)) for l in data.splitlines()]
  from qdc_jax.rl import common  # pylint: disable=g-import-not-at-top
  items = common.load_task(c.task).train
  for s in rows:  # the stored oracle agrees with a fresh check
    assert s.oracle_first_wrong == arith.first_wrong_step(arith.parse(items[s.question].question),
                                                          s.steps)
    assert len(s.rollout_checks) == max(len(s.steps) - 1, 0)
    assert all(len(g) == c.glore.rollouts_per_step for g in s.rollout_checks)
  # Finished: a rerun trains nothing; other settings are refused.
  monkeypatch.setattr(fit, "fit", lambda *a, **k: pytest.fail("trained again"))
  assert glore_exp.run(c, str(tmp_path)) == report
  c.glore.rollouts_per_step = 3
  with pytest.raises(ValueError, match="glore.rollouts_per_step"):
    glore_exp.run(c, str(tmp_path))


def test_config_presets():
  for arg in ("", "gemma", "smoke"):
    c = glore_config.get_config(arg)
    assert c.experiment == "glore"
  g = glore_config.get_config("gemma")
  assert (g.rm_train.opt.lr, g.rm_train.batch_size, g.rm_train.epochs) == (2e-6, 256, 1.0)
  assert (g.refine_train.opt.lr, g.refine_train.batch_size, g.refine_train.epochs) == (
      2e-5, 128, 1.0)
  assert g.glore.rollouts_per_step == 8 and g.glore.max_new_tokens == 300
  with pytest.raises(ValueError, match="Unknown configs/glore.py arg"):
    glore_config.get_config("nope")


def test_sentencepiece_marker_is_an_added_special_piece(tmp_path):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import tiny_gemma  # pylint: disable=g-import-not-at-top
  from qdc_jax.rl import rcrl  # pylint: disable=g-import-not-at-top
  path = tiny_gemma.make_tokenizer(str(tmp_path))
  meta = {"kind": "sentencepiece", "path": path}
  base = tokenizers.make_tokenizer("sentencepiece", model_path=path)
  assert len(base.encode("x[BAD]y")) > 3  # [BAD] is several pieces before
  new_meta, tok = rcrl.extend_tokenizer(meta, (glore.MARKER, rcrl.GOOD), base.vocab_size,
                                        directory=str(tmp_path))
  assert new_meta["added_pieces"] == [glore.MARKER, rcrl.GOOD]
  assert tok.vocab_size == base.vocab_size  # placeholders <unusedN> renamed, no new rows
  bad = tok.piece_to_id(glore.MARKER)
  word = next(base.id_to_piece(i) for i in range(base.vocab_size - 1, 0, -1)
              if base.id_to_piece(i).isalpha())  # a plain piece of the tiny model
  text = word + glore.MARKER + word
  assert bad in tok.encode(text) and tok.decode(tok.encode(text)) == text
  for i in range(base.vocab_size):  # every other piece keeps its id
    if i not in (bad, tok.piece_to_id(rcrl.GOOD)):
      assert tok.id_to_piece(i) == base.id_to_piece(i)
  # Idempotent: an extended tokenizer is not extended again.
  assert rcrl.extend_tokenizer(new_meta, (glore.MARKER,), base.vocab_size)[0] == new_meta
  table = jnp.asarray(np.random.default_rng(0).normal(size=(base.vocab_size, 4)), jnp.float32)
  out = rcrl.init_label_embeddings({"embedding": table}, meta, new_meta)["embedding"]
  others = [i for i in range(base.vocab_size) if i not in (bad, tok.piece_to_id(rcrl.GOOD))]
  np.testing.assert_allclose(out[bad], table[np.asarray(others)].mean(0), rtol=1e-5)
  np.testing.assert_array_equal(out[np.asarray(others)], table[np.asarray(others)])
  # No placeholder and no spare row: a clear error.
  with pytest.raises(ValueError, match="no unused piece"):
    rcrl.add_pieces(tokenizers.make_tokenizer("sentencepiece", model_path=path)
                    .processor.serialized_model_proto(), [f"[L{i}]" for i in range(200)],
                    base.vocab_size)
