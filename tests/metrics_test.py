"""Tests for sampling metrics against brute-force references."""
import fractions
import itertools
import random
import time

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from qdc_jax.data import answers
from qdc_jax.data import arith
from qdc_jax.eval import metrics


@pytest.fixture(scope='module', autouse=True)
def _warm_verifier():
  answers.start_verifier()
  yield


def brute_pass_at_k(n, c, k):
  """Exact fraction of k-subsets of n samples (first c correct) with a hit."""
  subsets = list(itertools.combinations(range(n), k))
  hits = sum(any(i < c for i in s) for s in subsets)
  return fractions.Fraction(hits, len(subsets))


_GRID = [(n, c, k) for n in range(1, 13) for c in range(0, n + 1)
         for k in range(1, n + 1)]


def test_pass_at_k_matches_brute_force():
  for n, c, k in _GRID:
    want = float(brute_pass_at_k(n, c, k))
    assert metrics.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (
        n, c, k)


def test_pass_at_k_vectorised_matches_brute_force():
  for k in range(1, 13):
    rows = [(n, c) for n, c, kk in _GRID if kk == k]
    n_P, c_P = np.array(rows).T
    got_P = metrics.pass_at_k_per_problem(n_P, c_P, k)
    want_P = [float(brute_pass_at_k(n, c, k)) for n, c in rows]
    np.testing.assert_allclose(got_P, want_P, rtol=0, atol=1e-12)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.integers(1, 400).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_closed_form_large_n(nck):
  n, c, k = nck
  from math import comb  # pylint: disable=g-import-not-at-top
  want = 1 - fractions.Fraction(comb(n - c, k), comb(n, k))
  assert metrics.pass_at_k(n, c, k) == pytest.approx(float(want), abs=1e-12)
  assert metrics.pass_at_k_per_problem([n], [c], k)[0] == pytest.approx(
      float(want), abs=1e-12)


def test_pass_at_k_edges():
  assert metrics.pass_at_k(10, 0, 3) == 0.0
  assert metrics.pass_at_k(10, 10, 3) == 1.0
  assert metrics.pass_at_k(10, 3, 10) == 1.0  # k = n: any correct sample.
  assert metrics.pass_at_k(10, 0, 10) == 0.0
  assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
  assert metrics.pass_at_k(96, 1, 96) == 1.0
  # Tiny but non-zero: 1 correct in 10**4 samples, k = 1.
  assert metrics.pass_at_k(10**4, 1, 1) == pytest.approx(1e-4, rel=1e-12)
  np.testing.assert_array_equal(
      metrics.pass_at_k_per_problem(4, [0, 4], 4), [0.0, 1.0])


@pytest.mark.parametrize('n, c, k', [(4, 1, 5), (4, 1, 0), (4, 5, 1),
                                     (4, -1, 1), (0, 0, 1)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
  with pytest.raises(ValueError):
    metrics.pass_at_k(n, c, k)
  with pytest.raises(ValueError):
    metrics.pass_at_k_per_problem([n], [c], k)


def test_pass_at_k_k_greater_than_n_message():
  with pytest.raises(ValueError, match='k <= n'):
    metrics.pass_at_k(4, 2, 16)


@pytest.mark.parametrize('answers_, ref, k, want', [
    (['5', '5', '3'], '5', 3, 1.0),
    (['3', '5', '5'], '5', 3, 1.0),
    (['3', '5', '5'], '5', 1, 0.0),
    # Tie 1-1: the first-seen answer wins.
    (['3', '5'], '5', 2, 0.0),
    (['5', '3'], '5', 2, 1.0),
    (['3', '5', '5', '3'], '3', 4, 1.0),
    # None does not vote.
    ([None, None, '5'], '5', 3, 1.0),
    ([None, None, '3', '5', '5'], '5', 3, 0.0),
    ([None, None], '5', 2, 0.0),
    # Equal values vote together, whatever the spelling.
    (['3', '5', '5.0', '$5'], '5', 4, 1.0),
    (['1/2', '3', r'\frac{1}{2}', '3'], '0.5', 4, 1.0),
    (['7', '7', '8', '8', '8'], '7', 5, 0.0),
    (['7', '7', '8', '8', '8'], '7', 4, 1.0),
])
def test_maj_at_k(answers_, ref, k, want):
  assert metrics.maj_at_k(answers_, ref, k) == want


def test_maj_at_k_rejects_bad_k():
  with pytest.raises(ValueError):
    metrics.maj_at_k(['1', '2'], '1', 3)
  with pytest.raises(ValueError):
    metrics.maj_at_k(['1', '2'], '1', 0)


def test_majority_answer_keeps_first_spelling():
  assert metrics.majority_answer(['$5', '5.0', '3']) == '$5'
  assert metrics.majority_answer([None]) is None


def _naive_majority(votes):
  counts = {}
  for v in votes:
    if v is not None:
      counts[v] = counts.get(v, 0) + 1
  if not counts:
    return None
  best = max(counts.values())
  return next(v for v in votes if v is not None and counts[v] == best)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.lists(st.one_of(st.none(), st.integers(0, 4)),
                           min_size=1, max_size=12))
def test_majority_matches_naive_vote(votes):
  texts = [None if v is None else str(v) for v in votes]
  want = _naive_majority(texts)
  assert metrics.majority_answer(texts) == want


@pytest.mark.parametrize('answers_, scores, k, want', [
    (['3', '5', '7'], [0.1, 0.9, 0.5], 3, 1.0),
    (['3', '5', '7'], [0.1, 0.9, 0.5], 1, 0.0),
    (['3', '5', '7'], [0.8, 0.9, 0.95], 2, 1.0),
    (['3', '5', '7'], [0.8, 0.9, 0.95], 3, 0.0),
    (['5', '3'], [0.5, 0.5], 2, 1.0),  # Tie: the earliest.
    (['3', '5'], [0.5, 0.5], 2, 0.0),
    ([None, '5'], [0.9, 0.1], 2, 0.0),  # An answerless pick is wrong.
    (['3', '5'], [float('nan'), 0.1], 2, 1.0),
])
def test_rerank_at_k(answers_, scores, k, want):
  assert metrics.rerank_at_k(answers_, scores, '5', k) == want


def test_rerank_at_k_rejects_mismatch():
  with pytest.raises(ValueError):
    metrics.rerank_at_k(['1', '2'], [0.1], '1', 1)
  with pytest.raises(ValueError):
    metrics.rerank_at_k(['1', '2'], [0.1, 0.2], '1', 3)


def test_operation_trace_lab():
  text = '12+7=19\n19*3=57\n57 mod 5=2\nmin(4,9)=4\n20% of 50=10\nThe answer is 10.'
  assert metrics.operation_trace(text) == (
      '12+7=19', '19*3=57', '57mod5=2', 'min(4,9)=4', '20%of50=10')


def test_operation_trace_gsm8k():
  annotated = ('Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n'
               'She sold 48+24 = <<48+24=72>>72 clips.\n#### 72')
  assert metrics.operation_trace(annotated) == ('48/2=24', '48+24=72')
  inline = ('She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 in all.\n'
            'That is $1,200 x 2 = $2,400 total.')
  assert metrics.operation_trace(inline) == (
      '48/2=24', '48+24=72', '1200*2=2400')
  assert metrics.operation_trace('No arithmetic here.') == ()


def test_operation_trace_matches_lab_trace():
  for problem in arith.make_split('ood', 20, seed=1):
    want = tuple(arith.format_step(s).replace(' ', '')
                 for s in arith.trace(problem.tree))
    assert metrics.operation_trace(problem.solution) == want


def test_operation_trace_chains_and_signs():
  text = '3+4=7+1=8, then 2 x 3 = 6 boxes; 5 - 7 = -2 and $1,200 - $200 = $1,000'
  assert metrics.operation_trace(text) == (
      '3+4=7', '7+1=8', '2*3=6', '5-7=-2', '1200-200=1000')


@pytest.mark.parametrize('text', [
    '1+' * 50_000, '1x' * 50_000, '1+1=' * 30_000, '9' * 20_000,
    'a' + ' ' * 100_000 + '=1', '<<1' + '=' * 50_000, '$1,' * 30_000,
    '12+7=19\n' * 10_000,
], ids=lambda t: f'len{len(t)}')
def test_operation_trace_bounded_time(text):
  start = time.monotonic()
  metrics.operation_trace(text)
  assert time.monotonic() - start < 2.0


def test_diversity_same_ops_different_wording():
  a = 'First, 12+7=19.\nThen 19*3=57.\nThe answer is 57.'
  b = 'We add: 12 + 7 = 19. Next multiply 19 * 3 = 57. The answer is 57.'
  assert metrics.exact_diversity([a, b]) == 2
  assert metrics.trace_diversity([a, b]) == 1


def test_diversity_lab_and_whitespace():
  a = '12+7=19\n19*3=57\nThe answer is 57.'
  a_spaced = '12+7=19 \n 19*3=57\nThe answer is 57.  '
  b = '3*19=57\n12+7=19\nThe answer is 57.'
  c = '12+7=20\n20*3=60\nThe answer is 60.'
  assert metrics.exact_diversity([a, a_spaced, b, c]) == 4 - 1
  assert metrics.trace_diversity([a, a_spaced, b, c]) == 3
  report = metrics.diversity_report([a, a_spaced, b, c],
                                    [True, True, True, False])
  assert report == {'exact_all': 3, 'trace_all': 3, 'exact_correct': 2,
                    'trace_correct': 2, 'num_samples': 4, 'num_correct': 3}
  empty = metrics.diversity_report([a], [False])
  assert empty['exact_correct'] == 0 and empty['trace_correct'] == 0


def test_diversity_report_rejects_mismatch():
  with pytest.raises(ValueError):
    metrics.diversity_report(['a'], [True, False])


def test_summarize_hand_case():
  lab = lambda v: f'1+1=2\nThe answer is {v}.'  # pylint: disable=unnecessary-lambda-assignment
  samples = [
      [lab(2), lab(3), lab(2), lab(2)],  # 3 of 4 correct, majority right.
      [lab(5), lab(5), lab(6), 'no answer'],  # 1 of 4, majority wrong.
  ]
  refs = ['2', 'Some reasoning.\n#### 6']
  out = metrics.summarize(samples, refs, ks=(1, 2, 4, 16),
                          greedy=[lab(2), lab(5)],
                          scores=[[0.1, 0.2, 0.9, 0.3], [0.1, 0.2, 0.9, 0.3]])
  assert 'pass@16' not in out and 'maj@16' not in out
  assert out['num_problems'] == 2
  assert out['accuracy'] == pytest.approx((3 / 4 + 1 / 4) / 2)
  assert out['pass@1'] == pytest.approx((0.75 + 0.25) / 2)
  assert out['pass@2'] == pytest.approx(
      (metrics.pass_at_k(4, 3, 2) + metrics.pass_at_k(4, 1, 2)) / 2)
  assert out['pass@4'] == 1.0
  assert out['maj@1'] == pytest.approx(0.5)  # lab(2) right, lab(5) wrong.
  assert out['maj@4'] == pytest.approx(0.5)
  assert out['rerank@4'] == 1.0  # Picks index 2 in both: lab(2) and lab(6).
  assert out['rerank@2'] == pytest.approx(0.0)  # lab(3), lab(5).
  assert out['greedy_accuracy'] == pytest.approx(0.5)
  assert out['diversity/exact_all'] == pytest.approx((2 + 3) / 2)
  assert out['diversity/trace_all'] == pytest.approx((1 + 2) / 2)
  assert out['diversity/exact_correct'] == pytest.approx((1 + 1) / 2)


def test_summarize_matches_per_problem_calls():
  rng = random.Random(0)
  problems = arith.make_split('in_dist', 12, seed=3)
  samples, refs = [], []
  for p in problems:
    texts = []
    for _ in range(8):
      answer = p.answer + rng.choice([0, 0, 1, -1])
      texts.append(f'{p.solution.rsplit(chr(10), 1)[0]}\n'
                   f'The answer is {answer}.')
    samples.append(texts)
    refs.append(p.answer)
  out = metrics.summarize(samples, refs, ks=(1, 4, 8))
  counts = [sum(answers.is_correct(t, r) for t in ts)
            for ts, r in zip(samples, refs)]
  for k in (1, 4, 8):
    want = np.mean([metrics.pass_at_k(8, c, k) for c in counts])
    assert out[f'pass@{k}'] == pytest.approx(want)
    want = np.mean([metrics.maj_at_k([answers.extract_answer(t) for t in ts],
                                     r, k) for ts, r in zip(samples, refs)])
    assert out[f'maj@{k}'] == pytest.approx(want)


def test_summarize_rejects_mismatch():
  with pytest.raises(ValueError):
    metrics.summarize([['a']], ['1', '2'])
  with pytest.raises(ValueError):
    metrics.summarize([], [])
