"""PPO: losses against hand-computed values, GAE against a naive loop, the detached value
branch, frozen parameters / reference through updates, Hydra + LoRA bytes, and PPO raising the
reward of a toy task with a known optimum."""

import functools
import os
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qdc_jax import sampling
from qdc_jax import storage
from qdc_jax.models import configs
from qdc_jax.models import lora as lora_lib
from qdc_jax.models import transformer
from qdc_jax.rl import common
from qdc_jax.rl import ppo
from qdc_jax.rl import rewards


def naive_gae(rewards_, values, mask, gamma, lam):
  adv = np.zeros_like(rewards_)
  for i in range(rewards_.shape[0]):
    running = 0.0
    for t in reversed(range(rewards_.shape[1])):
      if not mask[i, t]:
        running = 0.0
        continue
      nxt = t + 1 < rewards_.shape[1] and mask[i, t + 1]
      next_v = values[i, t + 1] if nxt else 0.0
      delta = rewards_[i, t] + gamma * next_v - values[i, t]
      running = delta + (gamma * lam * running if nxt else 0.0)
      adv[i, t] = running
  return adv, (adv + values) * mask


def test_gae_matches_naive_loop():
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
  mask = np.zeros((4, 9))
  for i, (s, n) in enumerate([(0, 9), (2, 5), (4, 1), (3, 6)]):
    mask[i, s:s + n] = 1
  for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
    adv, ret = ppo.gae(jnp.asarray(r * mask), jnp.asarray(v), jnp.asarray(mask), gamma, lam)
    ref_adv, ref_ret = naive_gae(r * mask, v, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)
  # lambda = gamma = 1: the advantage is the return-to-go minus the value.
  adv, _ = ppo.gae(jnp.asarray(r * mask), jnp.asarray(v), jnp.asarray(mask), 1.0, 1.0)
  togo = np.cumsum((r * mask)[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, (togo - v) * mask, rtol=1e-5, atol=1e-5)


def test_policy_loss_hand_computed():
  logp = jnp.log(jnp.array([[1.5, 0.5, 1.1]]))
  loss, stats = ppo.policy_loss(logp, jnp.zeros((1, 3)), jnp.array([[1.0, -1.0, 2.0]]),
                                jnp.ones((1, 3)), 0.2)
  # ratios 1.5, 0.5, 1.1 -> clipped 1.2, 0.8, 1.1; max(-A r, -A clip r) = -1.2, 0.8, -2.2.
  assert float(loss) == pytest.approx(-2.6 / 3, rel=1e-6)
  assert float(stats["clipfrac"]) == pytest.approx(2 / 3)
  # Masked-out entries do not count.
  loss_m, _ = ppo.policy_loss(logp, jnp.zeros((1, 3)), jnp.array([[1.0, -1.0, 2.0]]),
                              jnp.array([[1.0, 1.0, 0.0]]), 0.2)
  assert float(loss_m) == pytest.approx((-1.2 + 0.8) / 2, rel=1e-6)


def test_value_loss_hand_computed():
  loss, stats = ppo.value_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.5, 0.5]]),
                               jnp.array([[2.0, 0.0]]), jnp.ones((1, 2)), 0.2)
  # clipped values 0.7, 0.3: max((V-R)^2, (Vc-R)^2) = 1.69, 0.09.
  assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09) / 2, rel=1e-6)
  assert float(stats["vf_clipfrac"]) == 1.0


def test_whiten_token_rewards_and_running_moments():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  m = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  w = np.asarray(ppo.whiten(x, m))[0]
  np.testing.assert_allclose(w[:3], (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]), rtol=1e-5)
  assert w[3] == 0
  r = ppo.token_rewards(jnp.array([5.0]), jnp.array([2]), jnp.array([[0.1, 0.2, 0.3, 0.4]]),
                        m, 0.5, jnp.array([[1.0, 0.0, 0.0, 9.0]]))
  np.testing.assert_allclose(r, [[-0.05 + 1.0, -0.1, -0.15 + 5.0, 0.0]], rtol=1e-6)

  moments = ppo.RunningMoments()
  chunks = [np.array([1.0, 0.0, 0.0]), np.array([1.0]), np.array([0.0, 0.0, 1.0, 1.0, 1.0])]
  seen = []
  for c in chunks:
    scaled = ppo.scale_scores(c, moments)
    seen.extend(c)
    assert moments.std == pytest.approx(np.std(seen, ddof=1))
    np.testing.assert_allclose(scaled, c / np.std(seen, ddof=1), rtol=1e-6)  # no mean shift
  assert moments.mean == pytest.approx(np.mean(seen))


def test_best_k_of_n_and_adaptive_kl():
  keep = ppo.best_k_of_n([0.0, 1.0, 0.5, 1.0, 0.2, 0.1, 0.3, 0.0], n=4, k=2)
  np.testing.assert_array_equal(keep, [1, 3, 4, 6])
  np.testing.assert_array_equal(ppo.best_k_of_n([3.0, 1.0], n=2, k=2), [0, 1])
  with pytest.raises(ValueError, match="k <= n"):
    ppo.best_k_of_n([1.0, 2.0, 3.0], n=2, k=1)
  assert ppo.adaptive_kl_coef(0.1, 12.0, target=6.0, horizon=100, batch_rows=10) == \
      pytest.approx(0.1 * (1 + 0.2 * 0.1))
  assert ppo.adaptive_kl_coef(0.1, 5.4, target=6.0, horizon=100, batch_rows=10) == \
      pytest.approx(0.1 * (1 - 0.1 * 0.1))


def test_rollout_batch_layout():
  b = ppo.rollout_batch([[1, 5, 6], [1, 7]], [[8, 9, 2], [10]], 7, 0)
  np.testing.assert_array_equal(b["inputs"], [[1, 5, 6, 8, 9, 2], [1, 7, 10, 0, 0, 0]])
  np.testing.assert_array_equal(b["targets"], [[5, 6, 8, 9, 2, 0], [7, 10, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["action_mask"], [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["last_index"], [4, 1])
  with pytest.raises(ValueError, match="seq_len"):
    ppo.rollout_batch([[1, 2, 3]], [[4, 5, 6, 7, 8]], 7, 0)


def _tiny(num_layers=3):
  cfg = configs.get_model_config("lab_tiny", num_layers=num_layers)
  model = transformer.Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                         ["params"])
  return cfg, model, params


def _batch():
  b = ppo.rollout_batch([[1, 5, 6], [1, 7], [1, 9, 9], [1, 3]],
                        [[8, 9, 2], [10, 11, 12, 2], [4], [6, 6]], 10, 0)
  return jax.tree.map(jnp.asarray, b)


SPECS = [dict(), dict(value_layers=2, frozen_layers=1), dict(value_layers=3, frozen_layers=2),
         dict(value_layers=1, frozen_layers=1, lora_rank=4, lora_alpha=8.0)]


def test_value_gradient_is_detached_from_the_policy():
  cfg, _, params = _tiny()
  spec = ppo.Spec(cfg, value_layers=2)
  trainable, frozen = ppo.split_params(params, spec, jax.random.PRNGKey(1))
  trainable["value"]["head"]["w"] = jnp.ones((cfg.d_model,)) * 0.1  # non-trivial values
  b = _batch()
  mask = b["action_mask"]

  def vloss(tr):
    return ppo.masked_mean(jnp.square(ppo.forward(tr, frozen, b, spec)["values"] - 1.0), mask)

  def ploss(tr):
    return -ppo.masked_mean(ppo.forward(tr, frozen, b, spec)["logp"], mask)

  gv, gp = jax.jit(jax.grad(vloss))(trainable), jax.jit(jax.grad(ploss))(trainable)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(gv["policy"]))
  assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(gv["value"])) > 0
  assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(gp["policy"])) > 0


@pytest.mark.parametrize("kw", [dict(value_layers=1, frozen_layers=1),
                                dict(value_layers=2, frozen_layers=1, lora_rank=4)])
def test_frozen_blocks_and_reference_stay_bit_identical(kw):
  cfg, _, params = _tiny()
  spec = ppo.Spec(cfg, **kw)
  trainable, frozen = ppo.split_params(params, spec, jax.random.PRNGKey(1))
  frozen_before = jax.tree.map(np.array, frozen)
  params_before = jax.tree.map(np.array, params)
  tx = optax.adam(1e-2)
  state = ppo.init_state(trainable, tx)
  hyper = ppo.Hyper(minibatch_size=2, epochs=2)
  exp, _ = jax.jit(functools.partial(ppo.make_experience, spec=spec, hyper=hyper))(
      state["trainable"], frozen, _batch(), jnp.array([1.0, 0.0, 1.0, 0.0]), None, 0.05)
  update = jax.jit(functools.partial(ppo.ppo_update, spec=spec, hyper=hyper, tx=tx),
                   donate_argnums=(0,))
  for i in range(3):
    state, stats = update(state, frozen, exp, jax.random.PRNGKey(i))
  assert int(state["step"]) == 3 * 2 * 2
  assert np.isfinite(float(stats["loss"]))
  jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
  ref = ppo.reference_params(frozen)
  jax.tree.map(np.testing.assert_array_equal, ref, params_before)  # reference == initial
  pol = ppo.policy_params(state["trainable"], frozen, spec)
  for i in range(spec.frozen_layers):  # the policy's frozen bottom is the initial one
    jax.tree.map(np.testing.assert_array_equal, pol[f"layer_{i}"], params_before[f"layer_{i}"])
  np.testing.assert_array_equal(pol["embedding"], params_before["embedding"])
  top = f"layer_{cfg.num_layers - 1}"
  assert not np.array_equal(pol[top]["mlp"]["up"], params_before[top]["mlp"]["up"])


def test_hydra_and_lora_hold_fewer_bytes():
  cfg = configs.get_model_config("lab_small")
  model = transformer.Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                         ["params"])
  tx = optax.adam(1e-3)
  report = {}
  for name, kw in {"full": {}, "hydra": dict(frozen_layers=2),
                   "hydra_lora": dict(frozen_layers=2, lora_rank=8)}.items():
    spec = ppo.Spec(cfg, value_layers=1, **kw)
    tr, fr = ppo.split_params(params, spec, jax.random.PRNGKey(0))
    report[name] = ppo.param_bytes(tr, fr, jax.eval_shape(tx.init, tr), spec)["held"]["total"]
  full_model = sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))
  # Full fine-tune: policy + reference + value branch + 2 Adam moments of policy and branch.
  assert report["full"] > 4 * full_model
  assert report["hydra_lora"] < report["hydra"] < report["full"]
  # LoRA: the frozen base is the reference, so the model is held once (+ factors + branch).
  assert report["hydra_lora"] < 2 * full_model


def test_lora_merge_is_base_plus_low_rank_product():
  cfg, _, params = _tiny(2)
  lo = lora_lib.init(jax.random.PRNGKey(3), params, 2, [1])
  lo["layer_1"]["attn"]["o"]["b"] = jnp.ones_like(lo["layer_1"]["attn"]["o"]["b"])
  merged = lora_lib.merge(params, lo, 0.5)
  a = np.asarray(lo["layer_1"]["attn"]["o"]["a"]).reshape(-1, 2)
  expect = np.asarray(params["layer_1"]["attn"]["o"]).reshape(-1, cfg.d_model) + 0.5 * a @ np.ones(
      (2, cfg.d_model))
  np.testing.assert_allclose(np.asarray(merged["layer_1"]["attn"]["o"]).reshape(
      -1, cfg.d_model), expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(merged["layer_0"]["attn"]["o"], params["layer_0"]["attn"]["o"])
  assert lora_lib.num_params(lo) == sum(
      2 * (math.prod(w.shape[:n]) + math.prod(w.shape[n:]))
      for (mod, name), n in lora_lib.TARGETS.items() for w in [params["layer_1"][mod][name]])


def test_dense_reward_offsets_land_on_step_tokens():
  from qdc_jax import tokenizers
  from qdc_jax.data import arith
  tok = tokenizers.make_tokenizer("char", alphabet=arith.ALPHABET)
  item = common.Item("q", "p", "6", "30% of 40=12\n50% of 12=6\nThe answer is 6.")
  text = "30% of 40=12\n50% of 12=7\nThe answer is 7."
  rw = rewards.dense([item], [text], step_weight=0.5)
  assert rw.scores[0] == 0.0 and rw.step_rewards == [[(12, 0.25)]]
  resp = tok.encode(text) + [tok.eos_id]
  arr = rewards.token_rewards_from_offsets(rw, tok, [resp], [3], 60)
  assert arr.sum() == pytest.approx(0.25)
  j = int(np.argmax(arr[0])) - 2  # response token index
  assert tok.decode(resp[:j + 1]) == "30% of 40=12"


def test_ppo_raises_reward_on_a_toy_task():
  """Reward = share of generated tokens in a target set of 16 ids (chance ~1/8; optimum 1)."""
  cfg, model, params = _tiny(2)
  spec = ppo.Spec(cfg, value_layers=1)
  hyper = ppo.Hyper(epochs=2, minibatch_size=32)
  tx = optax.adam(3e-3)
  trainable, frozen = ppo.split_params(params, spec, jax.random.PRNGKey(0))
  state = ppo.init_state(trainable, tx)
  target = np.zeros(cfg.vocab_size, bool)
  target[40:56] = True
  sp = sampling.SamplingParams(max_new_tokens=6, num_samples=16, temperature=1.0, eos_id=-1)
  sample = jax.jit(functools.partial(sampling.sample, model=model, sp=sp))
  assemble = jax.jit(functools.partial(ppo.policy_params, spec=spec))
  experience = jax.jit(functools.partial(ppo.make_experience, spec=spec, hyper=hyper))
  update = jax.jit(functools.partial(ppo.ppo_update, spec=spec, hyper=hyper, tx=tx),
                   donate_argnums=(0,))
  prompts = np.array([[1, 7], [1, 8], [1, 9], [1, 10]], np.int32)
  means = []
  for it in range(12):
    out = sample(assemble(state["trainable"], frozen), prompts, np.array([2, 2, 2, 2]),
                 jax.random.PRNGKey(it))
    toks = np.asarray(out.tokens)
    scores = target[toks].mean(axis=1).astype(np.float32)
    means.append(float(scores.mean()))
    batch = ppo.rollout_batch([list(p) for p in np.repeat(prompts, 16, 0)],
                              [list(t) for t in toks], 8, 0)
    exp, _ = experience(state["trainable"], frozen, jax.tree.map(jnp.asarray, batch),
                        jnp.asarray(scores), None, 0.0)
    state, _ = update(state, frozen, exp, jax.random.PRNGKey(100 + it))
  assert means[0] < 0.25
  assert np.mean(means[-3:]) > means[0] + 0.3, means


def _smoke_config(**overrides):
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location(
      "ppo_config", os.path.join(os.path.dirname(__file__), "..", "configs", "ppo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("smoke")
  c.task.val_size, c.task.test_size = 4, 4
  c.eval.every = 100  # evaluate at the start and the end only
  # Every mesh axis in use (data, fsdp, tensor), as the multi-process test runs this config.
  c.mesh.shape = (2, 2, 2)
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def test_ppo_experiment_runs_and_resumes_exactly(tmp_path):
  import json
  import os
  from qdc_jax import checkpoint as ckpt_lib
  from qdc_jax.experiments import ppo as ppo_exp
  full = ppo_exp.run(_smoke_config(), str(tmp_path / "a"))
  # The same run stopped after iteration 1 and resumed to 2.
  stopped = ppo_exp.run(_smoke_config(**{"ppo.stop_after_iteration": 1}), str(tmp_path / "b"))
  assert stopped["stopped_at"] == 1
  resumed = ppo_exp.run(_smoke_config(), str(tmp_path / "b"))
  assert [p["rollouts"] for p in full["curve"]] == [0, 2 * 4 * 4]  # iterations x questions x N
  assert full["curve"] == [resumed["curve"][0], resumed["curve"][-1]]
  assert set(full["final"]) == {"in_dist", "ood"}
  with open(tmp_path / "a" / common.REPORT_FILE) as f:
    assert json.load(f)["algorithm"] == "ppo"

  # Bit-identical trainable state after the resume (same questions, keys and updates).
  a = _restore_state(tmp_path / "a")
  b = _restore_state(tmp_path / "b")
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params and Adam moments
  assert a["host"] == b["host"]  # rollouts, KL coefficient, reward moments, curve, best
  before = _initial_trainable()["policy"]["layer_3"]["mlp"]["up"]
  assert not np.array_equal(a["trainable"]["policy"]["layer_3"]["mlp"]["up"], before)
  # Settings other than the number of iterations may not change under a workdir.
  with pytest.raises(ValueError, match="ppo.temperature"):
    ppo_exp.run(_smoke_config(**{"ppo.temperature": 0.5}), str(tmp_path / "b"))


def _initial_trainable():
  from qdc_jax.experiments import ppo as ppo_exp
  cfg = _smoke_config()
  policy = common.load_policy(cfg.policy, mesh=None, rules=None)
  spec, _ = ppo_exp.make_spec_hyper(cfg, policy.model.config)
  tr, _ = ppo.split_params(nn.meta.unbox(policy.params), spec, jax.random.PRNGKey(cfg.seed))
  return tr


def _restore_state(workdir):
  import os
  from qdc_jax import checkpoint as ckpt_lib
  cfg = _smoke_config()
  tr = _initial_trainable()
  with ckpt_lib.Checkpointer(os.path.join(str(workdir), "checkpoints"), save_every=1) as c:
    abstract = {"step": jnp.zeros((), jnp.int32), "trainable": tr,
                "opt_state": _opt_state_like(cfg, tr), "nonfinite": jnp.zeros((), jnp.bool_)}
    assert c.latest_step() == 2
    state, extra = c.restore(abstract)
  return {"trainable": state["trainable"], "opt_state": state["opt_state"],
          "host": {k: v for k, v in extra["host"].items()}}


def _opt_state_like(cfg, trainable):
  import ml_collections
  from qdc_jax import optim
  opt = ml_collections.ConfigDict(cfg.opt.to_dict())
  opt.total_steps = 10
  return optim.make_optimizer(opt).init(trainable)


def test_reward_model_reward_round_trip(tmp_path):
  from qdc_jax import registry, tokenizers
  from qdc_jax.data import arith
  from qdc_jax.models import heads
  tok = tokenizers.make_tokenizer("char", alphabet=arith.ALPHABET)
  cfg = configs.get_model_config("lab_tiny")
  rm = heads.RewardModel(cfg)
  params = nn.meta.unbox(rm.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params["head"]["w"] = jax.random.normal(jax.random.PRNGKey(1), (cfg.d_model,))
  from qdc_jax.rl import reward_models
  reward_models.save(str(tmp_path / "rm"), cfg, params,
                     tokenizer_meta={"kind": "char", "alphabet": arith.ALPHABET})
  reward = reward_models.RewardModelReward.from_directory(str(tmp_path / "rm"), batch_size=2)
  items = [common.Item("q", "Question: 1+1\nSolution:\n", "2")] * 3
  texts = ["1+1=2\nThe answer is 2.", "The answer is 3.", "no answer"]
  out = reward(items, texts)
  np.testing.assert_array_equal(out.correct, [True, False, False])
  assert out.unparseable == 1
  for i, t in enumerate(texts):  # independent: the model on each sequence alone
    ids = tok.encode(items[i].prompt + t, add_bos=True)
    logit = rm.apply({"params": params}, jnp.asarray([ids]))[0, -1]
    assert out.scores[i] == pytest.approx(float(jax.nn.sigmoid(logit)), rel=1e-5)
  assert registry.get("reward", "sparse")(items, texts).scores.tolist() == [1.0, 0.0, 0.0]
  with pytest.raises(ValueError, match="holds a 'lm' model, not the 'reward_model'"):
    from qdc_jax import model_io
    model_io.save_model(str(tmp_path / "policy"), cfg, nn.meta.unbox(
        transformer.Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
        ["params"]), tokenizer={"kind": "char", "alphabet": arith.ALPHABET})
    reward_models.load(str(tmp_path / "policy"))


def test_report_tables_and_plots(tmp_path):
  from qdc_jax.rl import report
  def run(alg, maj1, rollouts):
    curve = [{"round": i, "rollouts": r, "maj@1": m, "maj@4": m, "pass@4": m + 0.1,
              "diversity/exact_all": 3.0, "diversity/trace_all": 2.0,
              "diversity/exact_correct": 1.0, "diversity/trace_correct": 1.0}
             for i, (r, m) in enumerate(zip(rollouts, maj1))]
    return {"algorithm": alg, "k": 4, "curve": curve, "best": curve[-1],
            "final": {"in_dist": {**curve[-1], "maj@1": maj1[-1] + 0.01}}}
  for name, r in {"ei": run("ei", [0.1, 0.3], [0, 800]),
                  "ppo": run("ppo", [0.1, 0.2, 0.25], [0, 64, 128])}.items():
    (tmp_path / name).mkdir()
    storage.write_json(str(tmp_path / name / common.REPORT_FILE), r)
  runs = report.load_runs([f"EI={tmp_path / 'ei'}", f"PPO={tmp_path / 'ppo'}"])
  table = report.tables(runs)
  assert "| EI | 0.310 | 0.300 | 0.400 | 3.000 | 2.000 | 1.000 | 800 | 800 |" in table
  assert "| PPO | 0.260 | 0.250 | 0.350 |" in table
  written = report.plots(runs, str(tmp_path))
  assert sorted(os.path.basename(p) for p in written) == [
      "diversity.png", "ei_iterations.png", "sample_complexity.png"]
  assert all(os.path.getsize(p) > 1000 for p in written)
  with pytest.raises(FileNotFoundError, match="did the run finish"):
    report.load_runs([f"X={tmp_path / 'missing'}"])


def test_committed_results_redraw_the_committed_tables(tmp_path):
  from qdc_jax.rl import report
  results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                         "results")
  runs = report.load_results(results)  # the directory, or the file itself
  assert runs == report.load_results(os.path.join(results, "rl_runs.json"))
  assert runs[0][0] == "SFT student (shipped)" and len(runs) == len(dict(runs))
  with open(os.path.join(results, "rl_tables.md")) as f:
    assert report.tables(runs) == f.read()
  # Runs of another K beside them: the columns say maj@k and each row names its own K.
  other = dict(runs[0][1], k=4, final={"in_dist": {"maj@1": 0.5, "maj@4": 0.25,
                                                   "pass@4": 0.75}})
  mixed = report.tables(runs[:1] + [("Smoke", other)])
  assert "| model | maj@1 | maj@k | pass@k |" in mixed
  assert "| SFT student (shipped) (k=16) | 0.180 | 0.203 | 0.500 |" in mixed
  assert "| Smoke (k=4) | 0.500 | 0.250 | 0.750 |" in mixed
  with pytest.raises(FileNotFoundError, match="rl_runs.json does not exist"):
    report.load_results(str(tmp_path))


@pytest.mark.parametrize("kw", SPECS + [dict(value_layers=3)])
def test_forward_at_init_equals_the_plain_model(kw):
  """Policy and reference log-probs are the model's; at init the value branch copies the
  policy's top blocks, so V = final_norm(h) . w + b whatever the branch point."""
  cfg, model, params = _tiny()
  spec = ppo.Spec(cfg, **kw)
  trainable, frozen = ppo.split_params(params, spec, jax.random.PRNGKey(1))
  w = jax.random.normal(jax.random.PRNGKey(2), (cfg.d_model,))
  trainable["value"]["head"] = {"w": w, "b": jnp.float32(0.5)}
  b = _batch()
  out = jax.jit(functools.partial(ppo.forward, spec=spec, with_reference=True))(
      trainable, frozen, b)
  hidden, _ = jax.jit(functools.partial(model.apply, return_hidden=True))(
      {"params": params}, b["inputs"], b["positions"], b["segment_ids"])
  logits = hidden @ params["embedding"].T
  logits = 30.0 * jnp.tanh(logits / 30.0)  # Gemma's final soft-cap
  ref = jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(out["logp"], ref, atol=1e-4)
  np.testing.assert_allclose(out["ref_logp"], ref, atol=1e-4)
  np.testing.assert_allclose(out["values"], hidden @ w + 0.5, rtol=1e-4, atol=1e-4)
  # Trainable holds exactly the blocks above the frozen bottom.
  names = {k for k in trainable.get("policy", trainable.get("lora", {})) if k.startswith("layer")}
  assert names == {f"layer_{i}" for i in range(spec.frozen_layers, cfg.num_layers)}


def test_trained_hydra_lora_policy_and_experience_wiring():
  cfg, model, params = _tiny()
  spec = ppo.Spec(cfg, value_layers=2, frozen_layers=1, lora_rank=4)
  hyper = ppo.Hyper(minibatch_size=2, epochs=2, whiten_advantages=False, gamma=1.0, lam=1.0)
  trainable, frozen = ppo.split_params(params, spec, jax.random.PRNGKey(1))
  tx = optax.adam(3e-2)
  state = ppo.init_state(trainable, tx)
  experience = jax.jit(functools.partial(ppo.make_experience, spec=spec, hyper=hyper))
  update = jax.jit(functools.partial(ppo.ppo_update, spec=spec, hyper=hyper, tx=tx))
  b = _batch()
  scores = jnp.array([1.0, 0.0, 1.0, 0.5])
  for i in range(2):
    exp, _ = experience(state["trainable"], frozen, b, scores, None, 0.1)
    state, _ = update(state, frozen, exp, jax.random.PRNGKey(i))
  # The trained policy's forward == the plain model on the merged parameters.
  out = jax.jit(functools.partial(ppo.forward, spec=spec, with_reference=True))(
      state["trainable"], frozen, b)
  merged = ppo.policy_params(state["trainable"], frozen, spec)
  logits, _ = jax.jit(model.apply)({"params": merged}, b["inputs"], b["positions"],
                                   b["segment_ids"])
  ref = jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(out["logp"], ref, atol=1e-5)
  mask = np.asarray(b["action_mask"])
  kl = (np.asarray(out["logp"]) - np.asarray(out["ref_logp"])) * mask
  assert np.abs(kl).max() > 1e-4  # the policy moved away from the reference
  # gamma = lambda = 1, no whitening: the return at the first action is the score minus
  # kl_coef x the summed per-token KL of the row.
  exp, stats = experience(state["trainable"], frozen, b, scores, None, 0.1)
  first = mask.argmax(axis=1)
  got = np.asarray(exp["returns"])[np.arange(4), first]
  np.testing.assert_allclose(got, np.asarray(scores) - 0.1 * kl.sum(axis=1), rtol=1e-4,
                             atol=1e-5)
  assert float(stats["kl"]) == pytest.approx(kl.sum(axis=1).mean(), rel=1e-4, abs=1e-6)


def test_nonfinite_update_is_skipped_and_sticky():
  cfg, _, params = _tiny(2)
  spec = ppo.Spec(cfg)
  hyper = ppo.Hyper(minibatch_size=2, epochs=1)
  trainable, frozen = ppo.split_params(params, spec, jax.random.PRNGKey(1))
  tx = optax.adam(1e-2)
  state = ppo.init_state(trainable, tx)
  before = jax.tree.map(np.array, state["trainable"])
  exp, _ = jax.jit(functools.partial(ppo.make_experience, spec=spec, hyper=hyper))(
      trainable, frozen, _batch(), jnp.array([1.0, jnp.nan, 0.0, 1.0]), None, 0.05)
  state, _ = jax.jit(functools.partial(ppo.ppo_update, spec=spec, hyper=hyper, tx=tx))(
      state, frozen, exp, jax.random.PRNGKey(0))
  assert bool(state["nonfinite"])
  jax.tree.map(np.testing.assert_array_equal, state["trainable"], before)
