"""Sampling metrics for reasoning: pass@k, maj@k, rerank@k and diversity.

All host-side Python over strings; the only arrays are per-problem numbers.
Correctness of a sample is ``answers.is_correct`` (final answer equivalence);
votes group answers by value (``answers.normalize_number``) or by lightly
normalised LaTeX, so ``5``, ``5.0`` and ``$5`` vote together.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import numpy as np

from qdc_jax.data import answers as answers_lib
from qdc_jax.data import arith

# ---------------------------------------------------------------------------
# pass@k.


def _check_counts(n: int, c: int, k: int) -> None:
  if n < 1:
    raise ValueError(f'pass@k needs n >= 1 samples, got n={n}')
  if not 0 <= c <= n:
    raise ValueError(f'need 0 <= c <= n, got c={c}, n={n}')
  if not 1 <= k <= n:
    raise ValueError(f'pass@k needs 1 <= k <= n, got k={k} with n={n} samples '
                     '(draw at least k samples per problem)')


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct.

  The probability that a uniformly random k-subset of the n samples holds at
  least one correct one: ``1 - C(n-c, k) / C(n, k)``, computed as
  ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so no huge binomials appear.

  Args:
    n: samples drawn (>= 1).
    c: correct samples (0 <= c <= n).
    k: budget (1 <= k <= n).

  Returns:
    The estimate in [0, 1].

  Raises:
    ValueError: counts out of range, notably k > n.
  """
  n, c, k = int(n), int(c), int(k)
  _check_counts(n, c, k)
  if n - c < k:
    return 1.0  # Every k-subset must contain a correct sample.
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_per_problem(n: Any, c: Any, k: int) -> np.ndarray:
  """pass@k for many problems at once (same formula as ``pass_at_k``).

  Args:
    n: samples per problem, shape [P] (or a scalar shared by all).
    c: correct samples per problem, shape [P].
    k: budget, at most every n.

  Returns:
    float64 array [P] of per-problem estimates; its mean is the benchmark's
    pass@k.

  Raises:
    ValueError: counts out of range, notably k > n for some problem.
  """
  c_P = np.asarray(c, dtype=np.int64).reshape(-1)
  n_P = np.broadcast_to(np.asarray(n, dtype=np.int64), c_P.shape)
  for n_i, c_i in zip(n_P.tolist(), c_P.tolist()):
    _check_counts(n_i, c_i, k)
  if c_P.size == 0:
    return np.zeros((0,), np.float64)
  # Sum of log(1 - k/i) over i in (n-c, n], masked per problem; the log form
  # vectorises the product, and -expm1 keeps precision when it is near 1.
  i_I = np.arange(1, int(n_P.max()) + 1, dtype=np.float64)
  in_range_PxI = (i_I[None, :] > (n_P - c_P)[:, None]) & (
      i_I[None, :] <= n_P[:, None])
  # Terms with i <= k are -inf/NaN; they only occur in rows where n - c < k,
  # which are 1.0 by definition and overwritten below.
  with np.errstate(divide='ignore', invalid='ignore'):
    log_terms_I = np.log1p(-k / i_I)
    log_terms_PxI = np.where(in_range_PxI, log_terms_I[None, :], 0.0)
    out_P = -np.expm1(log_terms_PxI.sum(axis=1))
  return np.where(n_P - c_P < k, 1.0, out_P)


# ---------------------------------------------------------------------------
# maj@k and rerank@k.


def _vote_key(answer: str) -> tuple[str, Any]:
  """Answers with equal keys are the same vote."""
  value = answers_lib.normalize_number(answer)
  if value is not None:
    return ('number', value)
  return ('text', answers_lib.canonical_text(answer))


def _check_k(num: int, k: int) -> None:
  if not 1 <= k <= num:
    raise ValueError(f'need 1 <= k <= {num} (the number of answers), got {k}')


def majority_answer(answers: Sequence[Optional[str]]) -> Optional[str]:
  """The most common answer; None if no answer was given.

  None answers (no final answer found) do not vote. Answers vote together
  when they have the same numeric value or the same normalised text. Ties go
  to the answer whose first vote came earliest, so the result is a
  deterministic function of the sample order. The returned string is the
  first-seen spelling of the winning answer.
  """
  counts: dict[tuple[str, Any], int] = {}
  first: dict[tuple[str, Any], tuple[int, str]] = {}
  for i, answer in enumerate(answers):
    if answer is None:
      continue
    key = _vote_key(answer)
    counts[key] = counts.get(key, 0) + 1
    first.setdefault(key, (i, answer))
  if not counts:
    return None
  best = max(counts, key=lambda key: (counts[key], -first[key][0]))
  return first[best][1]


def maj_at_k(answers: Sequence[Optional[str]], reference: Any, k: int, *,
             timeout_s: float = 2.0) -> float:
  """maj@k: whether the majority answer of the first k samples is correct.

  Args:
    answers: extracted final answers in sample order (None: no answer).
    reference: the reference answer.
    k: how many of the first answers vote (1 <= k <= len(answers)).
    timeout_s: passed to ``answers_equal``.

  Returns:
    1.0 or 0.0 (0.0 when none of the k gave an answer). See
    ``majority_answer`` for grouping and tie-breaking.

  Raises:
    ValueError: k out of range.
  """
  _check_k(len(answers), k)
  winner = majority_answer(answers[:k])
  if winner is None:
    return 0.0
  return float(answers_lib.answers_equal(winner, reference,
                                         timeout_s=timeout_s))


def rerank_at_k(answers: Sequence[Optional[str]], scores: Sequence[float],
                reference: Any, k: int, *, timeout_s: float = 2.0) -> float:
  """rerank@k: whether the best-scored of the first k samples is correct.

  The pick is the highest score among the first k (ties: the earliest; NaN
  scores never win unless all are NaN). Samples without an answer are not
  skipped: a verifier that prefers one is wrong.

  Args:
    answers: extracted final answers in sample order (None: no answer).
    scores: a verifier's score per sample (e.g. ORM), same length.
    reference: the reference answer.
    k: how many of the first samples are ranked.
    timeout_s: passed to ``answers_equal``.

  Returns:
    1.0 or 0.0.

  Raises:
    ValueError: k out of range or lengths differ.
  """
  if len(scores) != len(answers):
    raise ValueError(f'{len(answers)} answers but {len(scores)} scores')
  _check_k(len(answers), k)
  scores_K = np.asarray(scores[:k], dtype=np.float64)
  scores_K = np.where(np.isnan(scores_K), -np.inf, scores_K)
  pick = answers[int(np.argmax(scores_K))]
  if pick is None:
    return 0.0
  return float(answers_lib.answers_equal(pick, reference, timeout_s=timeout_s))


# ---------------------------------------------------------------------------
# Diversity.

_CALC_ANNOTATION_RE = re.compile(r'<<([^<>=]*)=([^<>]*)>>')
# Tokens of GSM8K-style prose: numbers (with $ and thousands commas), single
# characters, whitespace runs. Equations are then found by a linear scan over
# tokens; a regex for `a op b (op c)* = d` would retry long chains from every
# number and go quadratic.
_TOKEN_RE = re.compile(r'\$?\d+(?:,\d{3})*(?:\.\d+)?|\s+|.', re.DOTALL)
_INLINE_OPS = frozenset('+-*/x\u00d7\u00f7')
# arith.parse_solution's step regex backtracks over whitespace runs; collapsing
# them first keeps it linear on adversarial text.
_HSPACE_RE = re.compile(r'[^\S\n]+')
_THOUSANDS_COMMA_RE = re.compile(r'(?<=\d),(?=\d{3}(?!\d))')
_TIMES_DIVIDE = str.maketrans({'\u00d7': '*', '\u00f7': '/'})


def normalize_text(text: str) -> str:
  """Text up to whitespace (runs collapse, ends stripped); case is kept."""
  return ' '.join(str(text).split())


def _canon_lab_step(lhs: str, value: str) -> str:
  # Commas here separate min/max arguments, so only whitespace goes.
  return ''.join(f'{lhs}={value}'.split())


def _canon_equation(lhs: str, value: str, times_x: bool = False) -> str:
  """A GSM8K-style equation without spacing, ``$`` or thousands commas."""
  lhs = ''.join(lhs.split()).replace('$', '').translate(_TIMES_DIVIDE)
  if times_x:
    # Only between numbers is `x` a times sign.
    lhs = lhs.replace('x', '*')
  value = ''.join(value.split()).replace('$', '')
  return _THOUSANDS_COMMA_RE.sub('', f'{lhs}={value}')


def _is_number(token: str) -> bool:
  return token[-1].isdigit()


def _inline_equations(text: str) -> tuple[str, ...]:
  """``a op b (op c)* = d`` equations in prose, in order."""
  tokens = [t for t in _TOKEN_RE.findall(text) if not t.isspace()]
  found, chain, i = [], [], 0
  while i < len(tokens):
    token = tokens[i]
    expects_number = not chain or len(chain) % 2 == 0
    if _is_number(token):
      if expects_number and chain:
        chain.append(token)
      else:
        chain = [token]
    elif token in _INLINE_OPS and chain and not expects_number:
      chain.append(token)
    elif token == '=' and len(chain) >= 3 and not expects_number:
      j = i + 1
      sign = ''
      if j < len(tokens) and tokens[j] == '-':
        sign, j = '-', j + 1
      if j < len(tokens) and _is_number(tokens[j]):
        found.append(_canon_equation(''.join(chain), sign + tokens[j],
                                     times_x=True))
        # A result can start the next step: 3+4=7+1=8.
        chain, i = [tokens[j]], j + 1
        continue
      chain = []
    else:
      chain = []
    i += 1
  return tuple(found)


def operation_trace(text: str) -> tuple[str, ...]:
  """The sequence of arithmetic operations a solution performs.

  Each operation is its canonical equation ``lhs=value`` without whitespace
  (and, outside lab steps, without ``$`` and thousands commas), so
  ``12 + 7 = 19`` and ``12+7=19`` are one operation; the written value is
  kept, so a wrong result is a different operation. The first source that yields any operation is used:
    1. lab solution steps (``12+7=19``, ``17 mod 5=2``, ``min(4,9)=4``,
       ``20% of 50=10``), read by ``arith.parse_solution``; a step counts
       only if its left side is a well-formed lab step;
    2. GSM8K calculator annotations ``<<48/2=24>>``;
    3. inline equations ``a op b (op c)* = d`` with op in ``+ - * / x`` and
       the unicode times/divide signs.
  A solution with no operations has the empty trace.
  """
  text = str(text)
  steps = tuple(
      _canon_lab_step(lhs, str(value))
      for lhs, value in arith.parse_solution(_HSPACE_RE.sub(' ', text)).steps
      if arith.evaluate_step(lhs) is not None)
  if steps:
    return steps
  steps = tuple(_canon_equation(m[1], m[2])
                for m in _CALC_ANNOTATION_RE.finditer(text))
  if steps:
    return steps
  return _inline_equations(text)


def exact_diversity(texts: Sequence[str]) -> int:
  """Number of distinct texts after ``normalize_text``."""
  return len({normalize_text(t) for t in texts})


def trace_diversity(texts: Sequence[str]) -> int:
  """Number of distinct ``operation_trace`` sequences."""
  return len({operation_trace(t) for t in texts})


def diversity_report(samples: Sequence[str],
                     correct: Sequence[bool]) -> dict[str, int]:
  """Exact and trace diversity over all samples and over correct ones.

  Args:
    samples: solutions sampled for one problem.
    correct: whether each sample is correct, same length.

  Returns:
    ``{'exact_all', 'trace_all', 'exact_correct', 'trace_correct',
    'num_samples', 'num_correct'}``; diversities of an empty set are 0.

  Raises:
    ValueError: lengths differ.
  """
  if len(samples) != len(correct):
    raise ValueError(f'{len(samples)} samples but {len(correct)} flags')
  good = [s for s, ok in zip(samples, correct) if ok]
  return {
      'exact_all': exact_diversity(samples),
      'trace_all': trace_diversity(samples),
      'exact_correct': exact_diversity(good),
      'trace_correct': trace_diversity(good),
      'num_samples': len(samples),
      'num_correct': len(good),
  }


# ---------------------------------------------------------------------------
# Summary.


def summarize(per_problem_samples: Sequence[Sequence[str]],
              references: Sequence[Any],
              ks: Sequence[int] = (1, 4, 16), *,
              greedy: Optional[Sequence[str]] = None,
              scores: Optional[Sequence[Sequence[float]]] = None,
              timeout_s: float = 2.0) -> dict[str, float]:
  """Benchmark metrics from sampled completions.

  Args:
    per_problem_samples: per problem, its sampled completions (full text).
    references: per problem, the reference answer or reference solution.
    ks: budgets. A k larger than some problem's sample count is left out
      (its key is absent) rather than estimated from too few samples.
    greedy: per problem, the greedy (T=0) completion; adds
      ``greedy_accuracy`` (the thesis's maj@1).
    scores: per problem, a verifier score per sample; adds ``rerank@k``.
    timeout_s: per comparison, passed to ``answers_equal``.

  Returns:
    Means over problems: ``pass@k`` (unbiased), ``maj@k`` (first k samples),
    ``rerank@k``, ``greedy_accuracy``, ``accuracy`` (mean sample
    correctness), ``diversity/<key>`` for each ``diversity_report`` key, and
    ``num_problems``.

  Raises:
    ValueError: lengths differ or there are no problems.
  """
  num = len(per_problem_samples)
  if num == 0:
    raise ValueError('no problems')
  for name, other in (('references', references), ('greedy', greedy),
                      ('scores', scores)):
    if other is not None and len(other) != num:
      raise ValueError(f'{num} problems but {len(other)} {name}')
  min_n = min(len(s) for s in per_problem_samples)
  valid_ks = [k for k in ks if 1 <= k <= min_n]

  n_P, c_P, sample_acc_P = [], [], []
  maj = {k: [] for k in valid_ks}
  rerank = {k: [] for k in valid_ks}
  diversity: dict[str, list[int]] = {}
  for p, samples in enumerate(per_problem_samples):
    ref = answers_lib.answer_of_reference(references[p])
    found = [answers_lib.extract_answer(s) for s in samples]
    correct = [a is not None and
               answers_lib.answers_equal(a, ref, timeout_s=timeout_s)
               for a in found]
    n_P.append(len(samples))
    c_P.append(sum(correct))
    sample_acc_P.append(sum(correct) / max(len(samples), 1))
    for k in valid_ks:
      maj[k].append(maj_at_k(found, ref, k, timeout_s=timeout_s))
      if scores is not None:
        rerank[k].append(
            rerank_at_k(found, scores[p], ref, k, timeout_s=timeout_s))
    for key, value in diversity_report(samples, correct).items():
      diversity.setdefault(key, []).append(value)

  out: dict[str, float] = {'num_problems': float(num),
                           'accuracy': float(np.mean(sample_acc_P))}
  for k in valid_ks:
    out[f'pass@{k}'] = float(pass_at_k_per_problem(n_P, c_P, k).mean())
    out[f'maj@{k}'] = float(np.mean(maj[k]))
    if scores is not None:
      out[f'rerank@{k}'] = float(np.mean(rerank[k]))
  if greedy is not None:
    out['greedy_accuracy'] = float(np.mean([
        answers_lib.is_correct(g, ref, timeout_s=timeout_s)
        for g, ref in zip(greedy, references)]))
  for key, values in diversity.items():
    out[f'diversity/{key}'] = float(np.mean(values))
  return out
