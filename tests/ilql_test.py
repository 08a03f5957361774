"""ILQL: the loss against a naive loop, Polyak targets and frozen blocks, sampling, learning,
the experiment (resume, report, bad rows)."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qdc_jax import fit
from qdc_jax import sampling
from qdc_jax import sharding as sharding_lib
from qdc_jax import tokenizers
from qdc_jax.data import arith
from qdc_jax.data import pipeline
from qdc_jax.experiments import ilql as ilql_exp
from qdc_jax.models import configs, transformer
from qdc_jax.rl import common, ilql

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import ilql as ilql_config  # pylint: disable=g-import-not-at-top,wrong-import-position

TOK = tokenizers.make_tokenizer("char", alphabet=arith.ALPHABET)
HYPER = ilql.Hyper(gamma=0.9, tau=0.7, cql_scale=0.3, awr_scale=0.5, awr_beta=1.5,
                   awr_max_weight=3.0)


def _lse(x):
  m = x.max()
  return m + np.log(np.exp(x - m).sum())


def test_loss_matches_a_naive_loop():
  rng = np.random.default_rng(0)
  b, t, v = 2, 7, 5
  tokens = rng.integers(0, v, (b, t)).astype(np.int32)
  actions = np.zeros((b, t), np.float32)
  actions[0, 2:5] = 1  # states 2..4 take actions tokens[3..5]
  actions[1, 1:6] = 1
  rewards = np.zeros((b, t), np.float32)
  rewards[0, 4], rewards[1, 5] = 1.0, -0.5
  out = {k: rng.normal(size=(b, t, v)).astype(np.float32)
         for k in ("q1", "q2", "target_q1", "target_q2")}
  out["v"] = rng.normal(size=(b, t)).astype(np.float32)
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  batch = {"tokens": tokens, "actions": actions, "rewards": rewards}
  total, aux = ilql.losses(jnp.asarray(logits), {k: jnp.asarray(x) for k, x in out.items()},
                           {k: jnp.asarray(x) for k, x in batch.items()}, HYPER)
  want = n = 0.0
  for i in range(b):
    for s in range(t):
      if not actions[i, s]:
        continue
      a = tokens[i, s + 1]
      terminal = s + 1 >= t or not actions[i, s + 1]
      y = rewards[i, s] + (0.0 if terminal else HYPER.gamma * out["v"][i, s + 1])
      lq = (out["q1"][i, s, a] - y) ** 2 + (out["q2"][i, s, a] - y) ** 2
      tq = min(out["target_q1"][i, s, a], out["target_q2"][i, s, a])
      u = tq - out["v"][i, s]
      lv = (HYPER.tau if u >= 0 else 1 - HYPER.tau) * u * u
      cql = sum(_lse(out[q][i, s]) - out[q][i, s, a] for q in ("q1", "q2"))
      w = min(np.exp(HYPER.awr_beta * u), HYPER.awr_max_weight)
      awr = w * (_lse(logits[i, s]) - logits[i, s, a])
      want += lq + lv + HYPER.cql_scale * cql + HYPER.awr_scale * awr
      n += 1
  assert float(total) == pytest.approx(want, rel=1e-5)
  assert float(aux["tokens"]) == n


def test_encode_places_actions_and_the_reward():
  cols, cut = ilql.encode(TOK, [("Q:", "12", 1.0), ("Question:", "345", 0.5)], 12)
  head = len(TOK.encode("Q:", add_bos=True))  # BOS + 2
  # Row 0: tokens BOS Q : 1 2 EOS; states head-1 .. head+1 take actions 1, 2, EOS.
  assert cols["actions"][0].tolist()[:head + 3] == [0] * (head - 1) + [1, 1, 1] + [0]
  assert cols["rewards"][0, head + 1] == 1.0 and cols["rewards"][0].sum() == 1.0
  assert cols["tokens"][0, head + 2] == TOK.eos_id
  # Row 1 (10 + 4 tokens) is cut at 12: its reward lands on the last action that fits.
  assert cut == 1 and cols["rewards"][1, 10] == 0.5 and cols["rewards"][1].sum() == 0.5
  assert cols["actions"][1].tolist() == [0] * 9 + [1, 1, 0]


def _policy_params(cfg, seed=0):
  return nn.meta.unbox(transformer.Transformer(cfg).init(
      jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def test_polyak_targets_and_frozen_blocks():
  cfg = configs.get_model_config("lab_tiny")
  params = ilql.init_params(jax.random.PRNGKey(1), _policy_params(cfg), cfg)
  # Targets start equal to their Q heads; perturb so the average is visible.
  params["heads"]["target_q1"] = jax.tree.map(lambda x: x + 1.0, params["heads"]["target_q1"])
  inner = optax.sgd(0.1)
  tx = ilql.optimizer(inner, alpha=0.25, frozen_layers=1)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  upd, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, upd)
  q1_new = jax.tree.map(lambda p: p - 0.1, params["heads"]["q1"])
  for got, t, q in zip(jax.tree.leaves(new["heads"]["target_q1"]),
                       jax.tree.leaves(params["heads"]["target_q1"]), jax.tree.leaves(q1_new)):
    np.testing.assert_allclose(got, 0.75 * t + 0.25 * q, rtol=1e-6)
  for name in ("embedding", "layer_0"):  # frozen: bit-identical
    for a, b in zip(jax.tree.leaves(new["trunk"][name]), jax.tree.leaves(params["trunk"][name])):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(jax.tree.leaves(new["trunk"]["layer_1"])[0],
                             jax.tree.leaves(params["trunk"]["layer_1"])[0] - 0.1, rtol=1e-6)
  # Adam holds moments for the trained leaves only (not targets, not frozen blocks).
  adam = ilql.optimizer(optax.adam(1e-3), alpha=0.1, frozen_layers=1).init(params)
  held = sum(x.size for x in jax.tree.leaves(adam) if hasattr(x, "size") and x.ndim)
  trained = sum(x.size for x in jax.tree.leaves(ilql._trained(params, 1)))
  frozen = sum(x.size for k in ("embedding", "layer_0")
               for x in jax.tree.leaves(params["trunk"][k]))
  assert trained + frozen + sum(x.size for t in ilql.TARGETS for x in jax.tree.leaves(
      params["heads"][t])) == sum(x.size for x in jax.tree.leaves(params))
  assert held == 2 * trained  # Adam's two moments, for the trained leaves only


def test_sampling_at_beta_zero_is_the_policy_and_beta_shifts_the_logits():
  cfg = configs.get_model_config("lab_tiny")
  base = _policy_params(cfg)
  params = ilql.init_params(jax.random.PRNGKey(3), base, cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 60, (2, 9)), jnp.int32)
  plain, _ = transformer.Transformer(cfg).apply({"params": base}, tokens)
  logits, out = ilql.ILQLModel(cfg).apply({"params": params}, tokens, all_heads=True)
  np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
  shifted, _ = ilql.ILQLModel(cfg, beta=2.0).apply({"params": params}, tokens)
  want = plain + 2.0 * (jnp.minimum(out["target_q1"], out["target_q2"]) - out["v"][..., None])
  np.testing.assert_allclose(shifted, want, rtol=1e-5, atol=1e-4)
  # Through the one sampling loop: beta 0 draws the policy's tokens for the same key.
  sp = sampling.SamplingParams(max_new_tokens=6, num_samples=2, temperature=1.0, eos_id=-1)
  lengths = jnp.full((2,), 9, jnp.int32)
  key = jax.random.PRNGKey(5)
  a = sampling.jit_sample(transformer.Transformer(cfg), sp)(base, tokens, lengths, key)
  b = sampling.jit_sample(ilql.ILQLModel(cfg, beta=0.0), sp)(params, tokens, lengths, key)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_ilql_learns_which_action_pays(tmp_path):
  """One state, two actions taken equally often in the data: '1' pays 1, '2' pays 0. The
  behaviour policy (what plain BC would learn) is 50/50; ILQL's min Q^ - V must prefer '1',
  the AWR-weighted policy term must move the policy itself towards it, and sampling at
  beta > 0 prefers it further."""
  cfg = configs.get_model_config("lab_tiny")
  rows = [("Q:", "1", 1.0), ("Q:", "2", 0.0)] * 32
  cols, _ = ilql.encode(TOK, rows, 16)
  tc = common.sft_train_section("smoke")
  tc.steps, tc.batch_size, tc.seq_len, tc.log_every, tc.save_every = 80, 16, 16, 40, 80
  tc.opt.lr, tc.opt.warmup_steps = 3e-3, 5
  model = ilql.ILQLModel(cfg)
  mesh = sharding_lib.make_mesh((-1, 1, 1))
  init = ilql.init_params(jax.random.PRNGKey(0), _policy_params(cfg), cfg)
  layer_0 = jax.tree.map(np.asarray, init["trunk"]["layer_0"])
  result = fit.fit(tc, model=model, workdir=str(tmp_path), mesh=mesh,
                   rules=sharding_lib.DEFAULT_RULES,
                   data=pipeline.array_dataset(cols, batch_size=tc.batch_size, seed=0),
                   objective=ilql.objective(ilql.Hyper(), alpha=0.2, frozen_layers=1),
                   init_params=init, name="toy")
  for a, b in zip(jax.tree.leaves(result.params["trunk"]["layer_0"]), jax.tree.leaves(layer_0)):
    np.testing.assert_array_equal(np.asarray(a), b)  # frozen through fit: bit-identical
  prompt = jnp.asarray([TOK.encode("Q:", add_bos=True)], jnp.int32)
  logits, out = model.apply({"params": result.params}, prompt, all_heads=True)
  adv = (jnp.minimum(out["target_q1"], out["target_q2"]) - out["v"][..., None])[0, -1]
  one, two = TOK.encode("1")[0], TOK.encode("2")[0]
  assert float(adv[one]) > float(adv[two]) + 0.3, (adv[one], adv[two])
  p = jax.nn.softmax(logits[0, -1])
  assert float(p[one]) > float(p[two]) + 0.2  # AWR: the data's 50/50, weighted by exp(Q - V)
  shifted = logits[0, -1] + 4.0 * adv
  assert float(shifted[one]) > float(shifted[two])


def test_ilql_smoke_resumes_and_reports(tmp_path, monkeypatch):
  c = ilql_config.get_config("smoke")
  c.train.stop_at_step = 1  # as if killed in the first stage
  assert ilql_exp.run(c, str(tmp_path)) == {"stopped_at_step": 1}
  data = (tmp_path / "offline_data.jsonl").read_text()
  c.train.stop_at_step = -1
  report = ilql_exp.run(c, str(tmp_path))
  assert (tmp_path / "offline_data.jsonl").read_text() == data  # not sampled again
  rows = [json.loads(l) for l in data.splitlines()]
  assert len(rows) == c.task.train_size * c.data.samples
  assert all(r["reward"] in (0.0, 1.0) for r in rows)
  meta = json.loads((tmp_path / "model/model.json").read_text())
  assert meta["kind"] == "ilql"
  assert [p["step"] for p in report["curve"]] == [0, 2, 4]
  assert set(report["final"]) == {f"{w}/{s}" for w in ("base", "beta=1")
                                  for s in ("in_dist", "ood")}
  assert (tmp_path / "ilql_curve.png").exists()
  monkeypatch.setattr(fit, "fit", lambda *a, **k: pytest.fail("trained again"))
  assert ilql_exp.run(c, str(tmp_path)) == report
  c.ilql.tau = 0.9
  with pytest.raises(ValueError, match="ilql.tau"):
    ilql_exp.run(c, str(tmp_path))


def test_offline_rows_need_their_fields(tmp_path):
  path = tmp_path / "off.jsonl"
  path.write_text(json.dumps({"prompt": "p", "completion": "c", "reward": 1}) + "\n" +
                  json.dumps({"prompt": "p", "completion": "c"}) + "\n")
  with pytest.raises(ValueError, match=r"off.jsonl line 2: missing or mistyped \['reward'\]"):
    ilql_exp.read_rows(str(path))


def test_config_presets():
  for arg in ("", "gemma", "smoke"):
    assert ilql_config.get_config(arg).experiment == "ilql"
  with pytest.raises(ValueError, match="Unknown configs/ilql.py arg"):
    ilql_config.get_config("nope")
