"""Tests for answer extraction and equivalence."""
import fractions
import threading
import time

import hypothesis
from hypothesis import strategies as st
import pytest

from qdc_jax.data import answers
from qdc_jax.data import arith

F = fractions.Fraction

# Wall-clock bound for one call on adversarial input; generous because the
# test machine is shared.
_FAST_S = 2.0


@pytest.fixture(scope='module', autouse=True)
def _warm_verifier():
  # Pays math-verify's one-off start-up here, not inside timed assertions.
  answers.start_verifier()
  yield


@pytest.mark.parametrize('text, want', [
    # GSM8K.
    ('She has 5+3=<<5+3=8>>8 apples.\n#### 8', '8'),
    ('#### 1,234', '1,234'),
    ('#### -7.', '-7'),
    ('#### 1\nlater text\n#### 2', '2'),
    # Boxed: nested braces, last complete one wins, \fbox, no-brace form.
    (r'So $\boxed{\frac{1}{2}}$.', r'\frac{1}{2}'),
    (r'\boxed{\frac{\sqrt{3}}{2}}', r'\frac{\sqrt{3}}{2}'),
    (r'\boxed{1} and then \boxed{2}', '2'),
    (r'\boxed{3} then a truncated \boxed{\frac{', '3'),
    (r'\fbox{7}', '7'),
    (r'The answer is \boxed 5$', '5'),
    (r'\boxed{\{1,2\}}', r'\{1,2\}'),
    (r'\boxed{x = 3.}', 'x = 3'),
    # "The answer is" phrases: last wins, sentence end, $..$, markdown.
    ('I think the answer is 3. Actually the answer is 4. Done.', '4'),
    ('Thus the final answer is $\\frac{3}{4}$. Hope it helps', r'\frac{3}{4}'),
    ('**The answer is 42**', '42'),
    ('The answer is: 5 apples.\nBye', '5 apples'),
    ('So the answer is 3.5.', '3.5'),
    # The lab's line: first one, as arith.parse_solution reads it.
    ('12+7=19\n19*3=57\nThe answer is 57.', '57'),
    ('4-9=-5\nThe answer is -5.\nThe answer is 6.', '-5'),
    # Priority: boxed over GSM8K over phrases.
    ('the answer is 1\n#### 2', '2'),
    ('#### 2\n\\boxed{3}', '3'),
    # None.
    ('no answer here, just 42', None),
    ('', None),
    (r'\boxed{}', None),
    (None, None),
])
def test_extract_answer_formats(text, want):
  assert answers.extract_answer(text) == want


def test_extract_agrees_with_lab_oracle():
  for problem in arith.make_split('in_dist', 30, seed=0):
    got = answers.extract_answer(problem.solution)
    assert got == str(arith.parse_solution(problem.solution).answer)
    assert answers.is_correct(problem.solution, problem.answer)


@pytest.mark.parametrize('text, want', [
    ('42', F(42)), ('-42', F(-42)), ('+3', F(3)), ('\u22123', F(-3)),
    ('1,234', F(1234)), ('1,234,567.5', F(2469135, 2)), ('$5', F(5)),
    ('\\$5.50', F(11, 2)), ('-$5', F(-5)), ('$-5', F(-5)),
    ('50%', F(50)), ('50\\%', F(50)), ('12 dollars', F(12)), ('5 cm', F(5)),
    ('5cm', F(5)), ('3 km/h', F(3)), ('5\\text{ cm}', F(5)),
    ('90^\\circ', F(90)), ('90^{\\circ}', F(90)), ('0.5', F(1, 2)),
    ('.5', F(1, 2)), ('3/4', F(3, 4)), ('-3/4', F(-3, 4)),
    (r'\frac{3}{4}', F(3, 4)), (r'\dfrac{3}{4}', F(3, 4)),
    (r'\tfrac{-3}{4}', F(-3, 4)), (r'-\frac{3}{4}', F(-3, 4)),
    (r'\frac12', F(1, 2)), (r'1\frac{1}{2}', F(3, 2)),
    (r'-1\frac12', F(-3, 2)), ('1.5e3', F(1500)), ('2E-2', F(1, 50)),
    (r'1.5 \times 10^{3}', F(1500)), ('x = 7', F(7)), ('$\\frac{1}{2}$', F(1, 2)),
    ('\\left(5\\right)', None), ('{5}', F(5)), (7, F(7)), (0.1, F(1, 10)),
    (F(2, 3), F(2, 3)),
    # Not numbers (or not safely numbers).
    ('5 thousand', None), ('3 and a half', None), ('3x', None), ('2i', None),
    ('1,23', None), ('1, 2', None), ('5, because', None), ('1/2/3', None),
    (r'\frac{1}{0}', None), ('1/0', None), (r'\sqrt{2}', None), ('abc', None),
    ('', None), ('-', None), ('1e99999', None), ('9' * 5000, None),
    (None, None), (True, None), (float('nan'), None),
])
def test_normalize_number(text, want):
  assert answers.normalize_number(text) == want


@pytest.mark.parametrize('pred, ref, want', [
    ('0.5', r'\frac{1}{2}', True),
    ('1/2', '0.5', True),
    ('0.333', '1/3', False),
    ('0.33', r'\frac13', False),
    ('0.333333', '1/3', True),
    ('0.1666667', r'\frac{1}{6}', True),
    ('1000000.5', '1000001', False),
    ('1,234', '1234', True),
    ('$1,234.00', '1234', True),
    ('50%', '50', True),
    ('50%', '0.5', False),
    ('12 dollars', '12', True),
    ('-3', '3', False),
    ('-3', '\u22123', True),
    ('5', 5, True),
    (5.0, '5', True),
    ('7', '8', False),
    # Strings after light LaTeX normalisation.
    (r'\left( 1, 2 \right)', '(1,2)', True),
    (r'\text{Monday}', 'Monday', True),
    (r'\dfrac{\pi}{2}', r'\frac{\pi}{2}', True),
    # Symbolic (math-verify).
    (r'\sqrt{2}', r'2^{1/2}', True),
    (r'\frac{\pi}{2}', r'\pi/2', True),
    (r'3\sqrt{3}', r'\sqrt{27}', True),
    (r'\sqrt{3}', r'\sqrt{2}', False),
    ('banana', '19', False),
    (None, '1', False),
    ('1', None, False),
    ('', '', False),
])
def test_answers_equal(pred, ref, want):
  assert answers.answers_equal(pred, ref) == want


@pytest.mark.parametrize('completion, reference, want', [
    ('Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72', 72, True),
    ('... #### 72', 'She sold 24 clips.\n#### 72', True),
    (r'We get $\boxed{\dfrac{1}{2}}$.', '0.5', True),
    ('So the answer is $12.', '12', True),
    ('The answer is 13.', '12', False),
    ('No idea.', '12', False),
])
def test_is_correct(completion, reference, want):
  assert answers.is_correct(completion, reference) == want


# Strings glued from LaTeX and number fragments reach deeper code paths than
# uniform text does.
_LATEXISH = st.lists(st.sampled_from(
    list('0123456789.,-+/$%{}()^ x') +
    ['\\boxed{', '\\frac{', '\\dfrac', '\\left(', '\\right)', '\\text{',
     '\\sqrt{', '\\$', '\\%', '####', 'The answer is ', 'e', '\n']),
                     max_size=25).map(''.join)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.one_of(st.text(), _LATEXISH))
def test_extract_answer_never_raises(text):
  got = answers.extract_answer(text)
  assert got is None or (isinstance(got, str) and got)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(st.one_of(st.text(max_size=40), _LATEXISH),
                  st.one_of(st.text(max_size=40), _LATEXISH, st.integers()))
def test_answers_equal_never_raises(pred, ref):
  assert isinstance(answers.answers_equal(pred, ref, timeout_s=1.0), bool)
  assert isinstance(answers.is_correct(pred, ref, timeout_s=1.0), bool)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.integers(-10**30, 10**30), st.integers(1, 10**6))
def test_fraction_round_trips(num, den):
  value = F(num, den)
  assert answers.normalize_number(f'{value.numerator}/{value.denominator}') == value
  assert answers.normalize_number(
      rf'\frac{{{value.numerator}}}{{{value.denominator}}}') == value
  assert answers.answers_equal(str(num), f'{num:,}')


_ADVERSARIAL = [
    '{' * 100_000,
    '\\boxed{' + '{' * 100_000 + '1' + '}' * 100_000 + '}',
    '\\boxed{' * 20_000,
    '\\boxed{\\frac{' * 20_000,
    '\\boxed ' * 20_000 + 'x' * 50_000,
    '9' * 10_000,
    '#### ' + '9' * 10_000,
    'The answer is ' + '9' * 10_000 + '.',
    'answer is ' * 20_000,
    'The answer is ' + ' ' * 100_000,
    '1' * 10_000 + '/' + '3' * 10_000,
    '1,' * 20_000 + '1',
    '1e' + '9' * 10_000,
    '\\frac{' * 50_000,
    '$' * 100_000,
    '\\text{' * 50_000 + '}' * 50_000,
    '-' * 100_000 + '5',
    '5 ' + 'a' * 100_000 + '5',
]


@pytest.mark.parametrize('text', _ADVERSARIAL,
                         ids=[f'adv{i}' for i in range(len(_ADVERSARIAL))])
def test_bounded_time_on_adversarial_input(text):
  start = time.monotonic()
  answers.extract_answer(text)
  answers.normalize_number(text)
  answers.answers_equal(text, text + '1')
  answers.answers_equal(text, '5')
  answers.is_correct(text, '5')
  assert time.monotonic() - start < _FAST_S


def test_huge_equal_numbers_compare_as_strings():
  big = '9' * 10_000
  assert answers.normalize_number(big) is None
  assert answers.answers_equal(big, big)
  assert not answers.answers_equal(big, big[:-1] + '8')


def test_short_adversarial_latex_goes_to_math_verify_and_returns():
  # Short enough to reach math-verify; must still come back in time.
  for pred in [r'\boxed{\frac{', r'\frac{\frac{\frac{', r'\sqrt{\sqrt{' * 20,
               '(' * 200, '2^' * 200 + '2']:
    # A previous timeout killed the worker; restart it outside the timing.
    assert answers.start_verifier()
    start = time.monotonic()
    assert not answers.answers_equal(pred, '7', timeout_s=1.0)
    assert time.monotonic() - start < 1.0 + 1.0


def _call_in_thread(fn):
  out = {}

  def target():
    start = time.monotonic()
    out['value'] = fn()
    out['elapsed'] = time.monotonic() - start

  thread = threading.Thread(target=target)
  thread.start()
  thread.join(timeout=30)
  assert not thread.is_alive()
  return out['value'], out['elapsed']


def test_math_verify_works_off_main_thread():
  value, _ = _call_in_thread(
      lambda: answers.answers_equal(r'\sqrt{2}', r'2^{1/2}', timeout_s=10.0))
  assert value


# Stands in for a math-verify call that never finishes: reports ready, then
# reads requests and never answers.
_HANGING_WORKER = r'''
import sys, time
sys.stdout.write('ready\n'); sys.stdout.flush()
for line in sys.stdin:
  time.sleep(3600)
'''


def test_timeout_respected_off_main_thread(monkeypatch):
  verifier = answers._Verifier()
  monkeypatch.setattr(answers, '_VERIFIER', verifier)
  monkeypatch.setattr(answers, '_WORKER_SOURCE', _HANGING_WORKER)
  assert answers.start_verifier()
  proc = verifier.proc
  value, elapsed = _call_in_thread(
      lambda: answers.answers_equal(r'\sqrt{2}', r'2^{1/2}', timeout_s=0.5))
  assert value is False
  assert 0.4 < elapsed < 0.5 + 1.0
  # The stuck worker was killed, not left running.
  assert verifier.proc is None
  assert proc.poll() is not None
  verifier.kill()


def test_concurrent_callers_each_bounded(monkeypatch):
  verifier = answers._Verifier()
  monkeypatch.setattr(answers, '_VERIFIER', verifier)
  monkeypatch.setattr(answers, '_WORKER_SOURCE', _HANGING_WORKER)
  assert answers.start_verifier()
  results = []

  def target():
    start = time.monotonic()
    value = answers.answers_equal(r'\sqrt{2}', r'2^{1/2}', timeout_s=0.5)
    results.append((value, time.monotonic() - start))

  threads = [threading.Thread(target=target) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert len(results) == 3
  assert all(v is False for v, _ in results)
  # A cold restart (WORKER_START_TIMEOUT_S) may follow a kill; the waits for
  # the lock are still bounded by timeout_s each.
  assert all(e < 0.5 + answers.WORKER_START_TIMEOUT_S for _, e in results)
  verifier.kill()


def test_fallback_without_math_verify(monkeypatch):
  monkeypatch.setattr(answers, 'math_verify_available', lambda: False)
  assert not answers.answers_equal(r'\sqrt{2}', r'2^{1/2}')
  assert answers.answers_equal(r'\left(1,2\right)', '(1, 2)')
  assert answers.answers_equal('0.5', r'\frac12')
