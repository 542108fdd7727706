"""`mixtral serve` as clients see it: the official openai client (and raw HTTP where a client would
hide the detail) against a server on 127.0.0.1 with the tiny checkpoint.

One in-process server serves the whole module (API key on, a queue of 3); the `mixtral serve`
process itself is started only where the command line is what is tested (signals, the warning).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import pytest

from mixtral_cli.server.http import EventStream
from mixtral_cli.server.process import Server
from mixtral_cli.server.protocol import ChatRequest, Message, chat_prompt_ids, chat_settings
from mixtral_cli.server.worker import Job
from mixtral_cli.settings import GenerationConfig, ServeOptions

KEY = "sk-test-0123456789"
MODEL = "tiny-mixtral"
QUESTION = "Why is the sky blue?"
SYSTEM = "You are a terse assistant."
RAW_PROMPT = "The capital of France"
GREEDY = {"temperature": 0, "max_tokens": 12}
LONG = 900  # tokens; greedy generation from these prompts runs to max_tokens (no EOS) on the tiny model
WAIT_S = 120  # generous bound for anything that should happen "promptly" on a busy machine
LOG: list[str] = []  # the in-process server's request log lines


def mixtral_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mixtral_cli", *args]


def run_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_API_KEY"}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def eventually(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """`mixtral run --json` for the conversations the tests send (started at once, read when needed)."""
    common = ["-m", str(tiny_ckpt), "--json", "--temp", "0", "--device", "cpu", "--dtype", "float32"]
    procs = {
        "chat": subprocess.Popen(mixtral_cmd("run", QUESTION, "-n", "12", *common), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=run_env()),
        "system": subprocess.Popen(mixtral_cmd("run", QUESTION, "--system", SYSTEM, "-n", "12", *common),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env()),
        "raw": subprocess.Popen(mixtral_cmd("run", RAW_PROMPT, "--raw", "-n", "16", *common), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=run_env()),
    }
    results: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in results:
            out, err = procs[name].communicate(timeout=300)
            assert procs[name].returncode == 0, err
            results[name] = json.loads(out)
        return results[name]

    yield get
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@contextmanager
def serving(ckpt, log=LOG.append) -> Iterator[Server]:
    """An in-process server on `ckpt` (its own engine and KV cache), stopped on leaving."""
    from mixtral_cli.engine.loader import RuntimeOptions, load_engine

    engine = load_engine(ckpt, RuntimeOptions(device="cpu", dtype="float32"))
    opts = ServeOptions(model_name=MODEL, gen=GenerationConfig(max_tokens=None), host="127.0.0.1", port=0,
                        api_key=KEY, max_queue=3, send_timeout=2.0)
    srv = Server(engine, opts, log=log)
    thread = threading.Thread(target=srv.run, name="test-server", daemon=True)
    thread.start()
    eventually(lambda: _get_status(srv, "/health") == 200, "the server to answer /health", 60)
    yield srv
    srv.stop()
    thread.join(60)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(tiny_ckpt, reference):
    with serving(tiny_ckpt) as srv:
        yield srv


@pytest.fixture
def client(server) -> openai.OpenAI:
    idle(server)
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=WAIT_S)


def idle(server) -> None:
    eventually(lambda: server.worker.running is None and server.worker.waiting == 0, "the server to be idle")


def root(server) -> str:
    return server.url.removesuffix("/v1")


def http(server, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY,
         content_type: str = "application/json") -> tuple[int, dict, bytes]:
    """One raw request: (status, headers, body bytes), errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(root(server) + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _get_status(server, path: str) -> int:
    try:
        return http(server, "GET", path)[0]
    except OSError:
        return 0


def assert_error(status: int, headers: dict, body: bytes, expected_status: int, param=..., code=...) -> dict:
    assert status == expected_status, body
    assert headers.get("content-type", headers.get("Content-Type", "")).startswith("application/json")
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    assert err["type"] == ("invalid_request_error" if expected_status < 500 else "server_error")
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def user(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- greedy output, usage, streaming: the same as `mixtral run` -------------------------------------
@pytest.mark.parametrize("with_system", [False, True], ids=["user", "system+user"])
def test_greedy_chat_equals_run(client, reference, with_system):
    ref = reference("system" if with_system else "chat")
    messages = ([{"role": "system", "content": SYSTEM}] if with_system else []) + user()
    r = client.chat.completions.create(model="gpt-4o", messages=messages, **GREEDY)
    assert r.model == MODEL  # any name is accepted; the response names the model served
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref["text"] and ref["text"]
    assert choice.finish_reason == ref["finish_reason"]
    assert r.usage.prompt_tokens == ref["prompt_tokens"] == len(ref["prompt_token_ids"])
    assert r.usage.completion_tokens == ref["completion_tokens"]
    assert r.usage.total_tokens == ref["prompt_tokens"] + ref["completion_tokens"]


def test_developer_role_is_a_system_message(client, reference):
    messages = [{"role": "developer", "content": SYSTEM}] + user()
    r = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert r.choices[0].message.content == reference("system")["text"]


def test_stream_concatenates_to_the_same_text(client, reference):
    ref = reference("chat")
    chunks = list(client.chat.completions.create(model=MODEL, messages=user(), stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    body, last = chunks[:-1], chunks[-1]
    assert all(c.usage is None for c in body)
    assert last.choices == [] and last.usage.prompt_tokens == ref["prompt_tokens"]
    assert last.usage.completion_tokens == ref["completion_tokens"]
    assert "".join(c.choices[0].delta.content or "" for c in body) == ref["text"]
    assert len([c for c in body if c.choices[0].delta.content]) > 1  # it streamed, piece by piece
    assert [c.choices[0].finish_reason for c in body][-1] == ref["finish_reason"]
    assert all(c.choices[0].finish_reason is None for c in body[:-1])


def test_stream_without_include_usage_has_no_usage(server, client, reference):
    status, headers, raw = http(server, "POST", "/v1/chat/completions", {"messages": user(), "stream": True, **GREEDY})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reference("chat")["text"]


def test_completions_raw_prompt_equals_run_raw(client, reference):
    ref = reference("raw")
    r = client.completions.create(model=MODEL, prompt=RAW_PROMPT, temperature=0)  # OpenAI's default: 16 tokens
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == ref["text"] and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == ref["prompt_tokens"] and ref["prompt_token_ids"][0] == 1  # BOS, as --raw
    assert r.usage.completion_tokens == ref["completion_tokens"] == 16
    streamed = list(client.completions.create(model=MODEL, prompt=[RAW_PROMPT], temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == ref["text"]
    assert streamed[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings(client, reference, stream):
    text = reference("chat")["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    args = dict(model=MODEL, messages=user(), stop=["never appears", stop], **GREEDY)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **args))
        got = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**args).choices[0]
        got, finish = choice.message.content, choice.finish_reason
    assert got == expected and finish == "stop"


def test_four_concurrent_clients(client):
    prompts = ["Hello", "Count to ten", "Why is the sky blue?", "Tell me a long story"]

    def ask(i: int) -> tuple[str, int]:  # seeded sampling: each client its own, reproducible answer
        r = client.chat.completions.create(model=MODEL, messages=user(prompts[i]), temperature=1.0, seed=i,
                                           max_tokens=8)
        return r.choices[0].message.content, r.usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4)))
    one_by_one = [ask(i) for i in range(4)]
    assert together == one_by_one
    assert len({text for text, _ in together}) == 4 and all(n == 8 for _, n in together)


def test_penalties_are_applied(client):
    plain = client.chat.completions.create(model=MODEL, messages=user("Hello"), temperature=0, max_tokens=12)
    first = plain.choices[0].message.content
    # a negative frequency penalty rewards repeats: greedy decoding then repeats its first token
    r = client.chat.completions.create(model=MODEL, messages=user("Hello"), temperature=0, max_tokens=12,
                                       frequency_penalty=-2.0)
    repeated = r.choices[0].message.content
    assert repeated != first
    word = os.path.commonprefix([first, repeated])
    assert word and repeated == word * 12


def test_request_fields_fill_the_sampling_settings():
    defaults = GenerationConfig(max_tokens=None)
    req = ChatRequest(messages=[Message(role="user", content="hi")], temperature=2, top_p=1,
                      presence_penalty=-2, frequency_penalty=1.5, top_k=3, seed=2**63 - 1)  # OpenAI's bounds
    s = chat_settings(req, defaults, 32000).gen.sampling
    assert (s.temperature, s.top_p, s.presence_penalty, s.frequency_penalty, s.top_k, s.seed) == (
        2, 1, -2, 1.5, 3, 2**63 - 1)
    assert (s.min_p, s.repeat_penalty) == (defaults.sampling.min_p, defaults.sampling.repeat_penalty)
    unset = chat_settings(ChatRequest(messages=[Message(role="user", content="hi")]), defaults, 32000).gen.sampling
    assert unset == defaults.sampling


def test_harmless_fields_are_accepted(server, client):
    body = {"model": "whatever", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "me"}],
            "n": 1, "logprobs": False, "response_format": {"type": "text"}, "user": "u1", "store": False,
            "metadata": {"a": "b"}, "tool_choice": "none", "parallel_tool_calls": True, "presence_penalty": 0,
            "frequency_penalty": 0, "service_tier": "auto", "some_future_field": {"x": 1}, "top_k": 5, "min_p": 0.1,
            "repeat_penalty": 1.1, "seed": 7, "max_completion_tokens": 3, "top_p": 0}  # OpenAI allows top_p 0
    status, _, raw = http(server, "POST", "/v1/chat/completions", body)
    assert status == 200, raw
    out = json.loads(raw)
    assert out["model"] == MODEL and out["usage"]["completion_tokens"] == 3
    # a form content type (curl -d) is read as JSON too
    status, _, raw = http(server, "POST", "/v1/chat/completions", json.dumps({"messages": user(), "max_tokens": 2}).encode(),
                          content_type="application/x-www-form-urlencoded")
    assert status == 200, raw


def test_seed_makes_sampling_reproducible(client):
    args = dict(model=MODEL, messages=user("Hello"), temperature=1.0, max_tokens=10)
    a = client.chat.completions.create(seed=11, **args).choices[0].message.content
    b = client.chat.completions.create(seed=11, **args).choices[0].message.content
    assert a == b


# -- bad input: a 4xx error object, and the server goes on ----------------------------------------------
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BAD = [
    ("malformed json", CHAT, b'{"messages": [', None),
    ("empty body", CHAT, b"", None),
    ("not an object", CHAT, b"[1, 2]", None),
    ("missing messages", CHAT, {"model": MODEL}, "messages"),
    ("no messages", CHAT, {"messages": []}, "messages"),
    ("role not a string", CHAT, {"messages": [{"role": 5, "content": "hi"}]}, "messages[0].role"),
    ("unknown role", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("tool message answering nothing", CHAT,
     {"messages": user() + [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, "messages"),
    ("tool message without id", CHAT, {"messages": user() + [{"role": "tool", "content": "42"}]},
     "messages[1].tool_call_id"),
    ("image part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ("no content", CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("ends with assistant", CHAT, {"messages": user() + [{"role": "assistant", "content": "ok"}]}, "messages"),
    ("system after assistant", CHAT, {"messages": user() + [{"role": "assistant", "content": "ok"},
                                                            {"role": "system", "content": "s"}] + user()},
     "messages[2].role"),
    ("empty assistant", CHAT, {"messages": user() + [{"role": "assistant", "content": ""}] + user()},
     "messages[1].content"),
    ("malformed tool call", CHAT, {"messages": user() + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function"}]}] + user()}, "messages[1].tool_calls[0]"),
    ("tool call arguments not an object", CHAT, {"messages": user() + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]},
        {"role": "tool", "content": "1", "tool_call_id": "c1"}]}, "messages"),
    ("negative temperature", CHAT, {"messages": user(), "temperature": -1}, "temperature"),
    ("temperature above 2", CHAT, {"messages": user(), "temperature": 2.5}, "temperature"),
    ("completion temperature above 2", COMPLETIONS, {"prompt": "a", "temperature": 3}, "temperature"),
    ("infinite temperature", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
     "temperature"),
    ("temperature not a number", CHAT, {"messages": user(), "temperature": "hot"}, "temperature"),
    ("top_p above 1", CHAT, {"messages": user(), "top_p": 1.5}, "top_p"),
    ("negative top_k", CHAT, {"messages": user(), "top_k": -1}, "top_k"),
    ("min_p 1", CHAT, {"messages": user(), "min_p": 1}, "min_p"),
    ("repeat_penalty 0", CHAT, {"messages": user(), "repeat_penalty": 0}, "repeat_penalty"),
    ("presence_penalty 3", CHAT, {"messages": user(), "presence_penalty": 3}, "presence_penalty"),
    ("frequency_penalty -2.5", CHAT, {"messages": user(), "frequency_penalty": -2.5}, "frequency_penalty"),
    ("max_tokens 0", CHAT, {"messages": user(), "max_tokens": 0}, "max_tokens"),
    ("max_completion_tokens -1", CHAT, {"messages": user(), "max_completion_tokens": -1}, "max_completion_tokens"),
    ("both max fields", CHAT, {"messages": user(), "max_tokens": 2, "max_completion_tokens": 2}, "max_completion_tokens"),
    ("n 2", CHAT, {"messages": user(), "n": 2}, "n"),
    ("top_logprobs 21", CHAT, {"messages": user(), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs", CHAT, {"messages": user(), "top_logprobs": 3}, "top_logprobs"),
    ("tool not a function", CHAT, {"messages": user(), "tools": [{"type": "retrieval"}]}, "tools[0]"),
    ("tool without a name", CHAT, {"messages": user(), "tools": [{"type": "function", "function": {}}]},
     "tools[0].function.name"),
    ("tool parameters not a schema", CHAT, {"messages": user(), "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]}, "tools"),
    ("named tool_choice not a tool", CHAT, {"messages": user(), "tools": [{"type": "function", "function": {"name": "f"}}],
                                            "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice.function.name"),
    ("legacy functions", CHAT, {"messages": user(), "functions": [{"name": "f"}]}, "functions"),
    ("tool_choice required", CHAT, {"messages": user(), "tool_choice": "required"}, "tool_choice"),
    ("response_format type", CHAT, {"messages": user(), "response_format": {"type": "xml"}}, "response_format.type"),
    ("json_schema without a spec", CHAT, {"messages": user(), "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ("unsupported schema keyword", CHAT, {"messages": user(), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}},
     "response_format.json_schema.schema"),
    ("bad pattern", COMPLETIONS, {"prompt": "a", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}}},
     "response_format.json_schema.schema"),
    ("bad gbnf", COMPLETIONS, {"prompt": "a", "grammar": "root ::= ("}, "grammar"),
    ("grammar and response_format", CHAT, {"messages": user(), "grammar": 'root ::= "a"',
                                           "response_format": {"type": "json_object"}}, "grammar"),
    ("logit_bias above 100", CHAT, {"messages": user(), "logit_bias": {"50": 101}}, "logit_bias.50"),
    ("logit_bias not a token", CHAT, {"messages": user(), "logit_bias": {"abc": 1}}, "logit_bias"),
    ("logit_bias outside the vocabulary", CHAT, {"messages": user(), "logit_bias": {"32000": 1}}, "logit_bias"),
    ("audio", CHAT, {"messages": user(), "modalities": ["text", "audio"]}, "modalities"),
    ("stream_options without stream", CHAT, {"messages": user(), "stream_options": {"include_usage": True}},
     "stream_options"),
    ("seed too big", CHAT, {"messages": user(), "seed": 2**70}, "seed"),
    ("seed above int64", CHAT, {"messages": user(), "seed": 2**63}, "seed"),
    ("seed too small", COMPLETIONS, {"prompt": "a", "seed": -2**63 - 1}, "seed"),
    ("negative top_p", COMPLETIONS, {"prompt": "a", "top_p": -0.5}, "top_p"),
    ("stop not text", CHAT, {"messages": user(), "stop": 3}, "stop"),
    ("five stop sequences", CHAT, {"messages": user(), "stop": list("abcde")}, "stop"),
    ("bad input while streaming", CHAT, {"messages": [], "stream": True}, "messages"),
    ("completion logprobs 6", COMPLETIONS, {"prompt": "a", "logprobs": 6}, "logprobs"),
    ("suffix", COMPLETIONS, {"prompt": "a", "suffix": "b"}, "suffix"),
    ("best_of", COMPLETIONS, {"prompt": "a", "best_of": 2}, "best_of"),
    ("several prompts streamed", COMPLETIONS, {"prompt": ["a", "b"], "stream": True}, "stream"),
    ("token outside the vocabulary", COMPLETIONS, {"prompt": [1, 32000]}, "prompt"),
    ("second prompt's token outside", COMPLETIONS, {"prompt": [[1, 2], [1, -1]]}, "prompt[1]"),
    ("mixed prompt list", COMPLETIONS, {"prompt": ["a", [1, 2]]}, "prompt"),
    ("empty prompt list", COMPLETIONS, {"prompt": []}, "prompt"),
    ("missing prompt", COMPLETIONS, {"max_tokens": 3}, "prompt"),
    ("negative completion logprobs", COMPLETIONS, {"prompt": "a", "logprobs": -1}, "logprobs"),
    ("completion max_tokens 0", COMPLETIONS, {"prompt": "a", "max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_400_error_object(server, case):
    _, path, body, param = case
    status, headers, raw = http(server, "POST", path, body)
    err = assert_error(status, headers, raw, 400, param)
    if param:
        assert err["message"].startswith(param)
    assert http(server, "GET", "/health")[0] == 200


@pytest.mark.parametrize("field, value, message", [
    ("presence_penalty", 3, "presence_penalty: must be in [-2, 2], got 3"),
    ("frequency_penalty", -2.5, "frequency_penalty: must be in [-2, 2], got -2.5"),
    ("temperature", -1, "temperature: must be >= 0, got -1.0"),
    ("temperature", 2.5, "temperature: must be in [0, 2], got 2.5"),
    ("top_p", 1.5, "top_p: must be in (0, 1], got 1.5"),
    ("seed", 2**63, f"seed: must be a signed 64-bit integer, got {2**63}"),
    ("stop", list("abcde"), "stop: at most 4 stop sequences are allowed, got 5"),
])
def test_out_of_range_messages(field, value, message):
    from mixtral_cli.server.protocol import APIError

    with pytest.raises(APIError) as e:
        chat_settings(ChatRequest(messages=[Message(role="user", content="hi")], **{field: value}),
                      GenerationConfig(), 32000)
    assert (e.value.status, e.value.param, e.value.message) == (400, field, message)


def test_fastapi_validation_errors_become_400_error_objects():
    from mixtral_cli.server.protocol import validation_error

    err = validation_error([{"loc": ("body", "messages", 0, "role"), "msg": "Field required", "type": "missing"}])
    assert (err.status, err.param, err.message) == (400, "messages[0].role", "messages[0].role: Field required")
    err = validation_error([{"loc": ("body", "stop", "list[str]", 0), "msg": "Input should be a valid string",
                             "type": "string_type"}])
    assert err.param == "stop[0]" and err.body()["error"]["type"] == "invalid_request_error"
    assert validation_error([{"loc": ("body", 12), "msg": "JSON decode error", "type": "json_invalid",
                              "ctx": {"error": "Expecting value"}}]).message.startswith("the request body is not valid JSON")


def test_context_overflow(server):
    status, headers, raw = http(server, "POST", CHAT, {"messages": user("word " * 1100)})
    err = assert_error(status, headers, raw, 400, "messages", "context_length_exceeded")
    n = len(chat_prompt_ids(server.worker.engine.tokenizer, [Message(**m) for m in user("word " * 1100)]))
    assert err["message"] == (f"This model's maximum context length is 1024 tokens, but the messages take "
                              f"{n} tokens and the reply needs at least 1. Shorten the messages.")
    status, headers, raw = http(server, "POST", COMPLETIONS, {"prompt": "word " * 1100})
    assert_error(status, headers, raw, 400, "prompt", "context_length_exceeded")


def test_unknown_paths_methods_and_models(server):
    assert_error(*http(server, "GET", "/v1/engines"), 404)
    assert_error(*http(server, "DELETE", "/v1/models"), 405)
    assert_error(*http(server, "GET", "/v1/models/gpt-4"), 404, "model", "model_not_found")


def test_the_server_goes_on_after_bad_input(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user(), n=2)
    assert e.value.status_code == 400 and e.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=user(), stream=True, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}])
    r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    status, _, raw = http(server, "GET", "/health", key=None)  # no key needed
    assert status == 200 and json.loads(raw)["status"] == "ok"


def test_one_log_line_per_request(server, client):
    LOG.clear()
    r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=5)
    http(server, "POST", CHAT, {"messages": []})
    eventually(lambda: len(LOG) >= 2, "two log lines")
    assert len(LOG) == 2
    u = r.usage
    assert re.fullmatch(rf"POST /v1/chat/completions 200 · prompt {u.prompt_tokens} "
                        rf"\({u.prompt_tokens_details.cached_tokens} cached\) · completion 5 · [\d.]+ tok/s · [\d.]+ s",
                        LOG[0]), LOG[0]
    assert LOG[1].startswith("POST /v1/chat/completions 400 · messages: must contain at least one message")


# -- the API key --------------------------------------------------------------------------------
def test_wrong_or_missing_key_is_401(server):
    wrong = openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0, timeout=WAIT_S)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=MODEL, messages=user(), max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert_error(*http(server, "GET", "/v1/models", key=None), 401, code="invalid_api_key")
    assert_error(*http(server, "POST", CHAT, {"messages": user()}, key=KEY + "x"), 401)
    assert http(server, "GET", "/v1/models")[0] == 200


# -- one at a time: cancellation, the queue, prefix reuse ---------------------------------------------
def test_client_dropping_mid_stream_frees_the_server(server, client):
    stream = client.chat.completions.create(model=MODEL, messages=user("Tell me a long story"), temperature=0,
                                            max_tokens=LONG, stream=True)
    pieces = [c for _, c in zip(range(4), stream, strict=False)]
    assert len(pieces) == 4
    job = server.worker.running
    assert job is not None and job.settings.gen.max_tokens == LONG
    stream.close()
    eventually(lambda: job.state != "running", "the dropped stream's generation to stop")
    assert job.state == "cancelled" and job.disconnected
    assert job.completion_tokens < LONG
    eventually(lambda: any(line.startswith("POST /v1/chat/completions 200") and "client disconnected" in line
                           for line in LOG), "the log line of the dropped stream")
    r = client.chat.completions.create(model=MODEL, messages=user("Hello"), max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_client_dropping_a_non_streaming_request_frees_the_server(server, client):
    body = json.dumps({"messages": user("Tell me a long story"), "temperature": 0, "max_tokens": LONG}).encode()
    host, port = server.sock.getsockname()[:2]
    with socket.create_connection((host, port), timeout=WAIT_S) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        eventually(lambda: (j := server.worker.running) is not None and j.completion_tokens > 0,
                   "the generation to start")
        job = server.worker.running
    eventually(lambda: job.state != "running", "the abandoned generation to stop")
    assert job.state == "cancelled" and job.disconnected
    assert job.completion_tokens < LONG
    r = client.chat.completions.create(model=MODEL, messages=user("Hello"), max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_full_queue_gets_503_with_retry_after(server, client):
    long = client.chat.completions.create(model=MODEL, messages=user("Tell me a long story"), temperature=0,
                                          max_tokens=LONG, stream=True)
    next(long)
    eventually(lambda: server.worker.running is not None, "the long generation to start")
    waiting = [client.chat.completions.create(model=MODEL, messages=user(f"Question {i}"), max_tokens=2, stream=True)
               for i in range(3)]  # each returns once its request is queued
    try:
        assert server.worker.running is not None and server.worker.waiting == 3
        health = json.loads(http(server, "GET", "/health")[2])  # answers while a generation runs
        assert health["generating"] and health["waiting"] == 3
        assert [m.id for m in client.models.list().data] == [MODEL]
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=user(), max_tokens=2)
        assert e.value.status_code == 503
        assert e.value.response.headers["retry-after"].isdigit()
        assert "busy" in e.value.message
    finally:
        for s in [long, *waiting]:
            s.close()
    idle(server)
    r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_second_chat_turn_prefills_only_new_tokens(server, client, reference):
    ref = reference("chat")
    first = client.chat.completions.create(model=MODEL, messages=user(), **GREEDY)
    reply = first.choices[0].message.content
    assert reply == ref["text"]
    conversation = user() + [{"role": "assistant", "content": reply}] + user("And why are sunsets red?")
    second = client.chat.completions.create(model=MODEL, messages=conversation, **GREEDY)
    tok = server.worker.engine.tokenizer
    prompt2 = chat_prompt_ids(tok, [Message(**m) for m in conversation])
    cached = ref["prompt_token_ids"] + ref["token_ids"][:-1]  # the last token was sampled, never computed
    shared = len(os.path.commonprefix([cached, prompt2]))
    assert second.usage.prompt_tokens == len(prompt2)
    assert second.usage.prompt_tokens_details.cached_tokens == min(shared, len(prompt2) - 1)
    assert second.usage.prompt_tokens_details.cached_tokens >= len(ref["prompt_token_ids"]) > 0


# -- a stalled reader --------------------------------------------------------------------------------
def test_stream_whose_reader_stalls_is_cut():
    class FakeWorker:
        cancelled: list = []

        def cancel(self, job):
            self.cancelled.append(job)

    async def scenario():
        from mixtral_cli.server.protocol import Settings

        job = Job([1], Settings(GenerationConfig()), continuation=False)
        worker = FakeWorker()

        async def events():
            for i in range(100):
                yield f"data: {i}\n\n"

        sent = []
        stuck = asyncio.Event()

        async def send(message):
            sent.append(message)
            if len(sent) > 3:
                await stuck.wait()  # the client stopped reading: the socket never drains

        async def receive():
            await stuck.wait()
            return {"type": "http.disconnect"}

        response = EventStream(events(), job, worker, send_timeout=0.2)
        await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=30)
        return job, worker, sent

    job, worker, sent = asyncio.run(scenario())
    assert job.stalled and not job.disconnected
    assert worker.cancelled == [job]
    assert len(sent) == 4 and not any(m.get("more_body") is False for m in sent)


# -- the prompt: as mistral-common's v1 and v3 encoders build it -----------------------------------------
CONVERSATIONS = {
    "one user": [("user", "a")],
    "system first": [("system", "s"), ("user", "a")],
    "two systems": [("system", "s1"), ("user", "a"), ("system", "s2"), ("user", "b")],
    "late system": [("user", "a"), ("assistant", "x"), ("user", "b"), ("system", "late")],
    "two users": [("user", "a"), ("user", "b")],
    "users split by system": [("user", "a"), ("system", "s"), ("user", "b")],
    "two assistants": [("user", "a"), ("assistant", "x"), ("assistant", "y"), ("user", "b")],
    "assistant first": [("assistant", "x"), ("user", "a")],
    "system then assistant": [("system", "s"), ("assistant", "x"), ("user", "a")],
    "system only": [("system", "s")],
    "empty user": [("user", "")],
    "empty system": [("system", ""), ("user", "a")],
    "text parts": [("user", ["p", "", "q"]), ("user", "r")],
    "multi-turn": [("system", "s"), ("user", "a"), ("assistant", "x"), ("user", "b"), ("assistant", "y"),
                   ("user", "c")],
    "ends with assistant": [("user", "a"), ("assistant", "x")],
    "system after assistant": [("user", "a"), ("assistant", "x"), ("system", "s"), ("user", "b")],
    "empty assistant": [("user", "a"), ("assistant", ""), ("user", "b")],
    "assistant only": [("assistant", "x")],
}


@pytest.mark.parametrize("version", ["v1", "v3"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_prompt_matches_mistral_common(request, version, name):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mixtral_cli.checkpoints.tokenizer import Tokenizer
    from mixtral_cli.server.protocol import APIError

    tok = Tokenizer.from_file(request.getfixturevalue(f"{version}_tokenizer_path"))

    def content(c):
        return c if isinstance(c, str) else [{"type": "text", "text": t} for t in c]

    messages = [{"role": r, "content": content(c)} for r, c in CONVERSATIONS[name]]
    try:
        reference = getattr(MistralTokenizer, version)()
        expected = reference.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens
    except Exception:  # noqa: BLE001 - mistral-common refuses this conversation
        expected = None
    if expected is None:
        with pytest.raises(APIError) as e:
            chat_prompt_ids(tok, [Message(**m) for m in messages])
        assert e.value.status == 400 and e.value.param.startswith("messages")
    else:
        assert chat_prompt_ids(tok, [Message(**m) for m in messages]) == expected


def test_v3_checkpoint_runs_and_serves_mistral_common_v3_prompts(tiny_v3_ckpt):
    """Mixtral-8x22B's tokenizer end to end: `mixtral run` with a chat prompt, and the server on a
    multi-turn conversation, against mistral-common's v3 encoding."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    v3 = MistralTokenizer.v3()

    def v3_prompt(messages: list[dict]) -> list[int]:
        return v3.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens

    one_turn = [{"role": "system", "content": SYSTEM}, *user()]
    multi_turn = [{"role": "system", "content": SYSTEM}, *user("Hi 🙂"), {"role": "assistant", "content": "Hello!  "},
                  *user("Two"), *user("parts"), {"role": "assistant", "content": "ok"}, *user()]
    run = subprocess.Popen(mixtral_cmd("run", QUESTION, "--system", SYSTEM, "-m", str(tiny_v3_ckpt), "--json", "-n", "12",
                                       "--temp", "0", "--device", "cpu", "--dtype", "float32"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
    with serving(tiny_v3_ckpt, log=lambda line: None) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key=KEY, max_retries=0, timeout=WAIT_S)
        multi = client.chat.completions.create(model=MODEL, messages=multi_turn, **GREEDY)
        single = client.chat.completions.create(model=MODEL, messages=one_turn, **GREEDY)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    ran = json.loads(out)
    assert ran["prompt_token_ids"] == v3_prompt(one_turn)
    assert ran["completion_tokens"] > 0 and ran["text"] == single.choices[0].message.content
    assert multi.usage.prompt_tokens == len(v3_prompt(multi_turn))
    assert single.usage.prompt_tokens == len(ran["prompt_token_ids"])


# -- the command line ---------------------------------------------------------------------------------
def start_serve(tiny_ckpt, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(mixtral_cmd("serve", "-m", str(tiny_ckpt), "--port", "0", "--device", "cpu", *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or run_env())
    url = proc.stdout.readline().strip()  # the base URL is the first (and only) line on stdout
    if not url.startswith("http://"):
        proc.kill()
        raise AssertionError(f"no URL from mixtral serve: {url!r} {proc.communicate()[1]}")
    return proc, url


def test_cli_sigterm_mid_stream_exits_cleanly_and_warns_without_key(tiny_ckpt):
    proc, url = start_serve(tiny_ckpt, "--host", "0.0.0.0")
    try:
        port = url.rsplit(":", 1)[1].split("/")[0]
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=WAIT_S)
        stream = c.chat.completions.create(model=MODEL, messages=user("Tell me a long story"), max_tokens=LONG,
                                           stream=True)
        next(stream)
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError):  # the stream ends with an error event: the server is stopping
            for _ in stream:
                pass
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "API key" in warnings[0]
    assert "SIGTERM" in err and "stopped" in err


def test_cli_key_from_environment_and_sigint(tiny_ckpt):
    proc, url = start_serve(tiny_ckpt, env=run_env(MIXTRAL_API_KEY="env-key"))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="other", max_retries=0, timeout=WAIT_S).models.list()
        c = openai.OpenAI(base_url=url, api_key="env-key", max_retries=0, timeout=WAIT_S)
        assert c.chat.completions.create(model=MODEL, messages=user(), max_tokens=2).usage.completion_tokens == 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "warning" not in err
    assert "POST /v1/chat/completions 200 · prompt" in err  # the request's log line


def test_port_in_use_is_a_user_error():
    from mixtral_cli.errors import UserError
    from mixtral_cli.server.process import listen

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError) as e:
            listen("127.0.0.1", port)
    assert e.value.message.startswith(f"cannot listen on 127.0.0.1:{port}") and "--port" in e.value.hint
    with pytest.raises(UserError):
        listen("127.0.0.1", 70000)


def test_cli_help_describes_the_options():
    out = subprocess.run(mixtral_cmd("serve", "--help"), capture_output=True, text=True, timeout=120).stdout
    for flag in ("--model", "--host", "--port", "--api-key", "MIXTRAL_API_KEY", "--max-queue", "--send-timeout",
                 "--max-tokens", "--temperature", "--stop", "--system", "--ctx-size", "--device", "--dtype",
                 "--gpu-mem", "--experts-in-gpu", "/v1/chat/completions", "/v1/completions", "/health"):
        assert flag in out, flag
