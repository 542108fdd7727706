"""Tool calls on the chat API: the request's `tools` and `tool_choice`, the grammar a reply is held
to, and the reply read back as OpenAI's `tool_calls`, whole or streamed.

A call is generated as the tokenizer's call marker (`[TOOL_CALLS]`: one control token in v3, plain
text in v1, `checkpoints/tool_template.py`) and a JSON list `[{"name": ..., "arguments": {...}}]`
whose items the grammar restricts to the request's tools, each tool's arguments to its
`parameters` schema. What `tool_choice` does to the reply:

- `"none"`: the tools are in the prompt, the reply is text (or `response_format`'s document);
- `"required"` or `{"type": "function", "function": {"name": N}}`: the reply is calls (of N only);
- `"auto"` (the default when tools are given): the first characters decide. A reply whose first
  character (after the answer's leading space) is `[` is a call, made to read marker and list; any
  other first character starts a text reply, which then cannot turn into a call.

`parallel_tool_calls: false` allows one call per reply. The reply's `finish_reason` is
"tool_calls" when it made calls, "length" when the tokens ran out first (then the unfinished text
is the `content` and there are no `tool_calls`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..checkpoints.tokenizer import Tokenizer
from ..checkpoints.tool_template import call_prefix, new_tool_call_id, parse_tool_calls
from ..engine.grammar import Grammar, json_body
from .protocol import ChatRequest, bad_request
from .responses import tool_call

CALL_TEXT = "[TOOL_CALLS]"  # the v1 marker, as text
CHOICES = ("none", "auto", "required")


@dataclass
class ToolPlan:
    """What a request asks of tools: the definitions (for the prompt) and the choice."""

    tools: list[dict]  # {"name", "description", "parameters"}, as `Tokenizer.encode_instruct` takes them
    choice: str  # "none", "auto", "required" or "function" (only `name`)
    name: str | None = None
    parallel: bool = True

    @property
    def may_call(self) -> bool:
        return self.choice != "none"

    @property
    def must_call(self) -> bool:
        return self.choice in ("required", "function")


def tool_plan(req: ChatRequest) -> ToolPlan | None:
    """The request's tools, checked; None without tools."""
    if req.functions or req.function_call is not None:
        raise bad_request("functions" if req.functions else "function_call",
                          "the legacy function-calling fields are not supported; send tools and tool_choice")
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise bad_request("tool_choice", "is only allowed when tools are given")
        return None
    tools, names = [], set()
    for i, t in enumerate(req.tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise bad_request(where, 'must be {"type": "function", "function": {"name": ..., "parameters": ...}}')
        fn = t["function"]
        name, params = fn.get("name"), fn.get("parameters", {"type": "object"})
        if not isinstance(name, str) or not name:
            raise bad_request(f"{where}.function.name", "must be a non-empty string")
        if name in names:
            raise bad_request(f"{where}.function.name", f"{name!r} is defined twice")
        if not isinstance(params, dict):
            raise bad_request(f"{where}.function.parameters", "must be a JSON Schema object")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise bad_request(f"{where}.function.description", "must be a string")
        names.add(name)
        tools.append({"name": name, "description": description, "parameters": params})
    choice, name = req.tool_choice if req.tool_choice is not None else "auto", None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad_request("tool_choice", 'must be "none", "auto", "required" or '
                                             '{"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise bad_request("tool_choice.function.name", f"{name!r} is not one of the tools")
        choice = "function"
    elif choice not in CHOICES:
        raise bad_request("tool_choice", f'must be "none", "auto", "required" or a named function, got {choice!r}')
    return ToolPlan(tools, choice, name, req.parallel_tool_calls is not False)


def calls_schema(plan: ToolPlan) -> dict:
    """The JSON Schema of the list a call reply holds."""
    items = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]}}
             for t in plan.tools if plan.choice != "function" or t["name"] == plan.name]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not plan.parallel:
        schema["maxItems"] = 1
    return schema


def reply_grammar(plan: ToolPlan, tok: Tokenizer, text: Grammar | None) -> Grammar | None:
    """The grammar of a reply under `plan`; `text` is what a text reply must match (the request's
    `response_format`), None for free text."""
    if not plan.may_call:
        return text
    if text is not None and text.schema is None:
        raise bad_request("grammar", "a GBNF or Lark grammar cannot be combined with tools; use response_format")
    marker = f"<[{call_prefix(tok)[0]}]>" if tok.version == "v3" else f'" "? "{CALL_TEXT}" " "'
    rules = [f'call: {marker} " "? {json_body(calls_schema(plan))}']
    if plan.must_call:
        rules.insert(0, "start: call")
    else:
        rules.insert(0, "start: call | text")
        rules.append(f'text: " "? {json_body(text.schema)}' if text is not None else r'text: " "? /[^\[ ](.|\n)*/')
    return Grammar.lark("\n".join(rules), "tools")


# -- reading the reply ------------------------------------------------------------------------------------
@dataclass
class _Call:
    name: str | None = None
    arguments: str = ""
    announced: bool = False
    sent: int = 0  # characters of `arguments` already streamed
    id: str = field(default_factory=new_tool_call_id)


class ReplyReader:
    """A reply's text, piece by piece, read as content or as calls (`tool_choice` decides which
    replies may be calls). `feed` returns the stream deltas the piece makes: `{"content": ...}` or
    `{"tool_calls": [...]}` (OpenAI's fragments: index, id, type and name first, then pieces of the
    arguments); `calls()` the finished calls."""

    def __init__(self, plan: ToolPlan | None, tok: Tokenizer) -> None:
        self.plan = plan
        self.prefix = CALL_TEXT if tok.version == "v1" else ""
        self.text = ""
        self.is_call: bool | None = None if plan is not None and plan.may_call else False
        self._calls: list[_Call] = []

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        if self.is_call is None:
            head = self.text.lstrip()
            if not head:
                return []
            self.is_call = head.startswith("[")
            piece = self.text
        if not self.is_call:
            return [{"content": piece}] if piece else []
        return self._call_deltas()

    def _call_deltas(self) -> list[dict]:
        body = self.text.lstrip()
        if self.prefix:
            if len(body) < len(self.prefix):
                return []
            body = body[len(self.prefix):]
        for k, (name, arguments) in enumerate(scan_calls(body)):
            if k == len(self._calls):
                self._calls.append(_Call())
            self._calls[k].name, self._calls[k].arguments = name, arguments
        fragments = []
        for k, call in enumerate(self._calls):
            if call.name is None:
                continue
            if not call.announced:
                call.announced = True
                fragments.append({"index": k, "id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": ""}})
            if len(call.arguments) > call.sent:
                fragments.append({"index": k, "function": {"arguments": call.arguments[call.sent:]}})
                call.sent = len(call.arguments)
        return [{"tool_calls": fragments}] if fragments else []

    def calls(self) -> list[dict] | None:
        """The reply's calls as OpenAI's `tool_calls` (ids as streamed), or None: a text reply, or
        calls the tokens ran out on."""
        if not self.is_call:
            return None
        body = self.text.strip()
        body = body[len(self.prefix):] if body.startswith(self.prefix) else body
        try:
            parse_tool_calls(body)  # the whole list, checked
        except ValueError:
            return None
        scanned = list(scan_calls(body))  # the arguments as generated, as they were streamed
        while len(self._calls) < len(scanned):
            self._calls.append(_Call())
        return [tool_call(c.id, name, arguments) for c, (name, arguments) in zip(self._calls, scanned, strict=False)]


def scan_calls(text: str) -> Iterator[tuple[str | None, str]]:
    """(name, arguments text so far) of each call begun in `text`, the start of a JSON call list
    `[{"name": ..., "arguments": {...}}, ...]`: the name once its string is closed, the arguments'
    text as far as it has come. Reads only what a JSON scanner must (strings, escapes, nesting)."""
    calls: list[list] = []  # [name, start, end] of each call object
    depth, key, expect_key = 0, None, False
    in_string, escaped, string_start = False, False, 0
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 2:  # a key or a plain value of the call object
                    literal = json.loads(text[string_start:i + 1])
                    if expect_key:
                        key, expect_key = literal, False
                    elif key == "name":
                        calls[-1][0] = literal
        elif ch == '"':
            in_string, string_start = True, i
        elif ch in "{[":
            depth += 1
            if depth == 2:
                calls.append([None, None, None])
                expect_key = True
            elif depth == 3 and key == "arguments":
                calls[-1][1] = i
        elif ch in "}]":
            depth -= 1
            if depth == 2 and key == "arguments" and calls[-1][2] is None:
                calls[-1][2] = i + 1
        elif ch == "," and depth == 2:
            key, expect_key = None, True
    for name, start, end in calls:
        yield name, "" if start is None else text[start:end]
