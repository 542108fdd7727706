"""SentencePiece tokenizer, Mistral-Instruct chat template and streaming detokenizer.

Only ``sentencepiece`` is needed at runtime. Two tokenizer versions are read, told apart by the
``tokenizer.model`` itself (``chat_template.chat_template_for``: vocabulary size and control pieces):

- v1 (Mixtral-8x7B, 32000 entries): ``<s>`` and ``</s>`` are the only control pieces; ``[INST]`` and
  ``[/INST]`` are plain text, encoded with the user's text, and the system prompt goes in front of the
  *first* user message::

      <s>[INST] user1 [/INST] answer1</s>[INST] user2 [/INST]

- v3 (Mixtral-8x22B, 32768 entries): ``[INST]``, ``[/INST]``, ``[TOOL_CALLS]``, ``[AVAILABLE_TOOLS]``,
  ``[/AVAILABLE_TOOLS]``, ``[TOOL_RESULTS]`` and ``[/TOOL_RESULTS]`` are control pieces (single ids,
  no space pieces around them), and the system prompt goes in front of the *last* user message::

      <s>[INST]▁user1[/INST]▁answer1</s>[INST]▁system\n\nuser2[/INST]

The chat encoding equals mistral-common's ``MistralTokenizer.v1()`` / ``.v3()``
``encode_chat_completion`` id for id (``chat_template.py`` says how). Decoding drops every control
piece: ``decode``, ``decode_continuation`` and ``StreamDecoder`` never show one as text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from ..errors import UserError
from .chat_template import chat_template_for, conversation_turns, merge_user_runs
from .tool_template import tool_template_for, uses_tools

__all__ = ["StreamDecoder", "Tokenizer"]

_SPACE = "\u2581"  # SentencePiece's whitespace marker


class Tokenizer:
    """A SentencePiece model with byte fallback (Mistral/Mixtral tokenizer v1 or v3)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None) -> None:
        self._sp = processor
        self.path = path
        self.vocab_size: int = processor.vocab_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        # id -> raw byte value for the 256 byte-fallback pieces ``<0x00>`` .. ``<0xFF>``.
        self._byte_value: dict[int, int] = {}
        for i in range(self.vocab_size):
            if processor.is_byte(i):
                self._byte_value[i] = int(processor.id_to_piece(i)[3:-1], 16)
        self._control: frozenset[int] = frozenset(
            i for i in range(self.vocab_size) if processor.is_control(i)
        )
        self._anchor_id, self._anchor_text = self._find_anchor()
        template = chat_template_for(processor)
        if template is None:
            raise UserError(
                f"tokenizer file {path} is of a Mistral tokenizer version this program does not read "
                "(only v1 and v3, as Mixtral ships them)",
                hint="use the tokenizer.model of a Mixtral checkpoint",
            )
        self._template = template
        self.version: str = template.version  # "v1" or "v3"

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_file(cls, path: Path | str) -> Tokenizer:
        """Load a SentencePiece ``tokenizer.model``; a missing or unreadable file is a ``UserError``."""
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"tokenizer file not found: {path}",
                hint="point to the checkpoint's tokenizer.model",
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read tokenizer file {path}: {exc.strerror or exc}") from exc
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError/... on bad protos
            raise UserError(
                f"tokenizer file {path} is not a valid SentencePiece model",
                hint="re-download tokenizer.model",
            ) from exc
        if processor.vocab_size() <= 0 or processor.bos_id() < 0 or processor.eos_id() < 0:
            raise UserError(
                f"tokenizer file {path} is not a usable SentencePiece model (no vocabulary or no BOS/EOS)",
                hint="re-download tokenizer.model",
            )
        return cls(processor, path)

    # ------------------------------------------------------------------ basics

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """SentencePiece-encode ``text`` (dummy-prefix space included, as mistral-common does)."""
        ids: list[int] = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; control tokens (``<s>``, ``</s>``) decode to nothing."""
        return self._sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def is_control(self, token_id: int) -> bool:
        return token_id in self._control

    def is_byte(self, token_id: int) -> bool:
        return token_id in self._byte_value

    # ------------------------------------------------------------------ chat

    def encode_chat(self, messages: Sequence[Mapping[str, str]], system: str | None = None) -> list[int]:
        """Encode a conversation as a prompt for the next assistant reply, as mistral-common's
        ``encode_chat_completion`` does with ``system`` as the system message.

        ``messages`` are ``user``/``assistant`` mappings starting and ending with ``user``; each
        assistant message answers a user message, and user messages in a row are merged into one.
        An empty ``system`` counts as no system prompt. Raises ``ValueError`` on a malformed
        conversation.
        """
        return self._template.encode(merge_user_runs(conversation_turns(messages)), system)

    def encode_instruct(
        self,
        messages: Sequence[Mapping[str, Any]],
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """``encode_chat`` for a conversation already normalized as mistral-common's ``InstructRequest``
        holds it: user messages in a row stay separate ``[INST]`` blocks (the OpenAI server merges runs
        itself, and a system message between two user messages keeps them apart).

        With ``tools`` (a list of ``{"name", "description", "parameters"}``), tool messages or assistant
        ``tool_calls``, the conversation is encoded by ``tool_template.ToolTemplate`` (its module
        docstring gives the message fields, the rules and both versions' layouts). Raises a one-line
        ``ValueError`` on a malformed conversation.
        """
        if uses_tools(messages, tools):
            return tool_template_for(self._template).encode(messages, system, tools)
        return self._template.encode(conversation_turns(messages), system)

    # ------------------------------------------------------------------ internals

    def _find_anchor(self) -> tuple[int, str]:
        """A plain piece (no leading space marker, not control/byte/unknown) with a stable decoding.

        Decoding ``[anchor] + ids`` and dropping the anchor's text decodes ``ids`` as a continuation
        of earlier text, i.e. without SentencePiece's removal of the first piece's leading space.
        """
        candidates = [self._sp.piece_to_id(p) for p in ("a", "x", "0", ".")]
        candidates += range(self.vocab_size)
        for i in candidates:
            if not 0 <= i < self.vocab_size:
                continue
            if (
                self._sp.is_control(i)
                or self._sp.is_unknown(i)
                or self._sp.is_byte(i)
                or self._sp.is_unused(i)
            ):
                continue
            piece = self._sp.id_to_piece(i)
            if not piece or piece.startswith(_SPACE):
                continue
            text = self._sp.decode([i])
            if text and self._sp.decode([i, i]) == text + text:
                return i, text
        raise UserError("tokenizer has no plain text pieces", hint="re-download tokenizer.model")

    # ------------------------------------------------------------------ streaming (StreamDecoder)

    def decode_continuation(self, ids: list[int]) -> str:
        """Decode ``ids`` as if preceded by text (leading space of the first piece kept)."""
        text = self._sp.decode([self._anchor_id, *ids])
        if not text.startswith(self._anchor_text):  # cannot happen for a plain piece; be safe
            raise RuntimeError("tokenizer anchor piece did not decode as expected")
        return text[len(self._anchor_text) :]

    def ends_mid_character(self, ids: list[int]) -> bool:
        """True if ``ids`` ends with byte-fallback pieces that stop in the middle of a UTF-8 character."""
        tail: list[int] = []
        for token_id in reversed(ids):
            value = self._byte_value.get(token_id)
            if value is None or len(tail) == 4:
                break
            tail.append(value)
        # ``tail`` holds up to the last 4 bytes, newest first.
        for back, byte in enumerate(tail, start=1):
            if byte < 0x80:
                return False  # ASCII: complete
            if byte < 0xC0:
                continue  # continuation byte: look further back for the lead byte
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4 if byte < 0xF8 else 1
            return need > back
        return False


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get the newly completed text.

    Concatenating every ``push()`` result and the final ``flush()`` gives exactly
    ``tok.decode(ids)`` for the pushed ids. With ``prompt_ids`` the pushed ids are decoded as a
    continuation of the prompt, i.e. the result is ``tok.decode(prompt_ids + ids)`` minus the prompt's
    own text ``tok.decode(prompt_ids)`` (so a first generated piece ``"▁Paris"`` keeps its space).

    Text is held back only while the last pieces are byte-fallback bytes of an unfinished UTF-8
    character, so no U+FFFD is emitted for characters that later complete. Work per token is
    constant: only the ids not yet emitted (normally one) are decoded, never the whole sequence.
    """

    def __init__(self, tok: Tokenizer, prompt_ids: Iterable[int] | None = None) -> None:
        self._tok = tok
        self._pending: list[int] = []
        # SentencePiece strips the leading space of the first non-control piece of a sequence only.
        self._started = any(not tok.is_control(i) for i in prompt_ids or ())

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now final (possibly empty)."""
        self._pending.append(int(token_id))
        if self._tok.ends_mid_character(self._pending):
            return ""
        return self._drain()

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character decodes as U+FFFD)."""
        return self._drain() if self._pending else ""

    def _drain(self) -> str:
        ids = self._pending
        self._pending = []
        if self._started:
            return self._tok.decode_continuation(ids)
        if any(not self._tok.is_control(i) for i in ids):
            self._started = True
        return self._tok.decode(ids)
