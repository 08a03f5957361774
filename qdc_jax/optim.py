"""Optax builders: AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(*, peak_lr: float, warmup_steps: int, total_steps: int,
                           final_lr_ratio: float = 0.1) -> optax.Schedule:
  """0 -> peak_lr linearly over warmup_steps, then cosine to peak_lr * final_lr_ratio."""
  warmup_steps = max(0, int(warmup_steps))
  total_steps = max(int(total_steps), warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=peak_lr * final_lr_ratio)


def _decay_mask(params):
  # Weight decay on matrices only: norms, biases and scales stay undecayed (GPT-2/nanoGPT).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """`cfg` has: lr, warmup_steps, total_steps, final_lr_ratio, b1, b2, eps, weight_decay,
  grad_clip (<= 0 disables)."""
  schedule = learning_rate_schedule(peak_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                    total_steps=cfg.total_steps,
                                    final_lr_ratio=cfg.final_lr_ratio)
  parts = []
  if cfg.grad_clip and cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
