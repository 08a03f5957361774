"""ILQL: implicit language Q-learning (Snell et al. 2022), as trlX has it (thesis 3.2).

Offline RL on (prompt, completion, reward) rows. On the policy's trunk sit five heads, each an
MLP d -> 2d -> out on the final hidden state h_t (`ILQLHeads`): two Q heads Q_1, Q_2 [V] (one
value per next token), their Polyak-averaged targets Q^_1, Q^_2 and a V head [1]. With s_t the
state after token t and a_t = token t+1 (an action: a completion token), per action:

  Q target    y_t = r_t + gamma * V(s_{t+1})        (V stopped; 0 after the last action)
  Q loss      sum_i (Q_i(s_t, a_t) - y_t)^2
  V loss      expectile tau of min_i Q^_i(s_t, a_t) - V(s_t):  |tau - 1[u < 0]| u^2
  CQL term    sum_i CE(softmax(Q_i(s_t, .)), a_t)  (pushes Q down on tokens the data did not take)
  AWR term    w_t * CE(policy logits at s_t, a_t), w_t = min(exp(awr_beta * (min_i Q^_i - V)),
              awr_max_weight), stopped; awr_beta = 0 is trlX's plain behaviour-cloning term
  loss        Q + V + cql_scale * CQL + awr_scale * AWR, a mean over action tokens

`OBJECTIVE` plugs this into `fit` (one jitted step; the trunk is trained by every term, as in
trlX), with `optimizer` wrapping fit's optimiser: the target heads take no gradient step but
move by Polyak averaging, Q^ <- (1 - alpha) Q^ + alpha Q (after Q's step), and the bottom
`frozen_layers` blocks (and the embeddings) can be frozen (their optimiser state is not held).

Sampling (`ILQLModel`, a drop-in for `Transformer` in the one sampling loop): logits
+ beta * (min_i Q^_i(s, .) - V(s)) at every step; beta = 0 is the trained policy alone.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qdc_jax import train
from qdc_jax.models import transformer

TARGETS = {"target_q1": "q1", "target_q2": "q2"}  # target head -> the head it follows


@dataclasses.dataclass(frozen=True)
class Hyper:
  """ILQL loss weights (trlX's defaults where it has them)."""
  gamma: float = 0.99
  tau: float = 0.7  # V expectile
  cql_scale: float = 0.1
  awr_scale: float = 1.0
  awr_beta: float = 1.0  # AWR temperature (0 = behaviour cloning, trlX's "awac" term)
  awr_max_weight: float = 20.0


class MLPHead(nn.Module):
  """d -> 2d -> `out` (ReLU), float32."""
  out: int

  @nn.compact
  def __call__(self, h):
    d = h.shape[-1]
    x = nn.Dense(2 * d, name="hidden", kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(
                     h.astype(jnp.float32))
    return nn.Dense(self.out, name="out", kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", "vocab" if self.out > 1 else None)),
                    bias_init=nn.with_logical_partitioning(
                        nn.initializers.zeros, ("vocab" if self.out > 1 else None,)))(
                            nn.relu(x))


class ILQLHeads(nn.Module):
  """{"q1", "q2", "target_q1", "target_q2"}: [B, T, V]; "v": [B, T]."""
  vocab_size: int

  @nn.compact
  def __call__(self, h):
    out = {name: MLPHead(self.vocab_size, name=name)(h) for name in ("q1", "q2", *TARGETS)}
    out["v"] = MLPHead(1, name="v")(h)[..., 0]
    return out


class ILQLModel(nn.Module):
  """Trunk + ILQL heads; params {"trunk": a Transformer tree, "heads": `ILQLHeads`}.

  Called like a `Transformer` (tokens, positions, segment ids, cache, logits_index_B), it
  returns (logits + beta * (min target Q - V), cache): what the sampler draws from.
  `all_heads=True` returns (the policy logits, every head's output) instead (training)."""
  config: transformer.ModelConfig
  beta: float = 1.0

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, cache=None, *,
               logits_index_B=None, all_heads: bool = False):
    (logits, h), cache = transformer.Transformer(self.config, name="trunk")(
        tokens_BxT, positions_BxT, segment_ids_BxT, cache, logits_index_B=logits_index_B,
        with_hidden=True)
    out = ILQLHeads(self.config.vocab_size, name="heads")(h)
    if all_heads:
      return logits, out
    shift = jnp.minimum(out["target_q1"], out["target_q2"]) - out["v"][..., None]
    return logits + self.beta * shift, cache


def init_params(rng: jax.Array, policy_params: dict, config: transformer.ModelConfig) -> dict:
  """ILQL params from a policy: its trunk (copied), fresh Q and V heads, and target heads
  equal to the Q heads."""
  h = jnp.zeros((1, 1, config.d_model), jnp.float32)
  heads = nn.meta.unbox(ILQLHeads(config.vocab_size).init(rng, h)["params"])
  for target, source in TARGETS.items():
    heads[target] = jax.tree.map(jnp.copy, heads[source])
  return {"trunk": jax.tree.map(jnp.copy, policy_params), "heads": heads}


# ---------------------------------------------------------------------------------------------
# Data.


def encode(tokenizer, rows, seq_len: int) -> tuple[dict[str, np.ndarray], int]:
  """(prompt, completion, reward) rows -> {"tokens" [N, T], "actions" [N, T] (1 where token
  t + 1 is a completion token, the action taken in state t), "rewards" [N, T] (the row's
  reward on its last action)} and the number of rows cut at seq_len (their reward still lands
  on the last action that fits; the cut is logged by the caller).

  A completion ends with EOS (the action that ends the episode)."""
  n = len(rows)
  tokens = np.full((n, seq_len), tokenizer.pad_id, np.int32)
  actions = np.zeros((n, seq_len), np.float32)
  rewards = np.zeros((n, seq_len), np.float32)
  cut = 0
  for r, (prompt, completion, reward) in enumerate(rows):
    head = tokenizer.encode(prompt, add_bos=True)
    body = tokenizer.encode(completion) + [tokenizer.eos_id]
    ids = (head + body)[:seq_len]
    cut += len(head) + len(body) > seq_len
    tokens[r, :len(ids)] = ids
    last = len(ids) - 2  # the state whose action is the last kept token
    if last < len(head) - 1:
      continue  # no completion token fits: no action
    actions[r, len(head) - 1:last + 1] = 1.0
    rewards[r, last] = float(reward)
  return {"tokens": tokens, "actions": actions, "rewards": rewards}, cut


# ---------------------------------------------------------------------------------------------
# The loss and the optimiser.


def _at(x_BxTxV, a_BxT):
  return jnp.take_along_axis(x_BxTxV, a_BxT[..., None], axis=-1)[..., 0]


def losses(logits, out, batch, hyper: Hyper) -> tuple[jax.Array, dict]:
  """(sum of the ILQL loss over action tokens, aux sums): see the module docstring."""
  tokens, mask, r = batch["tokens"], batch["actions"], batch["rewards"]
  nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # a_t
  f32 = lambda x: x.astype(jnp.float32)
  q1, q2 = _at(f32(out["q1"]), nxt), _at(f32(out["q2"]), nxt)
  tq = jax.lax.stop_gradient(jnp.minimum(_at(f32(out["target_q1"]), nxt),
                                         _at(f32(out["target_q2"]), nxt)))
  v = f32(out["v"])
  # V(s_{t+1}) where t + 1 is still an action state; 0 after the last action (terminal).
  v_next = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  cont = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  y = jax.lax.stop_gradient(r + hyper.gamma * v_next * cont)
  loss_q = jnp.square(q1 - y) + jnp.square(q2 - y)
  u = tq - v
  loss_v = jnp.abs(hyper.tau - (u < 0).astype(jnp.float32)) * jnp.square(u)
  ce = lambda z: -_at(jax.nn.log_softmax(f32(z), -1), nxt)
  loss_cql = ce(out["q1"]) + ce(out["q2"])
  weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(hyper.awr_beta * (tq - v)),
                                             hyper.awr_max_weight))
  loss_awr = weight * ce(logits)
  total = loss_q + loss_v + hyper.cql_scale * loss_cql + hyper.awr_scale * loss_awr
  s = lambda x: jnp.sum(x * mask)
  return s(total), {"tokens": jnp.sum(mask), "loss_q": s(loss_q), "loss_v": s(loss_v),
                    "loss_cql": s(loss_cql), "loss_awr": s(loss_awr), "q": s(q1),
                    "v": s(v), "awr_weight": s(weight)}


def loss_sums(params, batch, *, model: ILQLModel, hyper: Hyper):
  logits, out = model.apply({"params": params}, batch["tokens"], all_heads=True)
  return losses(logits, out, batch, hyper)


def objective(hyper: Hyper, *, alpha: float, frozen_layers: int = 0) -> train.Objective:
  """The ILQL `fit` objective: its loss and the optimiser wrapper (`optimizer`)."""
  return train.Objective(functools.partial(loss_sums, hyper=hyper),
                         wrap_tx=functools.partial(optimizer, alpha=alpha,
                                                   frozen_layers=frozen_layers))


def _online(tree: dict) -> dict:
  """The tree without the target heads."""
  return {**tree, "heads": {k: v for k, v in tree["heads"].items() if k not in TARGETS}}


def _frozen(name: str, frozen_layers: int) -> bool:
  """Is trunk entry `name` frozen: the embeddings and blocks < frozen_layers (when > 0)."""
  return bool(frozen_layers) and (name in ("embedding", "pos_embedding") or (
      name.startswith("layer_") and int(name[len("layer_"):]) < frozen_layers))


def _trained(tree: dict, frozen_layers: int) -> dict:
  """What the optimiser steps: the tree without the target heads and the frozen trunk
  entries (a plain sub-dict, so the optimiser state holds nothing for them)."""
  online = _online(tree)
  return {**online, "trunk": {k: v for k, v in online["trunk"].items()
                              if not _frozen(k, frozen_layers)}}


def optimizer(inner: optax.GradientTransformation, *, alpha: float, frozen_layers: int = 0
              ) -> optax.GradientTransformation:
  """`inner` on the trained parameters (frozen ones get a zero update and hold no state);
  each target head moves to (1 - alpha) * itself + alpha * its Q head after the Q head's
  step."""

  def init(params):
    return inner.init(_trained(params, frozen_layers))

  def update(grads, state, params):
    upd, state = inner.update(_trained(grads, frozen_layers), state,
                              _trained(params, frozen_layers))
    trunk = {k: upd["trunk"][k] if k in upd["trunk"] else jax.tree.map(jnp.zeros_like, v)
             for k, v in params["trunk"].items()}
    heads = dict(upd["heads"])
    for target, source in TARGETS.items():
      heads[target] = jax.tree.map(lambda p, du, t: alpha * (p + du - t),
                                   params["heads"][source], upd["heads"][source],
                                   params["heads"][target])
    return {**upd, "trunk": trunk, "heads": heads}, state

  return optax.GradientTransformation(init, update)

