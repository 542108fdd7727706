"""Tool calling in the Mistral Instruct prompt: tool definitions, the assistant's calls and the tool results.

``Tokenizer.encode_instruct(messages, system=None, tools=None)`` encodes a conversation through
``ToolTemplate`` when ``tools`` is given (even ``[]``) or a message is a tool result or has calls; any
other keeps the plain chat template (``chat_template.py``), whose ids ``ToolTemplate`` also gives for
it. The messages are mappings::

    {"role": "user", "content": str}
    {"role": "assistant", "content": str | None,  # "tool_calls" is optional
     "tool_calls": [{"id": str, "name": str, "arguments": str (JSON object text) | dict}]}
    {"role": "tool", "content": str, "tool_call_id": str}

and ``tools`` is a list of ``{"name": str, "description": str (optional), "parameters": dict (optional,
a JSON schema)}``. Other keys are ignored. Malformed input raises a one-line ``ValueError``.

Rules (mistral-common's v3 request validator, made stricter where it only counts):

- The conversation starts with a user message and ends with a user or tool message; an assistant
  message follows a user or tool message; user messages in a row stay separate ``[INST]`` blocks.
- An assistant message without calls has non-empty text. With calls, its text may be empty or None
  (whitespace-only text counts as none).
- Each call of an assistant message has a distinct non-empty ``id``, a name of 1-64 characters
  ``[a-zA-Z0-9_-]``, and ``arguments`` that are a JSON object (a dict, or its JSON text; ``""`` means
  ``{}``, as in mistral-common).
- Tool messages come right after the assistant message whose calls they answer (or after each other),
  one per call, in any order: ``tool_call_id`` names one of that message's calls not answered yet, and
  every call is answered before the next user or assistant message.
- A tool result's ``content`` that is JSON text (``'{"t": 21}'``, ``'42'``) is embedded as that JSON
  value, any other text as a JSON string, and ``""`` as ``{}`` (mistral-common's normalization).

All JSON is written by ``json.dumps(value, ensure_ascii=False)``: separators ``", "`` and ``": "``, keys in
the order given, non-ASCII characters as they are. A tool definition reads
``{"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}`` (``description``
defaults to ``""``, ``parameters`` to ``{}``); the definitions form one JSON list.

v3 (Mixtral-8x22B), id for id mistral-common's v3 ``encode_chat_completion`` (lines wrapped; ``▁`` shows
the dummy-prefix space that starts each separately encoded text)::

    <s>[INST]▁What's the weather in Paris?[/INST][TOOL_CALLS]▁[{"name": "get_weather", "arguments":
    {"city": "Paris"}, "id": "a1B2c3D4e"}]</s>[TOOL_RESULTS]▁{"content": {"temp": 21}, "call_id":
    "a1B2c3D4e"}[/TOOL_RESULTS]▁It is 21 °C.</s>[AVAILABLE_TOOLS]▁[{"type": "function", "function":
    {"name": "get_weather", "description": "Current weather", "parameters": {...}}}][/AVAILABLE_TOOLS]
    [INST]▁Be brief.\\n\\nAnd in Rome?[/INST]

- The bracketed markers are control tokens; each JSON text is SentencePiece-encoded on its own, so it
  starts with the dummy-prefix space (``▁[``, ``▁{``).
- ``[AVAILABLE_TOOLS]`` goes right before the ``[INST]`` of the *last* user message (the system
  prompt goes inside that block, as without tools), however early that message is.
- A call is ``[TOOL_CALLS]`` then the JSON list of the message's calls, each ``{"name", "arguments",
  "id"}``, then ``</s>``. Each tool message is a block of its own, ``[TOOL_RESULTS]`` ``{"content",
  "call_id"}`` ``[/TOOL_RESULTS]``, with no ``</s>``; the answer that follows it comes right after.
- v3 call ids must be 9 characters ``[a-zA-Z0-9]``. ``normalize_tool_call_id`` keeps such an id and maps
  any other (OpenAI's ``call_...``) to a deterministic one, the first 9 base-62 digits of the SHA-256 of
  its UTF-8 bytes; a call and its result carry the same original id, so they stay paired.
  ``new_tool_call_id`` makes a fresh random one for a call the model makes.
- Not in mistral-common (which rejects it): an assistant message with both text and calls is its
  answer text, then ``[TOOL_CALLS]`` and the calls, then ``</s>``.

v1 (Mixtral-8x7B) has no tool tokens: the same layout, with the markers spelled as plain text inside the
``[INST]`` blocks and the answers, a space between each marker and its neighbours (lines wrapped at
spaces; ``\\n`` is a newline)::

    <s> [INST] Be brief.\\n\\nWhat's the weather in Paris? [/INST] [TOOL_CALLS] [{"name": "get_weather",
    "arguments": {"city": "Paris"}}]</s> [INST] [TOOL_RESULTS] {"name": "get_weather", "content":
    {"temp": 21}} [/TOOL_RESULTS] [/INST] It is 21 °C.</s> [INST] [AVAILABLE_TOOLS] [{"type":
    "function", "function": {"name": "get_weather", "description": "Current weather", "parameters":
    {...}}}] [/AVAILABLE_TOOLS] And in Rome? [/INST]

- The last user message's block is ``[INST] [AVAILABLE_TOOLS] <tools> [/AVAILABLE_TOOLS] <text>
  [/INST]`` (the system prompt is in front of the *first* user message's text, as without tools; an
  empty text leaves ``[INST] [AVAILABLE_TOOLS] <tools> [/AVAILABLE_TOOLS] [/INST]``).
- A call is the answer ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` then ``</s>``: no id,
  exactly what the model is made to generate (``call_prefix`` then the JSON list); text before the
  calls reads ``<text> [TOOL_CALLS] [...]``.
- The results of one run of tool messages form one user block, ``[INST] [TOOL_RESULTS] {"name": ...,
  "content": ...} [/TOOL_RESULTS] [TOOL_RESULTS] ... [/TOOL_RESULTS] [/INST]``, in the order given; the
  name is the answered call's, so results pair with calls by name and order (v1 prompts hold no ids).
- Each block and answer is one SentencePiece call, as without tools (``chat_template.V1Template``).

For the decoder: ``call_prefix(tokenizer)`` is the ids that start a call in an answer (v3: ``[5]``, the
``[TOOL_CALLS]`` id; v1: ``[733, 3957, 3064, 28730, 13741, 28735, 28793]``, the text ``[TOOL_CALLS]`` at
the start of an answer, ``▁[`` ``TO`` ``OL`` ``_`` ``CALL`` ``S`` ``]``). In history the JSON list follows
it after a space (``▁[``) and the answer ends with ``</s>``; ``parse_tool_calls(text)`` reads the
generated list (surrounding whitespace allowed) into ``(name, arguments JSON text)`` pairs.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .chat_template import ChatTemplate

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = [
    "CALL_MARKER",
    "ToolTemplate",
    "call_prefix",
    "new_tool_call_id",
    "normalize_tool_call_id",
    "parse_tool_calls",
    "tool_template_for",
    "uses_tools",
]

CALL_MARKER = "[TOOL_CALLS]"  # v3: a control token; v1: this text
TOOL_CALL_ID_LENGTH = 9
_ID_ALPHABET = string.digits + string.ascii_letters  # base 62
_ID_RE = re.compile(r"[a-zA-Z0-9]{9}")
_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ROLES = ("user", "assistant", "tool")


# ----------------------------------------------------------------------------- call ids


def new_tool_call_id() -> str:
    """A fresh random v3 call id: 9 characters ``[a-zA-Z0-9]`` (for a call the model makes)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(TOOL_CALL_ID_LENGTH))


def normalize_tool_call_id(call_id: str) -> str:
    """``call_id`` if it is already 9 characters ``[a-zA-Z0-9]``, else the first 9 base-62 digits of the
    SHA-256 of its UTF-8 bytes: the same input always gives the same id."""
    if _ID_RE.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode("utf-8")).digest(), "big")
    digits = []
    for _ in range(TOOL_CALL_ID_LENGTH):
        number, digit = divmod(number, len(_ID_ALPHABET))
        digits.append(_ID_ALPHABET[digit])
    return "".join(digits)


# ----------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class ToolCall:
    id: str  # as given (``normalize_tool_call_id`` makes the v3 id)
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Item:
    """A checked message: a user text, an answer (text and/or calls), or one tool result."""

    role: str  # "user", "assistant" or "tool"
    text: str = ""  # user text; assistant text ("" for none)
    calls: tuple[ToolCall, ...] = ()  # assistant
    call: ToolCall | None = None  # tool: the call it answers
    result: Any = None  # tool: the content as a JSON value


def uses_tools(messages: Sequence[Any], tools: Any) -> bool:
    """Whether the conversation needs ``ToolTemplate``: tools given, or a tool message, or a call."""
    if tools is not None:
        return True
    return any(
        isinstance(m, Mapping) and (m.get("role") == "tool" or bool(m.get("tool_calls"))) for m in messages
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _json_copy(value: Any, what: str) -> Any:
    """``value`` as JSON would hold it (tuples as lists, keys as strings); ValueError if it isn't JSON."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from None


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """The tool definitions in mistral-common's form ``{"type": "function", "function": {...}}``."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError("tools must be a list of tool definitions")
    checked: list[dict[str, Any]] = []
    names: set[str] = set()
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tool {index} is not a mapping with 'name', 'description' and 'parameters'")
        name = tool.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"tool {index} name {name!r} must be 1-64 characters a-z, A-Z, 0-9, '_' or '-'")
        if name in names:
            raise ValueError(f"tool {index}: another tool is also named {name!r}")
        names.add(name)
        description = tool.get("description")
        description = "" if description is None else description
        if not isinstance(description, str):
            raise ValueError(f"tool {index} ({name}) description must be a string")
        parameters = tool.get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, Mapping):
            raise ValueError(f"tool {index} ({name}) parameters must be a JSON schema object")
        parameters = _json_copy(parameters, f"tool {index} ({name}) parameters")
        checked.append({"type": "function",
                        "function": {"name": name, "description": description, "parameters": parameters}})
    return checked


def _check_calls(index: int, raw: Any) -> tuple[ToolCall, ...]:
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise ValueError(f"message {index}: tool_calls must be a list of calls")
    calls: list[ToolCall] = []
    seen: dict[str, str] = {}  # v3 id -> id as given
    for k, call in enumerate(raw):
        where = f"message {index} tool call {k}"
        if not isinstance(call, Mapping):
            raise ValueError(f"{where} is not a mapping with 'id', 'name' and 'arguments'")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(f"{where} has no 'id' (a non-empty string)")
        short = normalize_tool_call_id(call_id)
        if short in seen:
            raise ValueError(f"{where}: id {call_id!r} is used twice in this message"
                             + ("" if seen[short] == call_id else f" (as {short!r}, like {seen[short]!r})"))
        seen[short] = call_id
        name = call.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"{where} name {name!r} must be 1-64 characters a-z, A-Z, 0-9, '_' or '-'")
        arguments = call.get("arguments")
        if isinstance(arguments, str):
            if arguments == "":
                arguments = {}
            else:
                try:
                    arguments = json.loads(arguments)
                except ValueError as exc:
                    raise ValueError(f"{where} ({name}) arguments are not valid JSON: {exc}") from None
        if not isinstance(arguments, Mapping):
            kind = type(arguments).__name__
            raise ValueError(f"{where} ({name}) arguments must be a JSON object, got {kind}")
        calls.append(ToolCall(call_id, name, _json_copy(arguments, f"{where} ({name}) arguments")))
    return tuple(calls)


def _tool_content(content: str) -> Any:
    if content == "":
        return {}
    try:
        return json.loads(content)
    except ValueError:
        return content


def check_conversation(messages: Sequence[Any]) -> list[Item]:
    """Check a conversation (the rules in the module docstring); raise a one-line ``ValueError``."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of messages")
    if not messages:
        raise ValueError("conversation is empty: at least one user message is needed")
    items: list[Item] = []
    pending: dict[str, ToolCall] = {}  # unanswered calls of the last assistant message, by id as given
    answered: set[str] = set()
    calls_at = -1  # index of the assistant message the pending calls belong to

    def no_result_left(index: int) -> None:
        if pending:
            call_id = next(iter(pending))
            raise ValueError(f"message {calls_at}: tool call {call_id!r} has no result (a tool message with "
                             f"that tool_call_id must follow it before message {index})")

    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} is not a mapping with 'role' and 'content'")
        role = message.get("role")
        content = message.get("content")
        if role not in _ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected 'user', 'assistant' or 'tool'")
        previous = items[-1].role if items else None
        if previous is None and role != "user":
            raise ValueError(f"message {index} has role {role!r} "
                             "but the conversation starts with a user message")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ValueError(f"message {index}: tool message has no 'tool_call_id' (a non-empty string)")
            if previous not in ("assistant", "tool") or call_id not in pending:
                if previous in ("assistant", "tool") and call_id in answered:
                    raise ValueError(f"message {index}: tool call {call_id!r} already has a result")
                raise ValueError(f"message {index}: tool_call_id {call_id!r} matches no call of the "
                                 "assistant message right before the tool messages")
            if not isinstance(content, str):
                raise ValueError(f"message {index} content must be a string, got {type(content).__name__}")
            call = pending.pop(call_id)
            answered.add(call_id)
            items.append(Item("tool", call=call, result=_tool_content(content)))
            continue
        no_result_left(index)
        pending, answered = {}, set()
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {index} content must be a string, got {type(content).__name__}")
            items.append(Item("user", text=content))
            continue
        if previous == "assistant":
            raise ValueError(f"message {index} has role 'assistant' but follows an assistant message "
                             "(each answer follows a user or tool message)")
        raw_calls = message.get("tool_calls")
        calls = _check_calls(index, raw_calls) if raw_calls is not None else ()
        if content is not None and not isinstance(content, str):
            raise ValueError(f"message {index} content must be a string, got {type(content).__name__}")
        if not calls and not content:
            raise ValueError(f"message {index}: assistant message has no content and no tool calls")
        text = content if content and (not calls or content.strip()) else ""
        items.append(Item("assistant", text=text, calls=calls))
        pending = {call.id: call for call in calls}
        calls_at = index
    no_result_left(len(messages))
    if items[-1].role == "assistant":
        raise ValueError("conversation must end with a user or tool message")
    return items


# ----------------------------------------------------------------------------- templates


class ToolTemplate:
    """Prompt ids for a conversation with tools; subclasses spell one tokenizer version."""

    version: str

    def __init__(self, template: ChatTemplate) -> None:
        self.template = template
        self._sp = template.processor

    def encode(self, messages: Sequence[Any], system: str | None = None, tools: Any = None) -> list[int]:
        """BOS and the blocks of the module docstring; an empty ``system`` counts as none, as do no tools."""
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system prompt must be a string, got {type(system).__name__}")
        checked = check_tools(tools) if tools is not None else []
        tools_json = _dumps(checked) if checked else None
        items = check_conversation(messages)
        users = [i for i, item in enumerate(items) if item.role == "user"]
        system_at = users[-1 if self.template.system_before_last_user else 0] if system else None
        tools_at = users[-1] if tools_json else None
        ids = [self._sp.bos_id()]
        run: list[Item] = []  # tool results in a row
        for index, item in enumerate(items):
            if item.role == "tool":
                run.append(item)
                if index + 1 == len(items) or items[index + 1].role != "tool":
                    ids += self.results(run)
                    run = []
            elif item.role == "user":
                text = f"{system}\n\n{item.text}" if index == system_at else item.text
                ids += self.user(text, tools_json if index == tools_at else None)
            else:
                ids += [*self.answer(item.text, item.calls), self._sp.eos_id()]
        return ids

    def call_prefix(self) -> list[int]:
        """The ids that start a call in an answer."""
        raise NotImplementedError

    def user(self, text: str, tools_json: str | None) -> list[int]:
        raise NotImplementedError

    def answer(self, text: str, calls: Sequence[ToolCall]) -> list[int]:
        raise NotImplementedError

    def results(self, items: Sequence[Item]) -> list[int]:
        raise NotImplementedError


class V3ToolTemplate(ToolTemplate):
    """Control tokens around separately encoded JSON (mistral-common's ``InstructTokenizerV3``)."""

    version = "v3"

    def __init__(self, template: ChatTemplate) -> None:
        super().__init__(template)
        piece = self._sp.piece_to_id
        self._tools_begin, self._tools_end = piece("[AVAILABLE_TOOLS]"), piece("[/AVAILABLE_TOOLS]")
        self._calls = piece(CALL_MARKER)
        self._results_begin, self._results_end = piece("[TOOL_RESULTS]"), piece("[/TOOL_RESULTS]")

    def call_prefix(self) -> list[int]:
        return [self._calls]

    def user(self, text: str, tools_json: str | None) -> list[int]:
        block = self.template.user_block(text)
        if not tools_json:
            return block
        return [self._tools_begin, *self._sp.encode(tools_json), self._tools_end, *block]

    def answer(self, text: str, calls: Sequence[ToolCall]) -> list[int]:
        ids = self.template.answer(text) if text else []
        if calls:
            listed = [{"name": c.name, "arguments": c.arguments, "id": normalize_tool_call_id(c.id)}
                      for c in calls]
            ids += [self._calls, *self._sp.encode(_dumps(listed))]
        return ids

    def results(self, items: Sequence[Item]) -> list[int]:
        ids: list[int] = []
        for item in items:
            assert item.call is not None
            result = {"content": item.result, "call_id": normalize_tool_call_id(item.call.id)}
            ids += [self._results_begin, *self._sp.encode(_dumps(result)), self._results_end]
        return ids


class V1ToolTemplate(ToolTemplate):
    """The v3 layout with the markers as text inside the ``[INST]`` blocks and answers."""

    version = "v1"

    def call_prefix(self) -> list[int]:
        return self.template.answer(CALL_MARKER)

    def user(self, text: str, tools_json: str | None) -> list[int]:
        if tools_json:
            block = f"[AVAILABLE_TOOLS] {tools_json} [/AVAILABLE_TOOLS]"
            text = f"{block} {text}" if text else block
        return self.template.user_block(text)

    def answer(self, text: str, calls: Sequence[ToolCall]) -> list[int]:
        if calls:
            listed = _dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
            text = f"{text} {CALL_MARKER} {listed}" if text else f"{CALL_MARKER} {listed}"
        return self.template.answer(text)

    def results(self, items: Sequence[Item]) -> list[int]:
        blocks = []
        for item in items:
            assert item.call is not None
            shown = _dumps({"name": item.call.name, "content": item.result})
            blocks.append(f"[TOOL_RESULTS] {shown} [/TOOL_RESULTS]")
        return self.template.user_block(" ".join(blocks))


def tool_template_for(template: ChatTemplate) -> ToolTemplate:
    """The tool template of the chat template's tokenizer version (v1 or v3)."""
    kinds: dict[str, type[ToolTemplate]] = {"v1": V1ToolTemplate, "v3": V3ToolTemplate}
    return kinds[template.version](template)


# ----------------------------------------------------------------------------- decoding side


def call_prefix(tokenizer: Tokenizer) -> list[int]:
    """The ids that start a call in a generated answer: v3 ``[CALL_MARKER id]``; v1 the ids of the text
    ``[TOOL_CALLS]`` at the start of an answer (``▁[``, ``TO``, ``OL``, ...). The JSON list follows, in
    history with a space before it (``▁[``)."""
    return tool_template_for(tokenizer._template).call_prefix()


def parse_tool_calls(text: str) -> list[tuple[str, str]]:
    """The calls in the generated text after ``call_prefix``: a JSON list ``[{"name": str, "arguments":
    {...}}, ...]`` (surrounding whitespace allowed; an ``"id"`` key is ignored). Returns ``(name,
    arguments as JSON text)`` pairs; raises a one-line ``ValueError`` on anything else."""
    body = text.strip()
    try:
        calls, end = json.JSONDecoder().raw_decode(body)
    except ValueError as exc:
        raise ValueError(f"tool calls are not valid JSON: {exc}") from None
    if end != len(body):
        raise ValueError(f"tool calls: unexpected text after the JSON list at character {end}")
    if not isinstance(calls, list) or not calls:
        raise ValueError("tool calls must be a non-empty JSON list of calls")
    parsed: list[tuple[str, str]] = []
    for k, call in enumerate(calls):
        if not isinstance(call, dict):
            raise ValueError(f"tool call {k} is not a JSON object")
        extra = sorted(set(call) - {"name", "arguments", "id"})
        if extra:
            raise ValueError(f"tool call {k} has unexpected keys {extra}")
        name, arguments = call.get("name"), call.get("arguments")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"tool call {k} name {name!r} must be 1-64 characters a-z, A-Z, 0-9, '_' or '-'")
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call {k} ({name}) arguments must be a JSON object, got "
                             f"{type(arguments).__name__ if 'arguments' in call else 'nothing'}")
        parsed.append((name, _dumps(arguments)))
    return parsed
