"""Metrics of SPARQ rounds and of the whole archive.

`summarize(items)` describes one batch of items (a round); `ArchiveStats` accumulates the same
quantities round by round, so cumulative archive metrics cost O(round size) per round rather
than a pass over the whole archive, and its JSON can be committed with the round's state.

Keys of a summary:
  problems                    items generated
  parse_failures              items whose generator output could not be read
  parse_failures_by_reason    the same, by reason; a reason is the text before its first ":"
                              ("parse: unexpected token" -> "parse"), so details do not make
                              one key per item
  valid_fraction              lab only: fraction valid among items with an oracle verdict
                              (None when no item has one)
  valid_fraction_positive     the same among items with quality > 0 (the data that trains)
  mean_quality, max_quality   over all items (0.0 when there are none)
  num_quality_positive, frac_quality_positive
  unique_skills               DIV: distinct skills over all items
  unique_skill_sets           coverage: distinct non-empty skill-sets over all items
  unique_skill_sets_positive  coverage among items with quality > 0 (thesis Fig. 4.9 "train")
  qd_score                    MAP-Elites' QD-score with one niche per non-empty skill-set:
                              the sum over niches of the best quality found in it. It grows
                              by finding new skill-sets and by finding harder (still
                              solvable) problems in known ones; the empty skill-set is not a
                              niche, as in coverage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

from qdc_jax.sparq.archive import ArchiveItem

SkillSet = tuple[str, ...]


def _reason_key(reason: str) -> str:
  return reason.split(":", 1)[0].strip() or "unknown"


def _fraction(num: int, den: int) -> Optional[float]:
  return num / den if den else None


@dataclasses.dataclass(frozen=True)
class ArchiveStats:
  """Running totals over items; `add` returns the totals with more items included."""

  num_items: int = 0
  parse_failures: Mapping[str, int] = dataclasses.field(default_factory=dict)
  num_verdicts: int = 0
  num_valid: int = 0
  num_verdicts_positive: int = 0
  num_valid_positive: int = 0
  quality_sum: float = 0.0
  quality_max: float = 0.0
  num_positive: int = 0
  skills: frozenset[str] = frozenset()
  skill_sets: frozenset[SkillSet] = frozenset()
  skill_sets_positive: frozenset[SkillSet] = frozenset()
  niche_best: Mapping[SkillSet, float] = dataclasses.field(default_factory=dict)

  def add(self, items: Iterable[ArchiveItem]) -> ArchiveStats:
    failures = dict(self.parse_failures)
    niche_best = dict(self.niche_best)
    skills, skill_sets, positive_sets = set(self.skills), set(self.skill_sets), set(
        self.skill_sets_positive)
    n, verdicts, valid, verdicts_pos, valid_pos = (
        self.num_items, self.num_verdicts, self.num_valid, self.num_verdicts_positive,
        self.num_valid_positive)
    q_sum, q_max, n_pos = self.quality_sum, self.quality_max, self.num_positive
    for item in items:
      n += 1
      positive = item.quality > 0
      if item.parse_error:
        key = _reason_key(item.parse_error)
        failures[key] = failures.get(key, 0) + 1
      if item.valid is not None:
        verdicts += 1
        valid += bool(item.valid)
        if positive:
          verdicts_pos += 1
          valid_pos += bool(item.valid)
      q_sum += item.quality
      q_max = max(q_max, item.quality)
      n_pos += positive
      s = tuple(item.skill_set)
      skills.update(s)
      if s:
        skill_sets.add(s)
        niche_best[s] = max(niche_best.get(s, 0.0), item.quality)
        if positive:
          positive_sets.add(s)
    return ArchiveStats(num_items=n, parse_failures=failures, num_verdicts=verdicts,
                        num_valid=valid, num_verdicts_positive=verdicts_pos,
                        num_valid_positive=valid_pos, quality_sum=q_sum, quality_max=q_max,
                        num_positive=n_pos, skills=frozenset(skills),
                        skill_sets=frozenset(skill_sets),
                        skill_sets_positive=frozenset(positive_sets), niche_best=niche_best)

  def summary(self) -> dict[str, Any]:
    """The metrics (see the module docstring for the keys)."""
    return {
        "problems": self.num_items,
        "parse_failures": sum(self.parse_failures.values()),
        "parse_failures_by_reason": dict(sorted(self.parse_failures.items())),
        "valid_fraction": _fraction(self.num_valid, self.num_verdicts),
        "valid_fraction_positive": _fraction(self.num_valid_positive,
                                             self.num_verdicts_positive),
        "mean_quality": self.quality_sum / self.num_items if self.num_items else 0.0,
        "max_quality": self.quality_max,
        "num_quality_positive": self.num_positive,
        "frac_quality_positive": _fraction(self.num_positive, self.num_items) or 0.0,
        "unique_skills": len(self.skills),
        "unique_skill_sets": len(self.skill_sets),
        "unique_skill_sets_positive": len(self.skill_sets_positive),
        "qd_score": float(sum(self.niche_best.values())),
    }

  def to_json(self) -> dict[str, Any]:
    return {
        "num_items": self.num_items, "parse_failures": dict(self.parse_failures),
        "num_verdicts": self.num_verdicts, "num_valid": self.num_valid,
        "num_verdicts_positive": self.num_verdicts_positive,
        "num_valid_positive": self.num_valid_positive, "quality_sum": self.quality_sum,
        "quality_max": self.quality_max, "num_positive": self.num_positive,
        "skills": sorted(self.skills), "skill_sets": sorted(map(list, self.skill_sets)),
        "skill_sets_positive": sorted(map(list, self.skill_sets_positive)),
        "niche_best": [[list(s), q] for s, q in sorted(self.niche_best.items())],
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> ArchiveStats:
    return cls(
        num_items=int(d["num_items"]), parse_failures=dict(d["parse_failures"]),
        num_verdicts=int(d["num_verdicts"]), num_valid=int(d["num_valid"]),
        num_verdicts_positive=int(d["num_verdicts_positive"]),
        num_valid_positive=int(d["num_valid_positive"]),
        quality_sum=float(d["quality_sum"]), quality_max=float(d["quality_max"]),
        num_positive=int(d["num_positive"]), skills=frozenset(d["skills"]),
        skill_sets=frozenset(map(tuple, d["skill_sets"])),
        skill_sets_positive=frozenset(map(tuple, d["skill_sets_positive"])),
        niche_best={tuple(s): float(q) for s, q in d["niche_best"]})


def summarize(items: Iterable[ArchiveItem]) -> dict[str, Any]:
  """Metrics of one batch of items (e.g. a round's children)."""
  return ArchiveStats().add(items).summary()


def qd_score(items: Iterable[ArchiveItem]) -> float:
  """Sum over non-empty skill-sets of the best quality among the items with that set."""
  return summarize(items)["qd_score"]


def round_and_cumulative(stats: ArchiveStats, round_items: Sequence[ArchiveItem]
                         ) -> tuple[dict[str, Any], ArchiveStats]:
  """Metrics of a round plus the archive's after it, keys prefixed "round/" and "archive/".

  Args:
    stats: Totals of the archive before this round.
    round_items: The round's items.

  Returns:
    (flat metrics dict, updated totals).
  """
  new_stats = stats.add(round_items)
  out = {f"round/{k}": v for k, v in summarize(round_items).items()}
  out.update({f"archive/{k}": v for k, v in new_stats.summary().items()})
  return out, new_stats


def children(items: Iterable[ArchiveItem]) -> list[ArchiveItem]:
  """The generated items (round > 0): the archive without its seeds (round 0)."""
  return [i for i in items if i.round > 0]


def by_round(items: Iterable[ArchiveItem]) -> list[dict[str, Any]]:
  """Coverage, QD-score and the other metrics round by round, from the items alone.

  One row per generation round present (seeds, round 0, are left out, as in the loop's
  totals): {"round": r, "round/<key>": the round's summary, "archive/<key>": the archive's
  after it}, the keys of `round_and_cumulative` (the loop logs the same ones to
  sparq_metrics.jsonl; this recomputes them for any archive, e.g. one copied from elsewhere).
  """
  rounds: dict[int, list[ArchiveItem]] = {}
  for item in children(items):
    rounds.setdefault(item.round, []).append(item)
  stats, rows = ArchiveStats(), []
  for r in sorted(rounds):
    row, stats = round_and_cumulative(stats, sorted(rounds[r], key=lambda i: i.id))
    rows.append({"round": r, **row})
  return rows


@dataclasses.dataclass(frozen=True)
class Niche:
  """The items of one non-empty skill-set (a MAP-Elites niche)."""

  skill_set: SkillSet
  count: int  # items in the niche
  best_quality: float  # the niche's contribution to the QD-score
  mean_quality: float
  num_quality_positive: int
  examples: tuple[ArchiveItem, ...]  # its best items: quality, then solve rate, then id


def niches(items: Iterable[ArchiveItem], per_niche: int = 3) -> list[Niche]:
  """Items grouped by non-empty skill-set, best niche first (best quality, then size, then
  the skill-set), each with its `per_niche` best items as examples.

  The sum of `best_quality` over the niches is `qd_score(items)` and their number is the
  coverage (`summarize(items)["unique_skill_sets"]`). Pass `children(items)` for the
  generated problems only.
  """
  groups: dict[SkillSet, list[ArchiveItem]] = {}
  for item in items:
    if item.skill_set:
      groups.setdefault(tuple(item.skill_set), []).append(item)
  out = []
  for s, group in groups.items():
    best = sorted(group, key=lambda i: (-i.quality, -i.solve_rate, i.id))
    out.append(Niche(skill_set=s, count=len(group), best_quality=best[0].quality,
                     mean_quality=sum(i.quality for i in group) / len(group),
                     num_quality_positive=sum(i.quality > 0 for i in group),
                     examples=tuple(best[:max(per_niche, 0)])))
  return sorted(out, key=lambda n: (-n.best_quality, -n.count, n.skill_set))
