"""Prompt formats: Gemma's chat turns (instruction-tuned models) and the lab's plain template.

Gemma instruction-tuned checkpoints (gemma-2-*-it) were trained on dialogs of this shape; the
tokenizer adds BOS, so it is not part of the text:

  <start_of_turn>user
  {user text}<end_of_turn>
  <start_of_turn>model
  {model text}<end_of_turn>
  <start_of_turn>model           <- the generation prompt: the model writes the next reply

Each turn is `"<start_of_turn>" + role + "\\n" + text.strip() + "<end_of_turn>\\n"`: the same
string as Gemma-2's Hugging Face `chat_template` (which trims each message). Gemma has two
roles, "user" and "model"; that template raises "System role not supported" for a system
message, and so does `format_dialog` unless `fold_system=True`, which puts the system text and a
blank line at the start of the first user turn (what Gemma's docs advise and Gemma-3's template
does).

A reply ends with the `<end_of_turn>` token (or `<eos>`): sample with

  sp = sampling.SamplingParams(..., extra_stop_ids=chat_stop_ids(tokenizer))

and clean the decoded text with `parse_model_reply`. `PromptFormat`s bundle the three steps
and are picked by name ("gemma_chat" or "plain") from the registry:

  fmt = get_prompt_format("gemma_chat")
  texts = sampling.generate_text(params, [fmt.prompt(q) for q in questions], tokenizer=tok,
                                 sp=dataclasses.replace(sp, extra_stop_ids=fmt.stop_ids(tok)),
                                 model=model, rng=rng)
  replies = [fmt.reply(t[0]) for t in texts]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from qdc_jax import registry
from qdc_jax.data import arith

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
# How Gemma's eos piece is spelled; SentencePiece decodes control pieces to "", but text from
# other tools (HF `decode(..., skip_special_tokens=False)`) may contain it.
EOS_TEXT = "<eos>"
USER = "user"
MODEL = "model"
SYSTEM = "system"
ROLES = (USER, MODEL)
# What follows the last turn so that the model writes a reply.
GENERATION_PROMPT = f"{START_OF_TURN}{MODEL}\n"
# Where a generated reply ends, whichever comes first.
REPLY_END_MARKERS = (END_OF_TURN, EOS_TEXT, START_OF_TURN)


def _check_role(role: str) -> None:
  if role == SYSTEM:
    raise ValueError(
        "Gemma has no system role (Gemma-2's chat template raises 'System role not "
        "supported'). Put the instructions at the start of the first user turn, or pass a "
        "leading ('system', text) turn to format_dialog(..., fold_system=True).")
  if role not in ROLES:
    hint = " (Gemma calls the assistant 'model')" if role == "assistant" else ""
    raise ValueError(f"Unknown chat role {role!r}{hint}; valid roles: {', '.join(ROLES)}.")


def format_turn(role: str, text: str) -> str:
  """One closed turn: `<start_of_turn>{role}\\n{text}<end_of_turn>\\n`.

  Args:
    role: "user" or "model".
    text: The turn's content; surrounding whitespace is stripped (as Gemma-2's template does).

  Returns:
    The turn's text.

  Raises:
    ValueError: `role` is not "user" or "model".
  """
  _check_role(role)
  return f"{START_OF_TURN}{role}\n{text.strip()}{END_OF_TURN}\n"


def format_dialog(turns: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True,
                  fold_system: bool = False) -> str:
  """A dialog in Gemma's chat format, optionally ending with the model's generation prompt.

  Args:
    turns: (role, text) pairs. Roles alternate "user", "model", "user", ... starting with
      "user" (Gemma-2's template enforces the same).
    add_generation_prompt: Append `<start_of_turn>model\\n` so the model writes the next
      reply; then the last turn must be a user turn.
    fold_system: Accept a leading ("system", text) turn and prepend its text plus a blank
      line to the first user turn. Without it a system turn is an error.

  Returns:
    The dialog's text, without BOS (the tokenizer adds it).

  Raises:
    ValueError: no turns, an unknown role, a system turn not allowed here, roles that do not
      alternate, or a generation prompt requested after a model turn.
  """
  turns = list(turns)
  if not turns:
    raise ValueError("format_dialog needs at least one turn.")
  system = None
  if turns[0][0] == SYSTEM and fold_system:
    system = turns[0][1].strip()
    turns = turns[1:]
    if not turns or turns[0][0] != USER:
      raise ValueError("fold_system=True needs a user turn right after the system turn.")
  parts = []
  for i, (role, text) in enumerate(turns):
    _check_role(role)
    expected = ROLES[i % 2]
    if role != expected:
      raise ValueError(f"Turn {i} has role {role!r}, expected {expected!r}: Gemma dialogs "
                       "alternate user/model/user/... starting with user.")
    if i == 0 and system:
      text = f"{system}\n\n{text.strip()}"
    parts.append(format_turn(role, text))
  if add_generation_prompt:
    if turns[-1][0] != USER:
      raise ValueError("add_generation_prompt=True after a model turn would start a second "
                       "model turn in a row; end the dialog with a user turn.")
    parts.append(GENERATION_PROMPT)
  return "".join(parts)


def user_prompt(text: str) -> str:
  """One user turn followed by the generation prompt: the usual single-question prompt."""
  return format_dialog([(USER, text)])


def parse_model_reply(generated_text: str) -> str:
  """The reply in a model's generated text: up to the first end marker, stripped.

  End markers: `<end_of_turn>`, `<eos>`, and `<start_of_turn>` (a model that opens a new turn
  without closing its own has finished its reply). Text without markers (a reply cut by
  `max_new_tokens`, or one already cut at the stop token) is only stripped.

  Args:
    generated_text: Decoded sample, i.e. the text after the generation prompt.

  Returns:
    The reply's text.
  """
  end = len(generated_text)
  for marker in REPLY_END_MARKERS:
    pos = generated_text.find(marker)
    if 0 <= pos < end:
      end = pos
  return generated_text[:end].strip()


@dataclasses.dataclass(frozen=True)
class ChatTokens:
  """Ids of the chat control tokens in one tokenizer.

  Attributes:
    start_of_turn_id: Id of `<start_of_turn>` (106 in Gemma's tokenizer).
    end_of_turn_id: Id of `<end_of_turn>` (107 in Gemma's tokenizer).
    eos_id: The tokenizer's eos id (1 in Gemma's tokenizer).
  """

  start_of_turn_id: int
  end_of_turn_id: int
  eos_id: int

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a model reply: `<end_of_turn>`, then eos."""
    return (self.end_of_turn_id, self.eos_id)

  @classmethod
  def from_tokenizer(cls, tokenizer: Any) -> ChatTokens:
    """Looks the turn pieces up in a SentencePiece-style tokenizer.

    Args:
      tokenizer: Has `piece_to_id` / `id_to_piece` / `encode` / `eos_id`, like
        `tokenizers.SentencePieceTokenizer` with Gemma's `tokenizer.model`.

    Returns:
      The ids.

    Raises:
      ValueError: the tokenizer has no pieces (e.g. the lab's `CharTokenizer`, which spells
        `<end_of_turn>` as 13 characters, so no single id can stop sampling), lacks
        `<start_of_turn>` / `<end_of_turn>`, or does not encode them in text to their id.
    """
    return cls(start_of_turn_id=_piece_id(tokenizer, START_OF_TURN),
               end_of_turn_id=_piece_id(tokenizer, END_OF_TURN),
               eos_id=int(tokenizer.eos_id))


def _piece_id(tokenizer: Any, piece: str) -> int:
  """Id of `piece`, checked to be a real piece that text containing it encodes to."""
  piece_to_id = getattr(tokenizer, "piece_to_id", None)
  if piece_to_id is None:
    raise ValueError(
        f"{type(tokenizer).__name__} has no token pieces, so {piece!r} has no single id; the "
        "'gemma_chat' prompt format needs a SentencePiece tokenizer with Gemma's turn tokens "
        "(tokenizer.model of a Gemma checkpoint). Use prompt format 'plain' instead.")
  token_id = int(piece_to_id(piece))
  unk_id = getattr(tokenizer, "unk_id", None)
  id_to_piece = getattr(tokenizer, "id_to_piece", None)
  if token_id < 0 or token_id == unk_id or (id_to_piece and id_to_piece(token_id) != piece):
    raise ValueError(f"{tokenizer!r} has no {piece!r} piece; the 'gemma_chat' prompt format "
                     "needs Gemma's tokenizer.model (or one trained with it as a "
                     "user_defined_symbol).")
  if token_id not in tokenizer.encode(piece):
    raise ValueError(f"{tokenizer!r} has a {piece!r} piece (id {token_id}) but does not "
                     "encode the text to it (a control rather than user-defined piece?), so "
                     "chat prompts would not contain the token.")
  return token_id


def chat_stop_ids(tokenizer: Any) -> tuple[int, ...]:
  """`(end_of_turn_id, eos_id)`: for `SamplingParams(extra_stop_ids=...)` with chat prompts.

  Raises:
    ValueError: as `ChatTokens.from_tokenizer` (e.g. for the char tokenizer).
  """
  return ChatTokens.from_tokenizer(tokenizer).stop_ids


@runtime_checkable
class PromptFormat(Protocol):
  """How a question becomes a prompt, and a sample becomes an answer."""

  name: str

  def prompt(self, text: str) -> str:
    """The prompt text for one question (no BOS: the tokenizer adds it)."""
    ...

  def reply(self, generated: str) -> str:
    """The answer in a decoded sample of this prompt."""
    ...

  def stop_ids(self, tokenizer: Any) -> tuple[int, ...]:
    """Ids that end a sample, for `SamplingParams(extra_stop_ids=...)`."""
    ...


@dataclasses.dataclass(frozen=True)
class GemmaChatFormat:
  """One user turn plus the generation prompt; replies end at `<end_of_turn>`."""

  name: str = "gemma_chat"

  def prompt(self, text: str) -> str:
    return user_prompt(text)

  def reply(self, generated: str) -> str:
    return parse_model_reply(generated)

  def stop_ids(self, tokenizer: Any) -> tuple[int, ...]:
    return chat_stop_ids(tokenizer)


@dataclasses.dataclass(frozen=True)
class PlainFormat:
  """The lab's `arith.PROMPT_TEMPLATE` ("Question: ...\\nSolution:\\n"); samples end at eos."""

  name: str = "plain"

  def prompt(self, text: str) -> str:
    return arith.PROMPT_TEMPLATE.format(question=text)

  def reply(self, generated: str) -> str:
    return generated.strip()

  def stop_ids(self, tokenizer: Any) -> tuple[int, ...]:
    return (int(tokenizer.eos_id),)


PROMPT_FORMAT_KIND = "prompt_format"


def get_prompt_format(name: str) -> PromptFormat:
  """The prompt format registered as `name` ("gemma_chat" or "plain").

  Raises:
    ValueError: unknown name (the message lists the valid ones).
  """
  try:
    fmt = registry.get(PROMPT_FORMAT_KIND, name)
  except KeyError as e:
    raise ValueError(e.args[0]) from None
  return fmt() if isinstance(fmt, type) else fmt


# Registered at import; skipped where registry.py already lists the name (e.g. as a lazy
# "qdc_jax.chat:GemmaChatFormat" entry), which would otherwise count as a second registration.
for _name, _cls in (("gemma_chat", GemmaChatFormat), ("plain", PlainFormat)):
  if _name not in registry.names(PROMPT_FORMAT_KIND):
    registry.register(PROMPT_FORMAT_KIND, _name, _cls)
del _name, _cls
