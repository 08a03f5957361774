"""grain pipelines from (prompt, completion) text records to next-token training batches.

Batch contract: a dict of numpy int32 arrays, each [B, T] (B = per-process batch
size, T = seq_len):

  inputs        seq[:-1] where seq = [bos] + enc(prompt) + enc(completion) + [eos],
                truncated to T + 1 tokens; pad_id after the example.
  targets       seq[1:]; pad_id after the example.
  loss_mask     1 on targets that belong to the completion (its final eos included),
                0 on prompt targets and padding. With `train_on_prompt`, 1 on every
                non-pad target.
  positions     0, 1, 2, ... within each example (restarting per packed segment);
                0 on padding.
  segment_ids   1, 2, 3, ... for the examples packed into a row (just 1 when not
                packing); 0 on padding.

The training pipeline is a grain `MapDataset` (source -> shard -> shuffle ->
repeat -> tokenize) turned into an `IterDataset` (-> pack or pad -> batch).
Its iterator's `get_state()` is a small dict of ints (record index into the
shuffled, repeated stream, plus the packer's position in its current group), so
resuming never re-reads data; `iterator_state_to_json` / `restore_iterator_state`
carry it through a trainer checkpoint.

Typical use:

  it = lm_dataset(records, tok, seq_len=256, batch_size=32, pack=True, seed=0)
  batch = next(it)
  saved = iterator_state_to_json(it)  # store next to params in the checkpoint
  ...
  it = lm_dataset(records, tok, seq_len=256, batch_size=32, pack=True, seed=0)
  restore_iterator_state(it, saved)  # continues exactly where it left off
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from qdc_jax.tokenizers import Tokenizer

BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
_FIELDS = ("prompt", "completion")
# Map-stage reads run in a few threads; more buys nothing for Python tokenizers
# (GIL) and costs memory per iterator.
_DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


def validate_records(records: Sequence[Mapping[str, Any]]) -> None:
  """Checks every record has string 'prompt' and 'completion' fields.

  Done eagerly, before sharding, so an error names the row of `records` itself
  rather than surfacing later, mid-training, on one host.

  Raises:
    ValueError: naming the first bad row index and field.
  """
  for i, rec in enumerate(records):
    if not isinstance(rec, Mapping):
      raise ValueError(f"Record {i} is a {type(rec).__name__}, expected a dict with {_FIELDS}.")
    for field in _FIELDS:
      if field not in rec:
        raise ValueError(f"Record {i} is missing field {field!r}.")
      if not isinstance(rec[field], str):
        raise ValueError(
            f"Record {i} field {field!r} must be a str, got {type(rec[field]).__name__}."
        )


def encode_example(
    prompt: str,
    completion: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    train_on_prompt: bool = False,
) -> dict[str, np.ndarray]:
  """Unpadded inputs / targets / loss_mask of one example, each of length L <= seq_len.

  Args:
    prompt: Text the model conditions on.
    completion: Text the model learns to produce.
    tokenizer: Supplies bos / eos and the encoding.
    seq_len: T; the token sequence is cut to T + 1 tokens.
    train_on_prompt: Also put loss on prompt targets.

  Returns:
    {'inputs', 'targets', 'loss_mask'}: int32 arrays of equal length.
  """
  prompt_ids = tokenizer.encode(prompt)
  seq = [tokenizer.bos_id, *prompt_ids, *tokenizer.encode(completion), tokenizer.eos_id]
  seq_T1 = np.asarray(seq[: seq_len + 1], dtype=np.int32)
  length = len(seq_T1) - 1
  # targets[j] = seq[j + 1] is a completion token iff j + 1 > len(prompt_ids).
  loss_mask = np.arange(length) >= (0 if train_on_prompt else len(prompt_ids))
  return {
      "inputs": seq_T1[:-1],
      "targets": seq_T1[1:],
      "loss_mask": loss_mask.astype(np.int32),
  }


def pad_example(
    example: Mapping[str, np.ndarray], *, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
  """One unpadded example (from `encode_example`) as a full contract row of length T."""
  length = len(example["inputs"])
  pad = seq_len - length

  def right_pad(x: np.ndarray, value: int) -> np.ndarray:
    return np.pad(x, (0, pad), constant_values=value).astype(np.int32)

  return {
      "inputs": right_pad(example["inputs"], pad_id),
      "targets": right_pad(example["targets"], pad_id),
      "loss_mask": right_pad(example["loss_mask"], 0),
      "positions": right_pad(np.arange(length, dtype=np.int32), 0),
      "segment_ids": right_pad(np.ones(length, dtype=np.int32), 0),
  }


def count_truncated(
    records: Sequence[Mapping[str, str]], tokenizer: Tokenizer, *, seq_len: int
) -> int:
  """How many records are longer than seq_len + 1 tokens (and so lose their tail)."""
  n = 0
  for rec in records:
    total = 2 + len(tokenizer.encode(rec["prompt"])) + len(tokenizer.encode(rec["completion"]))
    n += total > seq_len + 1
  return n


def _record_to_example(
    rec: Mapping[str, Any], *, tokenizer: Tokenizer, seq_len: int, train_on_prompt: bool
) -> dict[str, np.ndarray]:
  return encode_example(
      rec["prompt"], rec["completion"], tokenizer, seq_len=seq_len, train_on_prompt=train_on_prompt
  )


def _packed_to_contract(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  # grain's packer emits per-feature segment ids / positions; all three packed
  # features share one layout, so those of 'inputs' serve for the row.
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "loss_mask": packed["loss_mask"],
      "positions": packed["inputs_positions"],
      "segment_ids": packed["inputs_segment_ids"],
  }


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"Need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}.")
  return shard_index, shard_count


def lm_iter_dataset(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    pack: bool = False,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    train_on_prompt: bool = False,
    num_packing_bins: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """The training pipeline as a grain `IterDataset`; see `lm_dataset` for arguments."""
  validate_records(records)
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}.")
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)

  ds = grain.MapDataset.source(records)
  # Strided shards: disjoint, cover everything, sizes differ by at most one.
  ds = ds.slice(slice(shard_index, None, shard_count))
  if len(ds) == 0:
    raise ValueError(f"Shard {shard_index}/{shard_count} of {len(records)} records is empty.")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # repeat() reseeds shuffle per epoch, so every epoch has its own order.
  ds = ds.repeat(num_epochs)
  ds = ds.map(
      functools.partial(
          _record_to_example, tokenizer=tokenizer, seq_len=seq_len, train_on_prompt=train_on_prompt
      )
  )
  read_options = read_options or _DEFAULT_READ_OPTIONS

  if not pack:
    ds = ds.map(functools.partial(pad_example, seq_len=seq_len, pad_id=tokenizer.pad_id))
    # Batching on the MapDataset keeps the iterator state a single index.
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.to_iter_dataset(read_options)

  features = ("inputs", "targets", "loss_mask")
  ids = grain.experimental.FirstFitPackIterDataset(
      ds.to_iter_dataset(read_options),
      length_struct={k: seq_len for k in features},
      num_packing_bins=num_packing_bins or batch_size,
      # Records are already shuffled; unshuffled bins keep the output a pure
      # function of the record order.
      shuffle_bins=False,
      padding_struct={"inputs": tokenizer.pad_id, "targets": tokenizer.pad_id, "loss_mask": 0},
  )
  return ids.map(_packed_to_contract).batch(batch_size, drop_remainder=drop_remainder)


def lm_dataset(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    pack: bool = False,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    train_on_prompt: bool = False,
    num_packing_bins: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """A checkpointable iterator of next-token training batches (see module docstring).

  Args:
    records: Sequence of dicts with str 'prompt' and 'completion' (extra keys ignored).
    tokenizer: A `qdc_jax.tokenizers.Tokenizer`.
    seq_len: T, the row length.
    batch_size: Rows per batch on this process.
    pack: First-fit pack several examples per row (grain's
      `FirstFitPackIterDataset`) instead of one padded example per row.
    shuffle: Shuffle records (differently each epoch) with `seed`.
    seed: Shuffle seed; the same seed gives the same batches.
    num_epochs: Passes over this process's shard; None repeats forever.
    shard_index: This process's shard; default `jax.process_index()`.
    shard_count: Number of shards; default `jax.process_count()`. Shards are
      strided (`records[shard_index::shard_count]`), so with finite
      `num_epochs` processes may differ by one record per epoch.
    drop_remainder: Drop a final short batch (finite `num_epochs` only).
    train_on_prompt: Put loss on prompt targets too.
    num_packing_bins: Rows packed together per packing round; default
      `batch_size`. More bins pack tighter but mix examples from further apart.
    read_options: grain thread/prefetch settings for the map stage.

  Returns:
    A grain iterator of batch dicts; its `get_state()` is JSON-serialisable.

  Raises:
    ValueError: a record lacks a str field (naming row and field), or bad sizes.
  """
  return iter(
      lm_iter_dataset(
          records,
          tokenizer,
          seq_len=seq_len,
          batch_size=batch_size,
          pack=pack,
          shuffle=shuffle,
          seed=seed,
          num_epochs=num_epochs,
          shard_index=shard_index,
          shard_count=shard_count,
          drop_remainder=drop_remainder,
          train_on_prompt=train_on_prompt,
          num_packing_bins=num_packing_bins,
          read_options=read_options,
      )
  )


def eval_batches(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    train_on_prompt: bool = False,
) -> list[dict[str, np.ndarray]]:
  """Every record exactly once, in order, as padded batches.

  The last batch is filled with padding rows (pad tokens, all-zero loss_mask and
  segment_ids), so every batch has the same shape and filler rows add nothing
  to masked sums. Not sharded: on several processes pass each its own slice.
  """
  validate_records(records)
  rows = [
      pad_example(
          _record_to_example(
              rec, tokenizer=tokenizer, seq_len=seq_len, train_on_prompt=train_on_prompt
          ),
          seq_len=seq_len,
          pad_id=tokenizer.pad_id,
      )
      for rec in records
  ]
  filler = {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}
  filler["inputs"] = filler["targets"] = np.full(seq_len, tokenizer.pad_id, np.int32)
  rows += [filler] * (-len(rows) % batch_size)
  return [
      {k: np.stack([r[k] for r in rows[s : s + batch_size]]) for k in BATCH_KEYS}
      for s in range(0, len(rows), batch_size)
  ]


# --------------------------------------------------------------------------- array rows


def array_dataset(columns: Mapping[str, np.ndarray], *, batch_size: int, seed: int = 0,
                  shuffle: bool = True) -> grain.DatasetIterator:
  """Rows of equal-length arrays (pre-tokenised windows, regression points) as a
  checkpointable iterator of global batches: shuffled afresh each epoch, repeated forever.

  Its state is one index (as `lm_dataset`'s), so `iterator_state_to_json` carries it.
  """
  cols = {k: np.asarray(v) for k, v in columns.items()}
  n = {len(v) for v in cols.values()}
  if len(n) != 1 or not n.pop():
    raise ValueError(f"array_dataset needs columns of one non-zero length, got "
                     f"{ {k: len(v) for k, v in cols.items()} }")
  rows = len(next(iter(cols.values())))
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ds = grain.MapDataset.range(rows)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None).map(lambda i: {k: v[i] for k, v in cols.items()})
  ds = ds.batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset(_DEFAULT_READ_OPTIONS))


def array_eval_batches(columns: Mapping[str, np.ndarray], *, batch_size: int
                       ) -> list[dict[str, np.ndarray]]:
  """Every row once, in order, in batches of one shape; the last is filled with all-zero rows
  (so a loss weighted by a mask or weight column adds nothing for them)."""
  cols = {k: np.asarray(v) for k, v in columns.items()}
  rows = len(next(iter(cols.values())))
  pad = -rows % batch_size
  cols = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in
          cols.items()}
  return [{k: v[s:s + batch_size] for k, v in cols.items()}
          for s in range(0, rows + pad, batch_size)]


def lm_windows(tokens: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """A token stream cut into non-overlapping rows of seq_len + 1 tokens, in the batch contract
  (every target carries loss; positions restart per row). A short tail is dropped."""
  tokens = np.asarray(tokens, np.int32)
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise ValueError(f"{len(tokens)} tokens make no row of seq_len={seq_len} + 1")
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
  w = tokens[idx]
  return {"inputs": w[:, :-1], "targets": w[:, 1:], "loss_mask": np.ones((n, seq_len),
                                                                          np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
          "segment_ids": np.ones((n, seq_len), np.int32)}


# --------------------------------------------------------------------------- iterator state

_BYTES_TAG = "__qdc_bytes_b64__"


def _to_jsonable(x: Any) -> Any:
  # Current grain states are dicts of ints; other grain versions / transforms
  # (e.g. mp_prefetch) may hold bytes or numpy scalars, so encode those too.
  if isinstance(x, Mapping):
    return {str(k): _to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_jsonable(v) for v in x]
  if isinstance(x, bytes):
    return {_BYTES_TAG: base64.b64encode(x).decode("ascii")}
  if isinstance(x, np.generic):
    return x.item()
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  raise TypeError(f"Iterator state holds a {type(x).__name__}, which has no JSON form: {x!r}")


def _from_jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    if set(x) == {_BYTES_TAG}:
      return base64.b64decode(x[_BYTES_TAG])
    return {k: _from_jsonable(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_jsonable(v) for v in x]
  return x


def iterator_state_to_json(it: grain.DatasetIterator) -> str:
  """The iterator's position as a JSON string (for a trainer checkpoint)."""
  return json.dumps(_to_jsonable(it.get_state()), sort_keys=True)


def restore_iterator_state(it: grain.DatasetIterator, state_json: str) -> grain.DatasetIterator:
  """Moves `it` (built with the same arguments) to a position saved by `iterator_state_to_json`.

  Returns:
    `it`, for chaining.
  """
  it.set_state(_from_jsonable(json.loads(state_json)))
  return it

