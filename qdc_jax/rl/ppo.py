"""PPO for reasoning (thesis 3.3): pure, jitted pieces; the loop is `experiments/ppo.py`.

Model (one trunk, `Spec`):
- policy: the transformer; optionally LoRA of rank r on its top blocks (base frozen);
- value branch: copies of the top `value_layers` blocks + final norm + a scalar head, fed the
  trunk's residual stream with the gradient stopped (value loss never moves the policy);
- reference: the frozen initial policy, for the per-token KL penalty. With LoRA the frozen
  base *is* the reference (no copy); without LoRA the top blocks are copied once;
- Hydra (trlX): the bottom `frozen_layers` blocks (and the embedding) are frozen and shared by
  policy, reference and value branch: stored once, run once per forward.

Parameters: `trainable` = {"policy": top blocks} or {"lora": LoRA tree}, plus {"value": ...};
`frozen` = {"bottom": embedding + bottom blocks, "top": the reference's top blocks}. Only
`trainable` is in the optimiser and in the donated state, so `frozen` stays bit-identical.

Rollout batches (R rows): tokens = prompt + response, right-padded to S; `inputs` = tokens[:,
:-1], `targets` = tokens[:, 1:]; `action_mask` [R, T] marks targets that are response tokens
(EOS included: stopping is an action); `last_index` [R] is the last action's position.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qdc_jax.models import heads
from qdc_jax.models import lora as lora_lib
from qdc_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static structure of the PPO model."""
  config: transformer.ModelConfig
  value_layers: int = 1  # blocks in the value branch (thesis: 4)
  frozen_layers: int = 0  # Hydra: bottom blocks frozen and shared (0 = off)
  lora_rank: int = 0  # LoRA rank on the policy's top blocks (0 = full fine-tune)
  lora_alpha: float = 0.0  # LoRA scale alpha / r (<= 0: scale 1)

  def __post_init__(self):
    n = self.config.num_layers
    if not 1 <= self.value_layers <= n:
      raise ValueError(f"value_layers={self.value_layers} must be in 1..{n} (the policy's "
                       f"num_layers)")
    if not 0 <= self.frozen_layers < n:
      raise ValueError(f"frozen_layers={self.frozen_layers} must be in 0..{n - 1}: at least "
                       f"one block has to train")
    if self.lora_rank < 0:
      raise ValueError(f"lora_rank={self.lora_rank} must be >= 0")

  @property
  def branch(self) -> int:
    """Index of the first block of the value branch."""
    return self.config.num_layers - self.value_layers

  @property
  def lora_scale(self) -> float:
    return lora_lib.scale(self.lora_alpha, self.lora_rank)

  def top_keys(self, params: dict) -> list[str]:
    """Policy parameters above the frozen bottom (the embedding only without Hydra)."""
    cfg = self.config
    keys = [f"layer_{i}" for i in range(self.frozen_layers, cfg.num_layers)] + ["final_norm"]
    if "lm_head" in params:
      keys.append("lm_head")
    if self.frozen_layers == 0:
      keys += [k for k in ("embedding", "pos_embedding") if k in params]
    return keys


@dataclasses.dataclass(frozen=True)
class Hyper:
  """PPO hyper-parameters used inside the jitted update."""
  epochs: int = 4  # PPO epochs over each rollout batch
  minibatch_size: int = 16  # rows per gradient step (rollout rows must be a multiple)
  clip_eps: float = 0.2  # policy ratio clip
  value_clip: float = 0.2  # value prediction clip around the rollout's values
  vf_coef: float = 1.0  # weight of the value loss
  gamma: float = 1.0
  lam: float = 0.95  # GAE lambda
  whiten_advantages: bool = True


# ---------------------------------------------------------------------------------------------
# Parameters.


def split_params(policy_params: dict, spec: Spec, rng: jax.Array) -> tuple[dict, dict]:
  """(trainable, frozen) from an (unboxed) policy parameter tree; see the module docstring.

  Every returned leaf is a fresh buffer: the caller's tree is never aliased (the update
  donates `trainable`).
  """
  copy = lambda t: jax.tree.map(jnp.copy, t)
  top_keys = spec.top_keys(policy_params)
  missing = [k for k in top_keys if k not in policy_params]
  if missing:
    raise ValueError(f"policy params lack {missing}; is this a {spec.config} tree?")
  bottom = {k: v for k, v in policy_params.items() if k not in top_keys}
  top = {k: policy_params[k] for k in top_keys}
  head = {"w": jnp.zeros((spec.config.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
  value = heads.value_branch_params_from_policy(policy_params, head, spec.branch,
                                                spec.config.num_layers)
  trainable: dict = {"value": value}
  if spec.lora_rank:
    trainable["lora"] = lora_lib.init(rng, policy_params, spec.lora_rank,
                                      range(spec.frozen_layers, spec.config.num_layers))
  else:
    trainable["policy"] = copy(top)
  # Updates of lr ~1e-6 vanish below bf16 resolution: train in f32 whatever the base dtype.
  trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
  return trainable, {"bottom": copy(bottom), "top": copy(top)}


def policy_params(trainable: dict, frozen: dict, spec: Spec) -> dict:
  """The full policy parameter tree (what the sampler and exports use). LoRA is merged into
  plain weights here only; `forward` keeps it unmerged."""
  if spec.lora_rank:
    top = lora_lib.merge(frozen["top"], trainable["lora"], spec.lora_scale)
  else:
    top = jax.tree.map(lambda t, base: t.astype(base.dtype), trainable["policy"],
                       frozen["top"])
  return {**frozen["bottom"], **top}


def reference_params(frozen: dict) -> dict:
  return {**frozen["bottom"], **frozen["top"]}


def param_bytes(trainable: dict, frozen: dict, opt_state: Any, spec: Spec) -> dict:
  """Bytes held by the PPO state, and by the naive layout (separate full policy, reference
  and value model, Adam on policy + value) for comparison."""
  size = lambda t: int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(t)))
  full = size(reference_params(frozen))
  held = {"trainable": size(trainable), "frozen": size(frozen), "optimizer": size(opt_state)}
  held["total"] = sum(held.values())
  naive = {"policy": full, "reference": full, "value_model": full + 4 * spec.config.d_model,
           "optimizer": 2 * (2 * full + 4 * spec.config.d_model)}
  naive["total"] = sum(naive.values())
  return {"held": held, "naive": naive, "ratio": held["total"] / naive["total"]}


# ---------------------------------------------------------------------------------------------
# Forward: log-probs of the taken tokens, values, reference log-probs.


def _token_logp(logits_BxTxV, targets_BxT):
  logits = logits_BxTxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  chosen = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0] - lse
  probs = jax.nn.softmax(logits, axis=-1)
  entropy = lse - jnp.sum(probs * logits, axis=-1)
  return chosen, entropy


def forward(trainable: dict, frozen: dict, batch: dict, spec: Spec, *,
            with_reference: bool = False) -> dict:
  """{"logp", "entropy", "values"[, "ref_logp"]}, each [R, T] aligned with the targets."""
  cfg = spec.config
  # Unmerged LoRA evaluates the model's jaxpr with factored weights, which the stacking of a
  # scanned stack would have to merge: with LoRA the blocks run unrolled (same parameters).
  model = transformer.Transformer(cfg.replace(scan_layers=False) if spec.lora_rank else cfg)
  n, f, b = cfg.num_layers, spec.frozen_layers, spec.branch
  tok, pos, seg = batch["inputs"], batch["positions"], batch["segment_ids"]

  def blocks(params, tok, pos, seg, hidden, *, first, last):
    return model.apply({"params": params}, tok, pos, seg, layers=(first, last),
                       hidden_BxTxD=hidden)[0]

  # With LoRA the policy is the frozen base with its adapted matmuls computed unmerged,
  # x @ W + scale * (x @ a) @ b: no full-size W + a @ b (or its gradient) is ever built.
  lora = trainable.get("lora") if spec.lora_rank else None
  pp = reference_params(frozen) if lora is not None else policy_params(trainable, frozen, spec)

  def run(params, first, last, hidden, adapted=True):
    fn = functools.partial(blocks, first=first, last=last)
    if lora is None or not adapted or last <= f:  # no adapted block runs
      return fn(params, tok, pos, seg, hidden)
    return lora_lib.apply(fn, params, lora, spec.lora_scale, tok, pos, seg, hidden)

  h_f = h_b = None
  if f:  # the shared frozen bottom, run once
    if b < f:
      h_b = run(pp, 0, b, None)
      h_f = run(pp, b, f, h_b)
    else:
      h_f = run(pp, 0, f, None)
    h_f = jax.lax.stop_gradient(h_f)
  if b >= f:
    h_b = h_f if (b == f and f) else run(pp, f, b, h_f)
    logits = run(pp, b, n, h_b)
  else:
    logits = run(pp, f, n, h_f)
  out = {}
  out["logp"], out["entropy"] = _token_logp(logits, batch["targets"])
  out["values"] = heads.ValueBranch(cfg, b).apply({"params": trainable["value"]}, h_b, pos, seg)
  if with_reference:
    ref_logits = run(reference_params(frozen), f, n, h_f, adapted=False)
    out["ref_logp"], _ = _token_logp(jax.lax.stop_gradient(ref_logits), batch["targets"])
  return out


# ---------------------------------------------------------------------------------------------
# Losses and estimators (all masked; means over action tokens).


def masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / std over the masked entries (mean kept when shift_mean=False)."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def gae(rewards_RxT, values_RxT, mask_RxT, gamma: float, lam: float):
  """Generalised advantage estimation over the action positions of each row.

  delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last action;
  A_t = delta_t + gamma lambda A_{t+1}. Returns (advantages, returns = A + V), 0 off-mask.
  """
  mask = mask_RxT.astype(jnp.float32)
  values = values_RxT * mask
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = (rewards_RxT + gamma * next_values * next_mask - values) * mask

  def step(carry, xs):
    delta, nm = xs
    adv = delta + gamma * lam * nm * carry
    return adv, adv

  _, adv_TxR = jax.lax.scan(step, jnp.zeros(rewards_RxT.shape[0]),
                            (deltas.T, next_mask.T), reverse=True)
  adv = adv_TxR.T * mask
  return adv, (adv + values) * mask


def policy_loss(logp, old_logp, advantages, mask, clip_eps: float):
  """Clipped surrogate: mean of max(-A r, -A clip(r, 1-eps, 1+eps)); plus diagnostics."""
  ratio = jnp.exp(logp - old_logp)
  pg1 = -advantages * ratio
  pg2 = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(pg1, pg2), mask)
  stats = {"clipfrac": masked_mean((pg2 > pg1).astype(jnp.float32), mask),
           "approx_kl": masked_mean(0.5 * jnp.square(logp - old_logp), mask),
           "ratio": masked_mean(ratio, mask)}
  return loss, stats


def value_loss(values, old_values, returns, mask, clip: float):
  """0.5 * mean of max((V - R)^2, (clip(V, V_old +- c) - R)^2)."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  loss = 0.5 * masked_mean(jnp.maximum(jnp.square(values - returns),
                                       jnp.square(clipped - returns)), mask)
  return loss, {"vf_clipfrac": masked_mean(
      (jnp.abs(values - old_values) > clip).astype(jnp.float32), mask)}


def token_rewards(scores_R, last_index_R, kl_RxT, mask_RxT, kl_coef, dense_RxT=None):
  """-kl_coef * KL per action token, + the sequence score at the last action (+ dense)."""
  r = -kl_coef * kl_RxT * mask_RxT
  t = jnp.arange(mask_RxT.shape[1])[None, :]
  r = r + jnp.where(t == last_index_R[:, None], scores_R[:, None], 0.0)
  if dense_RxT is not None:
    r = r + dense_RxT * mask_RxT
  return r


# ---------------------------------------------------------------------------------------------
# The two jitted steps: experience (score a rollout batch) and the K-epoch update.


def make_experience(trainable, frozen, batch, scores_R, dense_RxT, kl_coef, *, spec: Spec,
                    hyper: Hyper):
  """Old log-probs, values, reference log-probs, rewards, GAE advantages and returns.

  The forward passes run minibatch by minibatch (`lax.map`), so activations and [rows, T, V]
  logits never exist for the whole rollout batch at once. Log-probs (ratios, KL) are those
  of the model at temperature 1 even when rollouts were sampled at T < 1, as in trlX.
  """
  rows, m = batch["inputs"].shape[0], hyper.minibatch_size
  if rows % m:
    raise ValueError(f"rollout rows {rows} is not a multiple of minibatch_size {m}")
  keys = ("inputs", "targets", "positions", "segment_ids")
  chunks = {k: batch[k].reshape((rows // m, m) + batch[k].shape[1:]) for k in keys}
  out = jax.lax.map(
      lambda c: forward(trainable, frozen, c, spec, with_reference=True), chunks)
  out = jax.tree.map(lambda x: x.reshape((rows,) + x.shape[2:]), out)
  mask = batch["action_mask"].astype(jnp.float32)
  kl = (out["logp"] - out["ref_logp"]) * mask
  rewards = token_rewards(scores_R, batch["last_index"], kl, mask, kl_coef, dense_RxT)
  adv, returns = gae(rewards, out["values"], mask, hyper.gamma, hyper.lam)
  if hyper.whiten_advantages:
    adv = whiten(adv, mask)
  exp = {**batch, "old_logp": out["logp"] * mask, "old_values": out["values"] * mask,
         "advantages": adv, "returns": returns}
  rows = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  stats = {"kl": jnp.mean(jnp.sum(kl, axis=1)), "kl_per_token": masked_mean(kl, mask),
           "score": jnp.mean(scores_R), "response_tokens": jnp.mean(jnp.sum(mask, axis=1)),
           "value_mean": masked_mean(out["values"], mask),
           "entropy": masked_mean(out["entropy"], mask),
           "return_mean": jnp.mean(jnp.sum(returns, axis=1) / rows)}
  return exp, stats


def ppo_loss(trainable, frozen, mb, *, spec: Spec, hyper: Hyper):
  out = forward(trainable, frozen, mb, spec)
  mask = mb["action_mask"].astype(jnp.float32)
  pg, pg_stats = policy_loss(out["logp"], mb["old_logp"], mb["advantages"], mask,
                             hyper.clip_eps)
  vf, vf_stats = value_loss(out["values"], mb["old_values"], mb["returns"], mask,
                            hyper.value_clip)
  loss = pg + hyper.vf_coef * vf
  return loss, {"loss": loss, "pg_loss": pg, "vf_loss": vf, **pg_stats, **vf_stats}


def init_state(trainable, tx: optax.GradientTransformation) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
          "opt_state": tx.init(trainable), "nonfinite": jnp.zeros((), jnp.bool_)}


def ppo_update(state, frozen, exp, rng, *, spec: Spec, hyper: Hyper,
               tx: optax.GradientTransformation):
  """`hyper.epochs` passes over the rollout batch in shuffled minibatches, all in one jit.

  A non-finite loss or gradient skips that minibatch's update and sets the sticky
  `nonfinite` flag (the loop stops and keeps the last good checkpoint).
  """
  rows = exp["inputs"].shape[0]
  m = hyper.minibatch_size
  if rows % m:
    raise ValueError(f"rollout rows {rows} is not a multiple of minibatch_size {m}")
  grad_fn = jax.value_and_grad(functools.partial(ppo_loss, spec=spec, hyper=hyper),
                               has_aux=True)

  def minibatch(carry, mb):
    trainable, opt_state, bad = carry
    (loss, stats), grads = grad_fn(trainable, frozen, mb)
    gnorm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, opt_state, trainable)
    new_tr = optax.apply_updates(trainable, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & ~bad
    new_tr, new_opt = jax.lax.cond(ok, lambda: (new_tr, new_opt),
                                   lambda: (trainable, opt_state))
    return (new_tr, new_opt, ~ok), {**stats, "grad_norm": gnorm}

  def epoch(carry, key):
    perm = jax.random.permutation(key, rows)
    mbs = jax.tree.map(lambda x: x[perm].reshape((rows // m, m) + x.shape[1:]), exp)
    return jax.lax.scan(minibatch, carry, mbs)

  carry = (state["trainable"], state["opt_state"], state["nonfinite"])
  (trainable, opt_state, bad), stats = jax.lax.scan(
      epoch, carry, jax.random.split(rng, hyper.epochs))
  new_state = {"step": state["step"] + hyper.epochs * (rows // m), "trainable": trainable,
               "opt_state": opt_state, "nonfinite": bad}
  return new_state, jax.tree.map(jnp.mean, stats)


# ---------------------------------------------------------------------------------------------
# Host-side pieces: running reward scale, adaptive KL, best-K-of-N, batch assembly.


class RunningMoments:
  """Running mean / std of every score seen (parallel-variance merge; unbiased std)."""

  def __init__(self, count: float = 0.0, mean: float = 0.0, m2: float = 0.0):
    self.count, self.mean, self.m2 = float(count), float(mean), float(m2)

  @property
  def std(self) -> float:
    """Unbiased std of all scores seen; 1 until there are two and it is positive."""
    if self.count < 2:
      return 1.0
    var = self.m2 / (self.count - 1)
    return math.sqrt(var) if var > 0 else 1.0

  def update(self, xs) -> None:
    xs = np.asarray(xs, np.float64).ravel()
    if xs.size == 0:
      return
    n, mean = float(xs.size), float(xs.mean())
    m2 = float(np.sum(np.square(xs - mean)))
    total = self.count + n
    delta = mean - self.mean
    self.mean += delta * n / total
    self.m2 += m2 + delta * delta * self.count * n / total
    self.count = total

  def state_dict(self) -> dict:
    return {"count": self.count, "mean": self.mean, "m2": self.m2}


def scale_scores(scores, moments: RunningMoments) -> np.ndarray:
  """Scores / running std including this batch (no mean subtraction, as in the thesis)."""
  moments.update(scores)
  return np.asarray(scores, np.float32) / np.float32(moments.std)


def adaptive_kl_coef(coef: float, observed_kl: float, *, target: float, horizon: float,
                     batch_rows: int) -> float:
  """Ziegler et al.'s proportional controller: moves the coefficient by at most 20% x
  batch/horizon towards KL == target."""
  err = float(np.clip(observed_kl / target - 1.0, -0.2, 0.2))
  return coef * (1.0 + err * batch_rows / horizon)


def best_k_of_n(scores, n: int, k: int) -> np.ndarray:
  """Row indices keeping the k highest-scoring of each consecutive group of n rows (stable:
  ties keep the earlier sample)."""
  scores = np.asarray(scores)
  if k > n or scores.size % n:
    raise ValueError(f"best-K-of-N needs k <= n and rows divisible by n (k={k}, n={n}, "
                     f"rows={scores.size})")
  out = []
  for g in range(scores.size // n):
    group = scores[g * n:(g + 1) * n]
    keep = np.argsort(-group, kind="stable")[:k]
    out.extend(sorted(g * n + int(i) for i in keep))
  return np.asarray(out, np.int64)


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], seq_len: int,
                  pad_id: int) -> dict:
  """Arrays for `make_experience` from token lists (prompt incl. BOS; response incl. EOS)."""
  rows = len(prompts)
  tokens = np.full((rows, seq_len), pad_id, np.int32)
  mask = np.zeros((rows, seq_len - 1), np.float32)
  last = np.zeros((rows,), np.int32)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    if not r:
      raise ValueError(f"row {i}: empty response")
    if len(p) + len(r) > seq_len:
      raise ValueError(f"row {i}: prompt {len(p)} + response {len(r)} tokens > seq_len "
                       f"{seq_len}")
    tokens[i, :len(p)] = p
    tokens[i, len(p):len(p) + len(r)] = r
    mask[i, len(p) - 1:len(p) - 1 + len(r)] = 1.0
    last[i] = len(p) + len(r) - 2
  seg = (np.arange(seq_len - 1)[None, :] <= last[:, None]).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(seq_len - 1, dtype=np.int32),
                                       (rows, seq_len - 1)).copy(),
          "segment_ids": seg, "action_mask": mask, "last_index": last}
