"""Scalar heads on the transformer: PPO's value branch and reward-model scores.

Value branch (thesis 3.3, trlX "Hydra" heads): a copy of the policy's top `L` blocks and final
norm, fed the policy trunk's residual stream where those blocks begin, with the gradient
stopped there, so the value loss trains only the branch and never the policy trunk. Its blocks
are named like the policy's (`layer_<i>`), so they are initialised by copying the policy's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qdc_jax.models import transformer


class ScalarHead(nn.Module):
  """[B, T, D] -> [B, T] (f32): one linear unit. Zero-initialised: a value head starts at 0."""

  @nn.compact
  def __call__(self, x_BxTxD):
    d = x_BxTxD.shape[-1]
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                   (d,), jnp.float32)
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                   jnp.float32)
    return jnp.einsum("btd,d->bt", x_BxTxD.astype(jnp.float32), w) + b


class ValueBranch(nn.Module):
  """Blocks `first_layer`..num_layers-1, final norm and a scalar head."""

  config: transformer.ModelConfig
  first_layer: int

  @nn.compact
  def __call__(self, hidden_BxTxD, positions_BxT, segment_ids_BxT):
    cfg = self.config
    x = jax.lax.stop_gradient(hidden_BxTxD)  # no value gradient into the policy trunk
    for i in range(self.first_layer, cfg.num_layers):
      x, _ = transformer.Block(cfg, cfg.attention_kind(i), name=f"layer_{i}")(
          x, positions_BxT, segment_ids_BxT, None)
    x = transformer.Norm(cfg, name="final_norm")(x)
    return ScalarHead(name="head")(x)


def value_branch_params_from_policy(policy_params: dict, head: dict, first_layer: int,
                                    num_layers: int) -> dict:
  """Value-branch params: copies of the policy's top blocks and final norm + `head`."""
  out = {f"layer_{i}": jax.tree.map(jnp.copy, policy_params[f"layer_{i}"])
         for i in range(first_layer, num_layers)}
  out["final_norm"] = jax.tree.map(jnp.copy, policy_params["final_norm"])
  out["head"] = head
  return out


class RewardModel(nn.Module):
  """An outcome reward model: transformer trunk + scalar head; score = logit of P(correct).

  `__call__(tokens, positions, segment_ids)` -> [B, T] logits at every position (the ORM
  is read at the last token of a completion, or at every step end for step-wise scores).
  """

  config: transformer.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    hidden, _ = transformer.Transformer(self.config, name="trunk")(
        tokens_BxT, positions_BxT, segment_ids_BxT, return_hidden=True)
    return ScalarHead(name="head")(hidden)


class Regressor(nn.Module):
  """Continuous inputs -> one scalar per row, on the shared transformer (the scaling chapter's
  manifold check): each of the T chunks of a [B, T, C] input is embedded by one linear map, the
  blocks and final norm run on them (causal, positions 0..T-1), and a linear head reads the
  last position, which attends to every chunk. Returns [B] (f32)."""

  config: transformer.ModelConfig

  @nn.compact
  def __call__(self, x_BxTxC):
    cfg = self.config
    c = x_BxTxC.shape[-1]
    w = self.param("in_proj", nn.with_logical_partitioning(
        nn.initializers.normal(c ** -0.5), (None, "embed")), (c, cfg.d_model), jnp.float32)
    h = jnp.einsum("btc,cd->btd", x_BxTxC.astype(jnp.float32), w)
    tokens = jnp.zeros(x_BxTxC.shape[:2], jnp.int32)  # unused: the blocks start from h
    hidden, _ = transformer.Transformer(cfg, name="trunk")(tokens, hidden_BxTxD=h,
                                                           return_hidden=True)
    return ScalarHead(name="head")(hidden[:, -1:])[:, 0]
