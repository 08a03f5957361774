"""SPARQ archive: item JSON, atomic per-round commits, recovery after crashes."""
import json
import os

import pytest

from qdc_jax.sparq import archive as A


def _items(first_id, n, round_):
  return [A.ArchiveItem(id=first_id + i, parent_id=None if round_ == 0 else i,
                        round=round_, strategy="static_uniform", question=f"Q{first_id + i}",
                        intended_answer=str(i), raw_output="raw", k=16, num_correct=i % 17,
                        solve_rate=(i % 17) / 16,
                        quality=0.5, skill_set=["b", "a"][:1 + i % 2],
                        successful_solutions=["s1", "s2"], valid=bool(i % 2),
                        parse_error="" if i % 3 else "parse: bad")
          for i in range(n)]


def _commit(arch, round_, n):
  items = _items(arch.next_id(), n, round_)
  arch.commit_round(round_, items, {"rng": {"s": round_ * 10**30}, "w": [round_]})
  return items


def test_item_json_round_trip():
  item = A.ArchiveItem(id=3, parent_id=None, round=0, strategy="seed", question=None,
                       intended_answer=None, skill_set=["algebra"],
                       successful_solutions=("x",))
  d = json.loads(json.dumps(item.to_json()))
  assert A.ArchiveItem.from_json(d) == item
  assert item.skill_set == ("algebra",)
  with pytest.raises(ValueError):
    A.ArchiveItem.from_json({**d, "typo": 1})
  with pytest.raises(ValueError):
    A.ArchiveItem(id=0, parent_id=None, round=0, strategy="s", question="q",
                  intended_answer="1", k=4, num_correct=5)


def test_commit_and_reopen(tmp_path):
  arch = A.Archive(str(tmp_path))
  assert arch.rounds_committed() == 0 and arch.next_id() == 0 and arch.latest_state() is None
  r0 = _commit(arch, 0, 5)
  r1 = _commit(arch, 1, 0)  # an empty round is still a round
  r2 = _commit(arch, 2, 3)
  again = A.Archive(str(tmp_path))
  assert again.rounds_committed() == 3 and again.next_id() == 8
  assert again.load_items() == r0 + r1 + r2
  assert again.load_items([2]) == r2
  assert again.load_state(2) == {"rng": {"s": 2 * 10**30}, "w": [2]}
  assert again.latest_state() == again.load_state(2)
  with pytest.raises(IndexError):
    again.load_state(3)


def test_commit_validates(tmp_path):
  arch = A.Archive(str(tmp_path))
  with pytest.raises(ValueError):
    arch.commit_round(1, [], {})  # rounds go in order
  with pytest.raises(ValueError):
    arch.commit_round(0, _items(1, 2, 0), {})  # ids must start at next_id
  with pytest.raises(ValueError):
    arch.commit_round(0, _items(0, 2, 1), {})  # items of another round
  with pytest.raises(ValueError):
    arch.commit_round(0, [], {"x": float("nan")})
  with pytest.raises(ValueError):
    arch.commit_round(0, [], {"x": object()})
  assert A.Archive(str(tmp_path)).rounds_committed() == 0
  assert os.listdir(tmp_path) == []


def test_crash_debris_is_dropped_and_ids_continue(tmp_path):
  arch = A.Archive(str(tmp_path))
  r0 = _commit(arch, 0, 4)
  r1 = _commit(arch, 1, 2)
  # Crash 1: round 2 died while writing its items (half a tmp file).
  (tmp_path / "round_000002.jsonl.tmp").write_text('{"id": 6, "parent_')
  # Crash 2 (alternative): the items file was renamed into place but the record never was.
  (tmp_path / "round_000002.jsonl").write_text(
      json.dumps(_items(6, 1, 2)[0].to_json()) + "\n")
  (tmp_path / "round_000002.json.tmp").write_text('{"format": 1, "ro')
  arch = A.Archive(str(tmp_path))
  assert arch.rounds_committed() == 2 and arch.next_id() == 6
  assert sorted(os.listdir(tmp_path)) == [f"round_00000{r}.{e}" for r in (0, 1)
                                          for e in ("json", "jsonl")]
  r2 = _commit(arch, 2, 3)
  items = A.Archive(str(tmp_path)).load_items()
  assert items == r0 + r1 + r2
  assert [it.id for it in items] == list(range(9))


def test_damaged_last_round_is_set_aside_not_deleted(tmp_path):
  arch = A.Archive(str(tmp_path))
  r0 = _commit(arch, 0, 3)
  _commit(arch, 1, 3)
  path = tmp_path / "round_000001.jsonl"
  path.write_bytes(path.read_bytes()[:-10])  # truncated from outside the protocol
  arch = A.Archive(str(tmp_path))
  assert arch.rounds_committed() == 1 and arch.load_items() == r0
  assert (tmp_path / "round_000001.jsonl.damaged").exists()
  assert (tmp_path / "round_000001.json.damaged").exists()
  r1 = _commit(arch, 1, 2)
  assert A.Archive(str(tmp_path)).load_items() == r0 + r1


def test_damaged_middle_round_raises(tmp_path):
  arch = A.Archive(str(tmp_path))
  for r in range(3):
    _commit(arch, r, 2)
  (tmp_path / "round_000001.json").write_text("{not json")
  with pytest.raises(A.ArchiveError):
    A.Archive(str(tmp_path))


def test_changed_items_file_is_detected_on_load(tmp_path):
  arch = A.Archive(str(tmp_path))
  _commit(arch, 0, 2)
  path = tmp_path / "round_000000.jsonl"
  data = path.read_bytes()
  path.write_bytes(data.replace(b"Q0", b"Q9"))  # same size, different content
  with pytest.raises(A.ArchiveError):
    A.Archive(str(tmp_path)).load_items()
