"""Tests for qdc_jax.data.pipeline."""

import collections
import itertools
import json

import numpy as np
import pytest

from qdc_jax import tokenizers
from qdc_jax.data import pipeline

TOK = tokenizers.CharTokenizer("0123456789+-*=? abcdefghijklmnopqrstuvwxyz")
_SEG_KEYS = ("inputs", "targets", "loss_mask", "positions")


def _records(n: int, seed: int = 0) -> list[dict[str, str]]:
  """Unique arithmetic records with varied prompt and completion lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a, b = int(rng.integers(0, 10 ** int(rng.integers(1, 4)))), int(rng.integers(0, 100))
    steps = " ".join(["ok"] * int(rng.integers(0, 4)))
    out.append({"prompt": f"q{i} {a}+{b}=?", "completion": f"{steps} {a + b}".strip()})
  return out


def _batches(it, n):
  return list(itertools.islice(it, n))


def _segments(batches):
  """Every packed/padded segment as a tuple of (inputs, targets, loss_mask, positions)."""
  segs = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg_r = b["segment_ids"][r]
      for s in np.unique(seg_r[seg_r > 0]):
        where = seg_r == s
        segs.append(tuple(tuple(b[k][r][where].tolist()) for k in _SEG_KEYS))
  return segs


def _alone(rec, seq_len):
  """The same example padded alone, reduced to the segment tuple form."""
  row = pipeline.pad_example(
      pipeline.encode_example(rec["prompt"], rec["completion"], TOK, seq_len=seq_len),
      seq_len=seq_len,
      pad_id=TOK.pad_id,
  )
  where = row["segment_ids"] == 1
  return tuple(tuple(row[k][where].tolist()) for k in _SEG_KEYS)


# ----------------------------------------------------------------------------- contract


def test_one_padded_example_matches_hand_built_contract():
  tok = tokenizers.CharTokenizer("0123456789+=")  # '0'..'9' -> 4..13, '+' -> 14, '=' -> 15.
  recs = [{"prompt": "1+2=", "completion": "3"}]
  kw = dict(seq_len=8, batch_size=1, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
  batch = next(pipeline.lm_dataset(recs, tok, **kw))
  # seq = [bos, '1', '+', '2', '=', '3', eos] = [1, 5, 14, 6, 15, 7, 2]
  expected = {
      "inputs": [1, 5, 14, 6, 15, 7, 0, 0],
      "targets": [5, 14, 6, 15, 7, 2, 0, 0],
      "loss_mask": [0, 0, 0, 0, 1, 1, 0, 0],
      "positions": [0, 1, 2, 3, 4, 5, 0, 0],
      "segment_ids": [1, 1, 1, 1, 1, 1, 0, 0],
  }
  assert set(batch) == set(expected)
  for k, v in expected.items():
    assert batch[k].dtype == np.int32 and batch[k].shape == (1, 8), k
    np.testing.assert_array_equal(batch[k][0], v, err_msg=k)

  batch = next(pipeline.lm_dataset(recs, tok, train_on_prompt=True, **kw))
  np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 1, 1, 1, 1, 0, 0])

  # Truncation to T + 1 = 5 tokens: only prompt targets remain.
  batch = next(pipeline.lm_dataset(recs, tok, **{**kw, "seq_len": 4}))
  np.testing.assert_array_equal(batch["inputs"][0], [1, 5, 14, 6])
  np.testing.assert_array_equal(batch["targets"][0], [5, 14, 6, 15])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 0])
  assert pipeline.count_truncated(recs, tok, seq_len=4) == 1
  assert pipeline.count_truncated(recs, tok, seq_len=6) == 0


def test_loss_mask_is_exactly_completion_and_eos():
  recs = _records(20)
  rows = [
      {k: b[k][r] for k in pipeline.BATCH_KEYS}
      for b in pipeline.eval_batches(recs, TOK, seq_len=48, batch_size=4)
      for r in range(4)
  ]
  for rec, row in zip(recs, rows):
    completion = row["targets"][row["loss_mask"] == 1].tolist()
    assert completion == TOK.encode(rec["completion"]) + [TOK.eos_id]
    prompt_targets = row["targets"][(row["loss_mask"] == 0) & (row["segment_ids"] == 1)].tolist()
    assert prompt_targets == TOK.encode(rec["prompt"])


# ----------------------------------------------------------------------------- packing


def test_packing_preserves_every_example_exactly():
  recs = _records(60, seed=1)
  seq_len = 40
  it = pipeline.lm_dataset(
      recs, TOK, seq_len=seq_len, batch_size=4, pack=True, seed=3, num_epochs=1,
      drop_remainder=False, shard_index=0, shard_count=1,
  )
  batches = list(it)
  rows = sum(b["inputs"].shape[0] for b in batches)
  assert rows < len(recs)  # Packing actually put several examples in some rows.
  assert max(int(b["segment_ids"].max()) for b in batches) >= 2

  # Each segment equals the same example padded alone; none lost or duplicated.
  expected = collections.Counter(_alone(r, seq_len) for r in recs)
  assert collections.Counter(_segments(batches)) == expected
  total_mask = sum(int(b["loss_mask"].sum()) for b in batches)
  assert total_mask == sum(len(TOK.encode(r["completion"])) + 1 for r in recs)

  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg, pos = b["segment_ids"][r], b["positions"][r]
      used = int((seg > 0).sum())
      # Segments fill a prefix of the row, numbered 1, 2, 3, ... in order.
      assert (seg[:used] > 0).all() and (seg[used:] == 0).all()
      assert (np.diff(seg[:used]) >= 0).all() and seg[0] == 1
      assert set(np.unique(seg[:used])) == set(range(1, int(seg.max()) + 1))
      for s in range(1, int(seg.max()) + 1):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
      # Padding is pad tokens with no loss.
      assert (b["inputs"][r][used:] == TOK.pad_id).all()
      assert (b["targets"][r][used:] == TOK.pad_id).all()
      assert (b["loss_mask"][r][used:] == 0).all() and (pos[used:] == 0).all()


# ----------------------------------------------------------------------------- determinism, resume


@pytest.mark.parametrize("pack", [False, True])
def test_same_seed_same_batches(pack):
  recs = _records(30)
  kw = dict(seq_len=32, batch_size=4, pack=pack, shard_index=0, shard_count=1)
  a = _batches(pipeline.lm_dataset(recs, TOK, seed=7, **kw), 6)
  b = _batches(pipeline.lm_dataset(recs, TOK, seed=7, **kw), 6)
  c = _batches(pipeline.lm_dataset(recs, TOK, seed=8, **kw), 6)
  for x, y in zip(a, b):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))


@pytest.mark.parametrize("pack", [False, True])
def test_resume_from_json_state(pack):
  # 13 records, 2 rows per batch: 10 batches cross an epoch boundary, and 3
  # packing bins per round leave the packer mid-round at some batch edges.
  recs = _records(13)
  kw = dict(
      seq_len=32, batch_size=2, pack=pack, seed=5, shard_index=0, shard_count=1, num_packing_bins=3
  )
  it = pipeline.lm_dataset(recs, TOK, **kw)
  _batches(it, 5)
  saved = pipeline.iterator_state_to_json(it)
  assert isinstance(json.loads(saved), dict)
  expected = _batches(it, 5)

  fresh = pipeline.restore_iterator_state(pipeline.lm_dataset(recs, TOK, **kw), saved)
  got = _batches(fresh, 5)
  assert len(got) == len(expected) == 5
  for x, y in zip(expected, got):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- sharding


def test_shards_are_disjoint_and_cover_one_epoch():
  recs = _records(23)
  texts = {}
  for shard in (0, 1):
    it = pipeline.lm_dataset(
        recs, TOK, seq_len=48, batch_size=4, seed=2, num_epochs=1, drop_remainder=False,
        shard_index=shard, shard_count=2,
    )
    texts[shard] = [TOK.decode(row) for b in it for row in b["inputs"]]
  assert len(texts[0]) + len(texts[1]) == len(recs)
  assert not set(texts[0]) & set(texts[1])
  assert set(texts[0]) | set(texts[1]) == {r["prompt"] + r["completion"] for r in recs}


# ----------------------------------------------------------------------------- errors, eval


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"prompt": "1+1="}, "completion"),
        ({"completion": "2"}, "prompt"),
        ({"prompt": 3, "completion": "2"}, "prompt"),
    ],
)
def test_bad_record_names_row_and_field(bad, field):
  recs = _records(4)
  recs[2] = bad
  with pytest.raises(ValueError, match=rf"Record 2 .*'{field}'"):
    pipeline.lm_dataset(recs, TOK, seq_len=16, batch_size=2, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=rf"Record 2 .*'{field}'"):
    pipeline.eval_batches(recs, TOK, seq_len=16, batch_size=2)


def test_eval_batches_cover_records_in_order_with_masked_filler():
  recs = _records(7)
  batches = pipeline.eval_batches(recs, TOK, seq_len=48, batch_size=3)
  assert len(batches) == 3
  for b in batches:
    assert all(b[k].shape == (3, 48) and b[k].dtype == np.int32 for k in pipeline.BATCH_KEYS)
  rows = [{k: b[k][r] for k in pipeline.BATCH_KEYS} for b in batches for r in range(3)]
  for rec, row in zip(recs, rows):
    assert TOK.decode(row["inputs"]) == rec["prompt"] + rec["completion"]
  for filler in rows[7:]:
    assert not filler["loss_mask"].any() and not filler["segment_ids"].any()
    assert (filler["inputs"] == TOK.pad_id).all()
