"""Tests for the arithmetic lab against a naive independent evaluator."""
import collections
import fractions
import operator
import random
import re

import hypothesis
from hypothesis import strategies as st
import pytest

from qdc_jax.data import arith

Num, BinOp = arith.Num, arith.BinOp


# -- An independent reference: tuples, operator module and exact fractions. --


def to_tuple(tree):
  if isinstance(tree, Num):
    return tree.value
  return (tree.op, to_tuple(tree.left), to_tuple(tree.right))


def _naive_op(op, a, b):
  fns = {'+': operator.add, '-': operator.sub, '*': operator.mul,
         '/': operator.truediv, 'min': min, 'max': max,
         'mod': lambda x, y: fractions.Fraction(int(x) % int(y)),
         '%': lambda p, x: p * x / 100}
  result = fns[op](fractions.Fraction(a), fractions.Fraction(b))
  assert result.denominator == 1, (op, a, b)
  return int(result)


def naive_values(t):
  """Post-order values of every op of a tuple tree; the last is the answer."""
  if isinstance(t, int):
    return [], t
  op, left, right = t
  left_steps, a = naive_values(left)
  right_steps, b = naive_values(right)
  value = _naive_op(op, a, b)
  return left_steps + right_steps + [value], value


def naive_eval(tree):
  return naive_values(to_tuple(tree))[1]


_STEP_PATTERNS = (
    (r'(-?\d+)([-+*/])(-?\d+)', lambda m: (m[2], m[1], m[3])),
    (r'(-?\d+) mod (-?\d+)', lambda m: ('mod', m[1], m[2])),
    (r'(min|max)\((-?\d+),(-?\d+)\)', lambda m: (m[1], m[2], m[3])),
    (r'(-?\d+)% of (-?\d+)', lambda m: ('%', m[1], m[2])),
)


def naive_step(expr):
  for pattern, unpack in _STEP_PATTERNS:
    m = re.fullmatch(pattern, expr)
    if m:
      op, a, b = unpack(m)
      return _naive_op(op, int(a), int(b))
  raise AssertionError(f'unreadable step {expr!r}')


def random_tree(rng, n_ops):
  """Any shape and any op, values not necessarily defined: tests the syntax."""
  if n_ops == 0:
    return Num(rng.choice([0, rng.randint(1, 9), rng.randint(10, 10**6)]))
  k = rng.randint(0, n_ops - 1)
  return BinOp(rng.choice(arith.OPS), random_tree(rng, k),
               random_tree(rng, n_ops - 1 - k))


def shape(tree):
  if isinstance(tree, Num):
    return 'n'
  return (shape(tree.left), shape(tree.right))


def ops_preorder(tree):
  if isinstance(tree, Num):
    return []
  return [tree.op] + ops_preorder(tree.left) + ops_preorder(tree.right)


@pytest.fixture(scope='module')
def problems():
  rng = random.Random(1234)
  return [arith.generate(rng, arith.IN_DIST if i % 2 else arith.OOD)
          for i in range(10_000)]


# -- Exactness. --


def test_generated_problems_parse_back_exactly(problems):
  forms = collections.Counter(p.form for p in problems)
  assert forms['plain'] > 3000 and forms['word'] > 3000
  rng = random.Random(0)
  for p in problems:
    parsed = arith.parse(p.text)
    assert parsed == p.tree, p.text
    assert arith.evaluate(parsed) == naive_eval(p.tree) == p.answer
    other_form = 'plain' if p.form == 'word' else 'word'
    assert arith.parse(arith.render(p.tree, other_form, rng)) == p.tree
    assert p.num_steps == arith.num_ops(p.tree) == len(arith.trace(p.tree))
    assert p.max_digits == max(len(str(v)) for v in arith.literals(p.tree))
    assert p.answer >= 0


def test_every_op_and_form_is_generated(problems):
  ops = collections.Counter(op for p in problems for op in ops_preorder(p.tree))
  assert set(ops) == set(arith.OPS)
  assert min(ops.values()) > 1000


def test_arbitrary_trees_round_trip_in_both_forms():
  rng = random.Random(7)
  for _ in range(1500):
    tree = random_tree(rng, rng.randint(0, 12))
    assert arith.parse_expr(arith.render_expr(tree)) == tree
    for form in arith.FORMS:
      assert arith.parse(arith.render(tree, form, rng)) == tree
      assert arith.parse(arith.render(tree, form)) == tree


def test_precedence_and_parentheses():
  add = BinOp('+', Num(12), Num(7))
  assert arith.render(BinOp('*', add, Num(3))) == 'Compute (12 + 7) * 3.'
  assert arith.render_expr(BinOp('-', Num(9), BinOp('-', Num(4), Num(1)))) == (
      '9 - (4 - 1)')
  percent = BinOp('%', Num(20), BinOp('*', Num(5), Num(10)))
  assert arith.render_expr(percent) == '20% of (5 * 10)'
  assert arith.parse_expr('2 + 3 * 4') == BinOp('+', Num(2),
                                                BinOp('*', Num(3), Num(4)))
  assert arith.parse_expr('20% of 50 * 2') == BinOp(
      '*', BinOp('%', Num(20), Num(50)), Num(2))
  assert arith.evaluate(arith.parse_expr('max(3, 17 mod 5) - 1')) == 2


def test_undefined_ops_raise():
  for text in ('7 / 2', '7 / 0', '3 mod 0', '15% of 3'):
    with pytest.raises(arith.ArithError):
      arith.evaluate(arith.parse_expr(text))


# -- Solutions. --


def test_solutions_match_independent_evaluation(problems):
  for p in problems[:3000]:
    lines = p.solution.split('\n')
    assert lines[-1] == f'The answer is {p.answer}.'
    parsed = arith.parse_solution(p.solution)
    assert parsed.answer == p.answer
    expected, _ = naive_values(to_tuple(p.tree))
    assert [v for _, v in parsed.steps] == expected
    for expr, value in parsed.steps:
      assert naive_step(expr) == value == arith.evaluate_step(expr)


def test_solution_format():
  tree = arith.parse_expr('max(20% of 50, 17 mod 5) + (12 + 7) * 3')
  assert arith.solution(tree).split('\n') == [
      '20% of 50=10', '17 mod 5=2', 'max(10,2)=10', '12+7=19', '19*3=57',
      '10+57=67', 'The answer is 67.']


def test_parse_solution_is_tolerant():
  text = 'junk\n3+4=7\n  5*2 = 10 \n=\n9-12=-3\nThe answer is -3.\n1+1=2'
  parsed = arith.parse_solution(text)
  assert parsed.steps == (('3+4', 7), ('5*2', 10), ('9-12', -3))
  assert parsed.answer == -3
  for garbage in ('', None, 12, '\u00e9\u4e2d=\u0663', 'The answer is',
                  '=' * 50, '1=' + '9' * 5000, b'bytes'):
    result = arith.parse_solution(garbage)
    assert isinstance(result, arith.ParsedSolution)
  assert arith.parse_solution('x\nThe answer is 12').answer == 12
  assert arith.evaluate_step('7/2') is None
  assert arith.evaluate_step('nonsense') is None


# -- Skills. --


@pytest.mark.parametrize('expr, expected', [
    ('58 + 7', {'addition', 'carrying'}),
    ('52 + 7', {'addition'}),
    ('52 - 7', {'subtraction', 'carrying'}),
    ('57 - 2', {'subtraction'}),
    ('3 - 5', {'subtraction', 'negative_numbers'}),
    ('(12 + 7) * 3', {'addition', 'multiplication', 'parentheses'}),
    ('12 + 7 * 3', {'addition', 'multiplication'}),
    ('min(4, 9)', {'comparison'}),
    ('max(4, 9)', {'comparison'}),
    ('17 mod 5', {'remainder'}),
    ('20% of 50', {'percent'}),
    ('120 / 4', {'division', 'large_numbers'}),
    ('1 + 2 + 3 + 1', {'addition', 'multi_step'}),
    ('7 / 2', {'division'}),
])
def test_skills_of_hand_built_trees(expr, expected):
  assert arith.skills(arith.parse_expr(expr)) == tuple(sorted(expected))


def test_skill_names():
  assert len(arith.SKILLS) >= 10
  assert tuple(sorted(arith.SKILLS)) == arith.SKILLS
  rng = random.Random(3)
  seen = set()
  for _ in range(500):
    seen.update(arith.generate(rng, arith.OOD).skills)
  assert seen <= set(arith.SKILLS)
  assert seen >= set(arith.SKILLS) - {'negative_numbers'}


# -- Mutations. --


def _check_child(kind, parent, child, other=None):
  assert child.answer == naive_eval(arith.parse(child.text))
  assert child.form == parent.form
  assert child.tree != parent.tree
  assert all(s.value >= 0 for s in arith.trace(child.tree))
  parent_lits = collections.Counter(arith.literals(parent.tree))
  child_lits = collections.Counter(arith.literals(child.tree))
  if kind == 'change_number':
    assert shape(child.tree) == shape(parent.tree)
    assert ops_preorder(child.tree) == ops_preorder(parent.tree)
    diffs = [(a, b) for a, b in zip(arith.literals(parent.tree),
                                    arith.literals(child.tree)) if a != b]
    assert len(diffs) == 1
  elif kind == 'add_step':
    assert child.num_steps == parent.num_steps + 1
    assert parent_lits <= child_lits
  elif kind == 'remove_step':
    assert child.num_steps == parent.num_steps - 1
    assert child_lits <= parent_lits
  elif kind == 'swap_operator':
    assert shape(child.tree) == shape(parent.tree)
    assert arith.literals(child.tree) == arith.literals(parent.tree)
    diffs = [(a, b) for a, b in zip(ops_preorder(parent.tree),
                                    ops_preorder(child.tree)) if a != b]
    assert len(diffs) == 1
  elif kind == 'combine':
    root = child.tree
    assert isinstance(root, BinOp)
    if other is not None:
      assert {root.left, root.right} == {parent.tree, other.tree}
    else:
      assert parent.tree in (root.left, root.right)
  else:
    raise AssertionError(kind)


@pytest.mark.parametrize('kind', arith.MUTATION_KINDS)
def test_mutations_give_correct_children(kind):
  rng = random.Random(kind)
  parents = arith.make_split('in_dist', 30, 5) + arith.make_split('ood', 30, 5)
  done = 0
  for i, parent in enumerate(parents):
    if kind == 'remove_step' and parent.num_steps < 2:
      continue
    other = parents[-1 - i] if kind == 'combine' and i % 2 else None
    try:
      m = arith.mutate(rng, parent, kind, other=other)
    except arith.MutationError:
      continue
    assert m.kind == kind
    _check_child(kind, parent, m.child, other)
    done += 1
  assert done >= 40


def test_mutation_is_deterministic_and_any_kind_works():
  parents = arith.make_split('ood', 20, 1)
  kinds = collections.Counter()
  for i, parent in enumerate(parents):
    a = arith.mutate(random.Random(i), parent)
    b = arith.mutate(random.Random(i), parent)
    assert a == b
    _check_child(a.kind, parent, a.child)
    kinds[a.kind] += 1
  assert len(kinds) >= 3


def test_mutation_rejects_what_it_cannot_do():
  one_step = arith.make_problem(arith.parse_expr('3 + 4'))
  with pytest.raises(arith.MutationError):
    arith.mutate(random.Random(0), one_step, 'remove_step')
  with pytest.raises(ValueError):
    arith.mutate(random.Random(0), one_step, 'teleport')


# -- Oracle. --


def test_oracle_valid_and_invalid(problems):
  for p in problems[:200]:
    assert arith.oracle(p.text, p.answer).valid
    assert arith.oracle(p.text, str(p.answer)).valid
    assert arith.oracle(p.text, f'{p.answer}.0').valid
    assert arith.oracle(p.text, float(p.answer)).valid
    assert arith.oracle(p.text, p.solution).valid
    wrong = arith.oracle(p.text, p.answer + 1)
    assert wrong.parses and not wrong.valid and wrong.true_answer == p.answer
    assert wrong.skills == p.skills and wrong.steps == p.num_steps
  text = 'Compute (12 + 7) * 3.'
  for bad in (None, 'abc', 57.5, '57.5', True, float('nan'), [57]):
    result = arith.oracle(text, bad)
    assert result.parses and not result.valid and result.true_answer == 57
  undefined = arith.oracle('Compute 7 / 0.', 0)
  assert undefined.parses and undefined.true_answer is None
  assert not undefined.valid


@pytest.mark.parametrize('text', [
    '', ' ', 'hello', 'Compute .', 'Compute ((1 + 2).', 'Compute (1 + 2)).',
    'Compute 1 +.', 'Compute ' + '9' * 5000 + '.', 'Compute 007 + 1.',
    'Compute ' + '(' * 500 + '1' + ')' * 500 + '.',
    'Compute ' + ' + '.join(['1'] * 5000) + '.', 'Compute \u0663 + 1.',
    'Compute 1 \u00d7 2.', '\u4e2d\u6587', 'What is 5 %% of 20?',
    'Compute 20% of 5% of 100.', 'Compute -3 + 1.', 'Compute 1 + 2',
    'Ann has 5 apples. How many pens does Ann have now?',
    'Ann has 5 apples. Ben buys 3 more. How many apples does Ann have now?',
    'Ann has 5 apples. She buys 3 more.',
    'Ann has 5 apples. He buys 3 more. How many apples does Ann have now?',
    'Zed has 5 apples. How many apples does Zed have now?',
    'Ann has 5 apples. Ann has 6 apples. How many apples does Ann have now?',
    'Ann has 5 apples. She buys as many more as Ben has. '
    'How many apples does Ann have now?',
    ('Ann has 1 apples. ' + 'She buys 1 more. ' * 200 +
     'How many apples does Ann have now?'),
])
def test_oracle_rejects_garbage(text):
  result = arith.oracle(text, 1)
  assert not result.parses and not result.valid and result.true_answer is None


def test_word_references_cannot_blow_up():
  # Each agent adds the previous one twice: the tree would double per agent.
  names = [n for n, _ in arith.NAMES]
  sentences = [f'{names[0]} has 1 apples.']
  for prev, name in zip(names, names[1:]):
    sentences.append(f'{name} has 1 apples.')
    sentences += [f'{name} buys as many more as {prev} has.'] * 2
  sentences.append(f'How many apples does {names[-1]} have now?')
  assert not arith.oracle(' '.join(sentences), 0).parses


def test_oracle_accepts_word_problems_with_extra_whitespace():
  text = ('Ann  has 12 apples.\nShe buys 7 more.  Ben has 3 pens. He '
          'multiplies them by the number Ann has. How many pens does Ben '
          'have now?')
  result = arith.oracle(text, '57')
  assert result.valid and result.steps == 2
  # 3 * (12 + 7) needs parentheses in plain form: the skill is the tree's.
  assert result.skills == ('addition', 'multiplication', 'parentheses')


_SEED_TEXTS = [p.text for p in arith.make_split('in_dist', 10, 0)]


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.one_of(st.text(max_size=300), st.binary(max_size=50)),
                  st.one_of(st.none(), st.integers(), st.text(max_size=10),
                            st.floats()))
def test_oracle_fuzz_never_raises(text, answer):
  result = arith.oracle(text, answer)
  assert isinstance(result, arith.OracleResult)
  assert not result.valid or result.parses


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.sampled_from(_SEED_TEXTS), st.integers(0, 10_000),
                  st.text(max_size=3))
def test_oracle_fuzz_near_valid_text(base, position, insert):
  position %= len(base) + 1
  text = base[:position] + insert + base[position + 1:]
  result = arith.oracle(text, 0)
  if result.parses and result.true_answer is not None:
    assert result.true_answer == naive_eval(arith.parse(text))


# -- Splits, records, alphabet. --


def test_splits():
  in_dist = arith.make_split('in_dist', 300, 0)
  ood = arith.make_split('ood', 300, 0)
  assert in_dist == arith.make_split('in_dist', 300, 0)
  assert [p.text for p in in_dist] != [
      p.text for p in arith.make_split('in_dist', 300, 1)]
  assert all(1 <= p.num_steps <= 3 and p.max_digits <= 2 for p in in_dist)
  assert all(4 <= p.num_steps <= 6 and
             all(10 <= v <= 999 for v in arith.literals(p.tree)) for p in ood)
  mean = lambda ps, f: sum(f(p) for p in ps) / len(ps)
  assert mean(ood, lambda p: p.num_steps) > mean(in_dist, lambda p: p.num_steps)
  assert mean(ood, lambda p: p.max_digits) > mean(in_dist,
                                                  lambda p: p.max_digits)
  assert not {p.text for p in in_dist} & {p.text for p in ood}
  with pytest.raises(ValueError):
    arith.make_split('math', 3, 0)


def test_custom_spec_knobs():
  spec = arith.SplitSpec('adds', 2, 2, 3, 3, ops=('+', '/'), word_prob=0.0)
  rng = random.Random(0)
  for _ in range(100):
    p = arith.generate(rng, spec)
    assert p.form == 'plain' and p.num_steps == 2
    assert set(ops_preorder(p.tree)) <= {'+', '/'}
  with pytest.raises(ValueError):
    arith.SplitSpec('bad', 3, 1, 1, 1)


def test_records_round_trip(problems):
  for p in problems[:500]:
    record = p.to_record()
    assert set(record) == {'prompt', 'completion'}
    assert record['prompt'] == f'Question: {p.text}\nSolution:\n'
    assert record['completion'] == p.solution
    assert arith.Problem.from_record(record) == p
  with pytest.raises(arith.ParseError):
    arith.Problem.from_record({'prompt': 'nope', 'completion': ''})


def test_alphabet_covers_everything(problems):
  alphabet = set(arith.ALPHABET)
  assert len(alphabet) == len(arith.ALPHABET)
  rng = random.Random(0)
  children = [arith.mutate(rng, p).child for p in problems[:300]]
  for p in problems + children:
    record = p.to_record()
    assert set(record['prompt'] + record['completion']) <= alphabet


def test_parse_solution_is_fast_on_long_lines():
  import time  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  got = arith.parse_solution(" " * 100_000 + "=\n3+4=7\nThe answer is 7.")
  assert time.perf_counter() - t0 < 1.0
  assert got.steps == (("3+4", 7),) and got.answer == 7
