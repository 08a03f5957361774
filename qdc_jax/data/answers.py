"""Final-answer extraction and equivalence for model completions.

Three steps, cheapest first:

1. ``extract_answer`` pulls the final answer out of a completion or reference
   (GSM8K ``#### 42``, LaTeX ``\\boxed{..}``/``\\fbox{..}``, the lab's
   ``The answer is <int>.`` line, ``the (final) answer is X``).
2. ``normalize_number`` reads it as an exact ``fractions.Fraction`` when it is
   a number (commas, currency, ``%``, units, fractions, ``\\frac``, scientific
   notation).
3. ``answers_equal`` compares numbers exactly, else compares lightly
   normalised LaTeX strings, else asks math-verify (symbolic equivalence) in a
   separate worker process with a hard deadline.

Everything here reads untrusted model text, so every public function never
raises and runs in time linear in its input: scans are single passes with an
explicit stack (no recursion), regexes have no nested ambiguous quantifiers,
and numbers longer than ``MAX_NUMBER_DIGITS`` digits are not converted
(Python's int parsing is super-linear and capped at 4300 digits anyway).
"""
from __future__ import annotations

import atexit
import fractions
import importlib.util
import json
import math
import numbers
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import Any, Optional

# Numbers with more digits than this are compared as strings, not parsed.
MAX_NUMBER_DIGITS = 1000
# Scientific exponents beyond this are not expanded (10**10**9 is no number
# anyone means, and building it would stall the process).
MAX_EXPONENT = 1000
# A decimal written with at least this many fractional digits is taken to be
# a rounding of its value (0.333333 == 1/3); shorter decimals must match
# exactly (0.333 != 1/3, 0.5 == 1/2).
MIN_ROUNDED_DECIMALS = 6
# Answers longer than this are never sent to math-verify: parsing them is what
# can take unbounded time, and real final answers are short.
MAX_VERIFY_CHARS = 1000
# Starting the math-verify worker imports sympy (about 1-2 s, more on a busy
# machine). This one-off cost has its own bound, separate from `timeout_s`.
WORKER_START_TIMEOUT_S = 60.0


def _as_text(x: Any) -> Optional[str]:
  """A string for str/number inputs; None for None, bools and non-finite."""
  if x is None or isinstance(x, bool):
    return None
  if isinstance(x, str):
    return x
  if isinstance(x, fractions.Fraction):
    return f'{x.numerator}/{x.denominator}'
  if isinstance(x, numbers.Integral):
    return str(int(x))
  if isinstance(x, numbers.Real):
    value = float(x)
    # repr gives the shortest decimal that round-trips: 0.1, not 0.1000..01.
    return repr(value) if math.isfinite(value) else None
  return str(x)


# ---------------------------------------------------------------------------
# Extraction.

_BOX_COMMANDS = ('\\boxed', '\\fbox')
_ANSWER_PHRASE_RE = re.compile(r'\banswer\s+is\b', re.IGNORECASE)
_LAB_LINE_PREFIX = 'The answer is'
_LAB_LINE_RE = re.compile(r'The answer is (-?[0-9]+)\.?', re.ASCII)
_SENTENCE_END_RE = re.compile(r'\.\s')


def _brace_matches(text: str, start: int) -> dict[int, int]:
  """Index of each '{' at or after ``start`` -> index of its matching '}'.

  One pass with an explicit stack, so 100k nested braces cost 100k steps and
  no recursion. A backslash escapes the next character, so ``\\{`` and
  ``\\}`` (set braces) are not grouping braces.
  """
  matches, stack, i, n = {}, [], start, len(text)
  while i < n:
    ch = text[i]
    if ch == '\\':
      i += 2
      continue
    if ch == '{':
      stack.append(i)
    elif ch == '}' and stack:
      matches[stack.pop()] = i
    i += 1
  return matches


def _command_positions(text: str, command: str) -> list[int]:
  """End positions of every occurrence of a LaTeX command name."""
  out, i = [], text.find(command)
  while i >= 0:
    end = i + len(command)
    # `\boxedx` is another command; `\boxed{`, `\boxed 5` are ours.
    if end >= len(text) or not text[end].isalpha():
      out.append(end)
    i = text.find(command, end)
  return out


def _last_boxed(text: str) -> Optional[str]:
  """Content of the last complete ``\\boxed{..}``/``\\fbox{..}``."""
  ends = sorted(p for c in _BOX_COMMANDS for p in _command_positions(text, c))
  if not ends:
    return None
  matches = _brace_matches(text, ends[0])
  for end in reversed(ends):
    j = end
    while j < len(text) and text[j] in ' \t':
      j += 1
    if j < len(text) and text[j] == '{':
      close = matches.get(j)
      # Unbalanced (a truncated completion): an earlier box may be complete.
      content = text[j + 1:close].strip() if close is not None else ''
    elif j > end:
      # `\boxed 5`: the argument is the next token.
      k = j
      while k < len(text) and not text[k].isspace() and text[k] != '$':
        k += 1
      content = text[j:k]
    else:
      content = ''
    content = _strip_answer(content)
    if content:
      return content
  return None


def _strip_answer(value: str) -> str:
  """Drops surrounding whitespace, markdown bold and trailing periods."""
  value = value.strip().strip('*').strip()
  while value.endswith('.'):
    value = value[:-1].rstrip()
  return value


def _unwrap_math(value: str) -> str:
  """The inside of ``$..$``, ``\\(..\\)`` or ``\\[..\\]`` if value opens one."""
  for left, right in (('$$', '$$'), ('$', '$'), ('\\(', '\\)'),
                      ('\\[', '\\]')):
    if value.startswith(left):
      close = value.find(right, len(left))
      if close > len(left):
        return value[len(left):close].strip()
  return value


def _last_gsm8k(text: str) -> Optional[str]:
  i = text.rfind('####')
  if i < 0:
    return None
  end = text.find('\n', i)
  value = _strip_answer(text[i + 4:end if end >= 0 else len(text)])
  return value or None


def _first_lab_line(text: str) -> Optional[str]:
  # First, not last: arith.parse_solution (hence the lab's oracle and
  # coerce_answer) stops at the first answer line, and grading must agree.
  if _LAB_LINE_PREFIX not in text:
    return None
  for line in text.splitlines():
    line = line.strip()
    if line.startswith(_LAB_LINE_PREFIX):
      m = _LAB_LINE_RE.fullmatch(line)
      if m is not None:
        return m[1]
  return None


def _last_answer_phrase(text: str) -> Optional[str]:
  for m in reversed(list(_ANSWER_PHRASE_RE.finditer(text))):
    end = text.find('\n', m.end())
    value = text[m.end():end if end >= 0 else len(text)].strip()
    value = value.lstrip(':').strip().strip('*').strip()
    value = _unwrap_math(value)
    cut = _SENTENCE_END_RE.search(value)
    if cut is not None:
      value = value[:cut.start()]
    value = _strip_answer(value)
    if value:
      return value
  return None


def extract_answer(text: Any) -> Optional[str]:
  """The final answer written in a completion or reference solution.

  Formats, in priority order:
    1. the last complete ``\\boxed{..}`` or ``\\fbox{..}`` (nested braces
       allowed; an unbalanced last box falls back to the previous one);
    2. the last GSM8K ``#### X`` (rest of that line);
    3. the FIRST lab answer line ``The answer is <int>.`` (a whole line), as
       ``arith.parse_solution`` reads it;
    4. the last ``... answer is X`` phrase (case-insensitive, so also
       ``the final answer is X``): the rest of its line up to the end of the
       sentence, with ``$..$`` delimiters and markdown bold removed.
  A trailing period is stripped. The raw string is returned; see
  ``normalize_number`` for its value. Text with none of these formats gives
  None (no guessing from the last number).

  Args:
    text: completion or reference; non-strings are converted with ``str``.

  Returns:
    The answer string, or None. Never raises; linear time.
  """
  try:
    if text is None:
      return None
    if not isinstance(text, str):
      text = str(text)
    for finder in (_last_boxed, _last_gsm8k, _first_lab_line,
                   _last_answer_phrase):
      value = finder(text)
      if value:
        return value
  except Exception:  # pylint: disable=broad-except
    return None  # Never raising is the contract; unreadable means no answer.
  return None


# ---------------------------------------------------------------------------
# Numbers.

_UNWRAP_RE = re.compile(
    r'\\(?:text(?:bf|rm|normal|it)?|mathrm|mathbf|mbox)\s*\{([^{}]*)\}')
_REPLACEMENTS = (
    ('\\left', ''), ('\\right', ''), ('\\displaystyle', ''),
    ('\\!', ''), ('\\,', ''), ('\\;', ''), ('\\:', ''), ('\\ ', ' '),
    ('~', ' '), ('\\dfrac', '\\frac'), ('\\tfrac', '\\frac'),
    ('\\$', '$'), ('\\%', '%'), ('{,}', ','), ('\u2212', '-'),
    ('\\(', ''), ('\\)', ''), ('\\[', ''), ('\\]', ''),
)
_ASSIGNMENT_RE = re.compile(r'[A-Za-z]\s*=\s*')
# Thousands groups only in the canonical 1,234,567 form, so "1,23" or a list
# "1, 2" is not read as one number.
_DECIMAL_RE = re.compile(
    r'(\d{1,3}(?:,\d{3})+|\d+)?(?:\.(\d+))?'
    r'(?:[eE]([+-]?\d{1,5})(?![0-9])|'
    r'\s*(?:\\times|\\cdot|\u00d7)\s*10\s*\^\s*\{?\s*([+-]?\d{1,5})\s*\}?)?')
_SIGNED_DECIMAL_RE = re.compile(r'\s*([+-]?)\s*')
_CURRENCY = '$\u20ac\u00a3'
# Tails that leave the value unchanged. "50%" is read as 50, not 0.5: GSM8K
# and the lab write percent answers as bare numbers, so "50%" must match "50".
_SYMBOL_TAILS = ('%', '^{\\circ}', '^\\circ', '\u00b0')
_UNIT_RE = re.compile(r"[A-Za-z][A-Za-z .'/]*(?:\^\{?[23]\}?|[\u00b2\u00b3])?")
# Words after a number that change its value or make it an expression, so
# "5 thousand" or "3 and a half" is not 5 or 3 with a unit.
_NOT_UNIT_WORDS = frozenset((
    'i', 'j', 'e', 'x', 'y', 'z', 'n', 'k', 'pi', 'sqrt', 'and', 'or',
    'plus', 'minus', 'times', 'over', 'divided', 'half', 'halves', 'third',
    'thirds', 'quarter', 'quarters', 'hundred', 'thousand', 'million',
    'billion', 'trillion', 'dozen', 'squared', 'cubed'))


def _clean_latex(s: str) -> str:
  """Drops LaTeX that does not change a value: spacing, sizing, ``\\text``."""
  s = _UNWRAP_RE.sub(r'\1', s)
  for old, new in _REPLACEMENTS:
    if old in s:
      s = s.replace(old, new)
  return s.strip()


# (value, fractional digits written, end position) of a number read in text.
_Read = tuple[fractions.Fraction, int, int]


def _read_decimal(s: str, pos: int) -> Optional[_Read]:
  """An unsigned decimal at ``pos``: (value, fractional digits, end)."""
  m = _DECIMAL_RE.match(s, pos)
  int_part, frac_part = m[1] or '', m[2] or ''
  if not int_part and not frac_part:
    return None
  digits = int_part.replace(',', '')
  if len(digits) + len(frac_part) > MAX_NUMBER_DIGITS:
    return None
  value = fractions.Fraction(int(digits or '0'))
  if frac_part:
    value += fractions.Fraction(int(frac_part), 10**len(frac_part))
  decimals = len(frac_part)
  exponent = m[3] if m[3] is not None else m[4]
  if exponent is not None:
    e = int(exponent)
    if abs(e) > MAX_EXPONENT:
      return None
    value *= fractions.Fraction(10)**e
    decimals = max(0, decimals - e)
  return value, decimals, m.end()


def _read_signed_decimal(s: str) -> Optional[tuple[fractions.Fraction, int]]:
  """A whole string that is one signed decimal (e.g. a \\frac argument)."""
  m = _SIGNED_DECIMAL_RE.match(s)
  got = _read_decimal(s, m.end())
  if got is None or s[got[2]:].strip():
    return None
  value, decimals, _ = got
  return (-value if m[1] == '-' else value), decimals


def _read_frac(s: str, pos: int) -> Optional[_Read]:
  """``\\frac{a}{b}`` or ``\\frac12`` at ``pos``: (value, decimals, end)."""
  if not s.startswith('\\frac', pos):
    return None
  pos += len('\\frac')
  parts = []
  for _ in range(2):
    while pos < len(s) and s[pos] == ' ':
      pos += 1
    if pos >= len(s):
      return None
    if s[pos] == '{':
      close = s.find('}', pos)
      if close < 0:
        return None
      got = _read_signed_decimal(s[pos + 1:close])
      pos = close + 1
    elif s[pos].isdigit():
      got = (fractions.Fraction(int(s[pos])), 0)
      pos += 1
    else:
      return None
    if got is None:
      return None
    parts.append(got)
  (num, num_dec), (den, den_dec) = parts
  if den == 0:
    return None
  return num / den, max(num_dec, den_dec), pos


def _is_unit_tail(rest: str) -> bool:
  """Whether what follows a number only names its unit."""
  rest = rest.strip()
  for symbol in _SYMBOL_TAILS:
    if rest.startswith(symbol):
      rest = rest[len(symbol):].strip()
      break
  if not rest:
    return True
  if _UNIT_RE.fullmatch(rest) is None:
    return False
  words = rest.replace('.', ' ').replace('/', ' ').lower().split()
  return not any(w in _NOT_UNIT_WORDS for w in words)


def _parse_number(text: str) -> Optional[tuple[fractions.Fraction, int]]:
  """(exact value, fractional digits written) or None; see normalize_number."""
  s = _strip_answer(_clean_latex(text)).replace('$', '')
  s = s.strip()
  m = _ASSIGNMENT_RE.match(s)
  if m is not None:
    s = s[m.end():]
  if s.startswith('{') and s.endswith('}'):
    s = s[1:-1].strip()
  # Sign and currency in either order: -$5, $-5, +5.
  negative, pos = False, 0
  for _ in range(2):
    while pos < len(s) and s[pos] in ' ' + _CURRENCY:
      pos += 1
    if pos < len(s) and s[pos] in '+-' and not negative:
      negative = s[pos] == '-'
      pos += 1
  while pos < len(s) and s[pos] in ' ' + _CURRENCY:
    pos += 1
  got = _read_frac(s, pos)
  if got is None:
    got = _read_decimal(s, pos)
    if got is None:
      return None
    value, decimals, pos = got
    mixed = _read_frac(s, pos) if decimals == 0 and '.' not in s[:pos] else None
    if mixed is not None and mixed[0] >= 0:
      # 1\frac12 is one and a half.
      value, pos = value + mixed[0], mixed[2]
    else:
      j = pos
      while j < len(s) and s[j] == ' ':
        j += 1
      if j < len(s) and s[j] == '/':
        j += 1
        while j < len(s) and s[j] == ' ':
          j += 1
        den = _read_decimal(s, j)
        if den is None or den[0] == 0:
          return None
        value, decimals, pos = value / den[0], max(decimals, den[1]), den[2]
  else:
    value, decimals, pos = got
  if not _is_unit_tail(s[pos:]):
    return None
  return (-value if negative else value), decimals


def normalize_number(s: Any) -> Optional[fractions.Fraction]:
  """The exact value of a numeric answer, or None if it is not a number.

  Reads: integers and decimals with optional sign (``-``, ``+``, unicode
  minus), thousands commas (``1,234,567.5``; only well-formed groups),
  currency (``$``, ``\\$``, euro, pound), ``%``/``\\%`` (the number itself:
  ``50%`` is 50, matching how GSM8K and the lab write percent answers),
  degrees, trailing unit words (``12 dollars``, ``5 cm``, ``\\text{ km}``;
  words such as ``thousand``, ``and``, ``pi``, ``x`` are not units, so
  ``5 thousand`` is None), ``a/b``, ``\\frac{a}{b}``/``\\dfrac``/
  ``\\tfrac``/``\\frac12``, mixed ``1\\frac{1}{2}``, scientific ``1.5e3`` and
  ``1.5\\times 10^{3}``, ``$..$`` delimiters, a leading ``x =``.

  Numbers with more than ``MAX_NUMBER_DIGITS`` digits or exponents beyond
  ``MAX_EXPONENT`` give None, so huge inputs stay fast. Never raises.

  Args:
    s: a string, int, float or Fraction (bools and None give None).

  Returns:
    A Fraction, or None.
  """
  try:
    text = _as_text(s)
    if text is None:
      return None
    got = _parse_number(text)
    return None if got is None else got[0]
  except Exception:  # pylint: disable=broad-except
    return None


def _numbers_match(a: tuple[fractions.Fraction, int],
                   b: tuple[fractions.Fraction, int]) -> bool:
  if a[0] == b[0]:
    return True
  rounded = [d for _, d in (a, b) if d >= MIN_ROUNDED_DECIMALS]
  if not rounded:
    return False
  # Within half a unit in the last place of the coarser rounded side.
  return abs(a[0] - b[0]) <= fractions.Fraction(1, 2 * 10**min(rounded))


def canonical_text(s: str) -> str:
  """Light LaTeX normalisation for string comparison (see answers_equal)."""
  s = _strip_answer(_clean_latex(s)).replace('$', '')
  for symbol in ('^{\\circ}', '^\\circ'):
    s = s.replace(symbol, '')
  return ''.join(s.split())


# ---------------------------------------------------------------------------
# math-verify in a worker process.

# The worker runs math-verify with its own (SIGALRM-based) timeouts disabled:
# the parent's deadline is the real bound, enforced by killing the process,
# which also stops runaway sympy work that a thread could not interrupt.
_WORKER_SOURCE = r'''
import json, logging, sys
logging.disable(logging.CRITICAL)
try:
  from math_verify import parse, verify
except Exception:
  sys.stdout.write('unavailable\n'); sys.stdout.flush(); sys.exit(0)
sys.stdout.write('ready\n'); sys.stdout.flush()
for line in sys.stdin:
  try:
    req = json.loads(line)
    gold = parse('$' + req['ref'] + '$', parsing_timeout=None)
    pred = parse('$' + req['pred'] + '$', parsing_timeout=None)
    ok = bool(gold) and bool(pred) and bool(
        verify(gold, pred, timeout_seconds=None))
  except Exception:
    ok = False
  sys.stdout.write('1\n' if ok else '0\n'); sys.stdout.flush()
'''


class _Verifier:
  """One math-verify worker process per Python process, used under a lock.

  A stateful resource, hence a class: it owns a subprocess that is started on
  first use, killed when a request misses its deadline, and restarted on the
  next request.
  """

  def __init__(self):
    self.lock = threading.Lock()
    self.proc: Optional[subprocess.Popen] = None
    self.pid = os.getpid()
    self.unavailable = False
    self.buffer = b''

  def reset_after_fork(self) -> None:
    # A forked child must not share its parent's worker pipes or a lock some
    # parent thread held at fork time.
    self.lock = threading.Lock()
    self.proc, self.pid, self.buffer = None, os.getpid(), b''

  def kill(self) -> None:
    proc, self.proc, self.buffer = self.proc, None, b''
    if proc is None:
      return
    try:
      proc.kill()
      proc.wait(timeout=5)
    except Exception:  # pylint: disable=broad-except
      pass  # Already gone; nothing left to release.
    for stream in (proc.stdin, proc.stdout):
      try:
        stream.close()
      except Exception:  # pylint: disable=broad-except
        pass

  def _read_line(self, deadline: float) -> Optional[bytes]:
    """One line from the worker by ``deadline``; None on timeout or EOF."""
    fd = self.proc.stdout.fileno()
    while b'\n' not in self.buffer:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        return None
      ready, _, _ = select.select([fd], [], [], remaining)
      if not ready:
        return None
      chunk = os.read(fd, 4096)
      if not chunk:
        return None
      self.buffer += chunk
    line, self.buffer = self.buffer.split(b'\n', 1)
    return line

  def _ensure_started(self, timeout_s: float) -> bool:
    if self.proc is not None and self.proc.poll() is None:
      return True
    self.kill()
    if self.unavailable:
      return False
    self.proc = subprocess.Popen(
        [sys.executable, '-c', _WORKER_SOURCE], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    status = self._read_line(time.monotonic() + timeout_s)
    if status == b'ready':
      return True
    if status == b'unavailable':
      self.unavailable = True
    self.kill()
    return False

  def start(self, timeout_s: float) -> bool:
    if os.getpid() != self.pid:
      self.reset_after_fork()
    if not self.lock.acquire(timeout=max(timeout_s, 0.0)):
      return False
    try:
      return self._ensure_started(timeout_s)
    except Exception:  # pylint: disable=broad-except
      self.kill()
      return False
    finally:
      self.lock.release()

  def verify(self, pred: str, ref: str, timeout_s: float) -> bool:
    """math-verify's verdict, or False if it is not back within timeout_s.

    The deadline covers waiting for the lock and the verification; a cold
    start (first call, or the first after a kill) may add up to
    ``WORKER_START_TIMEOUT_S``.
    """
    if os.getpid() != self.pid:
      self.reset_after_fork()
    deadline = time.monotonic() + timeout_s
    if not self.lock.acquire(timeout=max(timeout_s, 0.0)):
      return False
    try:
      cold = self.proc is None or self.proc.poll() is not None
      if not self._ensure_started(WORKER_START_TIMEOUT_S):
        return False
      if cold:
        # The one-off start-up has its own bound; the verification still gets
        # its full timeout.
        deadline = time.monotonic() + timeout_s
      if time.monotonic() < deadline:
        request = json.dumps({'pred': pred, 'ref': ref}) + '\n'
        self.proc.stdin.write(request.encode())
        self.proc.stdin.flush()
        answer = self._read_line(deadline)
        if answer is not None:
          return answer == b'1'
      # Too late or dead: the worker may be stuck in sympy, so it goes.
      self.kill()
      return False
    except Exception:  # pylint: disable=broad-except
      self.kill()
      return False
    finally:
      self.lock.release()


_VERIFIER = _Verifier()
atexit.register(_VERIFIER.kill)
if hasattr(os, 'register_at_fork'):
  os.register_at_fork(after_in_child=_VERIFIER.reset_after_fork)


def math_verify_available() -> bool:
  """Whether math-verify can be used here (installed, POSIX pipes)."""
  return (os.name == 'posix' and not _VERIFIER.unavailable and
          importlib.util.find_spec('math_verify') is not None)


def start_verifier(timeout_s: float = WORKER_START_TIMEOUT_S) -> bool:
  """Starts the math-verify worker now, so no later call pays its start-up.

  Returns:
    Whether the worker is running.
  """
  try:
    return math_verify_available() and _VERIFIER.start(timeout_s)
  except Exception:  # pylint: disable=broad-except
    return False


# ---------------------------------------------------------------------------
# Equivalence.


def answers_equal(pred: Any, ref: Any, *, timeout_s: float = 2.0) -> bool:
  """Whether a predicted final answer equals the reference answer.

  In order:
    1. Both numbers (``normalize_number``): exact rational equality, so
       ``0.5 == 1/2 == \\frac{1}{2}`` and ``0.333 != 1/3``. A decimal written
       with at least ``MIN_ROUNDED_DECIMALS`` fractional digits is taken as a
       rounding and matches a value within half a unit of its last digit
       (``0.333333 == 1/3``). Two numbers that differ are unequal, final.
    2. Equal strings after light LaTeX normalisation (whitespace, ``$``,
       ``\\left``/``\\right``, ``\\!``, ``\\,``, ``\\text{..}``, ``\\dfrac``,
       trailing period, degrees).
    3. math-verify (symbolic: ``\\sqrt{2}`` vs ``2^{1/2}``, sets, intervals)
       in a worker process, for answers up to ``MAX_VERIFY_CHARS`` long.
       Off-main-thread safe: math-verify's signal-based timeouts are disabled
       and the worker is killed if it has not answered within ``timeout_s``
       (then the answer counts as unequal). If math-verify is not installed,
       or cannot run (no POSIX pipes), this step is skipped: the result is
       the string comparison of step 2.

  Args:
    pred: predicted answer (str, number or None).
    ref: reference answer (str, number or None).
    timeout_s: bound on step 3 (lock wait + verification). The first call in
      a process also starts the worker (up to ``WORKER_START_TIMEOUT_S``);
      call ``start_verifier`` beforehand to pay that up front.

  Returns:
    Whether they are equal; False for None inputs. Never raises.
  """
  try:
    p, r = _as_text(pred), _as_text(ref)
    if p is None or r is None:
      return False
    p_num, r_num = _parse_number(p), _parse_number(r)
    if p_num is not None and r_num is not None:
      return _numbers_match(p_num, r_num)
    p_text, r_text = canonical_text(p), canonical_text(r)
    if not p_text or not r_text:
      return False
    if p_text == r_text:
      return True
    if (len(p) > MAX_VERIFY_CHARS or len(r) > MAX_VERIFY_CHARS or
        not math_verify_available()):
      return False
    return _VERIFIER.verify(p.strip(), r.strip(), timeout_s)
  except Exception:  # pylint: disable=broad-except
    return False


def answer_of_reference(reference: Any) -> Any:
  """A bare answer from a reference that may be a whole solution.

  Strings go through ``extract_answer``; one without any answer format is
  taken as the bare answer itself. Numbers pass through.
  """
  if isinstance(reference, str):
    found = extract_answer(reference)
    return found if found is not None else reference.strip()
  return reference


def is_correct(completion: Any, reference_answer: Any, *,
               timeout_s: float = 2.0) -> bool:
  """Whether a completion's final answer equals the reference answer.

  Args:
    completion: model text; its answer is read by ``extract_answer`` (no
      answer means incorrect).
    reference_answer: a bare answer (``42``, ``'\\frac{1}{2}'``) or a full
      reference solution (``'... #### 42'``), whose answer is extracted.
    timeout_s: passed to ``answers_equal``.

  Returns:
    The verdict. Never raises.
  """
  try:
    pred = extract_answer(completion)
    if pred is None:
      return False
    return answers_equal(pred, answer_of_reference(reference_answer),
                         timeout_s=timeout_s)
  except Exception:  # pylint: disable=broad-except
    return False
