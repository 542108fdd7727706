"""Tool-calling prompts: v3 id for id against mistral-common, the documented v1 text layout, call ids,
the decoder helpers and every malformed-input error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mixtral_cli.checkpoints import tool_template
from mixtral_cli.checkpoints.chat_template import conversation_turns
from mixtral_cli.checkpoints.tokenizer import Tokenizer
from mixtral_cli.checkpoints.tool_template import (
    CALL_MARKER,
    call_prefix,
    new_tool_call_id,
    normalize_tool_call_id,
    parse_tool_calls,
)

V3_IDS = {"[INST]": 3, "[/INST]": 4, "[TOOL_CALLS]": 5, "[AVAILABLE_TOOLS]": 6, "[/AVAILABLE_TOOLS]": 7,
          "[TOOL_RESULTS]": 8, "[/TOOL_RESULTS]": 9}

WEATHER = {
    "name": "get_weather",
    "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SEARCH = {
    "name": "search-web_2",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "Requête, 検索 🙂"},
                       "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
    },
}
NO_PARAMS = {"name": "now", "description": "The time"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def calls(*items: tuple[str, str, str | dict], content: str | None = None) -> dict:
    return {"role": "assistant", "content": content,
            "tool_calls": [{"id": i, "name": n, "arguments": a} for i, n, a in items]}


def result(call_id: str, content: str) -> dict:
    return {"role": "tool", "content": content, "tool_call_id": call_id}


PARIS = ("a1B2c3D4e", "get_weather", '{"city": "Paris"}')
ROME = ("Zz9Yy8Xx7", "get_weather", {"city": "Rome"})

# (messages, system, tools): every one is a request mistral-common's v3 encoder accepts
V3_CASES = {
    "tools-one-user": ([user("What's the weather in Paris?")], None, [WEATHER]),
    "tools-system-one-user": ([user("Weather?")], "Be brief.", [WEATHER, SEARCH]),
    "call-result-answer-user": (
        [user("What's the weather in Paris?"), calls(PARIS), result(PARIS[0], '{"temp": 21}'),
         answer("It is 21 °C.  "), user("And in Rome?")],
        "Be brief.", [WEATHER],
    ),
    "ends-with-result": ([user("Paris?"), calls(PARIS), result(PARIS[0], '{"temp":21,  "sky":"clear"}')],
                         "System text", [WEATHER]),
    "two-parallel-calls": (
        [user("Paris and Rome?"), calls(PARIS, ROME), result(ROME[0], "18"), result(PARIS[0], '{"temp": 21}'),
         answer("Paris 21, Rome 18."), user("Thanks!")],
        None, [WEATHER],
    ),
    "non-ascii": (
        [user("Météo à Zürich? 日本語 🙂"),
         calls(("QwErTy123", "get_weather", {"city": "Zürich", "note": "日本 🙂", "nested": {"ü": [1, 2.5, None]}})),
         result("QwErTy123", '{"résumé": "ensoleillé ☀", "温度": 21}'), answer("Ensoleillé ☀."), user("Merci ✓")],
        "Réponds en français 🙂", [WEATHER, SEARCH],
    ),
    "result-contents": (
        [user("go"), calls(("aaaaaaaa1", "now", ""), ("aaaaaaaa2", "now", "{}"), ("aaaaaaaa3", "now", "  {} "),
                           ("aaaaaaaa4", "now", '{"x":1,"y":[1,2]}'), ("aaaaaaaa5", "now", {})),
         result("aaaaaaaa1", ""), result("aaaaaaaa2", "42"), result("aaaaaaaa3", "plain text, not JSON"),
         result("aaaaaaaa4", '"a JSON string"'), result("aaaaaaaa5", " [1, {\"a\": null}, true] ")],
        None, [NO_PARAMS],
    ),
    "two-rounds-and-history": (
        [user("first"), answer("hello"), user("Search then weather"),
         calls(("s1s1s1s1s", "search-web_2", {"query": "x", "limit": 3})), result("s1s1s1s1s", "[]"),
         calls(PARIS), result(PARIS[0], "{}"), answer("Done."), user("  again  "), answer("sure"), user("")],
        "sys", [SEARCH, WEATHER, NO_PARAMS],
    ),
    "results-then-user": ([user("q"), calls(PARIS), result(PARIS[0], "ok"), user("never mind")], "S", [WEATHER]),
    "no-tools-list": ([user("q"), calls(PARIS), result(PARIS[0], "1"), answer("a"), user("b")], None, []),
    "tool-history-no-tools-given": ([user("q"), calls(PARIS), result(PARIS[0], "1"), user("b")], "s", None),
}


@pytest.fixture(scope="module")
def tok1(v1_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.from_file(v1_tokenizer_path)


@pytest.fixture(scope="module")
def tok3(v3_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.from_file(v3_tokenizer_path)


@pytest.fixture(scope="module")
def mistral_v3(v3_tokenizer_path: Path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(v3_tokenizer_path))


def _reference(mistral, messages: list[dict], system: str | None, tools: list[dict] | None) -> list[int]:
    """mistral-common's ``encode_chat_completion`` of the same request (validator included)."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    msgs: list = [SystemMessage(content=system)] if system else []
    for m in messages:
        if m["role"] == "user":
            msgs.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            msgs.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        else:
            tool_calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                          for c in m.get("tool_calls") or []]
            msgs.append(AssistantMessage(content=m["content"], tool_calls=tool_calls or None))
    mc_tools = None if tools is None else [
        Tool(function=Function(name=t["name"], description=t.get("description", ""),
                               parameters=t.get("parameters", {})))
        for t in tools
    ]
    return mistral.encode_chat_completion(ChatCompletionRequest(messages=msgs, tools=mc_tools)).tokens


def _render(tok: Tokenizer, ids: list[int]) -> str:
    """The ids as text, control tokens shown as their pieces, spaces of the pieces kept."""
    out, run = [], []
    for i in [*ids, None]:
        if i is None or tok.is_control(i):
            out.append(tok.decode_continuation(run) if run else "")
            run = []
            if i is not None:
                out.append(tok.id_to_piece(i))
        else:
            run.append(i)
    return "".join(out)


# ----------------------------------------------------------------------------- v3 parity


@pytest.mark.parametrize("name", list(V3_CASES))
def test_v3_matches_mistral_common(tok3: Tokenizer, mistral_v3, name: str) -> None:
    messages, system, tools = V3_CASES[name]
    ids = tok3.encode_instruct(messages, system=system, tools=tools)
    assert ids == _reference(mistral_v3, messages, system, tools)


def test_v3_user_runs_stay_apart_like_instruct_request(tok3: Tokenizer, mistral_v3) -> None:
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    messages = [user("a"), user("b"), calls(PARIS), result(PARIS[0], "1"), user("c"), user("d")]
    reference = InstructRequest(
        messages=[UserMessage(content="a"), UserMessage(content="b"),
                  AssistantMessage(tool_calls=[ToolCall(id=PARIS[0], function=FunctionCall(name=PARIS[1],
                                                                                          arguments=PARIS[2]))]),
                  ToolMessage(content="1", tool_call_id=PARIS[0]), UserMessage(content="c"), UserMessage(content="d")],
        system_prompt="sys",
        available_tools=[Tool(function=Function(**WEATHER))],
    )
    expected = mistral_v3.instruct_tokenizer.encode_instruct(reference).tokens
    assert tok3.encode_instruct(messages, system="sys", tools=[WEATHER]) == expected


def test_v3_layout(tok3: Tokenizer) -> None:
    messages, system, tools = V3_CASES["call-result-answer-user"]
    text = _render(tok3, tok3.encode_instruct(messages, system=system, tools=tools))
    tools_json = json.dumps([{"type": "function", "function": WEATHER}], ensure_ascii=False)
    assert text == (
        '<s>[INST] What\'s the weather in Paris?[/INST][TOOL_CALLS] [{"name": "get_weather", "arguments": '
        '{"city": "Paris"}, "id": "a1B2c3D4e"}]</s>[TOOL_RESULTS] {"content": {"temp": 21}, "call_id": '
        '"a1B2c3D4e"}[/TOOL_RESULTS] It is 21 °C.</s>'
        f"[AVAILABLE_TOOLS] {tools_json}[/AVAILABLE_TOOLS][INST] Be brief.\n\nAnd in Rome?[/INST]"
    )


def test_v3_assistant_text_and_calls(tok3: Tokenizer, mistral_v3) -> None:
    """mistral-common rejects text with calls; we write the text, then the calls, as the model would."""
    with_text = [user("q"), calls(PARIS, content="Let me check. "), result(PARIS[0], "1")]
    with pytest.raises(Exception, match="content or tool_calls"):
        _reference(mistral_v3, with_text, None, [WEATHER])
    plain = tok3.encode_instruct([user("q"), calls(PARIS), result(PARIS[0], "1")], tools=[WEATHER])
    at = plain.index(V3_IDS["[TOOL_CALLS]"])
    expected = [*plain[:at], *tok3.encode("Let me check."), *plain[at:]]
    assert tok3.encode_instruct(with_text, tools=[WEATHER]) == expected
    # whitespace-only text with calls counts as none (as "" and None do)
    for content in ("", None, " \n "):
        blank = [user("q"), calls(PARIS, content=content), result(PARIS[0], "1")]
        assert tok3.encode_instruct(blank, tools=[WEATHER]) == plain


# ----------------------------------------------------------------------------- call ids


def test_openai_ids_are_mapped_consistently(tok3: Tokenizer, mistral_v3) -> None:
    long_a, long_b = "call_abc123DEF456ghi789", "call_ZZ-9_ü"
    messages = [user("Paris and Rome?"), calls((long_a, *PARIS[1:]), (long_b, *ROME[1:])),
                result(long_b, "18"), result(long_a, "21"), user("ok")]
    short_a, short_b = normalize_tool_call_id(long_a), normalize_tool_call_id(long_b)
    assert short_a != short_b
    mapped = [user("Paris and Rome?"), calls((short_a, *PARIS[1:]), (short_b, *ROME[1:])),
              result(short_b, "18"), result(short_a, "21"), user("ok")]
    ids = tok3.encode_instruct(messages, tools=[WEATHER])
    assert ids == tok3.encode_instruct(mapped, tools=[WEATHER]) == _reference(mistral_v3, mapped, None, [WEATHER])
    text = tok3.decode(ids)
    assert text.count(short_a) == 2 and text.count(short_b) == 2 and long_a not in text and "call_ZZ" not in text


def test_normalize_tool_call_id() -> None:
    for kept in ("a1B2c3D4e", "000000000", "ZZZZZZZZZ"):
        assert normalize_tool_call_id(kept) == kept
    ids = ["call_abc", "call_abd", "abcdefgh", "abcdefghij", "abc-defgh", "", "é" * 9, "call_" + "x" * 200]
    mapped = [normalize_tool_call_id(i) for i in ids]
    assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", m) for m in mapped)
    assert len(set(mapped)) == len(ids)
    assert mapped == [normalize_tool_call_id(i) for i in ids]  # deterministic
    assert normalize_tool_call_id("call_abc") == "t4mxTRtst"  # pinned: a change would unpair stored histories


def test_new_tool_call_id() -> None:
    made = {new_tool_call_id() for _ in range(200)}
    assert len(made) == 200
    assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", i) and normalize_tool_call_id(i) == i for i in made)


# ----------------------------------------------------------------------------- v1 format


V1_TOOLS_JSON = json.dumps([{"type": "function", "function": WEATHER}], ensure_ascii=False)


def test_v1_documented_layout(tok1: Tokenizer) -> None:
    messages, system, tools = V3_CASES["call-result-answer-user"]
    ids = tok1.encode_instruct(messages, system=system, tools=tools)
    assert _render(tok1, ids) == (
        "<s> [INST] Be brief.\n\nWhat's the weather in Paris? [/INST]"
        ' [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>'
        ' [INST] [TOOL_RESULTS] {"name": "get_weather", "content": {"temp": 21}} [/TOOL_RESULTS] [/INST]'
        " It is 21 °C.  </s>"
        f" [INST] [AVAILABLE_TOOLS] {V1_TOOLS_JSON} [/AVAILABLE_TOOLS] And in Rome? [/INST]"
    )
    # each block and answer is one SentencePiece call, as in the plain v1 template
    sp = tok1.encode
    assert ids == [
        1, *sp("[INST] Be brief.\n\nWhat's the weather in Paris? [/INST]"),
        *sp('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'), 2,
        *sp('[INST] [TOOL_RESULTS] {"name": "get_weather", "content": {"temp": 21}} [/TOOL_RESULTS] [/INST]'),
        *sp("It is 21 °C.  "), 2,
        *sp(f"[INST] [AVAILABLE_TOOLS] {V1_TOOLS_JSON} [/AVAILABLE_TOOLS] And in Rome? [/INST]"),
    ]


def test_v1_parallel_calls_results_and_empty_user(tok1: Tokenizer) -> None:
    messages = [user(""), calls(("call_1", "get_weather", {"city": "Paris"}), ("call_2", "get_weather", "{}"),
                                content="Checking."),
                result("call_2", "18"), result("call_1", "plain"), user("")]
    text = _render(tok1, tok1.encode_instruct(messages, system="S", tools=[WEATHER]))
    assert text == (
        "<s> [INST] S\n\n [/INST]"
        ' Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {}}]</s>'
        ' [INST] [TOOL_RESULTS] {"name": "get_weather", "content": 18} [/TOOL_RESULTS]'
        ' [TOOL_RESULTS] {"name": "get_weather", "content": "plain"} [/TOOL_RESULTS] [/INST]'
        f" [INST] [AVAILABLE_TOOLS] {V1_TOOLS_JSON} [/AVAILABLE_TOOLS] [/INST]"
    )
    assert "call_" not in text  # v1 prompts hold no ids


def test_v1_ends_with_results_and_no_tools(tok1: Tokenizer) -> None:
    messages = [user("q"), calls(("x", "now", "")), result("x", "")]
    assert _render(tok1, tok1.encode_instruct(messages)) == (
        '<s> [INST] q [/INST] [TOOL_CALLS] [{"name": "now", "arguments": {}}]</s>'
        ' [INST] [TOOL_RESULTS] {"name": "now", "content": {}} [/TOOL_RESULTS] [/INST]'
    )


def test_module_docstring_shows_both_layouts() -> None:
    doc = tool_template.__doc__ or ""
    assert "[INST] [AVAILABLE_TOOLS] [{" in doc and "[/AVAILABLE_TOOLS] And in Rome? [/INST]" in doc
    assert '[TOOL_CALLS] [{"name": "get_weather",' in doc and '[INST] [TOOL_RESULTS] {"name": "get_weather"' in doc
    assert '"id": "a1B2c3D4e"}]</s>[TOOL_RESULTS]' in doc


# ----------------------------------------------------------------------------- plain conversations

PLAIN = [
    ([user("Hi")], None),
    ([user("Hi"), answer("Hello!  "), user("Why?")], "Be brief."),
    ([user(""), user("b"), answer("x"), user(" c ")], "sys"),
]


@pytest.mark.parametrize("version", ["v1", "v3"])
@pytest.mark.parametrize("case", range(len(PLAIN)))
def test_plain_conversations_unchanged(tok1: Tokenizer, tok3: Tokenizer, version: str, case: int) -> None:
    tok = tok1 if version == "v1" else tok3
    messages, system = PLAIN[case]
    plain = tok._template.encode(conversation_turns(messages), system)
    assert tok.encode_instruct(messages, system=system) == plain
    assert tok.encode_instruct(messages, system=system, tools=[]) == plain  # the tool path, no tools block
    with_tools = tok.encode_instruct(messages, system=system, tools=[WEATHER])
    assert with_tools != plain and len(with_tools) > len(plain)


# ----------------------------------------------------------------------------- decoder side


def test_call_prefix(tok1: Tokenizer, tok3: Tokenizer) -> None:
    assert call_prefix(tok3) == [V3_IDS["[TOOL_CALLS]"]]
    assert call_prefix(tok1) == tok1.encode(CALL_MARKER) == [733, 3957, 3064, 28730, 13741, 28735, 28793]
    # in history a call answer starts with exactly these ids, and the rest parses back to the calls
    for tok in (tok1, tok3):
        messages = [user("q"), calls(PARIS, ROME), result(PARIS[0], "1"), result(ROME[0], "2")]
        ids = tok.encode_instruct(messages, tools=[WEATHER])
        prefix = call_prefix(tok)
        start = next(i for i in range(len(ids)) if ids[i : i + len(prefix)] == prefix)
        end = ids.index(tok.eos_id, start)
        assert ids[start - 1] == (V3_IDS["[/INST]"] if tok is tok3 else 28793)  # right after [/INST]
        parsed = parse_tool_calls(tok.decode_continuation(ids[start + len(prefix) : end]))
        assert parsed == [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')]


def test_parse_tool_calls() -> None:
    text = ' [{"name": "a", "arguments": {"x": "é 🙂", "n": [1, 2]}}, {"name": "b-2", "arguments": {}, "id": "q"}]\n'
    assert parse_tool_calls(text) == [("a", '{"x": "é 🙂", "n": [1, 2]}'), ("b-2", "{}")]
    assert parse_tool_calls('[{"arguments":{"k":1},"name":"f"}]') == [("f", '{"k": 1}')]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON"),
        ('[{"name": "a", "arguments": {}}', "not valid JSON"),
        ('[{"name": "a", "arguments": {}}] trailing', "unexpected text after"),
        ('[{"name": "a", "arguments": {}}][]', "unexpected text after"),
        ('{"name": "a", "arguments": {}}', "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ('["a"]', "tool call 0 is not a JSON object"),
        ('[{"name": "a", "arguments": {}, "type": "function"}]', "unexpected keys ['type']"),
        ('[{"arguments": {}}]', "tool call 0 name None"),
        ('[{"name": "a b", "arguments": {}}]', "tool call 0 name 'a b'"),
        ('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{}"}]', "tool call 1 (b) arguments must be "
                                                                              "a JSON object, got str"),
        ('[{"name": "a"}]', "got nothing"),
    ],
)
def test_parse_tool_calls_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_tool_calls(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- malformed input

OK_CALL = calls(("id1", "f", "{}"))
BAD = {
    "empty": ([], None, "conversation is empty"),
    "not-a-list": ({"role": "user", "content": "x"}, None, "messages must be a list"),
    "not-a-mapping": ([user("a"), "hello"], None, "message 1 is not a mapping"),
    "unknown-role": ([{"role": "system", "content": "x"}, user("a")], None,
                     "message 0 has role 'system'; expected 'user', 'assistant' or 'tool'"),
    "starts-with-assistant": ([OK_CALL, result("id1", "x")], None, "message 0 has role 'assistant' but the "
                                                                   "conversation starts with a user message"),
    "starts-with-tool": ([result("id1", "x")], None, "message 0 has role 'tool'"),
    "assistant-after-assistant": ([user("a"), answer("b"), answer("c"), user("d")], None,
                                  "message 2 has role 'assistant' but follows an assistant message"),
    "assistant-nothing": ([user("a"), {"role": "assistant", "content": None, "tool_calls": []}, user("b")], None,
                          "message 1: assistant message has no content and no tool calls"),
    "assistant-empty-text": ([user("a"), answer(""), user("b")], None, "message 1: assistant message has no content"),
    "assistant-content-type": ([user("a"), {"role": "assistant", "content": 5, "tool_calls": [
        {"id": "i", "name": "f", "arguments": {}}]}, result("i", "x")], None, "message 1 content must be a string, got int"),
    "user-content-type": ([user("a"), OK_CALL, result("id1", "x"), {"role": "user", "content": ["x"]}], None,
                          "message 3 content must be a string, got list"),
    "tool-calls-not-list": ([user("a"), {"role": "assistant", "content": None, "tool_calls": {"id": "i"}}], None,
                            "message 1: tool_calls must be a list of calls"),
    "call-not-mapping": ([user("a"), {"role": "assistant", "content": None, "tool_calls": ["f()"]}], None,
                         "message 1 tool call 0 is not a mapping"),
    "call-no-id": ([user("a"), {"role": "assistant", "content": None, "tool_calls": [
        {"name": "f", "arguments": "{}"}]}], None, "message 1 tool call 0 has no 'id'"),
    "call-empty-id": ([user("a"), calls(("", "f", "{}"))], None, "message 1 tool call 0 has no 'id'"),
    "call-duplicate-id": ([user("a"), calls(("i", "f", "{}"), ("i", "g", "{}"))], None,
                          "message 1 tool call 1: id 'i' is used twice in this message"),
    "call-mapped-id-collision": ([user("a"), calls(("call_abc", "f", "{}"), ("t4mxTRtst", "g", "{}"))], None,
                                 "id 't4mxTRtst' is used twice in this message (as 't4mxTRtst', like 'call_abc')"),
    "call-bad-name": ([user("a"), calls(("i", "get weather", "{}"))], None,
                      "message 1 tool call 0 name 'get weather' must be 1-64 characters"),
    "call-no-name": ([user("a"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "i", "arguments": "{}"}]}], None, "message 1 tool call 0 name None"),
    "call-long-name": ([user("a"), calls(("i", "f" * 65, "{}"))], None, "must be 1-64 characters"),
    "args-invalid-json": ([user("a"), calls(("i", "f", "{city: Paris}"))], None,
                          "message 1 tool call 0 (f) arguments are not valid JSON"),
    "args-json-list": ([user("a"), calls(("i", "f", "[1, 2]"))], None,
                       "message 1 tool call 0 (f) arguments must be a JSON object, got list"),
    "args-json-number": ([user("a"), calls(("i", "f", "5"))], None, "arguments must be a JSON object, got int"),
    "args-list": ([user("a"), calls(("i", "f", ["x"]))], None, "arguments must be a JSON object, got list"),
    "args-missing": ([user("a"), {"role": "assistant", "content": None, "tool_calls": [{"id": "i", "name": "f"}]}],
                     None, "arguments must be a JSON object, got NoneType"),
    "args-not-serialisable": ([user("a"), calls(("i", "f", {"s": {1, 2}}))], None,
                              "message 1 tool call 0 (f) arguments is not JSON-serialisable"),
    "tool-no-call-id": ([user("a"), OK_CALL, {"role": "tool", "content": "x"}], None,
                        "message 2: tool message has no 'tool_call_id'"),
    "tool-unknown-call-id": ([user("a"), OK_CALL, result("id2", "x")], None,
                             "message 2: tool_call_id 'id2' matches no call of the assistant message"),
    "tool-after-user": ([user("a"), result("id1", "x")], None, "message 1: tool_call_id 'id1' matches no call"),
    "tool-answers-older-call": ([user("a"), OK_CALL, result("id1", "x"), answer("b"), user("c"),
                                 result("id1", "y")], None, "message 5: tool_call_id 'id1' matches no call"),
    "tool-answered-twice": ([user("a"), calls(("id1", "f", "{}"), ("id2", "f", "{}")), result("id1", "x"),
                             result("id1", "y")], None, "message 3: tool call 'id1' already has a result"),
    "tool-content-type": ([user("a"), OK_CALL, {"role": "tool", "content": {"a": 1}, "tool_call_id": "id1"}], None,
                          "message 2 content must be a string, got dict"),
    "call-unanswered-before-user": ([user("a"), calls(("id1", "f", "{}"), ("id2", "f", "{}")), result("id2", "x"),
                                     user("b")], None, "message 1: tool call 'id1' has no result"),
    "call-unanswered-at-end": ([user("a"), calls(("id1", "f", "{}"), ("id2", "f", "{}")), result("id1", "x")],
                               None, "message 1: tool call 'id2' has no result"),
    "ends-with-call": ([user("a"), OK_CALL], None, "message 1: tool call 'id1' has no result"),
    "ends-with-answer": ([user("a"), OK_CALL, result("id1", "x"), answer("done")], None,
                         "conversation must end with a user or tool message"),
    "tools-not-list": ([user("a")], {"name": "f"}, "tools must be a list of tool definitions"),
    "tools-string": ([user("a")], "f", "tools must be a list of tool definitions"),
    "tool-not-mapping": ([user("a")], ["f"], "tool 0 is not a mapping"),
    "tool-openai-wrapped": ([user("a")], [{"type": "function", "function": WEATHER}], "tool 0 name None"),
    "tool-bad-name": ([user("a")], [WEATHER, {"name": "a.b"}], "tool 1 name 'a.b' must be 1-64 characters"),
    "tool-duplicate-name": ([user("a")], [WEATHER, WEATHER], "tool 1: another tool is also named 'get_weather'"),
    "tool-description-type": ([user("a")], [{"name": "f", "description": 3}], "tool 0 (f) description must be a string"),
    "tool-parameters-type": ([user("a")], [{"name": "f", "parameters": "object"}],
                             "tool 0 (f) parameters must be a JSON schema object"),
    "tool-parameters-not-json": ([user("a")], [{"name": "f", "parameters": {"default": object()}}],
                                 "tool 0 (f) parameters is not JSON-serialisable"),
}


@pytest.mark.parametrize("version", ["v1", "v3"])
@pytest.mark.parametrize("name", list(BAD))
def test_malformed_input_is_one_line_value_error(tok1: Tokenizer, tok3: Tokenizer, version: str, name: str) -> None:
    tok = tok1 if version == "v1" else tok3
    messages, tools, message = BAD[name]
    with pytest.raises(ValueError) as info:
        tok.encode_instruct(messages, tools=[] if tools is None else tools)  # [] takes the tool path
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_system_prompt_must_be_text(tok3: Tokenizer) -> None:
    with pytest.raises(ValueError, match="system prompt must be a string, got int"):
        tok3.encode_instruct([user("a")], system=5, tools=[WEATHER])  # type: ignore[arg-type]
