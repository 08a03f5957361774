"""SPARQ metrics: per-round summaries and cumulative archive totals."""
import json

import numpy as np
import pytest

from qdc_jax.sparq import metrics as M
from qdc_jax.sparq.archive import ArchiveItem


def _item(i, quality=0.0, skill_set=(), valid=None, parse_error=""):
  return ArchiveItem(id=i, parent_id=0, round=1, strategy="t", question="q",
                     intended_answer="1", quality=quality, skill_set=skill_set, valid=valid,
                     parse_error=parse_error)


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
