"""Skill-sets: SPARQ's descriptor of a problem, and the diversity measures built on them.

Thesis 4.3.1: the skill-set of a pair (Q, A) is the alphabetically sorted tuple of at most
k=3 skills used to solve Q, drawn from the M=100 most common skills of the seed set, as named
by an annotator model. DIV(set of pairs) = number of unique skills; coverage = number of unique
skill-sets.

Annotators name skills in free text, so everything here is forgiving about spelling (case,
whitespace, `_`/`-`/space are one) and strict about accounting: a named skill that is not in
the vocabulary is never dropped silently; it is returned as unknown and counted by
`SkillCounter`, as are known skills cut because an item named more than k.

The empty skill-set () means "no known skill" (unparseable text, or an annotation outside the
vocabulary). Strategies treat it as one more class; `coverage` leaves it out by default,
because it is not a discovered combination of skills.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Protocol, runtime_checkable

from qdc_jax import registry
from qdc_jax.data import arith

SkillSet = tuple[str, ...]

# k and M of the thesis.
DEFAULT_K = 3
DEFAULT_M = 100

_EDGE_PUNCTUATION = " \t\r\n.,;:!?\"'`*()[]{}<>"
_KEY_SEPARATORS_RE = re.compile(r"[\s_\-]+")


def normalise_skill(raw: Any) -> str:
  """A skill name as stored: lower case, single spaces, no edge punctuation."""
  text = raw if isinstance(raw, str) else str(raw)
  return " ".join(text.lower().split()).strip(_EDGE_PUNCTUATION)


def _key(skill: str) -> str:
  # Annotators write "large numbers", "large_numbers" and "Large-Numbers" for one skill.
  return _KEY_SEPARATORS_RE.sub(" ", normalise_skill(skill)).strip()


@dataclasses.dataclass(frozen=True)
class SkillVocabulary:
  """The M allowed skills, most common first.

  Attributes:
    skills: Canonical spellings, by rank (rank 0 = most common in the seed set).
    counts: Seed-set annotations naming each skill, same order.
  """

  skills: tuple[str, ...]
  counts: tuple[int, ...]

  def __post_init__(self):
    if len(self.skills) != len(self.counts):
      raise ValueError("skills and counts differ in length")
    if len(set(map(_key, self.skills))) != len(self.skills):
      raise ValueError(f"Duplicate skills (after normalisation) in {self.skills}")

  @classmethod
  def from_seed(cls, annotations: Iterable[Sequence[str]], m: int = DEFAULT_M
               ) -> SkillVocabulary:
    """The m most common skills of the seed set's annotations.

    Each annotation counts a skill once, however often it repeats it. Ties in count are broken
    alphabetically, so the vocabulary is deterministic. Spellings that normalise to one key
    ("large_numbers", "large numbers") are one skill, spelled as its most common spelling
    (alphabetically first on a tie).

    Args:
      annotations: One list of raw skill names per seed problem.
      m: Vocabulary size M (fewer if the seeds name fewer distinct skills).

    Returns:
      The vocabulary.

    Raises:
      ValueError: m < 1.
    """
    if m < 1:
      raise ValueError(f"m must be >= 1, got {m}")
    counts: collections.Counter[str] = collections.Counter()
    spellings: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    for annotation in annotations:
      seen = set()
      for raw in annotation:
        name = normalise_skill(raw)
        key = _key(name)
        if not key or key in seen:
          continue
        seen.add(key)
        counts[key] += 1
        spellings[key][name] += 1

    def spelling(key: str) -> str:
      return min(spellings[key].items(), key=lambda kv: (-kv[1], kv[0]))[0]

    ranked = sorted(counts, key=lambda key: (-counts[key], spelling(key)))[:m]
    return cls(skills=tuple(spelling(key) for key in ranked),
               counts=tuple(counts[key] for key in ranked))

  @functools.cached_property
  def _rank(self) -> dict[str, int]:
    return {_key(s): i for i, s in enumerate(self.skills)}

  def __len__(self) -> int:
    return len(self.skills)

  def __contains__(self, skill: object) -> bool:
    return isinstance(skill, str) and _key(skill) in self._rank

  def rank(self, skill: str) -> Optional[int]:
    """Rank of a skill (0 = most common), None if it is not in the vocabulary."""
    return self._rank.get(_key(skill))

  def split(self, raw_skills: Iterable[Any]) -> tuple[list[str], list[str]]:
    """(known skills by rank, unknown names in order of appearance), both de-duplicated."""
    known: dict[int, str] = {}
    unknown: dict[str, None] = {}
    for raw in raw_skills:
      name = normalise_skill(raw)
      if not name:
        continue
      rank = self._rank.get(_key(name))
      if rank is None:
        unknown[name] = None
      else:
        known[rank] = self.skills[rank]
    return [known[r] for r in sorted(known)], list(unknown)

  def normalise(self, raw_skills: Iterable[Any], k: int = DEFAULT_K
                ) -> tuple[SkillSet, list[str]]:
    """An annotation as a skill-set.

    Args:
      raw_skills: Skill names as the annotator wrote them.
      k: At most this many skills are kept; when more known skills are named, the k most
        common in the seed set (lowest vocabulary rank) are kept.

    Returns:
      (skill_set, unknown): the skill-set as a sorted tuple of canonical spellings, and the
      normalised names that are not in the vocabulary (for `SkillCounter`).
    """
    known, unknown = self.split(raw_skills)
    return tuple(sorted(known[:k])), unknown

  def to_json(self) -> dict[str, Any]:
    return {"skills": list(self.skills), "counts": list(self.counts)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> SkillVocabulary:
    return cls(skills=tuple(d["skills"]), counts=tuple(int(c) for c in d["counts"]))


@dataclasses.dataclass(frozen=True)
class SkillCounter:
  """What skill normalisation left out, so that it is reported rather than lost.

  Attributes:
    num_items: Annotations seen.
    num_with_unknown: Annotations that named at least one skill outside the vocabulary.
    num_truncated: Known skills cut because an annotation named more than k.
    num_empty: Annotations that ended with the empty skill-set.
    unknown: How many annotations named each unknown skill.
  """

  num_items: int = 0
  num_with_unknown: int = 0
  num_truncated: int = 0
  num_empty: int = 0
  unknown: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def add(self, unknown: Sequence[str], truncated: int = 0, empty: bool = False
          ) -> SkillCounter:
    """The counter after one more annotation."""
    merged = dict(self.unknown)
    for name in dict.fromkeys(unknown):
      merged[name] = merged.get(name, 0) + 1
    return SkillCounter(num_items=self.num_items + 1,
                        num_with_unknown=self.num_with_unknown + bool(unknown),
                        num_truncated=self.num_truncated + truncated,
                        num_empty=self.num_empty + bool(empty), unknown=merged)

  def merge(self, other: SkillCounter) -> SkillCounter:
    merged = dict(self.unknown)
    for name, n in other.unknown.items():
      merged[name] = merged.get(name, 0) + n
    return SkillCounter(num_items=self.num_items + other.num_items,
                        num_with_unknown=self.num_with_unknown + other.num_with_unknown,
                        num_truncated=self.num_truncated + other.num_truncated,
                        num_empty=self.num_empty + other.num_empty, unknown=merged)

  def report(self, top: int = 20) -> dict[str, Any]:
    """Summary for logs: totals and the `top` most frequent unknown skills."""
    most = sorted(self.unknown.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"items": self.num_items, "items_with_unknown": self.num_with_unknown,
            "unknown_mentions": sum(self.unknown.values()),
            "unknown_distinct": len(self.unknown), "truncated": self.num_truncated,
            "empty_skill_sets": self.num_empty, "top_unknown": [list(kv) for kv in most]}

  def to_json(self) -> dict[str, Any]:
    return {"num_items": self.num_items, "num_with_unknown": self.num_with_unknown,
            "num_truncated": self.num_truncated, "num_empty": self.num_empty,
            "unknown": dict(sorted(self.unknown.items()))}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> SkillCounter:
    return cls(num_items=int(d["num_items"]), num_with_unknown=int(d["num_with_unknown"]),
               num_truncated=int(d["num_truncated"]), num_empty=int(d["num_empty"]),
               unknown={str(k): int(v) for k, v in d["unknown"].items()})


def skill_sets_of(vocabulary: SkillVocabulary, annotations: Iterable[Sequence[Any]],
                  k: int = DEFAULT_K, counter: Optional[SkillCounter] = None
                  ) -> tuple[list[SkillSet], SkillCounter]:
  """Skill-sets of many annotations, with the counter of what was left out.

  Args:
    vocabulary: The allowed skills.
    annotations: Raw skill names, one list per problem.
    k: Skills kept per problem.
    counter: Counter to continue (a fresh one if None).

  Returns:
    (skill_sets, counter).
  """
  sets = []
  unknown_counts: collections.Counter[str] = collections.Counter()
  with_unknown = truncated = empty = 0
  for annotation in annotations:
    known, unknown = vocabulary.split(annotation)
    skill_set = tuple(sorted(known[:k]))
    unknown_counts.update(unknown)  # split() de-duplicates: one count per annotation
    with_unknown += bool(unknown)
    truncated += max(0, len(known) - k)
    empty += not skill_set
    sets.append(skill_set)
  batch = SkillCounter(num_items=len(sets), num_with_unknown=with_unknown,
                       num_truncated=truncated, num_empty=empty, unknown=dict(unknown_counts))
  return sets, batch if counter is None else counter.merge(batch)


def coverage(skill_sets: Iterable[Sequence[str]], include_empty: bool = False) -> int:
  """Number of unique skill-sets (the empty one only if `include_empty`)."""
  return len({tuple(s) for s in skill_sets if include_empty or len(s)})


def div(skill_sets: Iterable[Sequence[str]]) -> int:
  """DIV: number of unique skills over all skill-sets."""
  return len({skill for s in skill_sets for skill in s})


# ---------------------------------------------------------------------------
# Annotators.


@runtime_checkable
class SkillAnnotator(Protocol):
  """Names the skills each problem (with its solution, where known) needs.

  Two phases (thesis 4.3.1): the seed set is annotated free-form, and its M most common skills
  become the vocabulary; every later problem is labelled with skills from that vocabulary.
  The SPARQ loop therefore annotates the seeds with the annotator it is given, and everything
  after with `annotator.with_vocabulary(vocabulary)`, on a fresh run and on a resume alike.
  """

  def annotate(self, questions: Sequence[str],
               solutions: Sequence[Optional[str]]) -> list[list[str]]:
    """One list of raw skill names per question (possibly empty; never raises)."""
    ...

  def with_vocabulary(self, vocabulary: SkillVocabulary) -> SkillAnnotator:
    """This annotator choosing its skills from `vocabulary`; `self` is left as it was.

    Annotators whose names never vary (the oracle) return themselves.
    """
    ...


@dataclasses.dataclass(frozen=True)
class OracleAnnotator:
  """The lab's exact annotator: the skills of the parsed expression tree (`arith.SKILLS`).

  Solutions are not needed (the question alone fixes the tree); text outside the controlled
  language gets [].
  """

  name: str = "oracle"

  def annotate(self, questions: Sequence[str],
               solutions: Optional[Sequence[Optional[str]]] = None) -> list[list[str]]:
    del solutions  # The question's tree determines its skills.
    return [list(arith.oracle(q, None).skills) if isinstance(q, str) else []
            for q in questions]

  def with_vocabulary(self, vocabulary: SkillVocabulary) -> OracleAnnotator:
    del vocabulary  # Exact names; the seed vocabulary was made from these very names.
    return self


# ---------------------------------------------------------------------------
# Reading an LM annotator's reply.

MAX_SKILL_CHARS = 80
MAX_SKILLS_PARSED = 32
MAX_REPLY_CHARS = 20_000
_BULLET_RE = re.compile(r"^\s*(?:[-*+\u2022>#]+|\(?\d{1,3}[.):])\s*")
_LABEL_RE = re.compile(r"^\s*[A-Za-z][A-Za-z0-9 _\-]{0,30}:\s*")
_SPLIT_RE = re.compile(r"[\n,;|]")
_MARKUP_RE = re.compile(r"\*\*|__|`")


def parse_skill_list(text: Any) -> list[str]:
  """Skill names from an annotator's free-text reply; never raises.

  Reads comma-, semicolon-, pipe- or newline-separated lists, bullet and numbered lists,
  JSON-style lists (`["algebra", "geometry"]`), and a leading label (`Skills: a, b`). Names
  are normalised (`normalise_skill`) and de-duplicated in order. Pieces longer than
  `MAX_SKILL_CHARS` are sentences, not skill names, and are skipped; at most
  `MAX_SKILLS_PARSED` names are returned; only the first `MAX_REPLY_CHARS` characters are read.

  Args:
    text: The reply (non-strings give []).

  Returns:
    The skill names.
  """
  if not isinstance(text, str):
    return []
  try:
    out: dict[str, None] = {}
    for line in text[:MAX_REPLY_CHARS].splitlines():
      line = _MARKUP_RE.sub("", line)
      line = _BULLET_RE.sub("", line, count=1)
      label = _LABEL_RE.match(line)
      if label:
        line = line[label.end():]
      for piece in _SPLIT_RE.split(line):
        piece = _BULLET_RE.sub("", piece, count=1)
        name = normalise_skill(piece)
        if name and len(name) <= MAX_SKILL_CHARS:
          out[name] = None
          if len(out) >= MAX_SKILLS_PARSED:
            return list(out)
    return list(out)
  except Exception:  # pylint: disable=broad-except
    return []  # Unreadable replies annotate nothing; the counter sees an empty skill-set.


# Registered at import; skipped where registry.py already lists the name as a lazy entry.
if "oracle" not in registry.names("annotator"):
  registry.register("annotator", "oracle", OracleAnnotator)
