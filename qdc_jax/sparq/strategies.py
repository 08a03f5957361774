"""SPARQ's four working-set strategies: a selection distribution C and an update function U.

Each round the loop draws b parents with `select(state, rng, b)` (item ids), mutates them, scores
the children, and calls `update(state, children)` for the next round's state (thesis 4.3.1):

  static_uniform    W = the seed set, never updated; C uniform with replacement over W.
  static_diverse    W = the seed set partitioned into skill-set classes; C picks a class
                    uniformly, then a member uniformly (so rare skill-sets are drawn as often
                    as common ones).
  dynamic_uniform   W = the T highest-quality items among the seeds and every child with
                    quality > 0; C uniform over W.
  dynamic_diverse   MAP-Elites: one niche per skill-set holding at most L items; a child with
                    quality > 0 enters its niche, evicting the niche's worst member when full
                    and the child ranks above it; C picks a non-empty niche uniformly, then a
                    member uniformly.

Ranking (dynamic strategies): items compare by (quality, id) when `prefer_newer` (the default):
higher quality first, and on equal quality the newer item (higher id) wins. With K=16 the
quality takes only 13 values, so ties are the rule; preferring the newer keeps the working set
moving (a full niche of equal-quality members is refreshed first-in-first-out) instead of
freezing on the first items found. `prefer_newer=False` ranks by (quality, -id): the incumbent
wins ties, i.e. a child must be strictly better to evict (classic MAP-Elites).

Seeds enter the dynamic strategies at initialisation with whatever quality the caller gave
their items (their measured quality, or 0): they fill W until better children displace them.
Children with quality 0 never enter W, and an id already in W is not inserted twice.

States are frozen dataclasses of ids and qualities (never question text: the loop looks ids up
in its items), serialised by `to_json()` / `state_from_json()` so the loop can commit them with
each round. Id lists are run-length encoded as [start, stop) ranges, so a contiguous seed set
of any size costs a few bytes:

  {"strategy": "static_uniform",  "seed_ids": [[0, 7500]]}
  {"strategy": "static_diverse",  "classes": [{"skill_set": ["algebra"],
                                               "ids": [[0, 3], [9, 10]]}, ...]}
  {"strategy": "dynamic_uniform", "capacity": T, "prefer_newer": true,
   "members": [[id, quality], ...]}                                   (best first)
  {"strategy": "dynamic_diverse", "niche_limit": L, "prefer_newer": true,
   "niches": [{"skill_set": [...], "members": [[id, quality], ...]}, ...]}  (sorted by skill-set)

Selection is deterministic given the numpy Generator's state; `rng_to_json` / `rng_from_json`
carry that state through a commit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Union

import numpy as np

from qdc_jax import registry
from qdc_jax.sparq.archive import ArchiveItem

SkillSet = tuple[str, ...]
Member = tuple[int, float]  # (item id, quality)


# ---------------------------------------------------------------------------
# Helpers.


def encode_ids(ids: Iterable[int]) -> list[list[int]]:
  """Ids as [start, stop) runs of consecutive ascending ids, order preserved."""
  runs: list[list[int]] = []
  for i in ids:
    i = int(i)
    if runs and runs[-1][1] == i:
      runs[-1][1] = i + 1
    else:
      runs.append([i, i + 1])
  return runs


def decode_ids(runs: Iterable[Sequence[int]]) -> tuple[int, ...]:
  """Inverse of `encode_ids`."""
  out: list[int] = []
  for start, stop in runs:
    if stop <= start:
      raise ValueError(f"Empty or reversed id run [{start}, {stop})")
    out.extend(range(int(start), int(stop)))
  return tuple(out)


def rng_to_json(rng: np.random.Generator) -> dict[str, Any]:
  """The generator's bit-generator state (plain JSON: ints, strings)."""
  return rng.bit_generator.state


def rng_from_json(state: Mapping[str, Any]) -> np.random.Generator:
  """A Generator in exactly the saved state."""
  bit_generator = getattr(np.random, state["bit_generator"])()
  bit_generator.state = dict(state)
  return np.random.Generator(bit_generator)


def _check_b(b: int) -> None:
  if b < 0:
    raise ValueError(f"Cannot select {b} parents")


def _rank_key(prefer_newer: bool) -> Callable[[Member], tuple[float, int]]:
  if prefer_newer:
    return lambda m: (m[1], m[0])
  return lambda m: (m[1], -m[0])


def _eligible(children: Iterable[ArchiveItem], present: set[int]) -> list[Member]:
  """Children that may enter a working set, in the order given, without repeats."""
  out = []
  for child in children:
    if child.quality > 0 and child.id not in present:
      present.add(child.id)
      out.append((child.id, float(child.quality)))
  return out


def _members_json(members: Sequence[Member]) -> list[list[Union[int, float]]]:
  return [[i, q] for i, q in members]


def _members_from_json(rows: Iterable[Sequence[Any]]) -> tuple[Member, ...]:
  return tuple((int(i), float(q)) for i, q in rows)


def _uniform_over(ids: Sequence[int], rng: np.random.Generator, b: int) -> list[int]:
  _check_b(b)
  if b and not ids:
    raise ValueError("The working set is empty; nothing to select from")
  return [int(ids[j]) for j in rng.integers(0, len(ids), size=b)]


def _class_then_member(classes: Sequence[Sequence[int]], rng: np.random.Generator,
                       b: int) -> list[int]:
  _check_b(b)
  if b and not classes:
    raise ValueError("The working set has no non-empty class; nothing to select from")
  if not b:
    return []
  c = rng.integers(0, len(classes), size=b)
  sizes = np.array([len(cls) for cls in classes], dtype=np.int64)
  j = rng.integers(0, sizes[c])
  return [int(classes[ci][ji]) for ci, ji in zip(c, j)]


# ---------------------------------------------------------------------------
# Static uniform.


@dataclasses.dataclass(frozen=True)
class StaticUniformState:
  """W = the seed set, fixed."""

  seed_ids: tuple[int, ...]
  name: ClassVar[str] = "static_uniform"

  def to_json(self) -> dict[str, Any]:
    return {"strategy": self.name, "seed_ids": encode_ids(self.seed_ids)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> StaticUniformState:
    return cls(seed_ids=decode_ids(d["seed_ids"]))


def static_uniform_init(seeds: Sequence[ArchiveItem]) -> StaticUniformState:
  return StaticUniformState(seed_ids=tuple(s.id for s in seeds))


def static_uniform_select(state: StaticUniformState, rng: np.random.Generator,
                          b: int) -> list[int]:
  """b seed ids, uniformly with replacement."""
  return _uniform_over(state.seed_ids, rng, b)


def static_update(state: Any, children: Sequence[ArchiveItem]) -> Any:
  """U of the static strategies: W never changes."""
  del children
  return state


# ---------------------------------------------------------------------------
# Static diverse.


@dataclasses.dataclass(frozen=True)
class StaticDiverseState:
  """The seed set partitioned by skill-set; classes sorted by skill-set."""

  classes: tuple[tuple[SkillSet, tuple[int, ...]], ...]
  name: ClassVar[str] = "static_diverse"

  def to_json(self) -> dict[str, Any]:
    return {"strategy": self.name,
            "classes": [{"skill_set": list(s), "ids": encode_ids(ids)}
                        for s, ids in self.classes]}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> StaticDiverseState:
    return cls(classes=tuple((tuple(c["skill_set"]), decode_ids(c["ids"]))
                             for c in d["classes"]))


def static_diverse_init(seeds: Sequence[ArchiveItem]) -> StaticDiverseState:
  classes: dict[SkillSet, list[int]] = {}
  for s in seeds:
    classes.setdefault(tuple(s.skill_set), []).append(s.id)
  return StaticDiverseState(classes=tuple((k, tuple(v)) for k, v in sorted(classes.items())))


def static_diverse_select(state: StaticDiverseState, rng: np.random.Generator,
                          b: int) -> list[int]:
  """b seed ids: a skill-set class uniformly, then a member of it uniformly."""
  return _class_then_member([ids for _, ids in state.classes], rng, b)


# ---------------------------------------------------------------------------
# Dynamic uniform.


@dataclasses.dataclass(frozen=True)
class DynamicUniformState:
  """W = the top-`capacity` items by rank; members best first."""

  capacity: int
  members: tuple[Member, ...]
  prefer_newer: bool = True
  name: ClassVar[str] = "dynamic_uniform"

  def to_json(self) -> dict[str, Any]:
    return {"strategy": self.name, "capacity": self.capacity,
            "prefer_newer": self.prefer_newer, "members": _members_json(self.members)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> DynamicUniformState:
    return cls(capacity=int(d["capacity"]), members=_members_from_json(d["members"]),
               prefer_newer=bool(d["prefer_newer"]))


def _top(members: Iterable[Member], n: int, prefer_newer: bool) -> tuple[Member, ...]:
  return tuple(sorted(members, key=_rank_key(prefer_newer), reverse=True)[:n])


def dynamic_uniform_init(seeds: Sequence[ArchiveItem], capacity: int,
                         prefer_newer: bool = True) -> DynamicUniformState:
  """W = the top-`capacity` seeds (by the quality their items carry, then id).

  Raises:
    ValueError: capacity < 1.
  """
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1, got {capacity}")
  members = {s.id: (s.id, float(s.quality)) for s in seeds}.values()
  return DynamicUniformState(capacity=capacity,
                             members=_top(members, capacity, prefer_newer),
                             prefer_newer=prefer_newer)


def dynamic_uniform_select(state: DynamicUniformState, rng: np.random.Generator,
                           b: int) -> list[int]:
  """b ids of W, uniformly with replacement."""
  return _uniform_over([i for i, _ in state.members], rng, b)


def dynamic_uniform_update(state: DynamicUniformState,
                           children: Sequence[ArchiveItem]) -> DynamicUniformState:
  """Inserts the children with quality > 0 and keeps the top `capacity` of W."""
  present = {i for i, _ in state.members}
  pool = list(state.members) + _eligible(children, present)
  return dataclasses.replace(state, members=_top(pool, state.capacity, state.prefer_newer))


# ---------------------------------------------------------------------------
# Dynamic diverse (MAP-Elites).


@dataclasses.dataclass(frozen=True)
class DynamicDiverseState:
  """Niches by skill-set (sorted), each with at most `niche_limit` members, best first."""

  niche_limit: int
  niches: tuple[tuple[SkillSet, tuple[Member, ...]], ...]
  prefer_newer: bool = True
  name: ClassVar[str] = "dynamic_diverse"

  def to_json(self) -> dict[str, Any]:
    return {"strategy": self.name, "niche_limit": self.niche_limit,
            "prefer_newer": self.prefer_newer,
            "niches": [{"skill_set": list(s), "members": _members_json(m)}
                       for s, m in self.niches]}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> DynamicDiverseState:
    return cls(niche_limit=int(d["niche_limit"]), prefer_newer=bool(d["prefer_newer"]),
               niches=tuple((tuple(n["skill_set"]), _members_from_json(n["members"]))
                            for n in d["niches"]))


def _insert(niches: dict[SkillSet, list[Member]], skill_set: SkillSet, member: Member,
            limit: int, key: Callable[[Member], tuple[float, int]]) -> None:
  members = niches.setdefault(skill_set, [])
  if len(members) < limit:
    members.append(member)
    return
  worst = min(range(len(members)), key=lambda j: key(members[j]))
  if key(member) > key(members[worst]):
    members[worst] = member


def _freeze_niches(niches: Mapping[SkillSet, list[Member]], prefer_newer: bool
                   ) -> tuple[tuple[SkillSet, tuple[Member, ...]], ...]:
  key = _rank_key(prefer_newer)
  return tuple((s, tuple(sorted(m, key=key, reverse=True)))
               for s, m in sorted(niches.items()) if m)


def dynamic_diverse_init(seeds: Sequence[ArchiveItem], niche_limit: int,
                         prefer_newer: bool = True) -> DynamicDiverseState:
  """Niches filled with the seeds (whatever their quality), at most `niche_limit` each.

  Raises:
    ValueError: niche_limit < 1.
  """
  if niche_limit < 1:
    raise ValueError(f"niche_limit must be >= 1, got {niche_limit}")
  key = _rank_key(prefer_newer)
  niches: dict[SkillSet, list[Member]] = {}
  seen: set[int] = set()
  for s in sorted(seeds, key=lambda s: s.id):
    if s.id not in seen:
      seen.add(s.id)
      _insert(niches, tuple(s.skill_set), (s.id, float(s.quality)), niche_limit, key)
  return DynamicDiverseState(niche_limit=niche_limit, prefer_newer=prefer_newer,
                             niches=_freeze_niches(niches, prefer_newer))


def dynamic_diverse_select(state: DynamicDiverseState, rng: np.random.Generator,
                           b: int) -> list[int]:
  """b ids: a non-empty niche uniformly, then a member of it uniformly."""
  return _class_then_member([[i for i, _ in m] for _, m in state.niches], rng, b)


def dynamic_diverse_update(state: DynamicDiverseState,
                           children: Sequence[ArchiveItem]) -> DynamicDiverseState:
  """Inserts each child with quality > 0 into its skill-set's niche, in the order given.

  A niche below the limit takes the child; a full niche replaces its lowest-ranked member
  with the child only if the child ranks above it (see the module docstring for ties).
  """
  key = _rank_key(state.prefer_newer)
  niches = {s: list(m) for s, m in state.niches}
  present = {i for _, m in state.niches for i, _ in m}
  by_id = {c.id: c for c in children}
  for member in _eligible(children, present):
    _insert(niches, tuple(by_id[member[0]].skill_set), member, state.niche_limit, key)
  return dataclasses.replace(state, niches=_freeze_niches(niches, state.prefer_newer))


# ---------------------------------------------------------------------------
# Registry.

State = Union[StaticUniformState, StaticDiverseState, DynamicUniformState,
              DynamicDiverseState]


@dataclasses.dataclass(frozen=True)
class Strategy:
  """One strategy's functions, as the registry hands them out.

  Attributes:
    name: Registry name.
    init: `init(seeds, **config) -> state`; config is `capacity` (dynamic_uniform) or
      `niche_limit` (dynamic_diverse), plus `prefer_newer` for both; none for static ones.
    select: C: `select(state, rng, b) -> list[int]` of parent item ids.
    update: U: `update(state, children) -> state`.
    state_from_json: Inverse of `state.to_json()`.
  """

  name: str
  init: Callable[..., Any]
  select: Callable[[Any, np.random.Generator, int], list[int]]
  update: Callable[[Any, Sequence[ArchiveItem]], Any]
  state_from_json: Callable[[Mapping[str, Any]], Any]


STRATEGIES = {
    s.name: s for s in (
        Strategy("static_uniform", static_uniform_init, static_uniform_select,
                 static_update, StaticUniformState.from_json),
        Strategy("static_diverse", static_diverse_init, static_diverse_select,
                 static_update, StaticDiverseState.from_json),
        Strategy("dynamic_uniform", dynamic_uniform_init, dynamic_uniform_select,
                 dynamic_uniform_update, DynamicUniformState.from_json),
        Strategy("dynamic_diverse", dynamic_diverse_init, dynamic_diverse_select,
                 dynamic_diverse_update, DynamicDiverseState.from_json),
    )
}


def state_from_json(d: Mapping[str, Any]) -> State:
  """Any strategy's state from its JSON (dispatching on d["strategy"])."""
  return STRATEGIES[d["strategy"]].state_from_json(d)


def working_set(state: State) -> tuple[int, ...]:
  """The ids currently in W."""
  if isinstance(state, StaticUniformState):
    return state.seed_ids
  if isinstance(state, StaticDiverseState):
    return tuple(i for _, ids in state.classes for i in ids)
  if isinstance(state, DynamicUniformState):
    return tuple(i for i, _ in state.members)
  return tuple(i for _, m in state.niches for i, _ in m)


# Registered at import; skipped where registry.py already lists the name as a lazy entry.
for _name, _strategy in STRATEGIES.items():
  if _name not in registry.names("strategy"):
    registry.register("strategy", _name, _strategy)
del _name, _strategy
