"""Tests for qdc_jax.tokenizers."""

import pickle
import string

import numpy as np
import pytest

from qdc_jax import tokenizers

PRINTABLE = string.printable  # 100 printable ASCII characters, incl. whitespace.


# ----------------------------------------------------------------------------- char


def test_char_round_trip_all_printable_ascii():
  tok = tokenizers.CharTokenizer(PRINTABLE)
  ids = tok.encode(PRINTABLE)
  assert ids == list(range(4, 4 + len(PRINTABLE)))
  assert tok.decode(ids) == PRINTABLE
  framed = tok.encode(PRINTABLE, add_bos=True, add_eos=True)
  assert framed[0] == tok.bos_id and framed[-1] == tok.eos_id
  assert tok.decode(framed) == PRINTABLE


def test_char_special_ids_and_vocab_rounding():
  tok = tokenizers.CharTokenizer("abc")
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 8  # 4 specials + 3 chars = 7, rounded up to 8.
  assert tokenizers.CharTokenizer("abc", pad_vocab_to=1).vocab_size == 7
  assert tokenizers.CharTokenizer(PRINTABLE, pad_vocab_to=64).vocab_size == 128
  assert isinstance(tok, tokenizers.Tokenizer)


def test_char_unknown_and_slack_ids():
  tok = tokenizers.CharTokenizer("ab")
  assert tok.encode("axb") == [4, 3, 5]
  assert tok.decode([4, 3, 5]) == "a\ufffdb"
  # Ids 6 and 7 exist only because vocab_size was rounded up to 8.
  assert tok.decode([4, 6, 7, 5]) == "ab"
  with pytest.raises(ValueError, match="outside vocabulary"):
    tok.decode([8])


def test_char_decode_drops_pad_and_bos_and_stops_at_eos():
  tok = tokenizers.CharTokenizer("abc")
  a, b, c = tok.encode("abc")
  ids = [tok.bos_id, a, tok.pad_id, b, tok.eos_id, c, tok.eos_id, tok.pad_id]
  assert tok.decode(ids) == "ab"
  assert tok.decode(np.array(ids, dtype=np.int32)) == "ab"
  assert tok.decode([tok.eos_id, a]) == ""
  assert tok.decode_batch(np.array([[1, a, 2, 0], [c, c, 0, 0]])) == ["a", "cc"]
  assert tok.encode_batch(["ab", "c"], add_eos=True) == [[a, b, 2], [c, 2]]


def test_char_rejects_bad_alphabet():
  with pytest.raises(ValueError, match="repeated"):
    tokenizers.CharTokenizer("abca")
  with pytest.raises(ValueError, match="empty"):
    tokenizers.CharTokenizer("")


def test_make_tokenizer():
  tok = tokenizers.make_tokenizer("char", alphabet="xy")
  assert tok.decode(tok.encode("yx")) == "yx"
  with pytest.raises(ValueError, match="Unknown tokenizer .bpe.; valid choices: byte, char, sentencepiece"):
    tokenizers.make_tokenizer("bpe")


# ----------------------------------------------------------------------------- sentencepiece

_SP_TEXT = """\
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May?
Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.
How much did she earn? The answer is 10.
Betty is saving money for a new wallet which costs 100 dollars.
James writes a 3-page letter to 2 different friends twice a week.
How many pages does he write a year?
Digits: 0 1 2 3 4 5 6 7 8 9.
"""


@pytest.fixture(scope="module")
def sp_model_path(tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  tmp = tmp_path_factory.mktemp("sp")
  corpus = tmp / "corpus.txt"
  corpus.write_text(_SP_TEXT * 20)
  prefix = str(tmp / "tiny")
  spm.SentencePieceTrainer.train(
      input=str(corpus),
      model_prefix=prefix,
      vocab_size=80,
      model_type="unigram",
      character_coverage=1.0,
      pad_id=0,
      unk_id=1,
      bos_id=2,
      eos_id=3,
      user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
      minloglevel=2,
  )
  return prefix + ".model"


def test_sp_special_ids(sp_model_path):
  tok = tokenizers.SentencePieceTokenizer(sp_model_path)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 80
  assert tok.id_to_piece(tok.bos_id) == "<s>"
  assert tok.piece_to_id("</s>") == tok.eos_id
  assert isinstance(tok, tokenizers.Tokenizer)


def test_sp_round_trip(sp_model_path):
  tok = tokenizers.SentencePieceTokenizer(sp_model_path)
  text = "How many clips did Natalia sell in May? The answer is 72."
  ids = tok.encode(text)
  assert tok.bos_id not in ids and tok.eos_id not in ids
  assert tok.decode(ids) == text
  framed = tok.encode(text, add_bos=True, add_eos=True)
  assert framed == [tok.bos_id] + ids + [tok.eos_id]
  assert tok.decode(framed + [tok.pad_id] * 3) == text
  # Decode stops at the first eos even with text after it.
  assert tok.decode(framed + tok.encode("May")) == text
  assert tok.decode_batch([framed, tok.encode("April")]) == [text, "April"]


def test_sp_user_defined_symbols_are_single_ids(sp_model_path):
  tok = tokenizers.SentencePieceTokenizer(sp_model_path)
  for sym in ("<start_of_turn>", "<end_of_turn>"):
    sym_id = tok.piece_to_id(sym)
    assert sym_id != tok.unk_id
    assert tok.id_to_piece(sym_id) == sym
    ids = tok.encode(f"user{sym}May")
    assert ids.count(sym_id) == 1
    assert tok.encode(sym)[-1] == sym_id
  text = "<start_of_turn>user How many clips?<end_of_turn>"
  assert tok.decode(tok.encode(text)) == text


def test_sp_pickles_by_value(sp_model_path):
  tok = tokenizers.SentencePieceTokenizer(sp_model_path)
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("Betty saves") == tok.encode("Betty saves")
  assert (clone.pad_id, clone.bos_id, clone.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)


def test_sp_missing_file_error(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError) as info:
    tokenizers.SentencePieceTokenizer(missing)
  assert missing in str(info.value)
  assert "--config.tokenizer.path=" in str(info.value)
  with pytest.raises(FileNotFoundError, match="--config.tokenizer.path"):
    tokenizers.make_tokenizer("sentencepiece", model_path=missing)
