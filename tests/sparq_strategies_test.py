"""SPARQ strategies: selection distributions C and working-set updates U."""
import collections
import json

import numpy as np
import pytest

from qdc_jax import registry
from qdc_jax.sparq import strategies as St
from qdc_jax.sparq.archive import ArchiveItem


def _item(i, quality=0.0, skill_set=("a",), parent=None):
  return ArchiveItem(id=i, parent_id=parent, round=0 if parent is None else 1,
                     strategy="test", question=f"q{i}", intended_answer="1",
                     quality=quality, skill_set=skill_set)


def _skewed_seeds():
  # 90 seeds in class ("a",), 9 in ("b",), 1 in ("a", "c"): sizes 90 / 9 / 1.
  sets = [("a",)] * 90 + [("b",)] * 9 + [("a", "c")]
  return [_item(i, skill_set=s) for i, s in enumerate(sets)]


def _round_trip(state):
  return St.state_from_json(json.loads(json.dumps(state.to_json())))


def test_registry_lists_the_four():
  assert {"static_uniform", "static_diverse", "dynamic_uniform",
          "dynamic_diverse"} <= set(registry.names("strategy"))
  assert registry.get("strategy", "dynamic_diverse").update is St.dynamic_diverse_update


def test_id_runs():
  ids = (0, 1, 2, 7, 5, 6, 9)
  assert St.encode_ids(ids) == [[0, 3], [7, 8], [5, 7], [9, 10]]
  assert St.decode_ids(St.encode_ids(ids)) == ids
  assert St.encode_ids(range(7500)) == [[0, 7500]]


def test_static_uniform_samples_only_seeds_and_never_changes():
  seeds = [_item(i) for i in range(10, 20)]
  state = St.static_uniform_init(seeds)
  children = [_item(100 + i, quality=0.9, parent=10) for i in range(5)]
  assert St.static_update(state, children) is state
  picks = St.static_uniform_select(state, np.random.default_rng(0), 5000)
  assert set(picks) == set(range(10, 20))
  counts = np.bincount(np.array(picks) - 10)
  assert counts.min() > 400 and counts.max() < 600
  assert _round_trip(state) == state
  assert state.to_json()["seed_ids"] == [[10, 20]]


def test_static_diverse_draws_classes_uniformly_not_by_size():
  state = St.static_diverse_init(_skewed_seeds())
  n = 30_000
  picks = St.static_diverse_select(state, np.random.default_rng(1), n)
  cls = {i: s.skill_set for i, s in enumerate(_skewed_seeds())}
  counts = collections.Counter(cls[i] for i in picks)
  expected = n / 3
  chi2 = sum((counts[c] - expected) ** 2 / expected for c in [("a",), ("b",), ("a", "c")])
  assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001; proportional-to-size would be ~20000
  assert counts[("a", "c")] > 9000  # the single seed of its class is a third of the draws
  assert _round_trip(state) == state
  assert St.static_update(state, [_item(200, 0.5, ("z",), 1)]) is state


def test_dynamic_uniform_keeps_exactly_the_top_t():
  rng = np.random.default_rng(2)
  seeds = [_item(i, quality=0.0) for i in range(5)]
  state = St.dynamic_uniform_init(seeds, capacity=8)
  all_members = {(s.id, 0.0) for s in seeds}
  next_id = 5
  for _ in range(20):
    qs = rng.choice([0.0, 0.125, 0.5, 0.875], size=6)
    children = [_item(next_id + j, quality=float(q), parent=0) for j, q in enumerate(qs)]
    next_id += len(children)
    state = St.dynamic_uniform_update(state, children)
    all_members |= {(c.id, c.quality) for c in children if c.quality > 0}
    # Independent reference: sort everything ever eligible by (quality, id), keep 8.
    want = sorted(all_members, key=lambda m: (m[1], m[0]), reverse=True)[:8]
    assert list(state.members) == want
  assert len(state.members) == 8
  assert set(St.dynamic_uniform_select(state, rng, 200)) <= set(St.working_set(state))
  assert _round_trip(state) == state
  # Zero-quality children never enter; an id already in W is not inserted twice.
  small = St.dynamic_uniform_init([_item(0, 0.5)], capacity=3)
  small = St.dynamic_uniform_update(small, [_item(1, 0.0, parent=0), _item(0, 0.5)])
  assert small.members == ((0, 0.5),)


def test_dynamic_uniform_tie_policy():
  seeds = [_item(i, quality=0.5) for i in range(3)]
  child = [_item(3, quality=0.5, parent=0)]
  newer = St.dynamic_uniform_update(St.dynamic_uniform_init(seeds, 3), child)
  assert [i for i, _ in newer.members] == [3, 2, 1]
  older = St.dynamic_uniform_update(
      St.dynamic_uniform_init(seeds, 3, prefer_newer=False), child)
  assert [i for i, _ in older.members] == [0, 1, 2]


def test_map_elites_limit_eviction_and_zero_quality():
  seeds = [_item(0, 0.2, ("a",)), _item(1, 0.4, ("a",)), _item(2, 0.3, ("b",))]
  state = St.dynamic_diverse_init(seeds, niche_limit=2)
  niches = dict(state.niches)
  assert niches[("a",)] == ((1, 0.4), (0, 0.2))
  # A better child evicts the niche's lowest; a worse one and a zero-quality one do not enter.
  state = St.dynamic_diverse_update(state, [_item(3, 0.5, ("a",), 0),
                                            _item(4, 0.1, ("a",), 0),
                                            _item(5, 0.0, ("c",), 0)])
  niches = dict(state.niches)
  assert niches[("a",)] == ((3, 0.5), (1, 0.4))
  assert ("c",) not in niches
  # A new skill-set opens a niche.
  state = St.dynamic_diverse_update(state, [_item(6, 0.125, ("c", "d"), 3)])
  assert dict(state.niches)[("c", "d")] == ((6, 0.125),)
  assert all(len(m) <= 2 for _, m in state.niches)
  assert _round_trip(state) == state
  # Ties: the newer child replaces the oldest equal member, or not at all if prefer_newer is off.
  tied = [_item(7, 0.4, ("a",), 0)]
  assert dict(St.dynamic_diverse_update(state, tied).niches)[("a",)] == ((3, 0.5), (7, 0.4))
  strict = St.dynamic_diverse_init(seeds, niche_limit=2, prefer_newer=False)
  strict = St.dynamic_diverse_update(strict, [_item(7, 0.2, ("a",), 0)])
  assert dict(strict.niches)[("a",)] == ((1, 0.4), (0, 0.2))


def test_map_elites_random_archive_matches_a_naive_reference():
  rng = np.random.default_rng(3)
  sets = [("a",), ("b",), ("a", "b"), ("c",)]
  state = St.dynamic_diverse_init([_item(0, 0.0, ("a",))], niche_limit=3)
  kept = {("a",): [(0, 0.0)]}
  for i in range(1, 400):
    q = float(rng.choice([0.0, 0.125, 0.25, 0.5, 0.75]))
    s = sets[rng.integers(len(sets))]
    state = St.dynamic_diverse_update(state, [_item(i, q, s, 0)])
    if q > 0:
      # Naive: the niche keeps its 3 best by (quality, id) among all it was ever offered.
      kept.setdefault(s, []).append((i, q))
      kept[s] = sorted(kept[s], key=lambda m: (m[1], m[0]), reverse=True)[:3]
  assert dict(state.niches) == {s: tuple(m) for s, m in kept.items()}


def test_map_elites_selects_niches_uniformly():
  seeds = ([_item(i, 0.5, ("a",)) for i in range(50)] +
           [_item(50, 0.5, ("b",)), _item(51, 0.5, ("c",))])
  state = St.dynamic_diverse_init(seeds, niche_limit=50)
  n = 30_000
  picks = St.dynamic_diverse_select(state, np.random.default_rng(4), n)
  counts = collections.Counter("a" if i < 50 else ("b" if i == 50 else "c") for i in picks)
  chi2 = sum((counts[c] - n / 3) ** 2 / (n / 3) for c in "abc")
  assert chi2 < 13.8


@pytest.mark.parametrize("name, kwargs", [
    ("static_uniform", {}), ("static_diverse", {}), ("dynamic_uniform", {"capacity": 20}),
    ("dynamic_diverse", {"niche_limit": 4})])
def test_determinism_and_json_through_a_run(name, kwargs):
  strategy = registry.get("strategy", name)

  def run(seed, resume_at=None):
    rng = np.random.default_rng(seed)
    state = strategy.init(_skewed_seeds(), **kwargs)
    picks, next_id = [], 100
    for r in range(6):
      if r == resume_at:  # what the loop does after a restart
        state = St.state_from_json(json.loads(json.dumps(state.to_json())))
        rng = St.rng_from_json(json.loads(json.dumps(St.rng_to_json(rng))))
      parents = strategy.select(state, rng, 8)
      picks += parents
      children = [_item(next_id + j, float(rng.choice([0.0, 0.25, 0.75])),
                        (f"s{rng.integers(5)}",), p) for j, p in enumerate(parents)]
      next_id += len(children)
      state = strategy.update(state, children)
    return picks, state

  a, b = run(7), run(7)
  assert a == b
  assert run(7, resume_at=3) == a
  assert run(8)[0] != a[0]
  if name.startswith("static"):
    assert set(a[0]) <= set(range(100))


def test_empty_working_set_and_bad_args():
  with pytest.raises(ValueError):
    St.static_uniform_select(St.static_uniform_init([]), np.random.default_rng(0), 1)
  assert St.static_uniform_select(St.static_uniform_init([]), np.random.default_rng(0), 0) == []
  with pytest.raises(ValueError):
    St.dynamic_uniform_init([], capacity=0)
  with pytest.raises(ValueError):
    St.dynamic_diverse_init([], niche_limit=0)
