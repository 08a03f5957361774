"""The arithmetic lab: oracle-checkable problems in a small controlled language.

Every problem is an integer expression tree. Because the question text can be
parsed back into its tree, any text (including text a model wrote) has an exact
oracle: its true answer, the skills it uses, its number of steps.

Vocabulary of the controlled language
-------------------------------------
Literals: non-negative decimal integers without leading zeros (at most
``MAX_LITERAL_DIGITS`` digits). Every value is an integer; ops that would leave
the integers are undefined, never rounded.

  op      plain form        meaning                      solution step line
  +       a + b             sum                          12+7=19
  -       a - b             difference                   19-4=15
  *       a * b             product                      15*3=45
  /       a / b             exact quotient (b divides a) 45/5=9
  mod     a mod b           Python remainder, b != 0     17 mod 5=2
  min     min(a, b)         smaller of the two           min(4,9)=4
  max     max(a, b)         larger of the two            max(4,9)=9
  %       p% of x           p*x/100, only if integral    20% of 50=10

Precedence (tightest first): atoms (literal, ``(e)``, ``min``/``max``), then
``p% of x`` (both sides must be atoms; it does not chain), then ``* / mod``,
then ``+ -``; binary ops are left-associative. Rendering adds exactly the
parentheses needed to keep the tree, so ``parse(render(t)) == t``.

Plain questions: ``Compute <e>.`` | ``Evaluate <e>.`` | ``What is <e>?``

Word questions are stories, sentences separated by one space. Each agent (a
name from ``NAMES``, a plural noun from ``ITEMS``) follows one chain of the tree
(the left child; for ``%`` the right child, the base). Agents that a chain
refers to are told first.
  intro:     ``Ann has 12 apples.`` | ``Ann starts with 12 apples.``
  step:      subject ``Ann`` or her pronoun (``She``/``He``), then a phrase from
             ``WORD_TEMPLATES`` whose operand is a number (``She buys 7 more.``)
             or another agent's final count (``She buys as many more as Ben
             has.``, ``She multiplies them by the number Ben has.``).
  question:  ``How many apples does Ann have now?`` |
             ``How many apples does Ann end up with?``

Solutions: one line per op in evaluation order (post-order, left operand
first), then ``The answer is <int>.``
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import random
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

# The char tokenizer's vocabulary. Append only: ids are positions in it.
ALPHABET = ('0123456789'
            'abcdefghijklmnopqrstuvwxyz'
            'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
            ' \n+-*/%(),.?:=')

OPS = ('+', '-', '*', '/', 'mod', 'min', 'max', '%')
PERCENTS = (10, 20, 25, 30, 40, 50, 60, 75, 80, 90)
FORMS = ('plain', 'word')
SKILLS = ('addition', 'carrying', 'comparison', 'division', 'large_numbers',
          'multi_step', 'multiplication', 'negative_numbers', 'parentheses',
          'percent', 'remainder', 'subtraction')
MUTATION_KINDS = ('change_number', 'add_step', 'remove_step', 'swap_operator',
                  'combine')

# The question sits between a fixed prefix and suffix so that from_record can
# cut it back out; the completion is the bare solution (the tokenizer adds EOS).
PROMPT_TEMPLATE = 'Question: {question}\nSolution:\n'
ANSWER_TEMPLATE = 'The answer is {answer}.'

# Bounds that keep parsing of arbitrary model text cheap and non-recursive
# enough for Python's stack.
MAX_LITERAL_DIGITS = 18
MAX_PARSE_OPS = 128
MAX_PARSE_DEPTH = 64
MAX_TEXT_CHARS = 20_000
# Mutated children stay inside what word rendering (one name per agent) and
# a small model's context can hold.
MAX_MUTATION_OPS = 16
MAX_MUTATION_VALUE = 10**9

NAMES = (('Ann', 'She'), ('Ben', 'He'), ('Cara', 'She'), ('Dev', 'He'),
         ('Eli', 'He'), ('Fay', 'She'), ('Gus', 'He'), ('Hana', 'She'),
         ('Ivy', 'She'), ('Jon', 'He'), ('Kim', 'She'), ('Leo', 'He'),
         ('Mia', 'She'), ('Ned', 'He'), ('Olga', 'She'), ('Pablo', 'He'),
         ('Quinn', 'She'), ('Rosa', 'She'), ('Sam', 'He'), ('Tara', 'She'),
         ('Umar', 'He'), ('Vera', 'She'), ('Will', 'He'), ('Xena', 'She'),
         ('Yusuf', 'He'), ('Zoe', 'She'))
ITEMS = ('apples', 'pens', 'coins', 'stamps', 'books', 'shells', 'cards',
         'beads', 'marbles', 'stickers', 'candles', 'buttons', 'cookies',
         'rocks', 'seeds', 'ribbons')

# Per op: (literal form, reference form) pairs. {S} subject, {k} number,
# {R} the agent whose final count is the operand.
WORD_TEMPLATES = {
    '+': (('{S} buys {k} more.', '{S} buys as many more as {R} has.'),
          ('{S} finds {k} more.', '{S} finds as many more as {R} has.'),
          ('{S} is given {k} more.',
           '{S} is given as many more as {R} has.')),
    '-': (('{S} gives away {k}.', '{S} gives away as many as {R} has.'),
          ('{S} loses {k}.', '{S} loses as many as {R} has.'),
          ('{S} sells {k}.', '{S} sells as many as {R} has.')),
    '*': (('{S} multiplies them by {k}.',
           '{S} multiplies them by the number {R} has.'),
          ('{S} ends up with {k} times as many.',
           '{S} ends up with the number {R} has times as many.')),
    '/': (('{S} splits them equally into {k} bags and keeps one bag.',
           '{S} splits them equally into as many bags as {R} has and keeps '
           'one bag.'),
          ('{S} divides them equally into {k} groups and keeps one group.',
           '{S} divides them equally into as many groups as {R} has and keeps '
           'one group.')),
    'mod': (('{S} packs them into bags of {k} and keeps only the leftovers.',
             '{S} packs them into bags of the number {R} has and keeps only '
             'the leftovers.'),
            ('{S} makes full groups of {k} and keeps the rest.',
             '{S} makes full groups of the number {R} has and keeps the '
             'rest.')),
    'min': (('{S} keeps at most {k}.', '{S} keeps at most as many as {R} has.'),
            ('{S} keeps no more than {k}.',
             '{S} keeps no more than as many as {R} has.')),
    'max': (('{S} tops up to at least {k}.',
             '{S} tops up to at least as many as {R} has.'),
            ('{S} makes sure to have at least {k}.',
             '{S} makes sure to have at least as many as {R} has.')),
    '%': (('{S} keeps {k}% of them.',
           '{S} keeps as many percent of them as {R} has.'),
          ('{S} gives away all but {k}% of them.',
           '{S} gives away all but as many percent of them as {R} has.')),
}
INTRO_TEMPLATES = ('{S} has {k} {I}.', '{S} starts with {k} {I}.')
QUESTION_TEMPLATES = ('How many {I} does {S} have now?',
                      'How many {I} does {S} end up with?')
PLAIN_TEMPLATES = ('Compute {e}.', 'Evaluate {e}.', 'What is {e}?')


class ParseError(ValueError):
  """Text is not in the controlled language."""


class ArithError(ValueError):
  """An op leaves the integers (inexact division, zero divisor, ...)."""


class MutationError(ValueError):
  """No valid child was found within the retry budget."""


# ---------------------------------------------------------------------------
# Trees and evaluation.


@dataclasses.dataclass(frozen=True)
class Num:
  """An integer literal (non-negative in anything that is rendered)."""
  value: int


@dataclasses.dataclass(frozen=True)
class BinOp:
  """A binary op; for ``%`` the left child is the percent, the right one the
  base."""
  op: str
  left: 'Node'
  right: 'Node'


Node = Union[Num, BinOp]


@dataclasses.dataclass(frozen=True)
class Step:
  """One solution step: ``a op b = value``."""
  op: str
  a: int
  b: int
  value: int


def apply_op(op: str, a: int, b: int) -> int:
  """Applies one op exactly.

  Args:
    op: one of ``OPS``.
    a: left operand (the percent for ``%``).
    b: right operand (the base for ``%``).

  Returns:
    The integer result.

  Raises:
    ArithError: the result is not an integer or the op is unknown.
  """
  if op == '+':
    return a + b
  if op == '-':
    return a - b
  if op == '*':
    return a * b
  if op == '/':
    if b == 0 or a % b:
      raise ArithError(f'{a} / {b} is not an exact division')
    return a // b
  if op == 'mod':
    if b == 0:
      raise ArithError(f'{a} mod 0')
    return a % b
  if op == 'min':
    return min(a, b)
  if op == 'max':
    return max(a, b)
  if op == '%':
    if (a * b) % 100:
      raise ArithError(f'{a}% of {b} is not an integer')
    return a * b // 100
  raise ArithError(f'unknown op {op!r}')


def trace(tree: Node) -> list[Step]:
  """Steps in evaluation order (post-order, left subtree first).

  Raises:
    ArithError: some op is undefined.
  """
  steps = []

  def visit(node):
    if isinstance(node, Num):
      return node.value
    a = visit(node.left)
    b = visit(node.right)
    value = apply_op(node.op, a, b)
    steps.append(Step(node.op, a, b, value))
    return value

  visit(tree)
  return steps


def evaluate(tree: Node) -> int:
  """The exact value of a tree; raises ArithError if any op is undefined."""
  if isinstance(tree, Num):
    return tree.value
  return apply_op(tree.op, evaluate(tree.left), evaluate(tree.right))


def num_ops(tree: Node) -> int:
  """Number of binary ops (= solution steps)."""
  if isinstance(tree, Num):
    return 0
  return 1 + num_ops(tree.left) + num_ops(tree.right)


def literals(tree: Node) -> list[int]:
  """Literal values, left to right."""
  if isinstance(tree, Num):
    return [tree.value]
  return literals(tree.left) + literals(tree.right)


def max_digits(tree: Node) -> int:
  """Most digits of any literal."""
  return max(len(str(abs(v))) for v in literals(tree))


# ---------------------------------------------------------------------------
# Plain rendering and parsing.

_INFIX_PREC = {'+': 1, '-': 1, '*': 2, '/': 2, 'mod': 2, '%': 3}
_ATOM_PREC = 4


def _prec(node: Node) -> int:
  if isinstance(node, Num) or node.op in ('min', 'max'):
    return _ATOM_PREC
  return _INFIX_PREC[node.op]


def _child_wraps(node: BinOp) -> tuple[bool, bool]:
  """Whether the left/right child need parentheses under ``node``."""
  if node.op in ('min', 'max'):
    return False, False
  p = _INFIX_PREC[node.op]
  if node.op == '%':
    # `p% of x` does not chain, so both sides must be atoms.
    return _prec(node.left) < _ATOM_PREC, _prec(node.right) < _ATOM_PREC
  # Left-associative: an equal-precedence right child must keep its parens.
  return _prec(node.left) < p, _prec(node.right) <= p


def render_expr(tree: Node) -> str:
  """Plain expression text with minimal parentheses."""
  if isinstance(tree, Num):
    return str(tree.value)
  left, right = render_expr(tree.left), render_expr(tree.right)
  if tree.op in ('min', 'max'):
    return f'{tree.op}({left}, {right})'
  wrap_left, wrap_right = _child_wraps(tree)
  if wrap_left:
    left = f'({left})'
  if wrap_right:
    right = f'({right})'
  if tree.op == '%':
    return f'{left}% of {right}'
  return f'{left} {tree.op} {right}'


def _needs_parens(tree: Node) -> bool:
  if isinstance(tree, Num):
    return False
  return (any(_child_wraps(tree)) or _needs_parens(tree.left) or
          _needs_parens(tree.right))


_TOKEN_RE = re.compile(
    r'\s*(?:([0-9]+)|(mod|min|max|of)(?![A-Za-z0-9])|([-+*/%(),]))', re.ASCII)


def _to_literal(digits: str) -> int:
  if len(digits) > MAX_LITERAL_DIGITS:
    raise ParseError(f'literal longer than {MAX_LITERAL_DIGITS} digits')
  if len(digits) > 1 and digits[0] == '0':
    raise ParseError('leading zero')
  return int(digits)


def _tokenize(text: str) -> list[Union[int, str]]:
  tokens, pos, text = [], 0, text.strip()
  while pos < len(text):
    m = _TOKEN_RE.match(text, pos)
    if m is None:
      raise ParseError(f'unexpected character at {pos}')
    number, word, sym = m.groups()
    tokens.append(_to_literal(number) if number is not None else word or sym)
    pos = m.end()
  return tokens


class _ExprParser:
  """Recursive descent over the plain grammar (see module docstring)."""

  def __init__(self, tokens: list[Union[int, str]]):
    self.tokens, self.i, self.depth, self.ops = tokens, 0, 0, 0

  def peek(self) -> Union[int, str, None]:
    return self.tokens[self.i] if self.i < len(self.tokens) else None

  def take(self) -> Union[int, str]:
    tok = self.peek()
    if tok is None:
      raise ParseError('unexpected end of expression')
    self.i += 1
    return tok

  def expect(self, want: str) -> None:
    tok = self.take()
    if tok != want or isinstance(tok, int):
      raise ParseError(f'expected {want!r}, got {tok!r}')

  def node(self, op: str, left: Node, right: Node) -> BinOp:
    self.ops += 1
    if self.ops > MAX_PARSE_OPS:
      raise ParseError(f'more than {MAX_PARSE_OPS} ops')
    return BinOp(op, left, right)

  def is_sym(self, options: tuple[str, ...]) -> bool:
    tok = self.peek()
    return isinstance(tok, str) and tok in options

  def expr(self) -> Node:
    tree = self.term()
    while self.is_sym(('+', '-')):
      tree = self.node(self.take(), tree, self.term())
    return tree

  def term(self) -> Node:
    tree = self.percent()
    while self.is_sym(('*', '/', 'mod')):
      tree = self.node(self.take(), tree, self.percent())
    return tree

  def percent(self) -> Node:
    tree = self.atom()
    if self.is_sym(('%',)):
      self.take()
      self.expect('of')
      tree = self.node('%', tree, self.atom())
    return tree

  def atom(self) -> Node:
    tok = self.take()
    if isinstance(tok, int):
      return Num(tok)
    if tok not in ('(', 'min', 'max'):
      raise ParseError(f'unexpected token {tok!r}')
    self.depth += 1
    if self.depth > MAX_PARSE_DEPTH:
      raise ParseError('nesting too deep')
    if tok == '(':
      tree = self.expr()
    else:
      self.expect('(')
      left = self.expr()
      self.expect(',')
      tree = self.node(tok, left, self.expr())
    self.expect(')')
    self.depth -= 1
    return tree


def parse_expr(text: str) -> Node:
  """Parses a bare plain expression such as ``(12 + 7) * 3``."""
  parser = _ExprParser(_tokenize(text))
  tree = parser.expr()
  if parser.peek() is not None:
    raise ParseError(f'trailing token {parser.peek()!r}')
  return tree


def _template_regex(template: str) -> re.Pattern:
  groups = {'{S}': r'(?P<S>[A-Za-z]+)', '{k}': r'(?P<k>[0-9]+)',
            '{R}': r'(?P<R>[A-Za-z]+)', '{I}': r'(?P<I>[a-z]+)',
            '{e}': r'(?P<e>.+)'}
  parts = re.split(r'(\{[SkRIe]\})', template)
  return re.compile(''.join(groups.get(p, re.escape(p)) for p in parts),
                    re.ASCII | re.DOTALL)


_PLAIN_RES = tuple(_template_regex(t) for t in PLAIN_TEMPLATES)
_INTRO_RES = tuple(_template_regex(t) for t in INTRO_TEMPLATES)
_QUESTION_RES = tuple(_template_regex(t) for t in QUESTION_TEMPLATES)
_STEP_RES = tuple((op, _template_regex(t))
                  for op, pairs in WORD_TEMPLATES.items()
                  for pair in pairs for t in pair)
_PRONOUN = dict(NAMES)


# ---------------------------------------------------------------------------
# Word rendering and parsing.


def _pick(rng: Optional[random.Random], options: Sequence[Any]) -> Any:
  return options[0] if rng is None else rng.choice(options)


def _fill(template: str, **slots: Any) -> str:
  for key, value in slots.items():
    template = template.replace('{' + key + '}', str(value))
  return template


def _render_word(tree: Node, rng: Optional[random.Random]) -> str:
  names, items = list(NAMES), list(ITEMS)
  if rng is not None:
    rng.shuffle(names)
    rng.shuffle(items)
  sentences = []
  used = [0]

  def describe(node: Node) -> tuple[str, str]:
    chain = []
    while isinstance(node, BinOp):
      if node.op == '%':
        chain.append((node.op, node.left))
        node = node.right
      else:
        chain.append((node.op, node.right))
        node = node.left
    chain.reverse()
    # Agents that this chain refers to must be known before it mentions them.
    refs = [describe(operand)[0] if isinstance(operand, BinOp) else None
            for _, operand in chain]
    if used[0] >= len(names):
      raise ValueError(f'word form supports at most {len(names)} agents')
    (name, pronoun), item = names[used[0]], items[used[0] % len(items)]
    used[0] += 1
    sentences.append(_fill(_pick(rng, INTRO_TEMPLATES), S=name, k=node.value,
                           I=item))
    for (op, operand), ref in zip(chain, refs):
      literal_t, ref_t = _pick(rng, WORD_TEMPLATES[op])
      subject = pronoun if rng is None or rng.random() < 0.7 else name
      if ref is None:
        sentences.append(_fill(literal_t, S=subject, k=operand.value))
      else:
        sentences.append(_fill(ref_t, S=subject, R=ref))
    return name, item

  name, item = describe(tree)
  sentences.append(_fill(_pick(rng, QUESTION_TEMPLATES), S=name, I=item))
  return ' '.join(sentences)


def _parse_word(text: str) -> Node:
  sentences = re.split(r'(?<=[.?]) ', text)
  # name -> (tree, item, ops); ops counts the whole tree, since an agent may be
  # referenced more than once and trees would otherwise grow exponentially.
  agents: dict[str, tuple[Node, str, int]] = {}
  current = None
  for sentence in sentences[:-1]:
    m = _first_match(_INTRO_RES, sentence)
    if m is not None:
      name = m['S']
      if name not in _PRONOUN or name in agents:
        raise ParseError(f'bad or repeated name {name!r}')
      if m['I'] not in ITEMS:
        raise ParseError(f'unknown item {m["I"]!r}')
      agents[name] = (Num(_to_literal(m['k'])), m['I'], 0)
      current = name
      continue
    op, m = next(((op, m) for op, m in
                  ((op, r.fullmatch(sentence)) for op, r in _STEP_RES)
                  if m is not None), (None, None))
    if m is None:
      raise ParseError(f'unrecognised sentence {sentence[:60]!r}')
    if current is None or m['S'] not in (current, _PRONOUN[current]):
      raise ParseError(f'subject {m["S"]!r} is not the current agent')
    if m.groupdict().get('k') is not None:
      operand, operand_ops = Num(_to_literal(m['k'])), 0
    else:
      ref = m['R']
      if ref not in agents or ref == current:
        raise ParseError(f'unknown agent {ref!r}')
      operand, _, operand_ops = agents[ref]
    tree, item, ops = agents[current]
    ops += operand_ops + 1
    if ops > MAX_PARSE_OPS:
      raise ParseError(f'more than {MAX_PARSE_OPS} ops')
    tree = BinOp('%', operand, tree) if op == '%' else BinOp(op, tree, operand)
    agents[current] = (tree, item, ops)
  m = _first_match(_QUESTION_RES, sentences[-1])
  if m is None or m['S'] not in agents or agents[m['S']][1] != m['I']:
    raise ParseError('missing or mismatched question')
  return agents[m['S']][0]


def _first_match(regexes: Sequence[re.Pattern],
                 text: str) -> Optional[re.Match]:
  for r in regexes:
    m = r.fullmatch(text)
    if m is not None:
      return m
  return None


# ---------------------------------------------------------------------------
# Questions in either form.


def render(tree: Node, form: str = 'plain',
           rng: Optional[random.Random] = None) -> str:
  """Question text for a tree.

  Args:
    tree: the expression.
    form: 'plain' or 'word'.
    rng: picks templates, names and items; None picks the first of each.

  Returns:
    Text that ``parse`` maps back to exactly ``tree``.
  """
  if form == 'plain':
    return _fill(_pick(rng, PLAIN_TEMPLATES), e=render_expr(tree))
  if form == 'word':
    return _render_word(tree, rng)
  raise ValueError(f'unknown form {form!r}')


def parse_with_form(text: str) -> tuple[Node, str]:
  """Parses question text of either form; returns (tree, form).

  Raises:
    ParseError: the text is not in the controlled language.
  """
  if not isinstance(text, str):
    raise ParseError('not a string')
  if len(text) > MAX_TEXT_CHARS:
    raise ParseError('text too long')
  text = ' '.join(text.split())
  m = _first_match(_PLAIN_RES, text)
  if m is not None:
    return parse_expr(m['e']), 'plain'
  return _parse_word(text), 'word'


def parse(text: str) -> Node:
  """Parses question text of either form back into its tree."""
  return parse_with_form(text)[0]


# ---------------------------------------------------------------------------
# Skills and solutions.


def _carries(op: str, a: int, b: int) -> bool:
  """Whether column arithmetic of |a| op |b| carries (+) or borrows (-)."""
  a, b = abs(a), abs(b)
  if op == '-':
    a, b = max(a, b), min(a, b)
  while a or b:
    da, db = a % 10, b % 10
    # The first carry/borrow happens in a column without an incoming one, so
    # checking columns independently finds whether any happens at all.
    if (op == '+' and da + db >= 10) or (op == '-' and da < db):
      return True
    a, b = a // 10, b // 10
  return False


def skills(tree: Node) -> tuple[str, ...]:
  """Sorted skill names (see ``SKILLS``) that a tree exercises.

  Structural skills are always reported; value-based ones (carrying,
  negative_numbers) only for the parts of the tree that evaluate.
  """
  found = set()
  op_skill = {'+': 'addition', '-': 'subtraction', '*': 'multiplication',
              '/': 'division', 'mod': 'remainder', 'min': 'comparison',
              'max': 'comparison', '%': 'percent'}

  def visit(node: Node) -> Optional[int]:
    if isinstance(node, Num):
      if abs(node.value) >= 100:
        found.add('large_numbers')
      if node.value < 0:
        found.add('negative_numbers')
      return node.value
    found.add(op_skill.get(node.op, node.op))
    a, b = visit(node.left), visit(node.right)
    if a is None or b is None:
      return None
    if node.op in ('+', '-') and _carries(node.op, a, b):
      found.add('carrying')
    try:
      value = apply_op(node.op, a, b)
    except ArithError:
      return None
    if value < 0:
      found.add('negative_numbers')
    return value

  visit(tree)
  if num_ops(tree) >= 3:
    found.add('multi_step')
  if _needs_parens(tree):
    found.add('parentheses')
  return tuple(sorted(found))


def format_step(step: Step) -> str:
  """One solution line, e.g. ``12+7=19`` or ``20% of 50=10``."""
  if step.op == 'mod':
    lhs = f'{step.a} mod {step.b}'
  elif step.op in ('min', 'max'):
    lhs = f'{step.op}({step.a},{step.b})'
  elif step.op == '%':
    lhs = f'{step.a}% of {step.b}'
  else:
    lhs = f'{step.a}{step.op}{step.b}'
  return f'{lhs}={step.value}'


def solution(tree: Node) -> str:
  """Step-by-step solution ending with ``The answer is <int>.``"""
  lines = [format_step(s) for s in trace(tree)]
  lines.append(ANSWER_TEMPLATE.format(answer=evaluate(tree)))
  return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class ParsedSolution:
  """What could be read from a solution text."""
  steps: tuple[tuple[str, int], ...]
  answer: Optional[int]


_N = r'-?[0-9]+'
_MAX_STEP_LINE_CHARS = 1000
_STEP_LINE_RE = re.compile(rf'(.+?)\s*=\s*({_N})', re.ASCII)
_ANSWER_LINE_RE = re.compile(rf'The answer is ({_N})\.?', re.ASCII)
_STEP_EXPR_RES = (
    (re.compile(rf'({_N})\s*([-+*/])\s*({_N})', re.ASCII), None),
    (re.compile(rf'({_N})\s+(mod)\s+({_N})', re.ASCII), None),
    (re.compile(rf'(min|max)\(\s*({_N})\s*,\s*({_N})\s*\)', re.ASCII), 'fn'),
    (re.compile(rf'({_N})(%)\s*of\s+({_N})', re.ASCII), None),
)


def parse_solution(text: Any) -> ParsedSolution:
  """Reads ``expr=value`` steps and the first answer line; never raises.

  Lines after the first answer line are ignored, as are lines that are
  neither steps nor the answer.
  """
  steps, answer = [], None
  try:
    for line in str(text).splitlines():
      line = line.strip()
      if len(line) > _MAX_STEP_LINE_CHARS:
        continue  # no real step is this long; the step regex is quadratic in line length
      m = _ANSWER_LINE_RE.fullmatch(line)
      if m is not None:
        answer = _safe_int(m[1])
        if answer is not None:
          break
        continue
      m = _STEP_LINE_RE.fullmatch(line)
      if m is not None:
        value = _safe_int(m[2])
        if value is not None:
          steps.append((m[1].strip(), value))
  except Exception:  # pylint: disable=broad-except
    pass  # Tolerance is the contract: keep whatever was read.
  return ParsedSolution(tuple(steps), answer)


def parse_step(expr: str) -> Optional[tuple[str, int, int]]:
  """(op, a, b) of one step's left-hand side (``12+7`` -> ('+', 12, 7), ``min(4,9)``,
  ``20% of 50``); None if it is not a well-formed step."""
  try:
    for regex, kind in _STEP_EXPR_RES:
      m = regex.fullmatch(expr.strip())
      if m is None:
        continue
      if kind == 'fn':
        op, a, b = m[1], m[2], m[3]
      else:
        a, op, b = m[1], m[2], m[3]
      a, b = _safe_int(a), _safe_int(b)
      if a is None or b is None:
        return None
      return op, a, b
  except Exception:  # pylint: disable=broad-except
    return None
  return None


def evaluate_step(expr: str) -> Optional[int]:
  """Value of one step's left-hand side (``12+7``, ``min(4,9)``); None if not
  a well-formed step or undefined."""
  parsed = parse_step(expr)
  if parsed is None:
    return None
  try:
    return apply_op(*parsed)
  except Exception:  # pylint: disable=broad-except
    return None


_COMMUTATIVE = frozenset({'+', '*', 'min', 'max'})


def first_wrong_step(tree: Node, steps: Sequence[str]) -> Optional[int]:
  """The oracle's exact step check: index of the first wrong line of a solution, or None.

  `steps` are the solution's lines (``a op b=v`` steps, then ``The answer is N.``). The tree
  is simulated: a step is right if it computes, with its true value, a node of the tree
  whose operands are literals or nodes already computed (either operand order for + * min
  max); repeating an already computed node is harmless. The answer line is right if it
  states the tree's value; lines after it are not checked. Any other line (unparseable, a
  value that is not in the tree, a wrong result) is wrong. A solution whose lines are all
  right but that never states the answer returns ``len(steps)``: no prefix is wrong, the
  solution is unfinished.
  """
  nodes = []  # every BinOp, post-order

  def visit(node):
    if isinstance(node, BinOp):
      visit(node.left)
      visit(node.right)
      nodes.append(node)
  visit(tree)
  # Keyed by the (frozen, structurally equal) node: equal subtrees, e.g. both (3+4) of
  # (3+4)*(3+4), are one computation.
  true_value = {}
  for node in nodes:
    try:
      true_value[node] = evaluate(node)
    except ArithError:
      true_value[node] = None
  done: set = set()

  def operand(child) -> Optional[int]:
    if isinstance(child, Num):
      return child.value
    return true_value[child] if child in done else None

  answer = evaluate(tree)
  for i, line in enumerate(steps):
    line = line.strip()
    m = _ANSWER_LINE_RE.fullmatch(line)
    if m is not None:
      return None if _safe_int(m[1]) == answer else i
    m = _STEP_LINE_RE.fullmatch(line) if len(line) <= _MAX_STEP_LINE_CHARS else None
    parsed = parse_step(m[1]) if m is not None else None
    if parsed is None:
      return i
    op, a, b = parsed
    value = _safe_int(m[2])
    match = None
    for node in nodes:
      if node.op != op or true_value[node] != value:
        continue
      x, y = operand(node.left), operand(node.right)
      if x is None or y is None:
        continue
      if (x, y) == (a, b) or (op in _COMMUTATIVE and (y, x) == (a, b)):
        match = node
        if node not in done:
          break  # prefer a pending node over a repeat
    if match is None:
      return i
    done.add(match)
  return len(steps)


def _safe_int(digits: str) -> Optional[int]:
  try:
    return int(digits)
  except ValueError:  # Over Python's int-from-str digit limit.
    return None


# ---------------------------------------------------------------------------
# Problems and records.


@dataclasses.dataclass(frozen=True)
class Problem:
  """A question with everything the oracle knows about it."""
  text: str
  tree: Node
  answer: int
  solution: str
  form: str
  skills: tuple[str, ...]
  num_steps: int
  max_digits: int

  def to_record(self) -> dict[str, str]:
    """Training record: ``PROMPT_TEMPLATE`` prompt, solution completion."""
    return {'prompt': PROMPT_TEMPLATE.format(question=self.text),
            'completion': self.solution}

  @classmethod
  def from_record(cls, record: Mapping[str, str]) -> 'Problem':
    """Inverse of ``to_record`` (the completion is recomputed, not trusted)."""
    question = prompt_question(record['prompt'])
    if question is None:
      raise ParseError('prompt does not follow PROMPT_TEMPLATE')
    return problem_from_text(question)


def prompt_question(prompt: str) -> Optional[str]:
  """The question inside a ``PROMPT_TEMPLATE`` prompt; None for any other prompt."""
  m = _PROMPT_RE.fullmatch(prompt)
  return m['q'] if m else None


_PROMPT_RE = re.compile(
    re.escape(PROMPT_TEMPLATE).replace(re.escape('{question}'), '(?P<q>.*)'),
    re.DOTALL)


def _build(text: str, tree: Node, form: str) -> Problem:
  return Problem(text=text, tree=tree, answer=evaluate(tree),
                 solution=solution(tree), form=form, skills=skills(tree),
                 num_steps=num_ops(tree), max_digits=max_digits(tree))


def make_problem(tree: Node, form: str = 'plain',
                 rng: Optional[random.Random] = None) -> Problem:
  """Renders a tree as a problem; raises ArithError if it is undefined."""
  return _build(render(tree, form, rng), tree, form)


def problem_from_text(text: str) -> Problem:
  """A problem from question text, kept verbatim.

  Raises:
    ParseError: not in the controlled language.
    ArithError: parses but some op is undefined.
  """
  tree, form = parse_with_form(text)
  return _build(text, tree, form)


# ---------------------------------------------------------------------------
# Generation.


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """Knobs of a problem distribution.

  Attributes:
    name: split name.
    min_ops: fewest ops (solution steps).
    max_ops: most ops.
    min_digits: fewest digits of a drawn literal.
    max_digits: most digits of a drawn literal (divisors and percents are
      derived, so they may fall outside the range).
    ops: ops the generator may use.
    word_prob: probability of the word form.
    max_value: bound on every intermediate value; all values are >= 0.
  """
  name: str
  min_ops: int
  max_ops: int
  min_digits: int
  max_digits: int
  ops: tuple[str, ...] = OPS
  word_prob: float = 0.5
  max_value: int = 10**6

  def __post_init__(self):
    if not 0 <= self.min_ops <= self.max_ops:
      raise ValueError(f'bad op range {self.min_ops}..{self.max_ops}')
    if not 1 <= self.min_digits <= self.max_digits <= MAX_LITERAL_DIGITS:
      raise ValueError(f'bad digit range {self.min_digits}..{self.max_digits}')
    if not self.ops or any(op not in OPS for op in self.ops):
      raise ValueError(f'bad ops {self.ops}')


IN_DIST = SplitSpec('in_dist', min_ops=1, max_ops=3, min_digits=1,
                    max_digits=2, max_value=10_000)
OOD = SplitSpec('ood', min_ops=4, max_ops=6, min_digits=2, max_digits=3,
                max_value=10**6)
SPLITS = {'in_dist': IN_DIST, 'ood': OOD}

_GEN_ATTEMPTS = 50
# Used when `mutate` combines without a given partner.
_PARTNER_SPEC = SplitSpec('partner', 1, 1, 1, 2, max_value=10_000)


class _Retry(Exception):
  """A local construction failed; the caller draws again."""


def _digit_bounds(digits: int) -> tuple[int, int]:
  # Single digits start at 1: zero literals make degenerate steps.
  return (1 if digits == 1 else 10**(digits - 1)), 10**digits - 1


def _draw_literal(rng: random.Random, spec: SplitSpec) -> int:
  return rng.randint(*_digit_bounds(rng.randint(spec.min_digits,
                                                spec.max_digits)))


def _draw_multiple(rng: random.Random, spec: SplitSpec, step: int) -> int:
  digits = list(range(spec.min_digits, spec.max_digits + 1))
  rng.shuffle(digits)
  for d in digits:
    lo, hi = _digit_bounds(d)
    first = -(-lo // step) * step
    if first <= hi:
      return rng.randrange(first, hi + 1, step)
  raise _Retry()


def _gen_tree(rng: random.Random, spec: SplitSpec,
              n_ops: int) -> tuple[Node, int]:
  """A valid tree with exactly ``n_ops`` ops, and its value."""
  if n_ops == 0:
    value = _draw_literal(rng, spec)
    return Num(value), value
  for _ in range(_GEN_ATTEMPTS):
    try:
      tree, value = _gen_op(rng, spec, rng.choice(spec.ops), n_ops - 1)
    except _Retry:
      continue
    if 0 <= value <= spec.max_value:
      return tree, value
  # Reached only when the drawn ops kept failing (e.g. a spec of just '/'):
  # min/max cannot leave [0, max_value], '+' is the last resort.
  op = next((o for o in ('max', 'min', '+') if o in spec.ops), '+')
  left, lv = _gen_tree(rng, spec, n_ops - 1)
  right, rv = _gen_tree(rng, spec, 0)
  return BinOp(op, left, right), apply_op(op, lv, rv)


def _gen_op(rng: random.Random, spec: SplitSpec, op: str,
            n: int) -> tuple[Node, int]:
  """One node of type ``op`` whose children hold ``n`` ops in total."""
  hi_literal = 10**spec.max_digits - 1
  lo_literal = _digit_bounds(spec.min_digits)[0]
  if op == '%':
    # The percent is always a literal; the base carries the sub-steps.
    if n == 0:
      p = rng.choice(PERCENTS)
      x = _draw_multiple(rng, spec, 100 // math.gcd(p, 100))
      right = Num(x)
    else:
      right, x = _gen_tree(rng, spec, n)
      ps = [p for p in PERCENTS if (p * x) % 100 == 0]
      if not ps:
        raise _Retry()
      p = rng.choice(ps)
    return BinOp('%', Num(p), right), p * x // 100
  n_left = rng.randint(0, n)
  n_right = n - n_left
  if op == '/':
    if n_right == 0 and n_left > 0:
      left, a = _gen_tree(rng, spec, n_left)
      divisors = [k for k in range(max(2, lo_literal), min(a, hi_literal) + 1)
                  if a % k == 0]
      if not divisors:
        raise _Retry()
      b = rng.choice(divisors)
      return BinOp('/', left, Num(b)), a // b
    if n_right == 0:
      b = max(2, _draw_literal(rng, spec))
      right = Num(b)
    else:
      right, b = _gen_tree(rng, spec, n_right)
      if b < 2:
        raise _Retry()
    if n_left == 0:
      a = _draw_multiple(rng, spec, b)
      return BinOp('/', Num(a), right), a // b
    for _ in range(8):
      left, a = _gen_tree(rng, spec, n_left)
      if a % b == 0:
        return BinOp('/', left, right), a // b
    raise _Retry()
  left, a = _gen_tree(rng, spec, n_left)
  if op == 'mod' and n_right == 0:
    # A divisor below the dividend keeps the remainder from being trivial.
    lo, hi = max(2, lo_literal), min(hi_literal, a - 1)
    if hi < lo:
      raise _Retry()
    b = rng.randint(lo, hi)
    return BinOp('mod', left, Num(b)), a % b
  right, b = _gen_tree(rng, spec, n_right)
  if op == 'mod' and b < 2:
    raise _Retry()
  if op == '-' and a < b:
    left, right, a, b = right, left, b, a
  return BinOp(op, left, right), apply_op(op, a, b)


def generate(rng: random.Random, spec: SplitSpec) -> Problem:
  """Draws one problem from a split's distribution."""
  tree, _ = _gen_tree(rng, spec, rng.randint(spec.min_ops, spec.max_ops))
  form = 'word' if rng.random() < spec.word_prob else 'plain'
  return make_problem(tree, form, rng)


def make_split(name: str, n: int, seed: int) -> list[Problem]:
  """``n`` problems of split ``name`` ('in_dist' or 'ood'), fixed by seed."""
  if name not in SPLITS:
    raise ValueError(f'unknown split {name!r}; known: {sorted(SPLITS)}')
  # String seeding hashes with sha512, so it is stable across processes.
  rng = random.Random(f'qdc_jax.arith/{name}/{seed}')
  return [generate(rng, SPLITS[name]) for _ in range(n)]


# ---------------------------------------------------------------------------
# Mutations.


@dataclasses.dataclass(frozen=True)
class Mutation:
  """A child problem and how it was derived from its parent."""
  kind: str
  child: Problem


Path = tuple[int, ...]


def _nodes(tree: Node, path: Path = ()) -> list[tuple[Path, Node]]:
  out = [(path, tree)]
  if isinstance(tree, BinOp):
    out += _nodes(tree.left, path + (0,)) + _nodes(tree.right, path + (1,))
  return out


def _get(tree: Node, path: Path) -> Node:
  for side in path:
    tree = tree.right if side else tree.left
  return tree


def _replace(tree: Node, path: Path, new: Node) -> Node:
  if not path:
    return new
  if path[0] == 0:
    return dataclasses.replace(tree, left=_replace(tree.left, path[1:], new))
  return dataclasses.replace(tree, right=_replace(tree.right, path[1:], new))


def _admissible(tree: Node) -> bool:
  """Children obey the generator's invariants: defined, non-negative, small."""
  if not 1 <= num_ops(tree) <= MAX_MUTATION_OPS:
    return False
  if max_digits(tree) > MAX_LITERAL_DIGITS:
    return False
  try:
    steps = trace(tree)
  except ArithError:
    return False
  return all(0 <= s.value <= MAX_MUTATION_VALUE for s in steps)


def _new_literal(rng: random.Random, digits: int) -> int:
  return rng.randint(*_digit_bounds(max(1, min(digits, 3))))


def _change_number(rng: random.Random, tree: Node, other: Optional[Node],
                   ops: tuple[str, ...]) -> Optional[Node]:
  del other, ops
  leaves = [(path, node) for path, node in _nodes(tree)
            if isinstance(node, Num)]
  path, leaf = rng.choice(leaves)
  parent = _get(tree, path[:-1]) if path else None
  if isinstance(parent, BinOp) and parent.op == '%' and path[-1] == 0:
    value = rng.choice([p for p in PERCENTS if p != leaf.value])
  else:
    value = _new_literal(rng, len(str(abs(leaf.value))))
  if value == leaf.value:
    return None
  return _replace(tree, path, Num(value))


def _add_step(rng: random.Random, tree: Node, other: Optional[Node],
              ops: tuple[str, ...]) -> Optional[Node]:
  del other
  path, node = rng.choice(_nodes(tree))
  try:
    value = evaluate(node)
  except ArithError:
    return None
  op = rng.choice(ops)
  digits = max_digits(tree)
  if op == '%':
    ps = [p for p in PERCENTS if (p * value) % 100 == 0]
    if not ps:
      return None
    new = BinOp('%', Num(rng.choice(ps)), node)
  else:
    if op == '/':
      pool = [k for k in range(2, min(value, 99) + 1) if value % k == 0]
    elif op == 'mod':
      pool = list(range(2, max(2, min(value - 1, 99)) + 1))
    elif op == '-':
      pool = list(range(1, min(value, 99) + 1))
    else:
      pool = [_new_literal(rng, rng.randint(1, digits))]
    if not pool:
      return None
    new = BinOp(op, node, Num(rng.choice(pool)))
  return _replace(tree, path, new)


def _remove_step(rng: random.Random, tree: Node, other: Optional[Node],
                 ops: tuple[str, ...]) -> Optional[Node]:
  del other, ops
  # A step can go when one operand is a literal: the node collapses onto the
  # other operand (for '%', onto the base).
  options = []
  for path, node in _nodes(tree):
    if isinstance(node, BinOp):
      if isinstance(node.right, Num) and node.op != '%':
        options.append((path, node.left))
      if isinstance(node.left, Num):
        options.append((path, node.right))
  if not options:
    return None
  path, keep = rng.choice(options)
  return _replace(tree, path, keep)


def _swap_operator(rng: random.Random, tree: Node, other: Optional[Node],
                   ops: tuple[str, ...]) -> Optional[Node]:
  del other
  inner = [(p, n) for p, n in _nodes(tree) if isinstance(n, BinOp)]
  if not inner:
    return None
  path, node = rng.choice(inner)
  choices = [op for op in ops if op != node.op]
  if not choices:
    return None
  return _replace(tree, path, dataclasses.replace(node, op=rng.choice(choices)))


def _combine(rng: random.Random, tree: Node, other: Optional[Node],
             ops: tuple[str, ...]) -> Optional[Node]:
  if other is None:
    other, _ = _gen_tree(rng, _PARTNER_SPEC, 1)
  op = rng.choice([o for o in ('+', '-', '*', 'min', 'max') if o in ops] or
                  ['+'])
  a, b = tree, other
  try:
    if op == '-' and evaluate(a) < evaluate(b):
      a, b = b, a
  except ArithError:
    return None
  return BinOp(op, a, b)


_MUTATORS: dict[str, Callable[..., Optional[Node]]] = {
    'change_number': _change_number,
    'add_step': _add_step,
    'remove_step': _remove_step,
    'swap_operator': _swap_operator,
    'combine': _combine,
}


def mutate(rng: random.Random, parent: Problem, kind: Optional[str] = None,
           other: Optional[Problem] = None, ops: Sequence[str] = OPS,
           max_tries: int = 32) -> Mutation:
  """Derives a child problem (same form as the parent) with its oracle answer.

  Args:
    rng: all choices come from it, so a fixed seed gives a fixed child.
    parent: the problem to mutate.
    kind: one of ``MUTATION_KINDS``; None tries kinds in a random order.
    other: partner for 'combine'; None combines with a fresh one-op problem.
    ops: ops that add_step / swap_operator / combine may introduce.
    max_tries: draws per kind before giving up on it.

  Returns:
    The mutation; its child is valid (defined, every value in
    [0, MAX_MUTATION_VALUE], at most MAX_MUTATION_OPS ops) and differs from
    the parent's tree.

  Raises:
    MutationError: no valid child within the budget.
    ValueError: unknown kind.
  """
  if kind is not None and kind not in _MUTATORS:
    raise ValueError(f'unknown mutation kind {kind!r}')
  kinds = [kind] if kind else rng.sample(MUTATION_KINDS, len(MUTATION_KINDS))
  other_tree = other.tree if other is not None else None
  for k in kinds:
    for _ in range(max_tries):
      child = _MUTATORS[k](rng, parent.tree, other_tree, tuple(ops))
      if child is None or child == parent.tree or not _admissible(child):
        continue
      return Mutation(k, make_problem(child, parent.form, rng))
  raise MutationError(f'no valid child for kinds {kinds}')


# ---------------------------------------------------------------------------
# Oracle.


@dataclasses.dataclass(frozen=True)
class OracleResult:
  """What the oracle knows about a (possibly model-written) problem.

  Attributes:
    parses: the text is in the controlled language.
    true_answer: its exact value; None if it does not parse or is undefined
      (e.g. inexact division).
    valid: parses, is defined, and the intended answer equals the true one.
    skills: skills of the parsed tree.
    steps: number of ops of the parsed tree.
    reason: why it is not valid ('' when valid).
  """
  parses: bool
  true_answer: Optional[int]
  valid: bool
  skills: tuple[str, ...] = ()
  steps: int = 0
  reason: str = ''


_INT_TEXT_RE = re.compile(r'[+-]?[0-9]+(?:\.0*)?', re.ASCII)


def coerce_answer(answer: Any) -> Optional[int]:
  """An intended answer as an int, or None if it is not an integer.

  Accepts ints, integral finite floats, and strings such as '57', '-3',
  '57.0' or a solution whose answer line reads 'The answer is 57.'.
  """
  try:
    if answer is None or isinstance(answer, bool):
      return None
    if isinstance(answer, numbers.Integral):
      return int(answer)
    if isinstance(answer, numbers.Real):
      x = float(answer)
      return int(x) if math.isfinite(x) and x == int(x) else None
    if isinstance(answer, str):
      s = answer.strip()
      if _INT_TEXT_RE.fullmatch(s):
        return _safe_int(s.split('.')[0])
      return parse_solution(s).answer
  except Exception:  # pylint: disable=broad-except
    return None
  return None


def oracle(problem_text: Any, intended_answer: Any) -> OracleResult:
  """Checks any text and intended answer; never raises."""
  try:
    tree = parse(problem_text)
  except Exception as e:  # pylint: disable=broad-except
    return OracleResult(False, None, False, reason=f'parse: {e}'[:200])
  try:
    steps, found = num_ops(tree), skills(tree)
  except Exception as e:  # pylint: disable=broad-except
    return OracleResult(True, None, False, reason=f'skills: {e}'[:200])
  try:
    true_answer = evaluate(tree)
  except Exception as e:  # pylint: disable=broad-except
    return OracleResult(True, None, False, found, steps,
                        reason=f'undefined: {e}'[:200])
  intended = coerce_answer(intended_answer)
  valid = intended is not None and intended == true_answer
  reason = '' if valid else ('intended answer is not an integer'
                             if intended is None else 'wrong intended answer')
  return OracleResult(True, true_answer, valid, found, steps, reason)
