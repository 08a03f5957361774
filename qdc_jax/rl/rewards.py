"""Rewards for RL on reasoning tasks, chosen by name through `qdc_jax.registry` ("reward").

A reward function maps (items, completions) to `Rewards`: one sequence score per completion
(placed on its last token) and, for dense rewards, extra rewards at character offsets of the
completion (the ends of its steps), which `token_rewards_from_offsets` moves onto tokens.

- sparse: 1 if the final answer equals the reference, else 0 (thesis 3.3).
- dense: sparse + `step_weight / #reference steps` for every step of the completion whose
  arithmetic matches a step of the reference solution (the thesis's heuristic step matching).
- model: the probability of a correct answer that an outcome reward model gives the whole
  completion (`qdc_jax.rl.reward_models.RewardModelReward`).
Completions whose answer cannot be read score 0 and are counted in `unparseable`, never raise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from qdc_jax.data import answers
from qdc_jax.eval import metrics


@dataclasses.dataclass
class Rewards:
  scores: np.ndarray  # [B] sequence-level reward, on the completion's last token
  correct: np.ndarray  # [B] bool: final answer correct (for logging / best-of-N)
  unparseable: int = 0  # completions with no readable final answer
  # Per completion: (character offset where a rewarded step ends, reward); dense rewards only.
  step_rewards: Optional[list[list[tuple[int, float]]]] = None


def correctness(items, completions) -> tuple[np.ndarray, int]:
  if len(items) != len(completions):
    raise ValueError(f"{len(items)} items but {len(completions)} completions")
  correct, unparseable = [], 0
  for it, text in zip(items, completions):
    found = answers.extract_answer(text)
    if found is None:
      unparseable += 1
      correct.append(False)
    else:
      correct.append(answers.answers_equal(found, it.answer))
  return np.asarray(correct, bool), unparseable


def sparse(items: Sequence[Any], completions: Sequence[str], **_) -> Rewards:
  correct, bad = correctness(items, completions)
  return Rewards(correct.astype(np.float32), correct, bad)


def step_spans(text: str) -> list[tuple[int, str]]:
  """(end offset, line) of every non-empty line of a completion."""
  out, start = [], 0
  for line in text.split("\n"):
    end = start + len(line)
    if line.strip():
      out.append((end, line))
    start = end + 1
  return out


def dense(items: Sequence[Any], completions: Sequence[str], *, step_weight: float = 0.5,
          **_) -> Rewards:
  """Sparse reward + step matching against the reference solution's operations."""
  base = sparse(items, completions)
  steps: list[list[tuple[int, float]]] = []
  for it, text in zip(items, completions):
    ref_ops = set(metrics.operation_trace(it.solution or ""))
    row: list[tuple[int, float]] = []
    if ref_ops:
      per_step = step_weight / len(ref_ops)
      seen: set = set()
      for end, line in step_spans(text):
        ops = [op for op in metrics.operation_trace(line) if op in ref_ops and op not in seen]
        if ops:
          seen.update(ops)  # a reference step pays once, however often it is repeated
          row.append((end, per_step * len(ops)))
    steps.append(row)
  return dataclasses.replace(base, step_rewards=steps)


def token_index_of_offset(tokenizer, token_ids: Sequence[int], offset: int) -> int:
  """The first token whose decoded prefix covers `offset` characters (binary search)."""
  lo, hi = 1, len(token_ids)
  while lo < hi:
    mid = (lo + hi) // 2
    if len(tokenizer.decode(list(token_ids[:mid]))) >= offset:
      hi = mid
    else:
      lo = mid + 1
  return lo - 1


def token_rewards_from_offsets(rewards: Rewards, tokenizer, responses: Sequence[Sequence[int]],
                               prompt_lengths: Sequence[int], width: int) -> np.ndarray:
  """Dense step rewards as an [B, width] array aligned with PPO's targets (zeros if none)."""
  out = np.zeros((len(responses), width), np.float32)
  if rewards.step_rewards is None:
    return out
  for i, (resp, steps) in enumerate(zip(responses, rewards.step_rewards)):
    for offset, value in steps:
      j = token_index_of_offset(tokenizer, resp, offset)
      out[i, prompt_lengths[i] - 1 + j] += value
  return out
