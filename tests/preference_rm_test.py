"""Preference reward model (Bradley-Terry): pairs, loss, transform, training, e2e; A2C."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdc_jax import fit
from qdc_jax import sharding as sharding_lib
from qdc_jax import storage
from qdc_jax import tokenizers
from qdc_jax.data import arith
from qdc_jax.data import pipeline
from qdc_jax.experiments import preference_rm as prm_exp
from qdc_jax.models import configs, heads
from qdc_jax.rl import common, ppo
from qdc_jax.rl import reward_models as rm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import ppo as ppo_config  # pylint: disable=g-import-not-at-top,wrong-import-position
import preference_rm as prm_config  # pylint: disable=g-import-not-at-top,wrong-import-position

TOK = tokenizers.make_tokenizer("char", alphabet=arith.ALPHABET)


def _sol(q, sample, correct, first_wrong, text):
  return rm.Solution(question=q, sample=sample, prompt=f"Question: {q}\n", answer="1",
                     steps=text.split("\n"), correct=correct, oracle_first_wrong=first_wrong)


# ------------------------------------------------------------------ pairs


def test_solution_pairs_by_hand():
  data = [_sol(0, 0, True, None, "a"), _sol(0, 1, False, 1, "b"), _sol(0, 2, False, 0, "c"),
          _sol(0, 3, True, None, "a"),  # the same text as sample 0: no new pairs
          _sol(0, 4, False, 1, "d"),  # the same first error as "b": no pair between them
          _sol(1, 0, True, None, "e"), _sol(1, 1, True, None, "f")]  # all correct: none
  got = {(p.chosen, p.rejected, p.why) for p in rm.solution_pairs(data, max_per_question=0)}
  assert got == {("a", "b", "correct"), ("a", "c", "correct"), ("a", "d", "correct"),
                 ("b", "c", "first_error"), ("d", "c", "first_error")}
  none = {(p.chosen, p.rejected) for p in rm.solution_pairs(data, max_per_question=0,
                                                              tie_break="none")}
  assert none == {("a", "b"), ("a", "c"), ("a", "d")}
  capped = rm.solution_pairs(data, max_per_question=2, seed=3)
  assert len(capped) == 2 and capped == rm.solution_pairs(data, max_per_question=2, seed=3)
  assert {(p.chosen, p.rejected, p.why) for p in capped} <= got
  assert all(p.question == 0 and p.prompt == "Question: 0\n" for p in capped)
  with pytest.raises(ValueError, match="tie_break"):
    rm.solution_pairs(data, max_per_question=0, tie_break="length")


def test_pair_rows_and_hh_dialogues(tmp_path):
  hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5, surely"}
  p = rm.pair_from_row(hh, "x")
  assert p.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:"
  assert (p.chosen, p.rejected) == (" 4", " 5, surely")
  # The shared text runs into the last turn ("Assistant: 4" vs "Assistant: 4.5"): the split
  # is still at the last assistant turn, not inside the answers.
  p2 = rm.pair_from_row({"chosen": "\n\nHuman: q\n\nAssistant: 4",
                         "rejected": "\n\nHuman: q\n\nAssistant: 4.5"}, "x")
  assert (p2.prompt, p2.chosen, p2.rejected) == ("\n\nHuman: q\n\nAssistant:", " 4", " 4.5")
  explicit = rm.pair_from_row({"prompt": "Q", "chosen": "a", "rejected": "b"}, "x")
  assert (explicit.prompt, explicit.chosen, explicit.rejected) == ("Q", "a", "b")
  path = tmp_path / "prefs.jsonl"
  path.write_text(json.dumps(hh) + "\n" + json.dumps({"chosen": "a"}) + "\n")
  with pytest.raises(ValueError, match=r"prefs.jsonl line 2: no text field \['rejected'\]"):
    rm.read_pairs(str(path))
  assert len(rm.read_pairs(str(path), limit=1)) == 1
  with pytest.raises(ValueError, match="share no"):
    rm.pair_from_row({"chosen": "x", "rejected": "y"}, "x")


# ------------------------------------------------------------------ loss and transform


def _random_rm(seed=0):
  cfg = configs.get_model_config("lab_tiny")
  model = heads.RewardModel(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
                         ["params"])
  params["head"]["w"] = jax.random.normal(jax.random.PRNGKey(seed + 1), (cfg.d_model,))
  return cfg, model, params


def _batched(model, params, rows):
  """The head at the last token of each prompt + text, read from one right-padded batch (a
  causal model: the padding after a row's end does not change it)."""
  ids = [TOK.encode(a + b.rstrip("\n"), add_bos=True) for a, b in rows]
  toks = np.zeros((len(ids), max(map(len, ids))), np.int32)
  for i, x in enumerate(ids):
    toks[i, :len(x)] = x
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(toks)))
  return np.asarray([logits[i, len(x) - 1] for i, x in enumerate(ids)], np.float64)


def _alone(model, params, prompt, text):
  ids = TOK.encode(prompt + text.rstrip("\n"), add_bos=True)
  return float(model.apply({"params": params}, jnp.asarray([ids]))[0, -1])


def test_bradley_terry_loss_matches_numpy():
  _, model, params = _random_rm()
  pairs = [rm.Pair("Question: 1+2\nSolution:\n", "1+2=3\nThe answer is 3.", "The answer is 4."),
           rm.Pair("Question: 5*5\nSolution:\n", "The answer is 25.", "5*5=20\nThe answer is 20.")]
  batch, cut = rm.encode_pairs(TOK, pairs, 64)
  assert cut == 0
  loss, aux = rm.bradley_terry_loss_sums(params, {k: jnp.asarray(v) for k, v in batch.items()},
                                         model=model)
  z = _batched(model, params, [(p.prompt, t) for p in pairs for t in (p.chosen, p.rejected)])
  margins = [z[2 * i] - z[2 * i + 1] for i in range(len(pairs))]
  assert float(loss) == pytest.approx(sum(np.log1p(np.exp(-m)) for m in margins), rel=1e-4)
  assert float(aux["correct"]) == sum(m > 0 for m in margins) and float(aux["tokens"]) == 2
  short, cut = rm.encode_pairs(TOK, pairs, 24)  # a completion's end past seq_len: weight 0
  assert cut == 2 and short["weights"].tolist() == [0.0, 0.0]


def test_transforms():
  z = np.array([-2.0, 0.0, 3.0])
  np.testing.assert_allclose(rm.transform_scores(z, None), 1 / (1 + np.exp(-z)))
  t = rm.standardise_transform(z)
  out = rm.transform_scores(z, t)
  assert out.mean() == pytest.approx(0.0, abs=1e-12) and out.std() == pytest.approx(1.0)
  with pytest.raises(ValueError, match="Unknown reward-model transform"):
    rm.transform_scores(z, {"kind": "exp"})


def test_preference_reward_is_the_standardised_logit(tmp_path):
  cfg, model, params = _random_rm()
  transform = {"kind": "standardise", "shift": 0.3, "scale": 2.0}
  rm.save(str(tmp_path / "prm"), cfg, params,
          tokenizer_meta={"kind": "char", "alphabet": arith.ALPHABET},
          notes={"objective": "bradley_terry", "transform": transform})
  reward = rm.RewardModelReward.from_directory(str(tmp_path / "prm"), batch_size=2)
  items = [common.Item("q", "Question: 1+1\nSolution:\n", "2")] * 2
  texts = ["1+1=2\nThe answer is 2.", "The answer is 3."]
  out = reward(items, texts)
  for i, t in enumerate(texts):  # independent: the model on each sequence alone
    assert out.scores[i] == pytest.approx((_alone(model, params, items[i].prompt, t) - 0.3) / 2,
                                          rel=1e-4)
  np.testing.assert_array_equal(out.correct, [True, False])
  rm.save(str(tmp_path / "bad"), cfg, params, tokenizer_meta={"kind": "char",
                                                              "alphabet": arith.ALPHABET},
          notes={"transform": {"kind": "softplus"}})
  with pytest.raises(ValueError, match="Unknown reward-model transform"):
    rm.load(str(tmp_path / "bad"))


def test_bradley_terry_training_learns_a_preference(tmp_path):
  """A toy preference the base cannot know: answers ending in an even digit are preferred.
  Trained by `fit` with the Bradley-Terry objective, held-out pairwise accuracy goes from
  chance to near 1."""
  rng = np.random.default_rng(0)
  cfg = configs.get_model_config("lab_tiny")
  model = heads.RewardModel(cfg)
  def pairs(n):
    out = []
    for _ in range(n):
      a, b = rng.integers(10, 99, 2)
      even, odd = 2 * rng.integers(0, 5), 2 * rng.integers(0, 5) + 1
      out.append(rm.Pair(f"Question: {a}+{b}\nSolution:\n", f"The answer is {a}{even}.",
                         f"The answer is {a}{odd}."))
    return out
  train_pairs, test_pairs = pairs(256), pairs(64)
  tc = common.sft_train_section("smoke")
  tc.steps, tc.batch_size, tc.seq_len, tc.log_every, tc.save_every = 60, 32, 48, 20, 60
  tc.opt.lr, tc.opt.warmup_steps = 3e-3, 5
  cols, _ = rm.encode_pairs(TOK, train_pairs, tc.seq_len)
  mesh = sharding_lib.make_mesh((-1, 1, 1))
  init = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  result = fit.fit(tc, model=model, workdir=str(tmp_path), mesh=mesh,
                   rules=sharding_lib.DEFAULT_RULES,
                   data=pipeline.array_dataset(cols, batch_size=tc.batch_size, seed=0),
                   objective=rm.BRADLEY_TERRY, init_params=jax.tree.map(jnp.copy, init),
                   name="toy")  # fit donates its initial params
  scorer = rm.Scorer(model, result.params, TOK, mesh=mesh, rules=sharding_lib.DEFAULT_RULES,
                     param_shardings=result.param_shardings)
  acc = prm_exp.pairwise_accuracy(scorer, test_pairs, seed=0)
  assert acc["accuracy"] >= 0.9, acc["accuracy"]
  before = rm.Scorer(model, init, TOK, mesh=mesh, rules=sharding_lib.DEFAULT_RULES,
                     param_shardings=result.param_shardings)
  assert prm_exp.pairwise_accuracy(before, test_pairs, seed=0)["accuracy"] < 0.8


# ------------------------------------------------------------------ the experiment


def test_preference_rm_smoke_resumes_and_reports(tmp_path, monkeypatch):
  c = prm_config.get_config("smoke")
  c.train.stop_at_step = 2  # as if killed while training
  assert prm_exp.run(c, str(tmp_path)) == {"stopped": "train"}
  pairs_before = (tmp_path / "train_pairs.jsonl").read_text()
  c.train.stop_at_step = -1
  report = prm_exp.run(c, str(tmp_path))
  assert (tmp_path / "train_pairs.jsonl").read_text() == pairs_before  # not sampled again
  for f in ("report.md", "report.json", "preference_rm.png", "model/model.json"):
    assert (tmp_path / f).exists(), f
  meta = json.loads((tmp_path / "model/model.json").read_text())
  assert meta["kind"] == "reward_model" and meta["notes"]["objective"] == "bradley_terry"
  # The recorded transform is the mean / std of the head on the training completions.
  scorer = rm.load(str(tmp_path / "model"))
  train_pairs = [rm.Pair.from_json(json.loads(l)) for l in pairs_before.splitlines()]
  kept = [p for i, p in enumerate(train_pairs) if not prm_exp.held_out(p, i)]
  sample = [(p.prompt, t) for p in kept[:prm_exp.TRANSFORM_ROWS // 2]
            for t in (p.chosen, p.rejected)]
  z = _batched(scorer.model, scorer.params, sample)
  assert meta["notes"]["transform"]["shift"] == pytest.approx(z.mean(), abs=1e-4)
  assert meta["notes"]["transform"]["scale"] == pytest.approx(z.std(), rel=1e-3)
  test_pairs = [json.loads(l) for l in (tmp_path / "test_pairs.jsonl").read_text().splitlines()]
  assert report["test"]["pairs"] == len(test_pairs) > 0
  assert 0 <= report["test"]["accuracy"] <= 1
  assert report["solutions"]["solutions"] == c.task.test_size * c.pairs.samples
  # PPO takes the directory as its reward.
  from qdc_jax.experiments import ppo as ppo_exp  # pylint: disable=g-import-not-at-top
  rc = ppo_config.get_config("smoke").reward
  rc.name, rc.model_dir = "model", str(tmp_path / "model")
  reward = ppo_exp.make_reward(rc)
  assert reward.scorer.transform == meta["notes"]["transform"]
  # Finished: a rerun trains nothing; other settings are refused.
  monkeypatch.setattr(fit, "fit", lambda *a, **k: pytest.fail("trained again"))
  assert prm_exp.run(c, str(tmp_path)) == report
  c.pairs.tie_break = "none"
  with pytest.raises(ValueError, match="pairs.tie_break"):
    prm_exp.run(c, str(tmp_path))


def test_preference_rm_from_files(tmp_path):
  rows = [{"chosen": f"\n\nHuman: {a}+1?\n\nAssistant: {a + 1}",
           "rejected": f"\n\nHuman: {a}+1?\n\nAssistant: {a + 2}"} for a in range(12)]
  for name in ("train", "test"):
    storage.write_rows(str(tmp_path / f"{name}.jsonl"), rows)
  c = prm_config.get_config("smoke")
  c.data.train_path, c.data.test_path = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
  c.train.steps = 2
  report = prm_exp.run(c, str(tmp_path / "run"))
  assert report["source"] == "files" and report["test"]["pairs"] == 12
  assert report["data"]["train_kinds"] == {"data": 12} and report["solutions"] is None
  c.data.test_path = ""
  with pytest.raises(ValueError, match="Give both"):
    prm_exp.run(c, str(tmp_path / "run2"))


def test_config_presets():
  for arg in ("", "gemma", "smoke"):
    assert prm_config.get_config(arg).experiment == "preference_rm"
  with pytest.raises(ValueError, match="Unknown configs/preference_rm.py arg"):
    prm_config.get_config("nope")


# ------------------------------------------------------------------ A2C


def test_a2c_is_the_policy_gradient():
  """At ratio 1 (one on-policy step) the clipped surrogate's gradient is the
  advantage-weighted policy gradient -A / n, and the clipped value loss's is (V - R) / n."""
  rng = np.random.default_rng(0)
  logp = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
  mask = jnp.asarray(rng.integers(0, 2, size=(2, 5)), jnp.float32).at[0, 0].set(1.0)
  g = jax.grad(lambda lp: ppo.policy_loss(lp, logp, adv, mask, 0.2)[0])(logp)
  np.testing.assert_allclose(g, -adv * mask / mask.sum(), rtol=1e-5, atol=1e-7)
  v, ret = logp, adv
  gv = jax.grad(lambda x: ppo.value_loss(x, v, ret, mask, 0.2)[0])(v)
  np.testing.assert_allclose(gv, (v - ret) * mask / mask.sum(), rtol=1e-5, atol=1e-7)
  c = ppo_config.get_config("a2c")
  assert c.ppo.epochs == 1
  assert c.ppo.minibatch_size == c.ppo.questions_per_batch * c.ppo.best_k


def test_pairs_without_a_preference_or_a_score_are_left_out_and_counted(tmp_path):
  path = tmp_path / "pairs.jsonl"
  rows = [{"prompt": "q", "chosen": "a", "rejected": "b"},
          {"prompt": "q", "chosen": "same", "rejected": "same"},
          {"prompt": "r", "chosen": "c", "rejected": "d"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  pairs = rm.read_pairs(str(path))
  assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("c", "d")]

  class Scorer:  # "b" cannot be scored (as an empty or over-long completion)
    def final_logits(self, prompts, texts):
      return np.asarray([{"a": 1.0, "b": np.nan, "c": 2.0, "d": 3.0}[t] for t in texts])

  acc = prm_exp.pairwise_accuracy(Scorer(), pairs, seed=0)
  assert acc["pairs"] == 1 and acc["unscored"] == 1 and acc["accuracy"] == 0.0
  assert acc["margins"] == [-1.0]
