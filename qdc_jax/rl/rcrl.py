"""Return-conditioned RL (thesis 3.3, offline, decision-transformer style): the host side.

Data: a policy's sampled solution S = (S_1, ..., S_L) is split into steps (lines). Step S_i gets
the return label "[GOOD]" when the mean final-answer correctness of K rollouts of the policy from
the prefix P_i = (S_1, ..., S_i) is >= T (0.5), else "[BAD]". The last step's prefix is the
whole solution, which the policy already ended: its return is the solution's own correctness.
Training text puts each step's label right before it:

  Question: ...\nSolution:\n[BAD]94*5=470\n[GOOD]470-3=467\n[GOOD]The answer is 467.

Sampling conditions on "[GOOD]" one step at a time: every row's text is extended by "[GOOD]"
plus one sampled line, rows that ended (EOS, or a line without newline) drop out. The thesis's
loop, one sampler call per step, is `conditioned_generate_stepwise`; `conditioned_generate`
samples the same in one KV-cached call (`StepRule`, a token hook on the one sampling loop,
forces the label's tokens after every newline), since re-encoding every row once per step
costs ~20x a plain sample. Labels are stripped (`strip_labels`) before answers are scored.

Everything here is host-side text work, except the two samplers.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qdc_jax import sampling
from qdc_jax import storage
from qdc_jax import tokenizers

GOOD = "[GOOD]"
BAD = "[BAD]"
LABELS = (GOOD, BAD)
BALANCE_MODES = ("solutions", "steps", "none")


# ---------------------------------------------------------------------------------------------
# Steps, labels and training text.


def split_steps(solution: str) -> list[str]:
  """A solution's steps: its non-empty lines (trailing whitespace of a line dropped)."""
  return [line.rstrip() for line in solution.split("\n") if line.strip()]


def prefix_text(steps: Sequence[str], i: int) -> str:
  """The text of P_i = S_1..S_i as the policy continues it (each step ends with a newline)."""
  return "".join(s + "\n" for s in steps[:i])


def label_of(correct: Sequence[bool], threshold: float = 0.5) -> str:
  """GOOD if the mean return of the rollouts is >= threshold, else BAD."""
  if not len(correct):
    raise ValueError("label_of needs at least one rollout")
  return GOOD if float(np.mean(np.asarray(correct, np.float64))) >= threshold else BAD


def format_labelled(steps: Sequence[str], labels: Sequence[str]) -> str:
  """Steps joined by newlines, each preceded by its label."""
  if len(steps) != len(labels):
    raise ValueError(f"{len(steps)} steps but {len(labels)} labels")
  return "\n".join(l + s for s, l in zip(steps, labels))


def strip_labels(text: str, labels: Sequence[str] = LABELS) -> str:
  """The solution text without label tokens (what answers and diversity are scored on)."""
  for label in labels:
    text = text.replace(label, "")
  return text


@dataclasses.dataclass
class Labelled:
  """One sampled solution with its per-step rollout returns and labels (a JSONL row)."""
  question: int  # index into the task's train items
  sample: int  # which of the S samples of that question
  prompt: str
  answer: str
  solution: str  # the policy's sampled text
  correct: bool  # its final answer is right
  steps: list[str]
  step_correct: list[list[bool]]  # per step: the returns its label came from
  labels: list[str]
  rollouts: Optional[list[list[str]]] = None  # per non-final step: the K continuations

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    if d["rollouts"] is None:
      del d["rollouts"]
    return d

  @classmethod
  def from_json(cls, d: dict) -> "Labelled":
    return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


def rollout_prefixes(steps: Sequence[str]) -> list[str]:
  """The prefixes of a solution that need rollouts: P_1 .. P_{L-1} (P_L is the solution)."""
  return [prefix_text(steps, i) for i in range(1, len(steps))]


def step_rollouts(params, prompts: Sequence[str], step_lists: Sequence[Sequence[str]], *,
                  sp: sampling.SamplingParams, rng, **sampler_kw) -> list[list[list[str]]]:
  """Per solution (prompt + its steps), the `sp.num_samples` continuations of each non-final
  prefix P_1..P_{L-1}: every prefix of the set in one sampler call."""
  prefixes, owner = [], []
  for j, (prompt, steps) in enumerate(zip(prompts, step_lists)):
    for p in rollout_prefixes(steps):
      prefixes.append(prompt + p)
      owner.append(j)
  rolls = sampling.generate_text(params, prefixes, sp=sp, rng=rng,
                                 **sampler_kw) if prefixes else []
  groups: list[list[list[str]]] = [[] for _ in step_lists]
  for j, g in zip(owner, rolls):
    groups[j].append(g)
  return groups


def label_solution(*, question: int, sample: int, prompt: str, answer: str, solution: str,
                   rollouts: Sequence[Sequence[str]], is_correct, threshold: float = 0.5,
                   keep_rollouts: bool = True) -> Labelled:
  """Labels every step of `solution` from the continuations sampled after P_1..P_{L-1}.

  Args:
    rollouts: per non-final step i (1-based, i < L), the K continuations of prefix P_i.
    is_correct: fn(full solution text, answer) -> bool.
  """
  steps = split_steps(solution)
  if len(rollouts) != max(len(steps) - 1, 0):
    raise ValueError(f"{len(steps)} steps need {max(len(steps) - 1, 0)} rollout groups, got "
                     f"{len(rollouts)}")
  correct = bool(is_correct(solution, answer))
  step_correct = [[bool(is_correct(prefix_text(steps, i + 1) + r, answer)) for r in group]
                  for i, group in enumerate(rollouts)]
  if steps:
    step_correct.append([correct])
  return Labelled(question=question, sample=sample, prompt=prompt, answer=answer,
                  solution=solution, correct=correct, steps=steps, step_correct=step_correct,
                  labels=[label_of(c, threshold) for c in step_correct],
                  rollouts=[list(g) for g in rollouts] if keep_rollouts else None)


# ---------------------------------------------------------------------------------------------
# Balancing.


def balance(data: Sequence[Labelled], mode: str, seed: int = 0) -> tuple[list[tuple[int, int]],
                                                                          dict]:
  """Which solutions train, and from which step their labels are trained on.

  Modes:
    'solutions'  the thesis: as many correct as incorrect solutions (random subset of the
                 larger class), whole solutions trained.
    'steps'      as many trained GOOD as BAD step labels (`_balance_steps`): steps move
                 from the trained completion into the prompt (they stay as context, with
                 their labels, but get no loss), and whole solutions are dropped when that
                 cannot help. It always ends balanced, in degenerate cases (a single
                 solution) with nothing left.
    'none'       every solution with at least one step.

  Returns:
    ([(index into data, cut)], stats): the record of data[i] trains on steps[cut:].
  """
  if mode not in BALANCE_MODES:
    raise ValueError(f"Unknown balance mode {mode!r}; choose one of {', '.join(BALANCE_MODES)}")
  rng = np.random.default_rng(seed)
  usable = [i for i, d in enumerate(data) if d.steps]
  if mode == "none":
    chosen = [(i, 0) for i in usable]
  elif mode == "solutions":
    good = [i for i in usable if data[i].correct]
    bad = [i for i in usable if not data[i].correct]
    n = min(len(good), len(bad))
    if n == 0:
      raise ValueError(f"balance='solutions' needs correct and incorrect solutions; got "
                       f"{len(good)} correct and {len(bad)} incorrect: sample more "
                       f"(rcrl.samples_per_question, task.train_size) or use balance='none'")
    keep = set(rng.choice(good, n, replace=False).tolist()) | set(
        rng.choice(bad, n, replace=False).tolist())
    chosen = [(i, 0) for i in usable if i in keep]
  else:
    cut = _balance_steps(data, usable, rng)
    chosen = sorted(cut.items())
  stats = label_stats(data, chosen)
  stats["balance"] = mode
  return chosen, stats


def _balance_steps(data: Sequence[Labelled], usable: Sequence[int], rng) -> dict[int, int]:
  """{index: cut} with as many GOOD as BAD labels in steps[cut:] over the kept solutions.

  1. While the surplus label starts some solution's trained part, move that first step into
     the prompt (a random such solution; a solution with nothing left is dropped).
  2. Stuck (every trained part starts with the minority label): drop whole solutions with a
     surplus of the majority label, the largest surplus that does not overshoot first; if every
     one overshoots, drop the smallest, which flips the surplus, and go back to 1 (every
     trained part then starts with the new majority label).
  Each move removes trained steps, so it ends, and it ends balanced: while the counts differ
  some kept solution has a surplus of the majority label.
  """
  cut = {i: 0 for i in usable}
  labels = [l for i in usable for l in data[i].labels]
  diff = labels.count(GOOD) - labels.count(BAD)
  # Candidates by the label their trained part starts with; entries go stale when a solution
  # moves on or is dropped, and are checked when picked.
  heads: dict[str, list[int]] = {GOOD: [], BAD: []}
  for i in usable:
    heads[data[i].labels[0]].append(i)
  while diff:
    major = GOOD if diff > 0 else BAD
    group = heads[major]
    while group:
      j = int(rng.integers(len(group)))
      group[j], group[-1] = group[-1], group[j]
      i = group.pop()
      if i in cut and data[i].labels[cut[i]] == major:
        cut[i] += 1
        diff += -1 if major == GOOD else 1
        if cut[i] == len(data[i].steps):
          del cut[i]
        else:
          heads[data[i].labels[cut[i]]].append(i)
        break
    else:  # stuck: drop whole solutions
      sign = 1 if major == GOOD else -1
      surplus = sorted((sign * (data[i].labels[c:].count(GOOD) - data[i].labels[c:].count(BAD)),
                        i) for i, c in cut.items())
      surplus = [x for x in surplus if x[0] > 0]
      while diff and surplus:
        k = bisect.bisect_right(surplus, (abs(diff), len(data))) - 1
        s, i = surplus.pop(k if k >= 0 else 0)
        del cut[i]
        diff -= sign * s
        if sign * diff < 0:
          break  # overshot: the other label is the surplus now, go back to cutting
      for i, c in cut.items():
        heads[data[i].labels[c]].append(i)
  return cut


def label_stats(data: Sequence[Labelled], chosen: Sequence[tuple[int, int]]) -> dict:
  """Counts before (all labelled solutions) and after selection (trained labels only)."""
  before_labels = [l for d in data for l in d.labels]
  after_labels = [l for i, c in chosen for l in data[i].labels[c:]]
  ratio = lambda ls: ls.count(GOOD) / len(ls) if ls else float("nan")
  return {
      "solutions": len(data), "correct_solutions": sum(d.correct for d in data),
      "good_steps": before_labels.count(GOOD), "bad_steps": before_labels.count(BAD),
      "good_ratio": ratio(before_labels),
      "trained_solutions": len(chosen),
      "trained_correct_solutions": sum(data[i].correct for i, _ in chosen),
      "trained_good_steps": after_labels.count(GOOD),
      "trained_bad_steps": after_labels.count(BAD),
      "trained_good_ratio": ratio(after_labels),
      "context_only_steps": sum(c for _, c in chosen),
  }


def make_record(d: Labelled, cut: int = 0) -> dict:
  """{'prompt', 'completion'}: steps before `cut` (labelled) go into the prompt, untrained."""
  head = "".join(l + s + "\n" for s, l in zip(d.steps[:cut], d.labels[:cut]))
  return {"prompt": d.prompt + head,
          "completion": format_labelled(d.steps[cut:], d.labels[cut:])}


# ---------------------------------------------------------------------------------------------
# Tokenizer: label tokens.


_UNUSED_PIECE = re.compile(r"<unused[0-9]+>")
EXTENDED_TOKENIZER_FILE = "tokenizer_with_labels.model"


def _is_one_piece(tok, label: str) -> bool:
  """Whether a SentencePiece model writes `label` as one token, also inside text."""
  i = tok.piece_to_id(label)
  return i != tok.unk_id and i in tok.encode("a" + label + "a")


def add_pieces(proto: bytes, pieces: Sequence[str], model_vocab_size: int) -> bytes:
  """A SentencePiece model proto in which each of `pieces` is a user-defined piece (always one
  token): an unused placeholder piece (Gemma's `<unused0>`..) is renamed if there is one, so
  the vocabulary and every existing id stay as they are; else the piece is appended, and its id
  must fit in the model's embedding table."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(proto)
  kind = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  free = [p for p in m.pieces if _UNUSED_PIECE.fullmatch(p.piece)]
  for label in pieces:
    if free:
      slot = free.pop(0)
      slot.piece, slot.type, slot.score = label, kind, 0.0
    else:
      if len(m.pieces) >= model_vocab_size:
        raise ValueError(f"The tokenizer has no unused piece for {label!r} and the model's "
                         f"{model_vocab_size} embedding rows are all taken: use a base model "
                         f"with spare rows or a tokenizer with <unusedN> pieces")
      m.pieces.add(piece=label, score=0.0, type=kind)
  return m.SerializeToString()


def extend_tokenizer(tok_meta: dict, labels: Sequence[str], model_vocab_size: int,
                     directory: Optional[str] = None) -> tuple[dict, Any]:
  """(tokenizer metadata, tokenizer) that can write the label tokens.

  A char tokenizer gets the labels' missing characters appended to its alphabet (existing ids
  unchanged, so the base model's embeddings keep their meaning); the new ids must fit in the
  model's embedding table. A SentencePiece tokenizer gets each label as an added special
  (user-defined) piece (`add_pieces`); the extended model file is written to `directory`
  (the workdir; process 0 writes) and the metadata points at it, so the exported model
  directory carries it. Labels that already are one piece are left alone.
  """
  kind = tok_meta.get("kind")
  if kind == "char":
    alphabet = tok_meta["alphabet"]
    missing = "".join(dict.fromkeys(c for label in labels for c in label if c not in alphabet))
    tok = tokenizers.make_tokenizer("char", alphabet=alphabet + missing)
    top_id = max(tok.encode(alphabet + missing))
    if top_id >= model_vocab_size:
      raise ValueError(f"The label characters {missing!r} need token ids up to {top_id}, but "
                       f"the model's vocab_size is {model_vocab_size}: use a base model with a "
                       f"larger embedding table (lab models have 128 rows)")
    return {**tok_meta, "alphabet": alphabet + missing}, tok
  if kind == "sentencepiece":
    tok = tokenizers.make_tokenizer("sentencepiece", model_path=tok_meta["path"])
    missing = [l for l in dict.fromkeys(labels) if not _is_one_piece(tok, l)]
    if not missing:
      return dict(tok_meta), tok
    if directory is None:
      raise ValueError(f"Adding the pieces {missing} to {tok_meta['path']} writes a new "
                       f"tokenizer file: pass a directory (the workdir)")
    path = storage.join(directory, EXTENDED_TOKENIZER_FILE)
    proto = add_pieces(tok.processor.serialized_model_proto(), missing, model_vocab_size)
    storage.write_bytes(path, proto)  # process 0 writes; the others wait for it
    added = list(tok_meta.get("added_pieces", [])) + missing
    return ({**tok_meta, "path": path, "added_pieces": added},
            tokenizers.make_tokenizer("sentencepiece", model_path=path))
  raise ValueError(f"Unknown tokenizer kind {kind!r} in the model's metadata")


def _label_and_base_ids(old_meta: dict, new_meta: dict, rows: int) -> tuple[list[int], list[int]]:
  """(ids `extend_tokenizer` added, ids whose mean row they start from)."""
  if old_meta.get("kind") == "char":
    old, new = old_meta["alphabet"], new_meta["alphabet"]
    if not new.startswith(old):
      raise ValueError("init_label_embeddings: the new alphabet must extend the old one")
    tok = tokenizers.make_tokenizer("char", alphabet=new)
    return tok.encode(new[len(old):]), tok.encode(old)
  added = [p for p in new_meta.get("added_pieces", [])
           if p not in old_meta.get("added_pieces", [])]
  if not added:
    return [], []
  tok = tokenizers.make_tokenizer("sentencepiece", model_path=new_meta["path"])
  new_ids = [tok.piece_to_id(p) for p in added]
  return new_ids, sorted(set(range(min(rows, tok.vocab_size))) - set(new_ids))


def init_label_embeddings(params, old_meta: dict, new_meta: dict):
  """`params` with the embedding rows of the tokens `extend_tokenizer` added (a char
  tokenizer's appended characters, a SentencePiece model's added pieces) set to the mean row
  of the base vocabulary (the old alphabet; every other piece), other rows unchanged, so is
  the base's behaviour.

  The base never saw those ids: their rows still hold the random init (or an unused piece's
  untrained row), pushed away from every hidden state by the softmax, and as inputs they
  derail the model (after a short lab fine-tune it still answers "[GOOD]" with "]]]]...").
  Copying a similar character's row ('(' for '[') is worse with tied embeddings: the model
  then writes "min[52,85]".
  """
  if old_meta.get("kind") == "char" and new_meta["alphabet"] == old_meta["alphabet"]:
    return params
  table = params["embedding"]  # [vocab, d_model]
  new_ids, old_ids = _label_and_base_ids(old_meta, new_meta, table.shape[0])
  if not new_ids:
    return params
  old_ids, new_ids = jnp.asarray(old_ids), jnp.asarray(new_ids)
  out = dict(params)
  mean = table[old_ids].mean(0)  # (a 256k-row gather for Gemma: once, at the start)
  out["embedding"] = table.at[new_ids].set(jnp.broadcast_to(mean, (len(new_ids), mean.size)))
  if "lm_head" in params:  # untied output head [d_model, vocab]
    head = params["lm_head"]
    mean = head[:, old_ids].mean(1, keepdims=True)
    out["lm_head"] = head.at[:, new_ids].set(jnp.broadcast_to(mean, (mean.size, len(new_ids))))
  return out


def newline_ids(tokenizer) -> tuple[int, ...]:
  """Ids whose text contains a newline (they end a step)."""
  if isinstance(tokenizer, tokenizers.CharTokenizer):
    return tuple(tokenizer.encode("\n"))
  if hasattr(tokenizer, "id_to_piece"):
    ids = []
    for i in range(tokenizer.vocab_size):
      piece = tokenizer.id_to_piece(i)
      if "\n" in piece or piece == "<0x0A>":
        ids.append(i)
    return tuple(ids)
  return tuple(tokenizer.encode("\n"))


# ---------------------------------------------------------------------------------------------
# Conditioned sampling.


def _bucket_rows(n: int, batch_size: int, min_rows: int = 8) -> int:
  """Rows a sampler call gets: a multiple of batch_size, or a power of two (>= min_rows)
  below it, so that few sampler shapes are compiled as rows drop out."""
  if n >= batch_size:
    return -(-n // batch_size) * batch_size
  return min(batch_size, max(min_rows, 1 << max(n - 1, 0).bit_length()))


def conditioned_generate_stepwise(params, prompts: Sequence[str], *, model, tokenizer,
                                  num_samples: int = 1, greedy: bool = False,
                                  temperature: float = 0.7, step_tokens: int = 48,
                                  max_steps: int = 16, max_new_tokens: int = 160,
                                  rng: jax.Array, label: str = GOOD, batch_size: int = 64,
                                  mesh=None, rules=None, param_shardings=None,
                                  pad_multiple: int = 32) -> list[list[str]]:
  """Conditioned sampling as the thesis describes it, one sampler call per step (the reference
  for `conditioned_generate`, which does the same in one call).

  Each round, every unfinished row's text (prompt + its steps so far + `label`) is extended by
  the sampler (all rows batched) until a newline or EOS. A row finishes when its step ends
  without a newline (EOS, or `step_tokens` used), after `max_steps` steps, or when a step ends
  with its generated tokens (labels not counted) at `max_new_tokens` or more. Returned texts
  keep the labels (strip them with `strip_labels`).
  """
  stop = newline_ids(tokenizer)
  sp = sampling.SamplingParams(max_new_tokens=step_tokens, greedy=greedy,
                               temperature=temperature, extra_stop_ids=stop)
  n_rows = len(prompts) * num_samples
  texts = [""] * n_rows
  used = [0] * n_rows
  active = list(range(n_rows))
  for step in range(max_steps):
    if not active:
      break
    inputs = [prompts[r // num_samples] + texts[r] + label for r in active]
    inputs += [inputs[-1]] * (_bucket_rows(len(inputs), batch_size) - len(inputs))
    outs = sampling.generate_text(params, inputs, model=model, tokenizer=tokenizer, sp=sp,
                                  rng=jax.random.fold_in(rng, step), batch_size=batch_size,
                                  mesh=mesh, rules=rules, param_shardings=param_shardings,
                                  pad_multiple=pad_multiple)
    still = []
    for r, (out,) in zip(active, outs):
      cut = out.find("\n")
      piece = out if cut < 0 else out[:cut + 1]
      texts[r] += label + piece
      used[r] += len(tokenizer.encode(piece))
      if cut >= 0 and used[r] < max_new_tokens:
        still.append(r)
    active = still
  return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


@dataclasses.dataclass(frozen=True)
class StepRule:
  """The conditioned sampler's `sampling.TokenHook`: the label forced before every line, and
  when a row ends. A row's label tokens enter its cache exactly as if they ended its prompt,
  so one KV-cached `sampling.sample` call samples what the step-by-step loop
  (`conditioned_generate_stepwise`) samples, without re-encoding every row's text once per
  step. Log-probs of forced tokens are 0."""
  label_ids: tuple[int, ...]  # forced at the start and after every newline
  newline_ids: tuple[int, ...]
  step_tokens: int  # a line reaching this many tokens without newline ends the row
  max_steps: int  # lines per row
  max_new_tokens: int  # a line ending with this many free tokens generated ends the row

  @property
  def total_tokens(self) -> int:
    """Row length that no row can exceed (free tokens + forced labels)."""
    free = min(self.max_steps * self.step_tokens, self.max_new_tokens + self.step_tokens)
    return free + self.max_steps * len(self.label_ids)

  def init(self, rows: int) -> dict:
    zeros = jnp.zeros((rows,), jnp.int32)
    # force: label tokens written of the current line's label; line: free tokens in the
    # line; used: free tokens in the row; lines: newlines written.
    return {"force": zeros, "line": zeros, "used": zeros, "lines": zeros}

  def __call__(self, state, chosen, done, sp):
    n_label = len(self.label_ids)
    label = jnp.asarray(self.label_ids or (sp.pad_id,), jnp.int32)
    force = state["force"]
    forced = force < n_label
    tok = jnp.where(forced, label[jnp.minimum(force, max(n_label - 1, 0))], chosen)
    free = ~forced & ~done
    is_nl = free & jnp.isin(tok, jnp.asarray(self.newline_ids, jnp.int32))
    line = jnp.where(is_nl, 0, state["line"] + free)
    used = state["used"] + free
    lines = state["lines"] + is_nl
    ends = free & ((tok == sp.eos_id) | (~is_nl & (line >= self.step_tokens))
                   | (is_nl & ((lines >= self.max_steps) | (used >= self.max_new_tokens))))
    force = jnp.where(forced, force + 1, jnp.where(is_nl, 0, force))
    return tok, forced, ends, {"force": force, "line": line, "used": used, "lines": lines}


def conditioned_generate(params, prompts: Sequence[str], *, model, tokenizer,
                         num_samples: int = 1, greedy: bool = False, temperature: float = 0.7,
                         step_tokens: int = 48, max_steps: int = 16, max_new_tokens: int = 160,
                         rng: jax.Array, label: str = GOOD, batch_size: int = 64, mesh=None,
                         rules=None, param_shardings=None, pad_multiple: int = 32
                         ) -> list[list[str]]:
  """`num_samples` completions per prompt with `label` before every step (line); the same
  rules as `conditioned_generate_stepwise`, one KV-cached sampler call per batch of prompts.
  Returned texts keep the labels (strip them with `strip_labels`)."""
  if not prompts:
    return []
  rule = StepRule(label_ids=tuple(tokenizer.encode(label)) if label else (),
                  newline_ids=newline_ids(tokenizer), step_tokens=step_tokens,
                  max_steps=max_steps, max_new_tokens=max_new_tokens)
  # generate_text sets eos, pad and the valid vocabulary from the tokenizer.
  sp = sampling.SamplingParams(max_new_tokens=rule.total_tokens, num_samples=num_samples,
                               temperature=temperature, greedy=greedy)
  return sampling.generate_text(params, prompts, model=model, tokenizer=tokenizer, sp=sp,
                                rng=rng, batch_size=batch_size, mesh=mesh, rules=rules,
                                param_shardings=param_shardings, pad_multiple=pad_multiple,
                                hook=rule)
