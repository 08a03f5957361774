"""SPARQ phase 2: from the archive to training data, and the fixed-budget filter ablations.

Phase 2 (thesis 4.3.1) keeps the archive items with QUALITY > 0 and pairs each question with
each of its successful student verifications (`phase2_pairs`): every training solution is
self-generated.

The filter ablations (thesis 4.3.2) first reduce the archive to a pool with unique questions
(`unique_pool`: quality > 0, the earliest item of each question), then pick `budget` items:

  quality    Items drawn without replacement so that the picked qualities follow a Gaussian
             of mean m and sd 0.1. Each distinct quality value v gets probability mass
             proportional to exp(-(v - m)^2 / (2 sd^2)), shared equally by the pool's items
             with that value; so the target is the picked items' quality distribution, not
             the pool's times a Gaussian (the archive is dominated by easy problems, which
             would otherwise drag the mean down). Sampling without replacement uses
             exponential races (Efraimidis-Spirakis) in log space.
  diversity  Skill-sets ordered by greedy max-coverage: each pass picks, from the sets not yet
             used, the set adding the most skills not yet covered in this pass, until no set
             adds one; passes repeat on the remaining sets. Items are then taken round-robin
             over that order, one per set per cycle, uniformly within a set, until the
             budget: a budget below the number of sets goes to the sets covering the most
             unique skills; a larger one spreads over all sets evenly.
  qd         The diversity order and round-robin, but within each set the highest quality
             first.
  random     Uniformly without replacement.

Ties everywhere are broken by the rng, so results are deterministic given its seed. A budget
at least the pool size returns the whole pool. Filters return items; `training_pairs` turns
them into (item, solution) pairs with one successful verification each, as the thesis's
pool D'_train does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from qdc_jax import registry
from qdc_jax.sparq.archive import ArchiveItem

SkillSet = tuple[str, ...]
# Quality values closer than this are one value (they come from c/K ratios).
_QUALITY_DECIMALS = 9


def phase2_pairs(items: Sequence[ArchiveItem]) -> list[tuple[ArchiveItem, str]]:
  """(item, solution) for every successful verification of every item with quality > 0."""
  return [(item, s) for item in items
          if item.quality > 0 and item.question is not None
          for s in item.successful_solutions]


def unique_pool(items: Sequence[ArchiveItem]) -> list[ArchiveItem]:
  """Items with quality > 0, a question and a successful solution; first (lowest id) per
  question (compared after stripping whitespace at the ends)."""
  seen: set[str] = set()
  out = []
  for item in sorted(items, key=lambda it: it.id):
    if item.quality <= 0 or item.question is None or not item.successful_solutions:
      continue
    key = item.question.strip()
    if key not in seen:
      seen.add(key)
      out.append(item)
  return out


def training_pairs(selected: Sequence[ArchiveItem],
                   rng: Optional[np.random.Generator] = None
                   ) -> list[tuple[ArchiveItem, str]]:
  """One (item, solution) per item: a random successful verification, or the first one
  if no rng is given."""
  pairs = []
  for item in selected:
    sols = item.successful_solutions
    j = int(rng.integers(0, len(sols))) if rng is not None else 0
    pairs.append((item, sols[j]))
  return pairs


def _check_budget(budget: int) -> None:
  if budget < 0:
    raise ValueError(f"budget must be >= 0, got {budget}")


def random_filter(items: Sequence[ArchiveItem], budget: int,
                  rng: np.random.Generator) -> list[ArchiveItem]:
  """`budget` pool items uniformly without replacement."""
  _check_budget(budget)
  pool = unique_pool(items)
  picks = rng.permutation(len(pool))[:budget]
  return [pool[j] for j in picks]


def quality_filter(items: Sequence[ArchiveItem], budget: int, rng: np.random.Generator,
                   mean: float = 0.8, sd: float = 0.1) -> list[ArchiveItem]:
  """`budget` pool items whose qualities follow N(mean, sd) (see the module docstring).

  Raises:
    ValueError: sd <= 0 or a negative budget.
  """
  _check_budget(budget)
  if not sd > 0:
    raise ValueError(f"sd must be > 0, got {sd}")
  pool = unique_pool(items)
  if not pool:
    return []
  q = np.array([it.quality for it in pool], dtype=np.float64)
  levels, level_of, level_sizes = np.unique(np.round(q, _QUALITY_DECIMALS),
                                            return_inverse=True, return_counts=True)
  log_w = -((levels - mean) ** 2) / (2 * sd ** 2) - np.log(level_sizes)
  # Exponential race: item i finishes at E_i / w_i, E_i ~ Exp(1); the first `budget`
  # finishers are a weighted sample without replacement. In logs, so tiny weights (items
  # many sd from the mean) stay ordered instead of underflowing to ties.
  finish = np.log(rng.standard_exponential(len(pool))) - log_w[level_of]
  return [pool[j] for j in np.argsort(finish, kind="stable")[:budget]]


def _greedy_order(skill_sets: Sequence[SkillSet], rng: np.random.Generator) -> list[int]:
  """Indices of skill_sets in repeated greedy max-coverage order (ties by a random order).

  Gains within a pass only shrink and are at most the largest set size, so a pass scans the
  remaining sets once per gain level g (largest first), taking every set whose gain is
  still >= g when reached: that is exactly "take a set with the largest gain" each time.
  """
  remaining = [int(j) for j in rng.permutation(len(skill_sets))]
  top = max((len(s) for s in skill_sets), default=0)
  order: list[int] = []
  while remaining:
    covered: set[str] = set()
    taken: set[int] = set()
    for g in range(top, 0, -1):
      for j in remaining:
        if j not in taken and len(set(skill_sets[j]) - covered) >= g:
          taken.add(j)
          order.append(j)
          covered.update(skill_sets[j])
    if not taken:  # Only sets that add nothing (the empty skill-set) remain.
      order.extend(remaining)
      break
    remaining = [j for j in remaining if j not in taken]
  return order


def _round_robin(groups: Sequence[list[ArchiveItem]], budget: int) -> list[ArchiveItem]:
  out: list[ArchiveItem] = []
  depth = 0
  while len(out) < budget:
    took = False
    for g in groups:
      if depth < len(g):
        out.append(g[depth])
        took = True
        if len(out) == budget:
          break
    if not took:
      break
    depth += 1
  return out


def _grouped(items: Sequence[ArchiveItem], rng: np.random.Generator,
             within: Callable[[list[ArchiveItem]], list[ArchiveItem]]
             ) -> list[list[ArchiveItem]]:
  """Pool items grouped by skill-set, groups in greedy-coverage order, members shuffled and
  then ordered by `within` (a stable sort, so the shuffle breaks its ties)."""
  groups: dict[SkillSet, list[ArchiveItem]] = {}
  for item in unique_pool(items):
    groups.setdefault(tuple(item.skill_set), []).append(item)
  keys = sorted(groups)
  ordered = []
  for j in _greedy_order(keys, rng):
    members = groups[keys[j]]
    members = [members[i] for i in rng.permutation(len(members))]
    ordered.append(within(members))
  return ordered


def diversity_filter(items: Sequence[ArchiveItem], budget: int,
                     rng: np.random.Generator) -> list[ArchiveItem]:
  """`budget` items: skill-sets by greedy coverage, uniformly within each."""
  _check_budget(budget)
  return _round_robin(_grouped(items, rng, lambda m: m), budget)


def qd_filter(items: Sequence[ArchiveItem], budget: int,
              rng: np.random.Generator) -> list[ArchiveItem]:
  """`budget` items: skill-sets by greedy coverage, highest quality first within each."""
  _check_budget(budget)
  by_quality = lambda m: sorted(m, key=lambda it: -it.quality)
  return _round_robin(_grouped(items, rng, by_quality), budget)


FILTERS: dict[str, Callable[..., list[ArchiveItem]]] = {
    "quality": quality_filter,
    "diversity": diversity_filter,
    "qd": qd_filter,
    "random": random_filter,
}

# Registered at import; skipped where registry.py already lists the name as a lazy entry.
for _name, _fn in FILTERS.items():
  if _name not in registry.names("filter"):
    registry.register("filter", _name, _fn)
del _name, _fn
