"""SPARQ phase 2: training pairs and the fixed-budget filters."""
import numpy as np
import pytest

from qdc_jax import registry
from qdc_jax.sparq import filters as Fl
from qdc_jax.sparq import skills
from qdc_jax.sparq.archive import ArchiveItem

K = 16
# The qualities a K=16 student can give inside the band: 1 - c/16 for c = 2..14.
LEVELS = [1 - c / K for c in range(2, 15)]


def _item(i, quality, skill_set, question=None, sols=("s",)):
  return ArchiveItem(id=i, parent_id=0, round=1, strategy="t",
                     question=question if question is not None else f"q{i}",
                     intended_answer="1", quality=quality, skill_set=skill_set,
                     successful_solutions=sols)


def _synthetic_archive(n=4000, seed=0):
  """Skewed like a real archive: most problems easy (low quality), a few skill-sets common."""
  rng = np.random.default_rng(seed)
  vocab = [f"k{j}" for j in range(30)]
  popularity = 1.0 / np.arange(1, 31) ** 1.5
  popularity /= popularity.sum()
  level_p = np.linspace(3, 1, len(LEVELS))
  level_p /= level_p.sum()
  items = []
  for i in range(n):
    size = int(rng.integers(1, 4))
    s = tuple(sorted({str(x) for x in rng.choice(vocab, size=size, p=popularity)}))
    q = 0.0 if rng.random() < 0.3 else float(rng.choice(LEVELS, p=level_p))
    items.append(_item(i, q, s))
  return items


def test_phase2_pairs_one_per_successful_verification():
  items = [_item(0, 0.5, ("a",), sols=("s1", "s2")), _item(1, 0.0, ("a",), sols=("s3",)),
           _item(2, 0.25, ("b",), sols=())]
  assert [(it.question, s) for it, s in Fl.phase2_pairs(items)] == [("q0", "s1"), ("q0", "s2")]


def test_pool_has_unique_questions_and_positive_quality():
  items = [_item(3, 0.5, ("a",), "same"), _item(1, 0.25, ("a",), " same "),
           _item(2, 0.0, ("a",), "other"), _item(4, 0.5, ("a",), "third", sols=())]
  assert [it.id for it in Fl.unique_pool(items)] == [1]


@pytest.mark.parametrize("name", ["quality", "diversity", "qd", "random"])
def test_budget_uniqueness_and_determinism(name):
  items = _synthetic_archive(1500)
  items += [_item(10_000 + i, it.quality, it.skill_set, it.question)  # duplicate questions
            for i, it in enumerate(items[:200])]
  fn = registry.get("filter", name)
  for budget in (0, 1, 37, 400):
    got = fn(items, budget, np.random.default_rng(5))
    assert len(got) == budget
    assert len({it.question for it in got}) == budget
    assert all(it.quality > 0 for it in got)
    assert got == fn(items, budget, np.random.default_rng(5))
  pool = Fl.unique_pool(items)
  everything = fn(items, 10**6, np.random.default_rng(5))
  assert sorted(it.id for it in everything) == sorted(it.id for it in pool)
  assert fn(items, 400, np.random.default_rng(6)) != fn(items, 400, np.random.default_rng(5))
  with pytest.raises(ValueError):
    fn(items, -1, np.random.default_rng(0))


@pytest.mark.parametrize("m", [0.2, 0.4, 0.6, 0.8])
def test_quality_filter_mean_is_close_to_m(m):
  items = _synthetic_archive()
  got = Fl.quality_filter(items, 300, np.random.default_rng(1), mean=m, sd=0.1)
  mean = np.mean([it.quality for it in got])
  # The band's levels end at 0.125 and 0.875, which truncates the Gaussian by ~0.03 at the
  # extremes; the pool's own mean is far from most targets.
  assert abs(mean - m) < 0.05, (m, mean)
  assert np.std([it.quality for it in got]) < 0.14


def test_quality_filter_ignores_the_pool_skew():
  # 95% of the pool at quality 0.125: sampling the pool by Gaussian density alone would
  # give a mean near 0.4 for m = 0.6; the filter targets the picks' distribution.
  items = ([_item(i, 0.125, ("a",)) for i in range(1900)] +
           [_item(2000 + i, LEVELS[::-1][i % 13], ("a",)) for i in range(100)])
  got = Fl.quality_filter(items, 40, np.random.default_rng(0), mean=0.6)
  assert abs(np.mean([it.quality for it in got]) - 0.6) < 0.05


def test_diversity_covers_more_skills_than_random():
  items = _synthetic_archive()
  budget = 25
  div = [skills.div([it.skill_set for it in Fl.diversity_filter(items, budget,
                                                                np.random.default_rng(s))])
         for s in range(5)]
  rnd = [skills.div([it.skill_set for it in Fl.random_filter(items, budget,
                                                             np.random.default_rng(s))])
         for s in range(5)]
  all_skills = skills.div([it.skill_set for it in Fl.unique_pool(items)])
  assert min(div) == all_skills  # greedy coverage reaches every skill within 25 items
  assert max(rnd) < min(div)
  # And it spreads over skill-sets: 25 items from 25 different sets.
  picked = Fl.diversity_filter(items, budget, np.random.default_rng(0))
  assert skills.coverage([it.skill_set for it in picked]) == budget


def test_greedy_order_is_greedy():
  sets = [("a",), ("a", "b"), ("c",), ("a", "b", "c"), ("d",), ("b",), ()]
  order = Fl._greedy_order(sets, np.random.default_rng(0))  # pylint: disable=protected-access
  assert sorted(order) == list(range(len(sets)))
  assert [sets[j] for j in order[:2]] == [("a", "b", "c"), ("d",)]
  assert sets[order[-1]] == ()


def test_qd_picks_higher_quality_than_diversity_within_sets():
  items = _synthetic_archive()
  n_sets = skills.coverage([it.skill_set for it in Fl.unique_pool(items)])
  budget = 2 * n_sets
  qd = Fl.qd_filter(items, budget, np.random.default_rng(0))
  div = Fl.diversity_filter(items, budget, np.random.default_rng(0))
  assert {it.skill_set for it in qd} == {it.skill_set for it in div}
  assert np.mean([it.quality for it in qd]) > np.mean([it.quality for it in div]) + 0.05
  # Within every set, QD's n picks are that set's n best.
  pool, picked = {}, {}
  for it in Fl.unique_pool(items):
    pool.setdefault(it.skill_set, []).append(it.quality)
  for it in qd:
    picked.setdefault(it.skill_set, []).append(it.quality)
  for s, qs in picked.items():
    assert sorted(qs, reverse=True) == sorted(pool[s], reverse=True)[:len(qs)]


def test_training_pairs():
  items = [_item(0, 0.5, ("a",), sols=("s1", "s2", "s3"))]
  assert Fl.training_pairs(items) == [(items[0], "s1")]
  got = {Fl.training_pairs(items, np.random.default_rng(s))[0][1] for s in range(30)}
  assert got == {"s1", "s2", "s3"}
