"""PPO on reasoning questions (thesis 3.3), from a policy model directory.

Each iteration: sample N completions for each of `questions_per_batch` train questions at
temperature T (one sampler call), score them with the configured reward (registry "reward":
sparse / dense / model), keep the best K of each N, divide scores by a running std, score the
rollouts under policy, value branch and frozen reference (one jitted call), and run K PPO
epochs over minibatches (one jitted call). Every `eval_every` iterations the policy is
evaluated on the validation questions (maj@1, maj@k, pass@k, diversity) against the number of
rollouts sampled so far; the best validation maj@1 policy is exported and measured on the test
splits at the end (<workdir>/rl_report.json, ppo_curve.png).

Resumable: the checkpoint holds the trainable state and the host state (iteration, rollouts,
KL coefficient, running reward moments, curve); iteration i's questions and sampling keys come
from (seed, i), so a killed run redoes the iterations after its last checkpoint exactly.
"""

from __future__ import annotations

import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from qdc_jax import checkpoint as ckpt_lib
from qdc_jax import config_lib
from qdc_jax import fit
from qdc_jax import metrics_log
from qdc_jax import optim
from qdc_jax import registry
from qdc_jax import sampling
from qdc_jax import sharding as sharding_lib
from qdc_jax import storage
from qdc_jax.rl import common
from qdc_jax.rl import ppo
from qdc_jax.rl import reward_models
from qdc_jax.rl import rewards as rewards_lib


def make_reward(rc, mesh=None, rules=None):
  if rc.name == "model":
    if not rc.model_dir:
      raise ValueError("reward.name='model' needs --config.reward.model_dir (a reward-model "
                       "directory, e.g. <glore workdir>/orm/model)")
    return reward_models.RewardModelReward.from_directory(rc.model_dir, mesh=mesh, rules=rules)
  fn = registry.get("reward", rc.name)
  return functools.partial(fn, step_weight=rc.step_weight) if rc.name == "dense" else fn


@functools.lru_cache(maxsize=8)
def jitted_steps(spec: ppo.Spec, hyper: ppo.Hyper, opt_json: str):
  """(optimizer, jitted make_experience, jitted ppo_update), cached per settings, so runs in
  one process (a sweep, a notebook, a resumed run) compile them once."""
  opt = ml_collections.ConfigDict(json.loads(opt_json))
  tx = optim.make_optimizer(opt)
  experience = jax.jit(functools.partial(ppo.make_experience, spec=spec, hyper=hyper))
  update = jax.jit(functools.partial(ppo.ppo_update, spec=spec, hyper=hyper, tx=tx),
                   donate_argnums=(0,))
  return tx, experience, update


def make_spec_hyper(config, model_config):
  pc = config.ppo
  spec = ppo.Spec(model_config, value_layers=pc.value_layers, frozen_layers=pc.frozen_layers,
                  lora_rank=pc.lora_rank, lora_alpha=pc.lora_alpha)
  hyper = ppo.Hyper(epochs=pc.epochs, minibatch_size=pc.minibatch_size, clip_eps=pc.clip_eps,
                    value_clip=pc.value_clip, vf_coef=pc.vf_coef, gamma=pc.gamma, lam=pc.lam,
                    whiten_advantages=pc.whiten_advantages)
  return spec, hyper


def plot_curve(curve, k, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  xs = [max(p["rollouts"], 1) for p in curve]
  for key in ("maj@1", f"maj@{k}", f"pass@{k}"):
    ax.plot(xs, [p[key] for p in curve], marker="o", label=key)
  ax.set_xscale("log")
  ax.set_xlabel("rollouts sampled")
  ax.set_ylabel("validation accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("PPO")
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["policy", "task.name", "ppo.iterations", "reward.name"])
  pc = config.ppo
  if pc.best_k > pc.samples_per_question:
    raise ValueError(f"ppo.best_k={pc.best_k} > ppo.samples_per_question="
                     f"{pc.samples_per_question}: keep at most the N sampled")
  rows = pc.questions_per_batch * pc.best_k
  if rows % pc.minibatch_size:
    raise ValueError(f"rollout rows questions_per_batch x best_k = {rows} must be a multiple of "
                     f"ppo.minibatch_size={pc.minibatch_size}")
  mesh, rules = config_lib.make_mesh(config.mesh)
  data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % data_shards:
    raise ValueError(f"rollout rows questions_per_batch x best_k = {rows} must be a multiple of "
                     f"the data x fsdp mesh axes ({data_shards} devices)")
  task = common.load_task(config.task)
  policy = common.load_policy(config.policy, mesh=mesh, rules=rules)
  tok = policy.tokenizer
  cfg = policy.model.config
  spec, hyper = make_spec_hyper(config, cfg)
  reward_fn = make_reward(config.reward, mesh, rules)
  # Recorded only once the inputs load, so a mistyped path does not pin the workdir. The
  # number of iterations sets the schedule, so only stop_after_iteration may change.
  common.check_settings(workdir, config.to_dict(),
                        may_change=("mesh", "ppo.save_every", "ppo.log_every",
                                    "ppo.stop_after_iteration"))
  total_updates = pc.iterations * pc.epochs * (rows // pc.minibatch_size)
  opt_key = json.dumps({**config.opt.to_dict(), "total_steps": total_updates}, sort_keys=True)
  tx, experience_jit, update_jit = jitted_steps(spec, hyper, opt_key)

  trainable, frozen = ppo.split_params(nn.meta.unbox(policy.params), spec,
                                       jax.random.PRNGKey(config.seed))
  # New leaves (value head, LoRA factors) live on one device: replicate them on the mesh;
  # copies of policy leaves keep the policy's shardings.
  rep = sharding_lib.replicated(mesh)
  place = lambda x: x if getattr(x.sharding, "mesh", None) == mesh else jax.device_put(x, rep)
  trainable, frozen = jax.tree.map(place, trainable), jax.tree.map(place, frozen)
  state = jax.tree.map(place, ppo.init_state(trainable, tx))
  policy.params = None  # `frozen` + `trainable` hold the model now
  sizes = ppo.param_bytes(trainable, frozen, state["opt_state"], spec)
  logging.info("PPO state bytes: %s (naive layout %s, ratio %.3f)", sizes["held"],
               sizes["naive"], sizes["ratio"])
  ckpt = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), save_every=1, keep=2,
                               async_save=False)
  host = {"iteration": 0, "rollouts": 0, "kl_coef": pc.kl_coef,
          "moments": ppo.RunningMoments().state_dict(), "curve": [], "best": None}
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(state)
    host = extra["host"]
    logging.info("Resumed PPO at iteration %d (%d rollouts)", host["iteration"],
                 host["rollouts"])
  moments = ppo.RunningMoments(**host["moments"])

  # Few shapes: prompts padded to one length for the sampler; rollout rows to the batch's
  # longest prompt + response rounded up to `seq_bucket` (a handful of compiles in all).
  prompts = [tok.encode(it.prompt, add_bos=True) for it in task.train]
  p_len = -(-max(len(p) for p in prompts) // 16) * 16
  sp = sampling.SamplingParams(max_new_tokens=pc.max_new_tokens,
                               num_samples=pc.samples_per_question,
                               temperature=pc.temperature, eos_id=tok.eos_id,
                               pad_id=tok.pad_id, valid_vocab_size=tok.vocab_size)
  sample_fn = sampling.jit_sample(policy.model, sp, mesh, rules, policy.shardings)
  assemble = jax.jit(functools.partial(ppo.policy_params, spec=spec),
                     out_shardings=policy.shardings)
  def experience_fn(*args):
    with sharding_lib.activation_rules(mesh, rules):
      return experience_jit(*args)

  def update_fn(*args):
    with sharding_lib.activation_rules(mesh, rules):
      return update_jit(*args)
  ec = config.eval
  log = metrics_log.MetricLogger(workdir, name="ppo", total_steps=pc.iterations,
                                 start_step=host["iteration"], unit="iterations")

  def evaluate_now(params, it):
    m, _ = common.evaluate(params, task.val, policy=policy, ec=ec, mesh=mesh, rules=rules,
                           param_shardings=None)
    point = {"round": it, "rollouts": host["rollouts"], **common.headline(m, ec.k)}
    host["curve"].append(point)
    log.write(it, {f"val/{k}": v for k, v in point.items() if v is not None}, console=True)
    if host["best"] is None or point["maj@1"] > host["best"]["maj@1"]:
      host["best"] = point
      common.export(storage.join(workdir, "model"), policy, params,
                    notes={"algorithm": "ppo", "iteration": it, "rollouts": host["rollouts"]})

  try:
    if not host["curve"]:
      evaluate_now(assemble(state["trainable"], frozen), 0)
    rng = jax.random.PRNGKey(config.seed)
    end = pc.iterations if pc.stop_after_iteration < 0 else min(pc.iterations,
                                                                 pc.stop_after_iteration)
    for it in range(host["iteration"], end):
      t0 = time.perf_counter()
      pick = np.random.default_rng([config.seed, it]).choice(
          len(task.train), pc.questions_per_batch, replace=False)
      toks, lens = sampling.pad_prompts([prompts[i] for i in pick], tok.pad_id,
                                        multiple=p_len, min_rows=data_shards)
      params = assemble(state["trainable"], frozen)
      out = sharding_lib.to_host(sample_fn(
          params, sharding_lib.put_global(toks, mesh, rules),
          sharding_lib.put_global(lens, mesh, rules), jax.random.fold_in(rng, it)))
      del params
      responses = [list(out.tokens[r, :max(int(out.lengths[r]), 1)])
                   for r in range(len(pick) * pc.samples_per_question)]
      texts = [tok.decode(r) for r in responses]
      row_items = [task.train[i] for i in pick for _ in range(pc.samples_per_question)]
      rw = reward_fn(row_items, texts, tokenizer=tok)
      keep = ppo.best_k_of_n(rw.scores, pc.samples_per_question, pc.best_k)
      row_prompts = [prompts[i] for i in pick for _ in range(pc.samples_per_question)]
      kept_prompts = [row_prompts[i] for i in keep]
      kept_responses = [responses[i] for i in keep]
      scaled = ppo.scale_scores(rw.scores[keep], moments)
      longest = max(len(p) + len(r) for p, r in zip(kept_prompts, kept_responses))
      seq_len = -(-longest // pc.seq_bucket) * pc.seq_bucket
      batch = ppo.rollout_batch(kept_prompts, kept_responses, seq_len, tok.pad_id)
      dense = None
      if rw.step_rewards is not None:
        sub = rewards_lib.Rewards(rw.scores[keep], rw.correct[keep], 0,
                                  [rw.step_rewards[i] for i in keep])
        dense = rewards_lib.token_rewards_from_offsets(
            sub, tok, kept_responses, [len(p) for p in kept_prompts], seq_len - 1)
        dense = dense / np.float32(moments.std)
      batch = sharding_lib.put_global(batch, mesh, rules)
      exp, stats = experience_fn(
          state["trainable"], frozen, batch, sharding_lib.put_global(scaled, mesh, rules),
          None if dense is None else sharding_lib.put_global(dense, mesh, rules),
          jnp.float32(host["kl_coef"]))
      state, ustats = update_fn(state, frozen, exp, jax.random.fold_in(rng, 10_000_000 + it))
      stats, ustats = sharding_lib.to_host((stats, ustats))
      if bool(sharding_lib.to_host(state["nonfinite"])):
        raise fit.NonFiniteError(
            f"Non-finite PPO loss or gradient at iteration {it + 1}; stopped without saving. "
            f"The last good checkpoint is iteration {ckpt.latest_step()} in "
            f"{ckpt.directory}. Lower --config.opt.lr or check the rewards.")
      if pc.adaptive_kl:
        host["kl_coef"] = ppo.adaptive_kl_coef(host["kl_coef"], float(stats["kl"]),
                                               target=pc.kl_target, horizon=pc.kl_horizon,
                                               batch_rows=rows)
      host["rollouts"] += len(texts)
      host["iteration"] = it + 1
      host["moments"] = moments.state_dict()
      row = {"reward": float(rw.scores.mean()), "correct": float(rw.correct.mean()),
             "kept_reward": float(rw.scores[keep].mean()), "unparseable": rw.unparseable,
             "kl_coef": host["kl_coef"], "rollouts": host["rollouts"],
             "reward_std": moments.std, "seconds": time.perf_counter() - t0,
             **{k: float(v) for k, v in stats.items()},
             **{k: float(v) for k, v in ustats.items()}}
      log.write(it + 1, row, console=(it + 1) % pc.log_every == 0)
      is_eval = (it + 1) % ec.every == 0 or it + 1 == pc.iterations
      if is_eval:
        evaluate_now(assemble(state["trainable"], frozen), it + 1)
      if is_eval or (it + 1) % pc.save_every == 0 or it + 1 == end:
        ckpt.maybe_save(it + 1, state, {"host": host}, force=True)
  finally:
    ckpt.close()
    log.close()
  if host["iteration"] < pc.iterations:
    logging.info("Stopped after iteration %d of %d; re-run on %s to continue.",
                 host["iteration"], pc.iterations, workdir)
    return {"algorithm": "ppo", "curve": host["curve"], "stopped_at": host["iteration"]}

  best = common.load_policy(storage.join(workdir, "model"), mesh=mesh, rules=rules)
  final = {}
  for split, items in task.test.items():
    m, _ = common.evaluate(best.params, items, policy=best, ec=ec, mesh=mesh, rules=rules)
    final[split] = common.headline(m, ec.k)
    logging.info("PPO test %s: %s", split, final[split])
  report = {"algorithm": "ppo", "variant": config.variant, "seed": config.seed, "k": ec.k,
            "curve": host["curve"], "final": final, "best": host["best"],
            "notes": {"reward": config.reward.name, "state_bytes": sizes,
                      "policy": config.policy, "spec": {
                          "value_layers": spec.value_layers, "frozen_layers": spec.frozen_layers,
                          "lora_rank": spec.lora_rank}}}
  storage.write_json(storage.join(workdir, common.REPORT_FILE), report)
  plot_curve(host["curve"], ec.k, storage.join(workdir, "ppo_curve.png"))
  return report
