"""Tests for qdc_jax.chat."""

import pytest

from qdc_jax import chat, registry, sampling, tokenizers
from qdc_jax.data import arith

import tiny_gemma  # tests/tiny_gemma.py  # pylint: disable=g-bad-import-order

# ----------------------------------------------------------------------------- formatting


def test_user_prompt_exact():
  assert chat.user_prompt("What is 2+3?") == (
      "<start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n")
  # Surrounding whitespace is trimmed, as Gemma-2's template does; inner newlines stay.
  assert chat.user_prompt("  a\nb \n") == (
      "<start_of_turn>user\na\nb<end_of_turn>\n<start_of_turn>model\n")


def test_format_turn_exact():
  assert chat.format_turn("user", "hi") == "<start_of_turn>user\nhi<end_of_turn>\n"
  assert chat.format_turn("model", "Hello.") == "<start_of_turn>model\nHello.<end_of_turn>\n"


def test_multi_turn_dialog_exact():
  turns = [("user", "knock knock"), ("model", "who is there"), ("user", "Gemma")]
  assert chat.format_dialog(turns) == (
      "<start_of_turn>user\nknock knock<end_of_turn>\n"
      "<start_of_turn>model\nwho is there<end_of_turn>\n"
      "<start_of_turn>user\nGemma<end_of_turn>\n"
      "<start_of_turn>model\n")
  closed = turns + [("model", "Gemma who?")]
  assert chat.format_dialog(closed, add_generation_prompt=False) == (
      "<start_of_turn>user\nknock knock<end_of_turn>\n"
      "<start_of_turn>model\nwho is there<end_of_turn>\n"
      "<start_of_turn>user\nGemma<end_of_turn>\n"
      "<start_of_turn>model\nGemma who?<end_of_turn>\n")


def test_system_turn_rejected_or_folded():
  turns = [("system", "Answer tersely."), ("user", "What is 2+3?")]
  with pytest.raises(ValueError, match="no system role"):
    chat.format_dialog(turns)
  with pytest.raises(ValueError, match="no system role"):
    chat.format_turn("system", "x")
  assert chat.format_dialog(turns, fold_system=True) == (
      "<start_of_turn>user\nAnswer tersely.\n\nWhat is 2+3?<end_of_turn>\n"
      "<start_of_turn>model\n")
  with pytest.raises(ValueError, match="needs a user turn"):
    chat.format_dialog([("system", "x")], fold_system=True)


def test_dialog_role_errors():
  with pytest.raises(ValueError, match="Gemma calls the assistant 'model'"):
    chat.format_turn("assistant", "x")
  with pytest.raises(ValueError, match="valid roles: user, model"):
    chat.format_dialog([("bot", "x")])
  with pytest.raises(ValueError, match="expected 'user'"):
    chat.format_dialog([("model", "x")])
  with pytest.raises(ValueError, match="expected 'model'"):
    chat.format_dialog([("user", "a"), ("user", "b")])
  with pytest.raises(ValueError, match="after a model turn"):
    chat.format_dialog([("user", "a"), ("model", "b")])
  with pytest.raises(ValueError, match="at least one turn"):
    chat.format_dialog([])


def test_parse_model_reply():
  assert chat.parse_model_reply("The answer is 5.<end_of_turn>") == "The answer is 5."
  assert chat.parse_model_reply(" 5 <end_of_turn>\n<start_of_turn>user\nmore") == "5"
  assert chat.parse_model_reply("Five.<eos><pad><pad>") == "Five."
  assert chat.parse_model_reply("a<eos>b<end_of_turn>") == "a"
  assert chat.parse_model_reply("Six\n<start_of_turn>user\nx") == "Six"
  # No marker: a reply cut by max_new_tokens, or already cut at the stop id.
  assert chat.parse_model_reply("  The answer is\n") == "The answer is"
  assert chat.parse_model_reply("<end_of_turn>") == ""
  assert chat.parse_model_reply("") == ""


# ----------------------------------------------------------------------------- prompt formats


def test_prompt_formats_by_name():
  assert {"gemma_chat", "plain"} <= set(registry.names("prompt_format"))
  gemma = chat.get_prompt_format("gemma_chat")
  plain = chat.get_prompt_format("plain")
  assert isinstance(gemma, chat.PromptFormat) and isinstance(plain, chat.PromptFormat)
  assert (gemma.name, plain.name) == ("gemma_chat", "plain")
  assert gemma.prompt("1+1?") == "<start_of_turn>user\n1+1?<end_of_turn>\n<start_of_turn>model\n"
  assert gemma.reply("2<end_of_turn>") == "2"
  assert plain.prompt("1+1?") == "Question: 1+1?\nSolution:\n"
  assert plain.prompt("1+1?") == arith.PROMPT_TEMPLATE.format(question="1+1?")
  assert plain.reply(" The answer is 2.\n") == "The answer is 2."
  with pytest.raises(ValueError, match="Unknown prompt_format 'chatml'; valid choices: gemma_chat"):
    chat.get_prompt_format("chatml")


def test_char_tokenizer_stop_ids():
  tok = tokenizers.CharTokenizer("0123456789+-*/=() \n")
  assert chat.get_prompt_format("plain").stop_ids(tok) == (tok.eos_id,)
  with pytest.raises(ValueError, match="CharTokenizer has no token pieces.*'plain'"):
    chat.chat_stop_ids(tok)
  with pytest.raises(ValueError, match="no token pieces"):
    chat.get_prompt_format("gemma_chat").stop_ids(tok)


# ----------------------------------------------------------------------------- sentencepiece


def _train_sp(tmp_path, **kwargs):
  """tests/tiny_gemma.py's tokenizer: Gemma's ids (pad/eos/bos/unk = 0/1/2/3, <start_of_turn>
  106, <end_of_turn> 107, "\\n" 108), no normalization."""
  pytest.importorskip("sentencepiece")
  return tokenizers.SentencePieceTokenizer(tiny_gemma.make_tokenizer(tmp_path, **kwargs))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
  return _train_sp(tmp_path_factory.mktemp("sp"))


def test_sp_special_ids_as_trained(sp_tok):
  assert (sp_tok.pad_id, sp_tok.eos_id, sp_tok.bos_id, sp_tok.unk_id) == (0, 1, 2, 3)
  assert sp_tok.id_to_piece(sp_tok.eos_id) == "<eos>"
  assert sp_tok.id_to_piece(sp_tok.bos_id) == "<bos>"


def test_sp_turn_tokens_are_single_ids_in_prompt(sp_tok):
  sot, eot = sp_tok.piece_to_id("<start_of_turn>"), sp_tok.piece_to_id("<end_of_turn>")
  assert sp_tok.unk_id not in (sot, eot) and sot != eot
  prompt = chat.format_dialog([("user", "How many clips did Natalia sell?"),
                               ("model", "The answer is 72."), ("user", "What is 3 + 4?")])
  ids = sp_tok.encode(prompt, add_bos=True)
  assert ids[0] == sp_tok.bos_id and ids.count(sp_tok.bos_id) == 1
  assert ids[1] == sot
  assert ids.count(sot) == prompt.count("<start_of_turn>") == 4
  assert ids.count(eot) == prompt.count("<end_of_turn>") == 3
  assert sp_tok.unk_id not in ids
  # The generation prompt ends the ids: <start_of_turn>, "model" pieces, "\n".
  tail = sp_tok.encode("<start_of_turn>model\n")
  assert ids[-len(tail):] == tail and tail[0] == sot
  assert sp_tok.decode(ids) == prompt
  assert sp_tok.decode(sp_tok.encode(chat.user_prompt("Betty saves 100 dollars."))) == (
      chat.user_prompt("Betty saves 100 dollars."))


def test_sp_chat_stop_ids(sp_tok):
  eot = sp_tok.piece_to_id("<end_of_turn>")
  assert chat.chat_stop_ids(sp_tok) == (eot, sp_tok.eos_id)
  assert chat.get_prompt_format("gemma_chat").stop_ids(sp_tok) == (eot, 1) == (107, 1)
  tokens = chat.ChatTokens.from_tokenizer(sp_tok)
  assert tokens.start_of_turn_id == sp_tok.piece_to_id("<start_of_turn>")
  sp = sampling.SamplingParams(max_new_tokens=4, extra_stop_ids=chat.chat_stop_ids(sp_tok))
  assert eot in sp.stop_ids


def test_sp_reply_round_trip(sp_tok):
  # A sample that stopped at <end_of_turn>: the stop token decodes to its text, which
  # parse_model_reply cuts away; eos is a control piece and ends decoding.
  reply_ids = sp_tok.encode("The answer is 72.<end_of_turn>")
  assert chat.parse_model_reply(sp_tok.decode(reply_ids)) == "The answer is 72."
  reply_ids = sp_tok.encode("The answer is 72.") + [sp_tok.eos_id, sp_tok.pad_id]
  assert chat.parse_model_reply(sp_tok.decode(reply_ids)) == "The answer is 72."


def test_sp_without_turn_pieces_errors(tmp_path):
  tok = _train_sp(tmp_path, name="noturn", vocab_size=96, user_defined_symbols=["\n"])
  with pytest.raises(ValueError, match="has no '<start_of_turn>' piece"):
    chat.chat_stop_ids(tok)

