"""The Mistral Instruct chat templates, one per tokenizer version, as mistral-common encodes them.

A conversation is first checked and normalized (``conversation_turns``, ``merge_user_runs``), then a
``ChatTemplate`` turns it into ids: BOS, one ``[INST]`` block per user turn, each answer followed by
EOS, and the system prompt joined to one user turn with a blank line. The two versions differ in
how the blocks are spelled and in which user turn gets the system prompt:

- v1 (Mixtral-8x7B): ``[INST]``/``[/INST]`` are plain text, SentencePiece-encoded together with the
  user's text; the system prompt goes in front of the *first* user message.
- v3 (Mixtral-8x22B): ``[INST]``/``[/INST]`` are control tokens (single ids, no space pieces around
  them) around the encoded text; the system prompt goes in front of the *last* user message, and
  an answer's trailing spaces are dropped.

``chat_template_for`` reads the version from the ``tokenizer.model`` itself (its vocabulary size and
control pieces), never from a file or repository name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sentencepiece as spm

__all__ = ["ChatTemplate", "Turn", "chat_template_for", "conversation_turns", "merge_user_runs"]

Turn = tuple[str, str]  # (role, content); role "user" or "assistant"

# The control pieces that make a vocabulary v3: instruction markers and tool-calling markers.
V3_CONTROL_PIECES = frozenset({"[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                               "[TOOL_RESULTS]", "[/TOOL_RESULTS]"})
V3_VOCAB_SIZE = 32768
# v7 and later keep the system prompt in a block of its own: a different template, not supported.
V7_CONTROL_PIECE = "[SYSTEM_PROMPT]"


def conversation_turns(messages: Sequence[Mapping[str, str]]) -> list[Turn]:
    """Check a conversation; raise a one-line ``ValueError`` for a malformed one.

    It starts with a user message, each assistant message answers a user message (user messages
    may follow each other), answers are not empty, and the last message is a user message.
    """
    if not messages:
        raise ValueError("conversation is empty: at least one user message is needed")
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} is not a mapping with 'role' and 'content'")
        role = message.get("role")
        content = message.get("content")
        if role not in ("user", "assistant"):
            raise ValueError(f"message {index} has role {role!r}; expected 'user' or 'assistant'")
        if role == "assistant" and (not turns or turns[-1][0] != "user"):
            raise ValueError(
                f"message {index} has role 'assistant' but 'user' was expected "
                "(the conversation starts with a user message and each answer follows one)"
            )
        if not isinstance(content, str):
            raise ValueError(f"message {index} content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content:
            raise ValueError(f"message {index}: assistant message has no content")
        turns.append((role, content))
    if turns[-1][0] != "user":
        raise ValueError("conversation must end with a user message")
    return turns


def merge_user_runs(turns: Sequence[Turn]) -> list[Turn]:
    """Consecutive user messages as one, as mistral-common's request normalizer merges them: the
    non-empty contents joined by a blank line (all of them empty: one empty message)."""
    merged: list[Turn] = []
    for role, content in turns:
        if merged and role == merged[-1][0] == "user":
            merged[-1] = (role, "\n\n".join(text for text in (merged[-1][1], content) if text))
        else:
            merged.append((role, content))
    return merged


class ChatTemplate:
    """Prompt ids for checked turns; a user turn after a user turn is a block of its own (as in
    mistral-common's ``InstructRequest``). Subclasses spell the blocks of one tokenizer version."""

    version: str
    system_before_last_user: bool  # else before the first user message

    def __init__(self, processor: spm.SentencePieceProcessor) -> None:
        self._sp = processor

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The SentencePiece model the blocks are encoded with (``tool_template`` spells its markers)."""
        return self._sp

    def encode(self, turns: Sequence[Turn], system: str | None) -> list[int]:
        """An empty ``system`` counts as no system prompt (as in mistral-common)."""
        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        system_turn = users[-1 if self.system_before_last_user else 0] if system else None
        ids = [self._sp.bos_id()]
        for index, (role, content) in enumerate(turns):
            if role == "user":
                ids += self.user_block(f"{system}\n\n{content}" if index == system_turn else content)
            else:
                ids += [*self.answer(content), self._sp.eos_id()]
        return ids

    def user_block(self, text: str) -> list[int]:
        raise NotImplementedError

    def answer(self, text: str) -> list[int]:
        raise NotImplementedError


class V1Template(ChatTemplate):
    """``[INST] text [/INST]`` in one SentencePiece call, whose dummy-prefix space makes the ids
    read `` [INST]`` (733, 16289, 28793); an answer is a separate call, so it reads `` answer``."""

    version = "v1"
    system_before_last_user = False

    def user_block(self, text: str) -> list[int]:
        return self._sp.encode(f"[INST] {text} [/INST]")

    def answer(self, text: str) -> list[int]:
        return self._sp.encode(text)


class V3Template(ChatTemplate):
    """``[INST]`` id, the encoded text (dummy-prefix space included), ``[/INST]`` id; an empty text
    encodes to nothing, so an empty user message is ``[INST][/INST]``."""

    version = "v3"
    system_before_last_user = True

    def __init__(self, processor: spm.SentencePieceProcessor) -> None:
        super().__init__(processor)
        self._begin, self._end = processor.piece_to_id("[INST]"), processor.piece_to_id("[/INST]")

    def user_block(self, text: str) -> list[int]:
        return [self._begin, *self._sp.encode(text), self._end]

    def answer(self, text: str) -> list[int]:
        return self._sp.encode(text.rstrip(" "))  # mistral-common strips trailing spaces (not newlines)


def chat_template_for(processor: spm.SentencePieceProcessor) -> ChatTemplate | None:
    """The template the vocabulary was made for; None for one this module does not know (v7+).

    ``[INST]`` not a control piece: v1. The v3 control pieces at a vocabulary of 32768: v3 (the v2
    vocabulary has them too, and the same chat layout for conversations without tools).
    """
    control = {processor.id_to_piece(i) for i in range(processor.vocab_size()) if processor.is_control(i)}
    if "[INST]" not in control:
        return V1Template(processor)
    if processor.vocab_size() == V3_VOCAB_SIZE and V3_CONTROL_PIECES <= control and V7_CONTROL_PIECE not in control:
        return V3Template(processor)
    return None
