"""SPARQ's archive A: every generated problem, stored append-only one round at a time.

Layout of the archive directory (r = round, zero-padded to 6 digits):

  round_000000.jsonl   the round's items, one `ArchiveItem.to_json()` object per line
  round_000000.json    the round's commit record: {"format", "round", "first_id",
                       "num_items", "items_bytes", "items_sha256", "state"}; "state" is the
                       caller's opaque JSON dict (RNG state, working-set state, ...)

Commit protocol: the items file, then the record, are each written atomically through the
storage layer (`qdc_jax.storage`: a fsynced temp file renamed into place on a local disk, one
object upload on a bucket), by process 0, with a barrier after each. The record is written
last, so it is the commit point: a round whose record exists (and whose items file has the recorded size)
is committed; anything else is debris of an interrupted commit. Opening an archive therefore

  - deletes `*.tmp` files (half-written, never visible under a real name);
  - deletes an items file that has no record (a crash between the two renames);
  - sets aside a last round whose record is unreadable or whose items file is missing or has
    the wrong size (damage from outside this protocol): both files are renamed to
    `*.damaged`, never deleted, and the round counts as not committed;
  - raises `ArchiveError` for damage before the last round (dropping it would break the id
    sequence; a person has to look).

So after any crash, a reopened archive holds exactly the rounds that were fully committed, and
the next round's item ids continue from the last committed id. Every process opens the archive
and commits the same rounds; process 0 alone writes (and repairs), the others wait at a barrier.
Opening reads every commit record, so keep the per-round state small (ids, RNG state), not
item text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

from qdc_jax import storage

FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
DAMAGED_SUFFIX = ".damaged"
_ITEMS_RE = re.compile(r"round_(\d{6,})\.jsonl")
_RECORD_RE = re.compile(r"round_(\d{6,})\.json")


class ArchiveError(RuntimeError):
  """The archive directory is damaged in a way that cannot be repaired automatically."""


@dataclasses.dataclass(frozen=True)
class ArchiveItem:
  """One generated problem (or one seed) and everything measured about it.

  Attributes:
    id: Sequential id, unique in the archive.
    parent_id: Id of the parent it was mutated from; None for seed items.
    round: Round that generated it.
    strategy: Name of the strategy that generated it ("seed" for seeds, by convention).
    question: The child question; None when none could be read from the generator's output.
    intended_answer: The generator's intended final answer, as text; None if unreadable.
    raw_output: The generator's text, verbatim.
    k: Number of student verifications.
    num_correct: Verifications that reached the intended answer.
    solve_rate: num_correct / k (0 when k = 0).
    quality: QUALITY (see `quality.py`).
    skill_set: Sorted tuple of skills.
    successful_solutions: The correct verifications (phase 2's training solutions).
    valid: Lab only: the oracle's verdict that the intended answer is the true one; None
      where no oracle exists.
    parse_error: Why the generator's output could not be read ("" if it could).
  """

  id: int
  parent_id: Optional[int]
  round: int
  strategy: str
  question: Optional[str]
  intended_answer: Optional[str]
  raw_output: str = ""
  k: int = 0
  num_correct: int = 0
  solve_rate: float = 0.0
  quality: float = 0.0
  skill_set: tuple[str, ...] = ()
  successful_solutions: tuple[str, ...] = ()
  valid: Optional[bool] = None
  parse_error: str = ""

  def __post_init__(self):
    # Lists from callers or JSON become tuples, so items stay immutable and hashable.
    object.__setattr__(self, "skill_set", tuple(self.skill_set))
    object.__setattr__(self, "successful_solutions", tuple(self.successful_solutions))
    if not 0 <= self.num_correct <= max(self.k, 0):
      raise ValueError(f"Item {self.id}: need 0 <= num_correct <= k, got "
                       f"{self.num_correct}, {self.k}")
    if not (math.isfinite(self.quality) and math.isfinite(self.solve_rate)):
      raise ValueError(f"Item {self.id}: quality and solve_rate must be finite")

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["skill_set"] = list(self.skill_set)
    d["successful_solutions"] = list(self.successful_solutions)
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> ArchiveItem:
    """Inverse of `to_json`.

    Raises:
      ValueError: unknown keys (a different format, or a typo), or bad values.
      TypeError: missing required keys.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(d) - names
    if extra:
      raise ValueError(f"Unknown ArchiveItem keys: {sorted(extra)}")
    return cls(**d)


def _items_bytes(items: Sequence[ArchiveItem]) -> bytes:
  return "".join(json.dumps(item.to_json(), allow_nan=False) + "\n"
                 for item in items).encode("utf-8")


class Archive:
  """Append-only store of archive items, one atomically committed file pair per round.

  A class because it owns a directory and the bookkeeping of what is committed in it; all
  contents are plain JSON, readable without this code.
  """

  def __init__(self, directory: str, *, read_only: bool = False):
    """Opens (creating if needed) an archive directory and drops uncommitted debris.

    `read_only=True` (readers such as the QDC measures, possibly while a run is still
    writing): the directory must exist, nothing in it is created, removed or renamed, and
    only the committed rounds are read.

    Raises:
      ArchiveError: a committed round before the last one is damaged, or records disagree
        about item ids.
      FileNotFoundError: read_only and no such directory.
    """
    self.directory = directory
    self.read_only = read_only
    if read_only:
      if not storage.exists(directory):
        raise FileNotFoundError(f"No SPARQ archive at {directory}")
    elif storage.is_writer():
      storage.makedirs(directory)
    # Per committed round: (first_id, num_items, items_bytes, items_sha256).
    self._rounds: list[tuple[int, int, int, str]] = []
    self._recover()

  # -- paths ---------------------------------------------------------------

  def _items_path(self, r: int) -> str:
    return storage.join(self.directory, f"round_{r:06d}.jsonl")

  def _record_path(self, r: int) -> str:
    return storage.join(self.directory, f"round_{r:06d}.json")

  # -- opening -------------------------------------------------------------

  def _read_record(self, r: int) -> Optional[dict[str, Any]]:
    """The round's commit record if it is well formed and its items file matches."""
    try:
      record = json.loads(storage.read_bytes(self._record_path(r)).decode("utf-8"))
      ok = (isinstance(record, dict) and record.get("format") == FORMAT_VERSION and
            record.get("round") == r and isinstance(record.get("state"), dict) and
            all(isinstance(record.get(k), int)
                for k in ("first_id", "num_items", "items_bytes")) and
            isinstance(record.get("items_sha256"), str) and
            storage.path(self._items_path(r)).stat().length == record["items_bytes"])
      return record if ok else None
    except (OSError, ValueError):
      return None

  def _recover(self) -> None:
    # Every process reads the same directory and reaches the same verdict; then process 0
    # alone removes or sets aside the debris, and the others wait for it.
    names = storage.listdir(self.directory)
    debris = [storage.join(self.directory, n) for n in names if TMP_SUFFIX in n]
    damaged = []
    record_rounds = sorted(int(m[1]) for m in map(_RECORD_RE.fullmatch, names) if m)
    item_rounds = sorted(int(m[1]) for m in map(_ITEMS_RE.fullmatch, names) if m)
    if record_rounds != list(range(len(record_rounds))):
      raise ArchiveError(f"{self.directory}: commit records are not rounds 0..n-1: "
                         f"{record_rounds[:10]}...")
    next_id = 0
    for r in record_rounds:
      record = self._read_record(r)
      if record is None:
        if r != record_rounds[-1]:
          raise ArchiveError(f"{self.directory}: round {r} is damaged but later rounds are "
                             "committed; repair or remove it by hand.")
        logging.warning("Archive %s: last round %d is damaged; %s and treated as not "
                        "committed.", self.directory, r,
                        "left as it is (read-only)" if self.read_only
                        else f"set aside as *{DAMAGED_SUFFIX}")
        damaged = [p for p in (self._items_path(r), self._record_path(r)) if storage.exists(p)]
        break
      if record["first_id"] != next_id:
        raise ArchiveError(f"{self.directory}: round {r} starts at id {record['first_id']}, "
                           f"expected {next_id}")
      self._rounds.append((record["first_id"], record["num_items"], record["items_bytes"],
                           record["items_sha256"]))
      next_id += record["num_items"]
    # Items written whose record never was: the round was never committed.
    debris += [self._items_path(r) for r in item_rounds
               if r >= len(self._rounds) and self._items_path(r) not in damaged]
    if self.read_only:
      return
    if storage.is_writer():
      for p in debris:
        if storage.exists(p):
          storage.path(p).unlink()
      for p in damaged:
        storage.path(p).rename(p + DAMAGED_SUFFIX)
    storage.barrier(f"archive-open:{self.directory}")

  # -- queries -------------------------------------------------------------

  def rounds_committed(self) -> int:
    """Number of committed rounds; the next round to commit has this index."""
    return len(self._rounds)

  def next_id(self) -> int:
    """Id the next committed item must have."""
    if not self._rounds:
      return 0
    first_id, num_items, _, _ = self._rounds[-1]
    return first_id + num_items

  def num_items(self) -> int:
    return self.next_id()

  def iter_items(self, rounds: Optional[Iterable[int]] = None) -> Iterator[ArchiveItem]:
    """Committed items in id order (of the given rounds, else all).

    Raises:
      ArchiveError: a committed items file no longer matches its record.
      IndexError: a round that is not committed.
    """
    for r in (range(len(self._rounds)) if rounds is None else rounds):
      if not 0 <= r < len(self._rounds):
        raise IndexError(f"Round {r} is not committed ({len(self._rounds)} are)")
      first_id, num_items, size, digest = self._rounds[r]
      data = storage.read_bytes(self._items_path(r))
      if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise ArchiveError(f"{self._items_path(r)} changed after it was committed")
      lines = data.decode("utf-8").splitlines()
      if len(lines) != num_items:
        raise ArchiveError(f"{self._items_path(r)}: {len(lines)} lines, record says "
                           f"{num_items}")
      for line in lines:
        yield ArchiveItem.from_json(json.loads(line))

  def load_items(self, rounds: Optional[Iterable[int]] = None) -> list[ArchiveItem]:
    """All committed items (of the given rounds, else all), in id order."""
    return list(self.iter_items(rounds))

  def load_state(self, round: int) -> dict[str, Any]:  # pylint: disable=redefined-builtin
    """The state dict committed with a round.

    Raises:
      IndexError: the round is not committed.
    """
    if not 0 <= round < len(self._rounds):
      raise IndexError(f"Round {round} is not committed ({len(self._rounds)} are)")
    return json.loads(storage.read_bytes(self._record_path(round)).decode("utf-8"))["state"]

  def latest_state(self) -> Optional[dict[str, Any]]:
    """The last committed round's state, None for an empty archive."""
    return self.load_state(len(self._rounds) - 1) if self._rounds else None

  # -- writing -------------------------------------------------------------

  def commit_round(self, round: int,  # pylint: disable=redefined-builtin
                   items: Sequence[ArchiveItem], state: Mapping[str, Any]) -> None:
    """Atomically appends one round: its items and the caller's state.

    Args:
      round: Must equal `rounds_committed()` (rounds are committed in order, once).
      items: The round's items, ids `next_id(), next_id()+1, ...`, each with `.round == round`
        (may be empty).
      state: JSON-serialisable dict (no NaN/inf), returned by `load_state(round)`.

    Raises:
      ValueError: wrong round, ids or item rounds, or a state that is not JSON.
    """
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read-only")
    if round != len(self._rounds):
      raise ValueError(f"Next round to commit is {len(self._rounds)}, got {round}")
    first_id = self.next_id()
    for i, item in enumerate(items):
      if item.id != first_id + i:
        raise ValueError(f"Item ids must run {first_id}, {first_id + 1}, ...; item {i} has "
                         f"id {item.id}")
      if item.round != round:
        raise ValueError(f"Item {item.id} says round {item.round}, committing round {round}")
    if not isinstance(state, Mapping):
      raise ValueError(f"state must be a dict, got {type(state).__name__}")
    data = _items_bytes(items)
    record = {"format": FORMAT_VERSION, "round": round, "first_id": first_id,
              "num_items": len(items), "items_bytes": len(data),
              "items_sha256": hashlib.sha256(data).hexdigest(), "state": dict(state)}
    try:
      record_data = json.dumps(record, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
      raise ValueError(f"state is not JSON-serialisable: {e}") from e
    storage.write_bytes(self._items_path(round), data)
    storage.write_bytes(self._record_path(round), record_data)  # The commit point.
    self._rounds.append((first_id, len(items), len(data), record["items_sha256"]))
