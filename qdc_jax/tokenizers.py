"""Tokenizers behind one small interface: a char tokenizer (lab) and SentencePiece (Gemma).

Every tokenizer exposes `vocab_size`, `pad_id`, `bos_id`, `eos_id`, and
`encode` / `decode` (plus batch forms). `decode` is the inverse used on model
samples: it drops pad and bos ids and stops at the first eos, so a sampled row
`[bos, ..., eos, junk...]` decodes to just its text.

Typical use:

  tok = make_tokenizer("char", alphabet="0123456789+-*/=() \\n")
  ids = tok.encode("1+2=3", add_bos=True, add_eos=True)
  assert tok.decode(ids) == "1+2=3"
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

# Ids of the char tokenizer's special tokens; alphabet characters follow them.
CHAR_PAD_ID = 0
CHAR_BOS_ID = 1
CHAR_EOS_ID = 2
CHAR_UNK_ID = 3
_CHAR_NUM_SPECIAL = 4
# What the char tokenizer decodes its unk id to (U+FFFD REPLACEMENT CHARACTER).
UNK_TEXT = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of qdc_jax relies on from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    """Number of rows the embedding table needs (may exceed the used ids)."""
    ...

  @property
  def pad_id(self) -> int:
    ...

  @property
  def bos_id(self) -> int:
    ...

  @property
  def eos_id(self) -> int:
    ...

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...

  def encode_batch(
      self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
  ) -> list[list[int]]:
    ...

  def decode_batch(self, ids_batch: Iterable[Iterable[int]]) -> list[str]:
    ...


def _content_ids(ids: Iterable[Any], *, pad_id: int, bos_id: int, eos_id: int) -> list[int]:
  """Ids up to (excluding) the first eos, without pad and bos.

  Accepts numpy / jax integer scalars as well as Python ints, since decode is
  mostly called on rows of sampled arrays.
  """
  out = []
  for i in ids:
    i = int(i)
    if i == eos_id:
      break
    if i == pad_id or i == bos_id:
      continue
    out.append(i)
  return out


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes: ids 0=pad, 1=bos, 2=eos, then byte b -> 3 + b (no unk: every text encodes).

  The scaling chapter's tokenizer for real text (source code, prose): nothing to train or
  download, one vocabulary for every corpus, so losses are comparable (nats per byte).
  Decoding replaces byte sequences that are not valid UTF-8 (a sample cut mid-character).
  """

  pad_vocab_to: int = 8
  num_special = 3

  @property
  def vocab_size(self) -> int:
    return _round_up(self.num_special + 256, self.pad_vocab_to)

  pad_id = property(lambda self: CHAR_PAD_ID)
  bos_id = property(lambda self: CHAR_BOS_ID)
  eos_id = property(lambda self: CHAR_EOS_ID)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = [b + self.num_special for b in text.encode("utf-8")]
    return ([CHAR_BOS_ID] if add_bos else []) + ids + ([CHAR_EOS_ID] if add_eos else [])

  def decode(self, ids: Iterable[int]) -> str:
    content = _content_ids(ids, pad_id=CHAR_PAD_ID, bos_id=CHAR_BOS_ID, eos_id=CHAR_EOS_ID)
    bad = [i for i in content if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"Token id {bad[0]} outside vocabulary [0, {self.vocab_size}).")
    data = bytes(i - self.num_special for i in content
                 if self.num_special <= i < self.num_special + 256)
    return data.decode("utf-8", errors="replace")

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

  def decode_batch(self, ids_batch: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in ids_batch]


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """One id per character of a fixed alphabet, after four special ids.

  Ids: 0=pad, 1=bos, 2=eos, 3=unk, then `alphabet[k]` -> 4 + k. Characters not
  in the alphabet encode to unk, which decodes to U+FFFD. `vocab_size` is
  rounded up to a multiple of `pad_vocab_to` so embedding/logit matmuls get
  friendly shapes; the extra ids are never produced by `encode` and decode to ''.

  Attributes:
    alphabet: The characters, each at most once.
    pad_vocab_to: Round `vocab_size` up to a multiple of this (1 = no rounding).
  """

  alphabet: str
  pad_vocab_to: int = 8
  _char_to_id: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not self.alphabet:
      raise ValueError("CharTokenizer alphabet must not be empty.")
    dupes = sorted(c for c, n in collections.Counter(self.alphabet).items() if n > 1)
    if dupes:
      raise ValueError(f"CharTokenizer alphabet has repeated characters: {dupes!r}")
    if self.pad_vocab_to < 1:
      raise ValueError(f"pad_vocab_to must be >= 1, got {self.pad_vocab_to}")
    # Frozen dataclass: the lookup table is derived state, set once here.
    object.__setattr__(
        self, "_char_to_id", {c: _CHAR_NUM_SPECIAL + k for k, c in enumerate(self.alphabet)}
    )

  @property
  def vocab_size(self) -> int:
    return _round_up(_CHAR_NUM_SPECIAL + len(self.alphabet), self.pad_vocab_to)

  @property
  def pad_id(self) -> int:
    return CHAR_PAD_ID

  @property
  def bos_id(self) -> int:
    return CHAR_BOS_ID

  @property
  def eos_id(self) -> int:
    return CHAR_EOS_ID

  @property
  def unk_id(self) -> int:
    return CHAR_UNK_ID

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Maps each character to its id (unknown characters to `unk_id`)."""
    ids = [self._char_to_id.get(c, CHAR_UNK_ID) for c in text]
    if add_bos:
      ids.insert(0, CHAR_BOS_ID)
    if add_eos:
      ids.append(CHAR_EOS_ID)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`: drops pad/bos, stops at the first eos.

    Raises:
      ValueError: an id outside [0, vocab_size).
    """
    chars = []
    for i in _content_ids(ids, pad_id=CHAR_PAD_ID, bos_id=CHAR_BOS_ID, eos_id=CHAR_EOS_ID):
      if i == CHAR_UNK_ID:
        chars.append(UNK_TEXT)
      elif _CHAR_NUM_SPECIAL <= i < _CHAR_NUM_SPECIAL + len(self.alphabet):
        chars.append(self.alphabet[i - _CHAR_NUM_SPECIAL])
      elif 0 <= i < self.vocab_size:
        continue  # Rounding slack: a model may emit it, but it carries no text.
      else:
        raise ValueError(f"Token id {i} outside vocabulary [0, {self.vocab_size}).")
    return "".join(chars)

  def encode_batch(
      self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
  ) -> list[list[int]]:
    return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

  def decode_batch(self, ids_batch: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in ids_batch]


class SentencePieceTokenizer:
  """A `sentencepiece` model behind the `Tokenizer` interface.

  Special ids come from the model. Models trained without a pad piece report
  `pad_id() == -1`; then `pad_id` falls back to 0 (usually `<unk>` in such
  models), which is safe for padding because padded targets are masked, but it
  means `decode` also drops genuine id-0 tokens of such a model.

  Pickles by value (the serialized model proto), so it can travel to grain
  worker processes.
  """

  def __init__(self, model_path: str):
    """Loads the model.

    Args:
      model_path: Path of a SentencePiece `.model` file.

    Raises:
      FileNotFoundError: `model_path` does not exist.
    """
    # Imported here so the char-tokenizer path never needs sentencepiece.
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    from qdc_jax import storage  # pylint: disable=g-import-not-at-top

    if not model_path or not storage.exists(model_path) or storage.path(model_path).is_dir():
      raise FileNotFoundError(
          f"SentencePiece model file not found: {model_path!r}. Set the tokenizer path with "
          "--config.tokenizer.path=/path/to/tokenizer.model"
      )
    self._model_path = os.fspath(model_path)
    # Read through the storage layer (gs:// too), then parsed from memory.
    self._sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(model_path))
    self._set_ids()

  def _set_ids(self):
    self._pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
    self._bos_id = self._sp.bos_id()
    self._eos_id = self._sp.eos_id()

  def __getstate__(self) -> dict[str, Any]:
    return {"model_path": self._model_path, "proto": self._sp.serialized_model_proto()}

  def __setstate__(self, state: dict[str, Any]):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._model_path = state["model_path"]
    self._sp = spm.SentencePieceProcessor(model_proto=state["proto"])
    self._set_ids()

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(model_path={self._model_path!r}, vocab_size={self.vocab_size})"

  @property
  def model_path(self) -> str:
    return self._model_path

  @property
  def processor(self) -> Any:
    """The underlying `sentencepiece.SentencePieceProcessor`."""
    return self._sp

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally framed by bos / eos.

    Raises:
      ValueError: bos or eos requested but the model has none.
    """
    ids = list(self._sp.encode(text, out_type=int))
    if add_bos:
      if self._bos_id < 0:
        raise ValueError(f"add_bos=True but {self._model_path!r} has no bos piece.")
      ids.insert(0, self._bos_id)
    if add_eos:
      if self._eos_id < 0:
        raise ValueError(f"add_eos=True but {self._model_path!r} has no eos piece.")
      ids.append(self._eos_id)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`: drops pad/bos, stops at the first eos."""
    content = _content_ids(ids, pad_id=self._pad_id, bos_id=self._bos_id, eos_id=self._eos_id)
    return self._sp.decode(content)

  def encode_batch(
      self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
  ) -> list[list[int]]:
    return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

  def decode_batch(self, ids_batch: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in ids_batch]

  def piece_to_id(self, piece: str) -> int:
    """Id of `piece` (the unk id if the model lacks it)."""
    return self._sp.piece_to_id(piece)

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))




def make_tokenizer(kind: str, **kwargs: Any) -> Tokenizer:
  """Builds a tokenizer by name.

  Args:
    kind: 'char' (kwargs: alphabet, pad_vocab_to), 'byte' (kwargs: pad_vocab_to) or
      'sentencepiece' (kwargs: model_path).
    **kwargs: Passed to the tokenizer's constructor.

  Returns:
    The tokenizer.

  Raises:
    ValueError: unknown `kind`.
  """
  from qdc_jax import registry  # pylint: disable=g-import-not-at-top

  try:
    cls = registry.get("tokenizer", kind)
  except KeyError as e:
    raise ValueError(e.args[0]) from None
  return cls(**kwargs)
