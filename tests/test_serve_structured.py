"""Structured output over HTTP: response_format and GBNF grammars, tool calls (v1 and v3 tokenizers),
logprobs (chat, completions with echo, token-id prompts), logit_bias, and hostile schemas, with the
official openai client against a server on 127.0.0.1 running the tiny random model."""

from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest
import torch
from test_serve import KEY, MODEL, WAIT_S, http, idle, serving

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
                         "city": {"enum": ["Zürich", "東京", "🌍 city"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 10},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
TOOLS = [WEATHER, TIME]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def ask(text: str = "Tell me about yourself.") -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    with serving(tiny_ckpt) as srv:
        yield srv


@pytest.fixture(scope="module")
def server_v3(tiny_v3_ckpt):
    with serving(tiny_v3_ckpt) as srv:
        yield srv


def client_of(server) -> openai.OpenAI:
    idle(server)
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=WAIT_S)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return client_of(server)


# -- response_format ------------------------------------------------------------------------------
def test_json_schema_output_is_valid_across_seeds(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(6):
        r = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0.8, seed=seed, max_tokens=200,
                                           response_format=fmt)
        choice = r.choices[0]
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.finish_reason == "stop" and r.usage.completion_tokens <= 200


def test_json_object_mode_and_completions_endpoint(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0.8, seed=seed, max_tokens=150,
                                           response_format={"type": "json_object"})
        c = r.choices[0]
        assert isinstance(json.loads(c.message.content), dict) if c.finish_reason == "stop" else c.finish_reason == "length"
    r = client.completions.create(model=MODEL, prompt="A person:", max_tokens=200, temperature=0.8, seed=1,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "p", "schema": SCHEMA}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_running_out_of_tokens_inside_a_document_is_length(client):
    r = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=4, seed=0, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_streamed_json_equals_the_whole_reply(client):
    args = dict(model=MODEL, messages=ask(), temperature=0.8, seed=4, max_tokens=200,
                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
    whole = client.chat.completions.create(**args).choices[0].message.content
    pieces = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **args)
              if ch.choices]
    assert "".join(pieces) == whole


def test_gbnf_grammar_field(client):
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ask(), seed=seed, max_tokens=30,
                                           extra_body={"grammar": grammar})
        assert r.choices[0].message.content in ("The answer is yes.", "The answer is no.")
        assert r.choices[0].finish_reason == "stop"


def test_hostile_schemas_get_a_400_and_do_not_hold_up_the_queue(server, client, monkeypatch):
    deep: dict = {"type": "string"}
    for _ in range(100):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    huge = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": "[a-z]{3,9}x" * 5}
                                             for i in range(5000)}}
    unsupported = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}

    def refused(schema, problem: str) -> None:
        status, _, raw = http(server, "POST", "/v1/chat/completions", {
            "messages": ask(), "max_tokens": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        err = json.loads(raw).get("error", {})
        assert status == 400 and err["param"] == "response_format.json_schema.schema", raw
        assert problem in err["message"], err

    refused(deep, "deeper than 64 levels")
    refused(huge, "bytes; at most")
    refused(unsupported, "not")
    # a compile that outlasts the limit is abandoned with a 400; the generation queue never saw it
    import mixtral_cli.server.http as http_module

    monkeypatch.setattr(http_module, "GRAMMAR_TIMEOUT_S", 1e-6)
    refused(SCHEMA, "took longer than")
    monkeypatch.undo()
    assert server.worker.waiting == 0
    r = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=3)
    assert r.usage.completion_tokens == 3


# -- logprobs -----------------------------------------------------------------------------------------
def reference_logprobs(hf_tiny, ids: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits at every position of `ids`, [T, V] float64."""
    with torch.no_grad():
        logits = hf_tiny(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def test_chat_logprobs_match_a_full_forward_pass(server, client, hf_tiny):
    messages = ask("Why is the sky blue?")
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    tok = server.worker.engine.tokenizer
    prompt = tok.encode_instruct(messages)
    ids = list(prompt)
    for entry in content:
        ref = reference_logprobs(hf_tiny, ids)[-1]
        best = int(ref.argmax())
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the top one
        assert entry.logprob == pytest.approx(float(ref[best]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        ids.append(best)
    # streamed, the same entries arrive spread over the chunks
    streamed = [e for ch in client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8,
                                                            logprobs=True, top_logprobs=3, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


def test_completion_echo_scores_the_prompt_like_perplexity(server, hf_tiny, tiny_ckpt):
    from mixtral_cli.engine.evaluate import perplexity

    tok = server.worker.engine.tokenizer
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France"]
    prompts = [tok.encode(t, bos=True) for t in texts]
    status, _, raw = http(server, "POST", "/v1/completions", {"prompt": prompts, "max_tokens": 0, "echo": True,
                                                              "logprobs": 2, "temperature": 0})
    assert status == 200, raw
    out = json.loads(raw)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for ids, text, choice in zip(prompts, texts, out["choices"], strict=True):
        lp = choice["logprobs"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and lp["tokens"][0] == "<s>"
        ref = reference_logprobs(hf_tiny, ids)
        expected = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
        assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
        ppl = perplexity(server.worker.engine.model, ids, ctx=len(ids))  # `mixtral perplexity`'s scoring
        assert -sum(lp["token_logprobs"][1:]) == pytest.approx(math.log(ppl.perplexity) * ppl.tokens_scored, abs=1e-4)
        pieces = lp["tokens"][1:]
        assert "".join(pieces)[1:] == text  # the first piece's space is SentencePiece's dummy prefix
        assert lp["text_offset"] == [0] + [max(0, len("".join(pieces[:i])) - 1) for i in range(len(pieces))]
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts)) and out["usage"]["completion_tokens"] == 0


def test_echo_then_generate_and_stream(server):
    tok = server.worker.engine.tokenizer
    ids = tok.encode("Once upon a time", bos=True)
    body = {"prompt": ids, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0}
    status, _, raw = http(server, "POST", "/v1/completions", body)
    whole = json.loads(raw)["choices"][0]
    assert status == 200 and len(whole["logprobs"]["tokens"]) == len(ids) + 3
    assert whole["text"].startswith(tok.decode(ids))
    status, _, raw = http(server, "POST", "/v1/completions", body | {"stream": True})
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    tokens = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert text == whole["text"] and tokens == whole["logprobs"]["tokens"]


def test_logit_bias_steers_greedy_decoding(server, client):
    tok = server.worker.engine.tokenizer
    target = tok.encode("banana")[-1]
    r = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, max_tokens=5,
                                       logit_bias={str(target): 100}, logprobs=True)
    assert all(bytes(e.bytes) == tok.id_to_piece(target).replace("\u2581", " ").encode()
               for e in r.choices[0].logprobs.content)


# -- tool calls ------------------------------------------------------------------------------------------
def check_calls(calls, allowed=("get_weather", "get_time")) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.function.name in allowed and len(call.id) == 9
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("which", ["v1", "v3"])
def test_required_tool_choice_gives_valid_calls(which, server, server_v3):
    client = client_of(server if which == "v1" else server_v3)
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=ask("Weather in Paris?"), tools=TOOLS,
                                           tool_choice="required", temperature=0.8, seed=seed, max_tokens=200)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message.tool_calls)


@pytest.mark.parametrize("which", ["v1", "v3"])
def test_named_function_and_no_parallel_calls(which, server, server_v3):
    client = client_of(server if which == "v1" else server_v3)
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ask(), tools=TOOLS, temperature=0.8, seed=seed,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           parallel_tool_calls=False, max_tokens=200)
        calls = r.choices[0].message.tool_calls
        check_calls(calls, allowed=("get_time",))
        assert len(calls) == 1


@pytest.mark.parametrize("which", ["v1", "v3"])
def test_auto_is_text_or_valid_calls_and_none_is_text(which, server, server_v3):
    client = client_of(server if which == "v1" else server_v3)
    kinds = set()
    for seed in range(8):
        r = client.chat.completions.create(model=MODEL, messages=ask(), tools=TOOLS, temperature=1.0, seed=seed,
                                           max_tokens=60)
        choice = r.choices[0]
        if choice.message.tool_calls:
            check_calls(choice.message.tool_calls)
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            kinds.add("call")
        else:
            assert choice.finish_reason in ("stop", "length") and not choice.message.content.lstrip().startswith("[")
            kinds.add("text")
    assert kinds  # which of the two the random model picks is its business
    r = client.chat.completions.create(model=MODEL, messages=ask(), tools=TOOLS, tool_choice="none", max_tokens=10)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("which", ["v1", "v3"])
def test_streamed_tool_calls_assemble_to_the_whole_reply(which, server, server_v3):
    client = client_of(server if which == "v1" else server_v3)
    args = dict(model=MODEL, messages=ask(), tools=TOOLS, tool_choice="required", temperature=0.8, seed=2,
                max_tokens=200)
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **args):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for frag in chunk.choices[0].delta.tool_calls or []:
            if frag.id:  # the first fragment of a call: id, type and name
                assert frag.index not in calls and frag.function.name and frag.type == "function"
                calls[frag.index] = {"name": frag.function.name, "arguments": frag.function.arguments or ""}
            else:
                calls[frag.index]["arguments"] += frag.function.arguments
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]


@pytest.mark.parametrize("which", ["v1", "v3"])
def test_the_conversation_after_a_call(which, server, server_v3):
    client = client_of(server if which == "v1" else server_v3)
    first = client.chat.completions.create(model=MODEL, messages=ask("Weather in Paris?"), tools=TOOLS,
                                           tool_choice="required", seed=1, max_tokens=200)
    calls = first.choices[0].message.tool_calls
    messages = ask("Weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]}
    ] + [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temp": 21})} for c in calls]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.content and r.usage.prompt_tokens > first.usage.prompt_tokens
    # OpenAI-style ids (not 9 characters) pair up as well
    messages[1]["tool_calls"][0]["id"] = messages[2]["tool_call_id"] = "call_abc123XYZ"
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, tools=TOOLS)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
