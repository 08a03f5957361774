"""SPARQ metrics: per-round summaries and cumulative archive totals."""
import dataclasses
import json

import numpy as np
import pytest

from qdc_jax.sparq import metrics as M
from qdc_jax.sparq.archive import ArchiveItem


def _item(i, quality=0.0, skill_set=(), valid=None, parse_error="", round_=1, solve_rate=0.0):
  return ArchiveItem(id=i, parent_id=0, round=round_, strategy="t", question="q",
                     intended_answer="1", quality=quality, skill_set=skill_set, valid=valid,
                     parse_error=parse_error, solve_rate=solve_rate)


ITEMS = [
    _item(0, 0.5, ("a", "b"), valid=True),
    _item(1, 0.75, ("a", "b"), valid=False),
    _item(2, 0.0, ("c",), valid=True),
    _item(3, 0.0, (), valid=False, parse_error="parse: unexpected token 'x'"),
    _item(4, 0.0, (), parse_error="no_answer_line"),
    _item(5, 0.25, ("d",), parse_error=""),
    _item(6, 0.0, (), parse_error="parse: empty"),
]


def test_summary_by_hand():
  s = M.summarize(ITEMS)
  assert s["problems"] == 7
  assert s["parse_failures"] == 3
  assert s["parse_failures_by_reason"] == {"no_answer_line": 1, "parse": 2}
  assert s["valid_fraction"] == pytest.approx(2 / 4)
  assert s["valid_fraction_positive"] == pytest.approx(1 / 2)
  assert s["mean_quality"] == pytest.approx(1.5 / 7)
  assert s["max_quality"] == 0.75
  assert s["num_quality_positive"] == 3
  assert s["frac_quality_positive"] == pytest.approx(3 / 7)
  assert s["unique_skills"] == 4
  assert s["unique_skill_sets"] == 3  # (a, b), (c), (d); the empty set is not a niche
  assert s["unique_skill_sets_positive"] == 2
  assert s["qd_score"] == pytest.approx(0.75 + 0.0 + 0.25)
  assert M.qd_score(ITEMS) == s["qd_score"]


def test_empty():
  s = M.summarize([])
  assert s["problems"] == 0 and s["valid_fraction"] is None and s["mean_quality"] == 0.0
  assert s["qd_score"] == 0.0 and s["frac_quality_positive"] == 0.0


def test_cumulative_equals_summary_of_everything_and_round_trips():
  rng = np.random.default_rng(0)
  items = [_item(i, float(rng.choice([0.0, 0.25, 0.5])),
                 tuple(sorted({f"s{j}" for j in rng.integers(0, 6, size=rng.integers(0, 3))})),
                 valid=bool(rng.random() < 0.7), parse_error=["", "", "parse: x"][i % 3])
           for i in range(300)]
  stats = M.ArchiveStats()
  for r in range(10):
    batch = items[30 * r:30 * (r + 1)]
    flat, stats = M.round_and_cumulative(stats, batch)
    assert flat["round/problems"] == 30
    stats = M.ArchiveStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert stats.summary() == M.summarize(items[:30 * (r + 1)])
  assert flat["archive/problems"] == 300


def test_by_round_is_the_loops_round_and_cumulative_without_the_seeds():
  seeds = [_item(100 + i, 1.0, ("seed",), round_=0) for i in range(3)]
  rounds = [ITEMS[:3], ITEMS[3:5], ITEMS[5:]]
  items = seeds + [dataclasses.replace(it, round=r + 1) for r, batch in enumerate(rounds)
                   for it in batch]
  rows = M.by_round(list(reversed(items)))  # any order in, rounds in order out
  assert [r["round"] for r in rows] == [1, 2, 3]
  stats = M.ArchiveStats()
  for row, batch in zip(rows, rounds):
    want, stats = M.round_and_cumulative(
        stats, [dataclasses.replace(it, round=row["round"]) for it in batch])
    assert row == {"round": row["round"], **want}
  # By hand: coverage (a, b), (c) after round 1, + (d) in round 3; QD-score 0.75, then 1.0.
  assert [r["archive/unique_skill_sets"] for r in rows] == [2, 2, 3]
  assert [r["archive/qd_score"] for r in rows] == pytest.approx([0.75, 0.75, 1.0])
  assert [r["round/problems"] for r in rows] == [3, 2, 2]
  assert M.children(items) == [it for it in items if it.round > 0]
  assert M.by_round(seeds) == []


def test_niches_group_by_skill_set_best_first_and_sum_to_the_qd_score():
  items = ITEMS + [_item(7, 0.5, ("c",), solve_rate=0.5), _item(8, 0.5, ("c",), solve_rate=0.75)]
  ns = M.niches(items, per_niche=2)
  assert [n.skill_set for n in ns] == [("a", "b"), ("c",), ("d",)]  # 0.75, then 0.5 > 0.25
  ab, c, d = ns
  assert (ab.count, ab.best_quality, ab.mean_quality, ab.num_quality_positive) == (
      2, 0.75, pytest.approx(0.625), 2)
  assert [it.id for it in ab.examples] == [1, 0]
  # Ties on quality: the higher solve rate first; at most per_niche examples.
  assert [it.id for it in c.examples] == [8, 7] and c.count == 3
  assert [it.id for it in d.examples] == [5]
  assert sum(n.best_quality for n in ns) == pytest.approx(M.qd_score(items))
  assert len(ns) == M.summarize(items)["unique_skill_sets"]
  assert M.niches([_item(0)]) == []  # the empty skill-set is no niche
