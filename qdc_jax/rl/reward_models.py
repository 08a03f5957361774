"""Outcome and step-wise reward models (thesis 3.4, GLoRe): labels, training loss, scoring.

A reward model (`heads.RewardModel`: the shared transformer trunk + a scalar head) reads a
question and a solution and gives, at the last token of every step, the logit of
P(the final answer will be correct | question, solution up to that step).

Labels, one per step of a student solution (its lines, `rcrl.split_steps`):
  ORM           every step gets the solution's own final correctness.
  balanced ORM  the same, on a subset of solutions with as many correct as incorrect ones per
                question (`balance_per_question`).
  SORM          step i (prefix P_i = S_1..S_i) is positive if any of K rollouts of the student
                from P_i reaches the correct answer and is *consistent* (the result R_i of
                step S_i, the number after its last '=', appears in the rollout, so the
                rollout builds on the prefix rather than starting over); the last step's label
                is the solution's own correctness. Post-processing (`sorm_labels`): a positive
                step makes every earlier step positive; `balance_per_step` then keeps as many
                positives as negatives at each prefix length (the others are left unlabelled,
                weight 0, not dropped: their text still conditions later steps).

Preference reward model (thesis 3.2, trlX): the same head read at the last token of a whole
completion, trained on (prompt, chosen, rejected) pairs with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected) (`BRADLEY_TERRY`). Pairs come from a JSONL (Anthropic
HH-style rows by flag, `read_pairs`) or, on the lab, from student samples (`solution_pairs`).

Training rows (`encode`): int32 tokens [N, T] and at each labelled step end a label and a
weight; `OBJECTIVE` (binary cross-entropy at the weighted positions) plugs into `fit`;
`encode_pairs` / `BRADLEY_TERRY` are the pairwise twins. `Scorer` reads the head at every
step end; `RewardModelReward` is PPO's `model` reward. Model directories go through
`model_io` with kind "reward_model"; their notes record `objective` and the `transform` a
consumer applies to the head's logit (`transform_scores`): "sigmoid" (P(correct), the ORMs) or
"standardise" (shift and scale measured on the training completions: Bradley-Terry logits have
no fixed scale).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qdc_jax import model_io
from qdc_jax import sharding as sharding_lib
from qdc_jax import storage
from qdc_jax import train
from qdc_jax.models import heads
from qdc_jax.rl import rcrl
from qdc_jax.rl import rewards

KIND = "reward_model"
LABEL_KINDS = ("orm", "balanced_orm", "sorm")


# ---------------------------------------------------------------------------------------------
# One student solution with everything its labels come from (a JSONL row).


@dataclasses.dataclass
class Solution:
  question: int  # index into the items it was sampled for
  sample: int  # which sample of that question
  prompt: str
  answer: str
  steps: list[str]
  correct: bool  # the final answer is right
  # Per non-final step i: for each of the K rollouts from P_{i+1}, (reached the correct
  # answer, consistent with the prefix). Empty when no rollouts were drawn.
  rollout_checks: list[list[tuple[bool, bool]]] = dataclasses.field(default_factory=list)
  # Per non-final step: the first correct and consistent rollout from P_{i+1} (None if none):
  # local refinement's targets.
  verifiers: list[Optional[str]] = dataclasses.field(default_factory=list)
  oracle_first_wrong: Optional[int] = None  # lab only: `arith.first_wrong_step`

  @property
  def text(self) -> str:
    return "\n".join(self.steps)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "Solution":
    d = dict(d)
    d["rollout_checks"] = [[tuple(c) for c in g] for g in d.get("rollout_checks", [])]
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


_NUMBER = re.compile(r"-?[0-9]+")


def step_result(step: str) -> Optional[str]:
  """R_i of a step line `... = R` (None for lines without a result, e.g. the answer line)."""
  if "=" not in step:
    return None
  m = _NUMBER.search(step.rsplit("=", 1)[1])
  return m.group(0) if m else None


def consistent(step: str, suffix: str) -> bool:
  """Whether a rollout `suffix` from the prefix ending in `step` uses that step's result
  (a whole number in the suffix; steps without a result are consistent with anything)."""
  r = step_result(step)
  if r is None:
    return True
  # Signed as written: a result of -2 is not the 2 of "5-2" (a digit before the minus).
  return re.search(rf"(?<![0-9]){re.escape(r)}(?![0-9])", suffix) is not None


def check_rollouts(steps: Sequence[str], rollouts: Sequence[Sequence[str]], answer: str,
                   is_correct: Callable[[str, str], bool]
                   ) -> tuple[list[list[tuple[bool, bool]]], list[Optional[str]]]:
  """Per non-final step i, per rollout from P_{i+1}: (correct, consistent); and per step the
  first rollout that is both (None if none)."""
  if len(rollouts) != max(len(steps) - 1, 0):
    raise ValueError(f"{len(steps)} steps need {max(len(steps) - 1, 0)} rollout groups, got "
                     f"{len(rollouts)}")
  checks, verifiers = [], []
  for i, group in enumerate(rollouts):
    head = rcrl.prefix_text(steps, i + 1)
    row = [(bool(is_correct(head + r, answer)), consistent(steps[i], r)) for r in group]
    checks.append(row)
    verifiers.append(next((r for r, (c, ok) in zip(group, row) if c and ok), None))
  return checks, verifiers


# ---------------------------------------------------------------------------------------------
# Labels.


def orm_labels(s: Solution) -> list[bool]:
  return [s.correct] * len(s.steps)


def sorm_raw_labels(s: Solution, consistency: bool = True) -> list[bool]:
  """Before post-processing: a step is positive if a (consistent) rollout verified it."""
  out = [any(c and (ok or not consistency) for c, ok in group) for group in s.rollout_checks]
  return out + [s.correct] if s.steps else []


def sorm_labels(s: Solution, consistency: bool = True) -> list[bool]:
  """Raw labels, then a positive step makes every earlier step positive."""
  raw = sorm_raw_labels(s, consistency)
  return [any(raw[i:]) for i in range(len(raw))]


def oracle_labels(s: Solution) -> list[bool]:
  """Lab only: P_i is valid (every step up to i right) and the solution, where it is whole,
  reaches the answer: the exact counterpart of a step label."""
  if s.oracle_first_wrong is None and not s.correct:
    raise ValueError("oracle labels need oracle_first_wrong (lab items only)")
  first = len(s.steps) if s.oracle_first_wrong is None else s.oracle_first_wrong
  labels = [i < first for i in range(len(s.steps))]
  if labels:
    labels[-1] = s.correct
  return labels


def balance_per_question(data: Sequence[Solution], seed: int = 0) -> list[int]:
  """Balanced ORM: per question, min(#correct, #incorrect) solutions of each class (drawn
  at random); questions with one class only contribute nothing. Returns indices."""
  rng = np.random.default_rng(seed)
  by_q: dict[int, tuple[list[int], list[int]]] = {}
  for i, s in enumerate(data):
    by_q.setdefault(s.question, ([], []))[0 if s.correct else 1].append(i)
  keep = []
  for q in sorted(by_q):
    pos, neg = by_q[q]
    n = min(len(pos), len(neg))
    keep += list(rng.choice(pos, n, replace=False)) + list(rng.choice(neg, n, replace=False))
  return sorted(int(i) for i in keep)


def balance_per_step(labels: Sequence[Sequence[bool]], seed: int = 0) -> list[list[bool]]:
  """Which step labels train: at each prefix length, as many positives as negatives (drawn
  at random). Returns a per-solution, per-step mask."""
  rng = np.random.default_rng(seed)
  mask = [[False] * len(l) for l in labels]
  depth = max((len(l) for l in labels), default=0)
  for t in range(depth):
    pos = [i for i, l in enumerate(labels) if len(l) > t and l[t]]
    neg = [i for i, l in enumerate(labels) if len(l) > t and not l[t]]
    n = min(len(pos), len(neg))
    for i in list(rng.choice(pos, n, replace=False)) + list(rng.choice(neg, n, replace=False)):
      mask[int(i)][t] = True
  return mask


def training_labels(data: Sequence[Solution], kind: str, seed: int = 0,
                    consistency: bool = True
                    ) -> tuple[list[int], list[list[bool]], list[list[bool]]]:
  """(solution indices, their labels, which labels train) for one reward model kind
  (`consistency`: the SORM's consistency check, on by default; off for the ablation)."""
  if kind == "orm":
    idx = list(range(len(data)))
    labels = [orm_labels(data[i]) for i in idx]
    return idx, labels, [[True] * len(l) for l in labels]
  if kind == "balanced_orm":
    idx = balance_per_question(data, seed)
    labels = [orm_labels(data[i]) for i in idx]
    return idx, labels, [[True] * len(l) for l in labels]
  if kind == "sorm":
    idx = list(range(len(data)))
    labels = [sorm_labels(data[i], consistency) for i in idx]
    return idx, labels, balance_per_step(labels, seed)
  raise ValueError(f"Unknown reward model kind {kind!r}; one of {LABEL_KINDS}")


# ---------------------------------------------------------------------------------------------
# Token rows.


def step_end_tokens(tokenizer, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
  """(token ids of BOS + prompt + the steps joined by newlines, the index of each step's last
  token). The prompt and the solution are encoded apart, as the sampler saw them."""
  head = tokenizer.encode(prompt, add_bos=True)
  body = tokenizer.encode("\n".join(steps))
  ends, offset = [], 0
  for s in steps:
    offset += len(s)
    ends.append(len(head) + rewards.token_index_of_offset(tokenizer, body, offset))
    offset += 1  # the newline
  return head + body, ends


def encode(tokenizer, rows: Sequence[tuple[str, Sequence[str], Sequence[bool],
                                           Sequence[bool]]], seq_len: int
           ) -> tuple[dict[str, np.ndarray], int]:
  """(prompt, steps, labels, mask) rows -> {"tokens", "labels", "weights"} [N, seq_len] and
  the number of step labels cut off by seq_len (they get weight 0)."""
  n = len(rows)
  tokens = np.full((n, seq_len), tokenizer.pad_id, np.int32)
  labels = np.zeros((n, seq_len), np.float32)
  weights = np.zeros((n, seq_len), np.float32)
  cut = 0
  for r, (prompt, steps, lab, mask) in enumerate(rows):
    ids, ends = step_end_tokens(tokenizer, prompt, steps)
    ids = ids[:seq_len]
    tokens[r, :len(ids)] = ids
    for e, y, m in zip(ends, lab, mask):
      if not m:
        continue
      if e >= seq_len:
        cut += 1
        continue
      labels[r, e], weights[r, e] = float(y), 1.0
  return {"tokens": tokens, "labels": labels, "weights": weights}, cut


def bce_loss_sums(params, batch, *, model):
  """Sum of binary cross-entropies at the weighted positions; "correct" counts the
  thresholded predictions that match (reported as accuracy)."""
  logits = model.apply({"params": params}, batch["tokens"])
  y, w = batch["labels"], batch["weights"]
  # log(1 + e^-|z|) + max(z, 0) - z y: stable for any logit.
  losses = jnp.logaddexp(0.0, logits) - logits * y
  hit = ((logits > 0).astype(jnp.float32) == y).astype(jnp.float32)
  return jnp.sum(losses * w), {"tokens": jnp.sum(w), "correct": jnp.sum(hit * w)}


OBJECTIVE = train.Objective(bce_loss_sums)


# ---------------------------------------------------------------------------------------------
# Preference pairs (Bradley-Terry).


@dataclasses.dataclass(frozen=True)
class Pair:
  prompt: str
  chosen: str  # the completion preferred ...
  rejected: str  # ... over this one
  why: str = "data"  # "data" (read from a file), "correct" or "first_error" (lab pairs)
  question: int = -1  # lab pairs: index of the question both answer

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "Pair":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


TIE_BREAKS = ("none", "first_error")


def solution_pairs(data: Sequence[Solution], *, max_per_question: int, seed: int = 0,
                   tie_break: str = "first_error") -> list[Pair]:
  """Preference pairs among the samples of each question.

  A correct solution is preferred over an incorrect one ("correct"). The tie-break decides
  pairs of equal correctness: "none" forms none; "first_error" (needs the lab oracle's
  `oracle_first_wrong`) prefers, of two incorrect solutions, the one whose first wrong step
  comes later (it is right for longer); equal first errors, and two correct solutions, form
  no pair. Distinct texts only (a pair of identical texts carries no preference). Up to
  `max_per_question` pairs per question, a seeded sample of the candidates (0 = all), in
  a fixed order.
  """
  if tie_break not in TIE_BREAKS:
    raise ValueError(f"tie_break={tie_break!r}: use one of {TIE_BREAKS}")
  rng = np.random.default_rng(seed)
  by_q: dict[int, list[Solution]] = {}
  for s in data:
    by_q.setdefault(s.question, []).append(s)
  out = []
  for q in sorted(by_q):
    sols = list({s.text: s for s in by_q[q] if s.steps}.values())
    cand = []
    for a in sols:
      for b in sols:
        if a.correct and not b.correct:
          cand.append((a, b, "correct"))
        elif (tie_break == "first_error" and not a.correct and not b.correct
              and a.oracle_first_wrong is not None and b.oracle_first_wrong is not None
              and a.oracle_first_wrong > b.oracle_first_wrong):
          cand.append((a, b, "first_error"))
    if max_per_question and len(cand) > max_per_question:
      cand = [cand[i] for i in sorted(rng.choice(len(cand), max_per_question, replace=False))]
    out += [Pair(a.prompt, a.text, b.text, why, q) for a, b, why in cand]
  return out


_ASSISTANT = "\n\nAssistant:"


def pair_from_row(row: dict, where: str) -> Pair:
  """A (prompt, chosen, rejected) row, or an Anthropic HH row {"chosen", "rejected"} whose two
  dialogues share everything up to the last "\n\nAssistant:" (the prompt)."""
  missing = [k for k in ("chosen", "rejected") if not isinstance(row.get(k), str)]
  if missing:
    raise ValueError(f"{where}: no text field {missing} (a preference row needs 'chosen' and "
                     f"'rejected', and 'prompt' unless both hold a whole HH dialogue)")
  if isinstance(row.get("prompt"), str):
    return Pair(row["prompt"], row["chosen"], row["rejected"])
  chosen, rejected = row["chosen"], row["rejected"]
  common_len = 0
  for x, y in zip(chosen, rejected):
    if x != y:
      break
    common_len += 1
  cut = chosen.rfind(_ASSISTANT, 0, common_len)
  if cut < 0:
    raise ValueError(f"{where}: no 'prompt' field and the chosen and rejected texts share no "
                     f"'\\n\\nAssistant:' turn to split at; give the prompt as its own field")
  cut += len(_ASSISTANT)
  return Pair(chosen[:cut], chosen[cut:], rejected[cut:])


def read_pairs(path: str, limit: int = 0) -> list[Pair]:
  """Preference pairs from a JSONL file (`pair_from_row` per line); `limit` > 0 reads only
  the first rows. A malformed row is an error naming its line; rows whose chosen and
  rejected completions are the same are left out (with a warning)."""
  rows = storage.read_rows(path)
  if rows is None:
    raise FileNotFoundError(f"No preference file at {path}")
  rows = rows[:limit] if limit else rows  # the rows past `limit` are never parsed
  pairs = [pair_from_row(r, f"{path} line {i + 1}") for i, r in enumerate(rows)]
  same = sum(p.chosen == p.rejected for p in pairs)
  if same:  # no preference to learn or to measure
    logging.warning("%s: %d of %d rows have the same chosen and rejected completion; left "
                    "out", path, same, len(pairs))
  return [p for p in pairs if p.chosen != p.rejected]


def completion_end(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
  """(tokens, index of the token the head is read at): the end of the completion's last
  step, where `Scorer.final_scores` reads it (the prompt alone for an empty completion)."""
  steps = rcrl.split_steps(completion)
  ids, ends = step_end_tokens(tokenizer, prompt, steps)
  return ids, ends[-1] if ends else len(ids) - 1


def encode_pairs(tokenizer, pairs: Sequence[Pair], seq_len: int
                 ) -> tuple[dict[str, np.ndarray], int]:
  """Pairs -> {"tokens" [N, 2, T] (chosen, rejected), "ends" [N, 2], "weights" [N]} and the
  number of pairs dropped (weight 0) because a completion's end is past seq_len."""
  n = len(pairs)
  tokens = np.full((n, 2, seq_len), tokenizer.pad_id, np.int32)
  ends = np.zeros((n, 2), np.int32)
  weights = np.ones((n,), np.float32)
  cut = 0
  for r, pr in enumerate(pairs):
    for j, text in enumerate((pr.chosen, pr.rejected)):
      ids, end = completion_end(tokenizer, pr.prompt, text)
      ids = ids[:seq_len]
      tokens[r, j, :len(ids)] = ids
      if end >= seq_len:
        weights[r] = 0.0
      else:
        ends[r, j] = end
    cut += int(weights[r] == 0)
  return {"tokens": tokens, "ends": ends, "weights": weights}, cut


def bradley_terry_loss_sums(params, batch, *, model):
  """Sum over pairs of -log sigmoid(r_chosen - r_rejected), r the head at each completion's
  end; "correct" counts the pairs ranked right (reported as pairwise accuracy)."""
  n, _, t = batch["tokens"].shape
  logits = model.apply({"params": params}, batch["tokens"].reshape(n * 2, t)).reshape(n, 2, t)
  r = jnp.take_along_axis(logits, batch["ends"][..., None], axis=-1)[..., 0]
  margin = r[:, 0] - r[:, 1]
  w = batch["weights"]
  return (jnp.sum(jnp.logaddexp(0.0, -margin) * w),
          {"tokens": jnp.sum(w), "correct": jnp.sum((margin > 0).astype(jnp.float32) * w)})


BRADLEY_TERRY = train.Objective(bradley_terry_loss_sums)
OBJECTIVES = {"bce": OBJECTIVE, "bradley_terry": BRADLEY_TERRY}


# ---------------------------------------------------------------------------------------------
# What a consumer makes of the head's logit.

TRANSFORMS = ("sigmoid", "standardise")


def standardise_transform(logits: np.ndarray) -> dict:
  """The "standardise" transform of a Bradley-Terry model: its logits on `logits` (the
  training completions) map to mean 0, standard deviation 1."""
  logits = np.asarray(logits, np.float64)
  return {"kind": "standardise", "shift": float(np.mean(logits)),
          "scale": float(max(np.std(logits), 1e-6))}


def transform_scores(logits: np.ndarray, transform: Optional[dict]) -> np.ndarray:
  """Head logits -> scores: P = sigmoid(z) (no transform recorded: directories written
  before transforms existed are ORMs), or (z - shift) / scale."""
  transform = transform or {"kind": "sigmoid"}
  z = np.asarray(logits, np.float64)
  if transform["kind"] == "sigmoid":
    return 1.0 / (1.0 + np.exp(-z))
  if transform["kind"] == "standardise":
    return (z - transform["shift"]) / transform["scale"]
  raise ValueError(f"Unknown reward-model transform {transform!r}: one of {TRANSFORMS}")


def init_params(policy_params) -> dict:
  """Reward model params: the policy's trunk (copied) and a zero `heads.ScalarHead`, so every
  score starts at P = 0.5."""
  d = policy_params["embedding"].shape[-1]
  return {"trunk": jax.tree.map(jnp.copy, policy_params),
          "head": {"w": jnp.zeros((d,), jnp.float32), "b": jnp.zeros((), jnp.float32)}}


# ---------------------------------------------------------------------------------------------
# Scoring and the model directory.


class Scorer:
  """The reward head at step ends with a trained reward model, on a mesh (global arrays in,
  the replicated logits back through `to_host`; every process makes the same calls).

  `transform` (the directory's, `transform_scores`) maps a whole completion's logit to the
  score `final_scores` returns."""

  def __init__(self, model, params, tokenizer, *, mesh, rules, param_shardings,
               batch_size: int = 64, transform: Optional[dict] = None):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.mesh, self.rules = mesh, rules
    self.transform = transform or {"kind": "sigmoid"}
    self.truncated = 0  # step ends past the model's max_len, scored NaN
    rows = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    self.batch_size = -(-batch_size // rows) * rows
    self._apply = sharding_lib.jit_sharded(
        lambda p, t: model.apply({"params": p}, t), mesh, rules,
        in_shardings=(param_shardings, sharding_lib.batch_sharding(mesh, rules, 2)),
        out_shardings=sharding_lib.replicated(mesh))

  def step_logits(self, prompts: Sequence[str], step_lists: Sequence[Sequence[str]]
                  ) -> list[np.ndarray]:
    """Per solution, the head's logit after each of its steps (an empty array for no steps;
    NaN for a step that ends past the model's max_len, counted in `truncated`)."""
    enc = [step_end_tokens(self.tokenizer, p, s) for p, s in zip(prompts, step_lists)]
    out: list[np.ndarray] = []
    max_len = self.model.config.max_len
    for start in range(0, len(enc), self.batch_size):
      chunk = enc[start:start + self.batch_size]
      width = min(max(-(-max(len(ids) for ids, _ in chunk) // 64) * 64, 64), max_len)
      toks = np.full((self.batch_size, width), self.tokenizer.pad_id, np.int32)
      for r, (ids, _) in enumerate(chunk):
        toks[r, :min(len(ids), width)] = ids[:width]
      logits = sharding_lib.to_host(self._apply(self.params,
                                                sharding_lib.put_global(toks, self.mesh,
                                                                        self.rules)))
      for r, (_, ends) in enumerate(chunk):
        ends = np.asarray(ends, np.int64)
        inside = ends < width
        z = np.full(len(ends), np.nan)
        z[inside] = logits[r, ends[inside]].astype(np.float64)
        self.truncated += int((~inside).sum())
        out.append(z)
    return out

  def step_scores(self, prompts: Sequence[str], step_lists: Sequence[Sequence[str]]
                  ) -> list[np.ndarray]:
    """Per solution, P(correct) after each of its steps: sigmoid of `step_logits` (what an
    ORM / SORM head means)."""
    return [transform_scores(z, {"kind": "sigmoid"})
            for z in self.step_logits(prompts, step_lists)]

  def final_logits(self, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """The head's logit at the end of each whole completion (NaN for an empty text)."""
    z = self.step_logits(prompts, [rcrl.split_steps(t) for t in texts])
    return np.asarray([x[-1] if len(x) else np.nan for x in z], np.float64)

  def final_scores(self, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """The score of each whole completion under the directory's transform: P(correct) for an
    ORM (0.5 for an empty text), the standardised logit for a preference model (0 for an
    empty text: its training mean)."""
    z = self.final_logits(prompts, texts)
    neutral = 0.0 if self.transform["kind"] == "sigmoid" else self.transform["shift"]
    return transform_scores(np.where(np.isnan(z), neutral, z), self.transform)


def save(directory: str, cfg, params, *, tokenizer_meta: dict, notes: Optional[dict] = None
         ) -> None:
  """A reward-model directory (model_io, kind "reward_model"); call on every process."""
  model_io.save_model(directory, cfg, params, tokenizer=tokenizer_meta, notes=notes, kind=KIND)


def load(directory: str, *, mesh=None, rules=None, batch_size: int = 64) -> Scorer:
  """The `Scorer` of a reward-model directory (or 'asset:NAME'), with its recorded transform."""
  if directory.startswith("asset:"):
    directory = model_io.asset_path(directory[len("asset:"):])
  mesh = mesh or sharding_lib.make_mesh((-1, 1, 1))
  rules = rules or sharding_lib.DEFAULT_RULES
  cfg, params, tok, meta, shardings = model_io.load_model(directory, mesh=mesh, rules=rules,
                                                           kind=KIND)
  if tok is None:
    raise ValueError(f"{directory}/model.json names no tokenizer")
  transform = meta.get("notes", {}).get("transform")
  transform_scores(np.zeros(1), transform)  # an unknown transform fails here, not in PPO
  return Scorer(heads.RewardModel(cfg), params, tok, mesh=mesh, rules=rules,
                param_shardings=shardings, batch_size=batch_size, transform=transform)


class RewardModelReward:
  """PPO's `model` reward: each completion's `Scorer.final_scores` (P(correct) for an ORM, the
  standardised Bradley-Terry score for a preference model). A class (built from a directory
  by `from_directory`), where the other rewards are functions."""

  def __init__(self, scorer: Scorer):
    self.scorer = scorer

  @classmethod
  def from_directory(cls, directory: str, **kwargs) -> "RewardModelReward":
    return cls(load(directory, **kwargs))

  def __call__(self, items: Sequence[Any], completions: Sequence[str], **_) -> rewards.Rewards:
    correct, bad = rewards.correctness(items, completions)
    scores = self.scorer.final_scores([it.prompt for it in items], completions)
    return rewards.Rewards(scores.astype(np.float32), correct, bad)


def read_solutions(path: str) -> Optional[list[Solution]]:
  rows = storage.read_rows(path)
  return None if rows is None else [Solution.from_json(r) for r in rows]
