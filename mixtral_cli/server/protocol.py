"""OpenAI's chat and completions API as data: request models, validation into generation settings,
the chat prompt as mistral-common's v1 and v3 encoders build it, and response and error objects.

No HTTP and no tensors here; `http.py` does the serving. Every refusal is an `APIError`, which the
server sends as OpenAI's error object `{"error": {"message", "type", "param", "code"}}`.

A request the official API would refuse for a value out of its documented range (temperature in
[0, 2], top_p in [0, 1], presence and frequency penalties in [-2, 2], at most 4 stop sequences, a
signed 64-bit seed, max_tokens at least 1) is refused here too, with a 400. Deliberate differences,
where this server accepts what OpenAI refuses:

- llama.cpp's extras `top_k`, `min_p` and `repeat_penalty` are accepted (with this project's ranges);
- fields the server does not know are ignored (OpenAI refuses unrecognised arguments), so clients
  that send newer fields work;
- any `model` name is accepted; responses name the model served;
- a `max_tokens` beyond the room left in the context is cut to that room (the reply then ends with
  finish_reason "length"); OpenAI refuses such a request;
- `response_format` is enforced by a grammar whatever `strict` says, and is taken on /v1/completions
  too; llama.cpp's `grammar` (GBNF) is accepted on both endpoints;
- /v1/completions takes a `prompt` of token ids (a list of ints, or a list of such lists), as vLLM
  does; several prompts are answered one after another, one choice each, and cannot be streamed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from ..checkpoints.tokenizer import Tokenizer
from ..engine.grammar import Grammar, GrammarError
from ..engine.logprobs import MAX_TOP_LOGPROBS
from ..settings import GenerationConfig, InvalidSetting


class APIError(Exception):
    """A refused request: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


# -- request bodies: loose types (unknown fields allowed); meaning is checked below ----------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Message(_Body):
    role: str
    content: str | list[Any] | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Request(_Body):
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # llama.cpp's extras
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    grammar: str | None = None  # llama.cpp's: a GBNF grammar


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class CompletionRequest(_Request):
    prompt: str | list[Any]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


BodyModel = TypeVar("BodyModel", ChatRequest, CompletionRequest)


# -- validation ------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What one request asks of the generator."""

    gen: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # per generated token, with this many alternatives; None: not asked
    echo: bool = False  # /v1/completions: the prompt comes back, scored when logprobs is asked
    generate: bool = True  # False: max_tokens 0 with echo (only the prompt is scored)


def _refuse_if(condition: bool, param: str, message: str) -> None:
    if condition:
        raise bad_request(param, message)


def _in_range(value: float | None, param: str, low: float, high: float) -> None:
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise bad_request(param, f"must be in [{low:g}, {high:g}], got {value:g}")


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                   "frequency_penalty", "seed")  # SamplingConfig's names
SMALLEST_TOP_P = 1e-9
MAX_TEMPERATURE = 2  # OpenAI's; the command line's --temp may go higher
MAX_STOP = 4  # OpenAI's limit on stop sequences
SEED_RANGE = (-2**63, 2**63 - 1)  # OpenAI's: a signed 64-bit integer


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's `logit_bias`: token ids (as JSON object keys) to a bias in [-100, 100]."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request("logit_bias", f"keys must be token ids, got {key!r}") from None
        _refuse_if(not 0 <= token < vocab_size, "logit_bias", f"token id {token} is outside the vocabulary "
                                                              f"(0..{vocab_size - 1})")
        _in_range(value, f"logit_bias.{key}", -100, 100)
        out[token] = float(value)
    return out


def response_grammar(req: _Request) -> Grammar | None:
    """The grammar `response_format` (or llama.cpp's `grammar`) asks for; it is checked against the
    vocabulary later (`Grammar.check`, off the event loop)."""
    fmt, gbnf = req.response_format, req.grammar
    _refuse_if(fmt is not None and gbnf is not None, "grammar", "send response_format or grammar, not both")
    try:
        if gbnf is not None:
            return Grammar.gbnf(gbnf, "grammar")
        kind = (fmt or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":  # llama.cpp's servers also take a schema here
            schema = fmt.get("schema")
            return Grammar.json_object() if schema is None else Grammar.json_schema(schema, "response_format.schema")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            _refuse_if(not isinstance(spec, dict), "response_format.json_schema",
                       "must be an object with a 'schema' (and a 'name')")
            schema = spec.get("schema")
            return (Grammar.json_object() if schema is None
                    else Grammar.json_schema(schema, "response_format.json_schema.schema"))
    except GrammarError as e:
        raise bad_request(e.source, e.problem) from None
    raise bad_request("response_format.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def settings(req: _Request, defaults: GenerationConfig, vocab_size: int, *, max_tokens: int | None = None,
             max_tokens_param: str = "max_tokens") -> Settings:
    """The request's sampling, stopping and output format, over the server's defaults (unset
    fields keep them)."""
    _refuse_if(req.n not in (None, 1), "n", f"only n=1 is supported (one choice per request), got {req.n}")
    _refuse_if(req.stream_options is not None and not req.stream, "stream_options",
               "is only allowed when stream is true")
    chosen = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
    if chosen.get("top_p") == 0:  # OpenAI allows it (only the most likely token): the smallest nucleus we take
        chosen["top_p"] = SMALLEST_TOP_P
    stop = defaults.stop if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
    _refuse_if(req.stop is not None and len(stop) > MAX_STOP, "stop",
               f"at most {MAX_STOP} stop sequences are allowed, got {len(stop)}")
    chosen["logit_bias"] = logit_bias(req.logit_bias, vocab_size)
    gen = replace(defaults, max_tokens=defaults.max_tokens if max_tokens is None else max_tokens, stop=stop,
                  sampling=replace(defaults.sampling, **chosen), grammar=response_grammar(req))
    try:
        gen.validate()
    except InvalidSetting as e:
        raise bad_request(max_tokens_param if e.field == "max_tokens" else e.field, e.problem) from None
    # OpenAI's ranges where they are narrower than the settings' own (checked above, with their messages)
    _in_range(req.temperature, "temperature", 0, MAX_TEMPERATURE)
    low, high = SEED_RANGE
    _refuse_if(req.seed is not None and not low <= req.seed <= high, "seed",
               f"must be a signed 64-bit integer, got {req.seed}")
    return Settings(gen, stream=bool(req.stream),
                    include_usage=bool(req.stream_options and req.stream_options.include_usage))


def chat_settings(req: ChatRequest, defaults: GenerationConfig, vocab_size: int) -> Settings:
    _refuse_if(req.top_logprobs is not None and not req.logprobs, "top_logprobs", "needs logprobs: true")
    _in_range(req.top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    _refuse_if(bool(req.modalities) and req.modalities != ["text"], "modalities", "only ['text'] is supported")
    for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
        _refuse_if(getattr(req, name) is not None, name, "is not supported")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise bad_request("max_completion_tokens", "set max_tokens or max_completion_tokens, not both")
    param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
    limit = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    s = settings(req, defaults, vocab_size, max_tokens=limit, max_tokens_param=param)
    return replace(s, logprobs=(req.top_logprobs or 0) if req.logprobs else None)


COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions


def completion_settings(req: CompletionRequest, defaults: GenerationConfig, vocab_size: int) -> Settings:
    _refuse_if(bool(req.suffix), "suffix", "is not supported (no fill-in-the-middle)")
    _refuse_if(req.best_of not in (None, 1), "best_of", f"only best_of=1 is supported, got {req.best_of}")
    _in_range(req.logprobs, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    score_only = req.max_tokens == 0
    _refuse_if(score_only and not req.echo, "max_tokens", "must be at least 1 (0 only with echo: true)")
    limit = COMPLETIONS_MAX_TOKENS if req.max_tokens is None else 1 if score_only else req.max_tokens
    s = settings(req, defaults, vocab_size, max_tokens=limit)
    return replace(s, logprobs=req.logprobs, echo=bool(req.echo), generate=not score_only)


def completion_prompts(req: CompletionRequest, tok: Tokenizer, stream: bool) -> list[tuple[list[int], str]]:
    """The prompts of a /v1/completions request as (ids, text): a string (encoded after BOS, as `run
    --raw` does), a list of strings, a list of token ids (taken as they are: no BOS is added; the
    text is their decoding), or a list of such lists."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [(tok.encode(prompt, bos=True), prompt)]
    _refuse_if(not prompt, "prompt", "must not be empty")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [prompt]
    elif all(isinstance(p, str) for p in prompt):
        prompts = [tok.encode(p, bos=True) for p in prompt]
    elif all(isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
             for p in prompt):
        prompts = prompt
    else:
        raise bad_request("prompt", "must be a string, a list of strings, a list of token ids or a list of "
                                    "non-empty lists of token ids")
    for j, ids in enumerate(prompts):
        bad = next((i for i in ids if not 0 <= i < tok.vocab_size), None)
        _refuse_if(bad is not None, f"prompt[{j}]" if len(prompts) > 1 else "prompt",
                   f"token id {bad} is outside the vocabulary (0..{tok.vocab_size - 1})")
    _refuse_if(stream and len(prompts) > 1, "stream", f"stream one prompt at a time, got {len(prompts)}")
    texts = prompt if isinstance(prompt[0], str) else [tok.decode(ids) for ids in prompts]
    return list(zip(prompts, texts, strict=True))


# -- the chat prompt, as mistral-common's v1 and v3 encoders build it -------------------------------
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _text(content: str | list[Any] | None, param: str) -> str | None:
    """A message's text: a string, or its text parts joined by a blank line (empty parts skipped)."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"{kind!r} parts are" if isinstance(kind, str) else "parts other than text are"
            raise bad_request(f"{param}[{j}]", f"{what} not supported: this model reads text only")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{param}[{j}].text", "must be a string")
        if part["text"]:
            texts.append(part["text"])
    return "\n\n".join(texts)


def _calls(raw: list[Any], param: str) -> list[dict]:
    """An assistant message's OpenAI `tool_calls` as the tokenizer takes them: {id, name, arguments}."""
    calls = []
    for j, c in enumerate(raw):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(c.get("id"), str) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{param}[{j}]", 'must be {"id": ..., "type": "function", "function": '
                                               '{"name": ..., "arguments": "..."}}')
        calls.append({"id": c["id"], "name": fn["name"], "arguments": fn.get("arguments", "")})
    return calls


def chat_conversation(messages: Sequence[Message]) -> tuple[list[dict], str | None]:
    """Validate and normalise OpenAI messages the way mistral-common's request validator and
    normaliser do (the same for v1 and v3): (user/assistant/tool messages, system prompt).

    Accepted: consecutive text messages of one role (merged, joined by a blank line), system
    messages anywhere but right after an assistant message (all joined into one system prompt,
    which the tokenizer version puts before the first or the last user message), a conversation
    that does not start with a user message (an empty user message is put first), assistant
    messages with `tool_calls` (and no text) and the `tool` messages answering them. Refused: a
    conversation ending with an assistant message, a system message right after an assistant
    message, an assistant message with neither text nor calls. How calls and results must pair is
    the tokenizer's to check (`tool_template.check_conversation`).
    """
    if not messages:
        raise bad_request("messages", "must contain at least one message")
    items: list[dict] = []  # {"role", "content"[, "tool_calls" | "tool_call_id"]}
    for i, m in enumerate(messages):
        role = "tool" if m.role == "tool" else ROLES.get(m.role)
        if role is None:
            raise bad_request(f"messages[{i}].role", f"unknown role {m.role!r}; use system, developer, user, "
                                                     "assistant or tool")
        text = _text(m.content, f"messages[{i}].content")
        item: dict = {"role": role, "content": text}
        if m.tool_calls:
            if role != "assistant":
                raise bad_request(f"messages[{i}].tool_calls", "only assistant messages make tool calls")
            item["tool_calls"] = _calls(m.tool_calls, f"messages[{i}].tool_calls")
        if role == "tool":
            if not isinstance(m.tool_call_id, str):
                raise bad_request(f"messages[{i}].tool_call_id", "a tool message must name the call it answers")
            item["tool_call_id"], item["content"] = m.tool_call_id, text or ""
        elif text is None and not m.tool_calls:
            raise bad_request(f"messages[{i}].content", "is missing")
        if role == "assistant" and not text and not m.tool_calls:
            raise bad_request(f"messages[{i}].content", "an assistant message needs text or tool calls")
        if items and items[-1]["role"] == "assistant" and role == "system":
            raise bad_request(f"messages[{i}].role", f"a {m.role} message cannot follow an assistant message")
        items.append(item)
    if items[-1]["role"] == "assistant":
        raise bad_request("messages", "the conversation must end with a user or tool message (the assistant "
                                      "replies to it)")
    system = "\n\n".join(it["content"] for it in items if it["role"] == "system" and it["content"]) or None
    out: list[dict] = []
    previous = None
    for item in items:
        role = item["role"]
        plain = role in ("user", "assistant") and "tool_calls" not in item
        if role != "system":
            if plain and role == previous and "tool_calls" not in out[-1]:
                # merge a run of one role; a system message between two runs splits them
                if item["content"]:
                    out[-1]["content"] = (f"{out[-1]['content']}\n\n{item['content']}" if out[-1]["content"]
                                          else item["content"])
            else:
                out.append(dict(item))
        previous = role if plain or role == "system" else None
    if not out or out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": ""})
    return out, system


def chat_prompt_ids(tok: Tokenizer, messages: Sequence[Message], default_system: str | None = None,
                    tools: list[dict] | None = None) -> list[int]:
    """Prompt ids for the next assistant reply: the Instruct template `run` and `chat` use, with
    the request's tools (`tool_calls.ToolPlan.tools`).

    Two user messages in a row (split by a system message) stay two `[INST]` blocks, as mistral-common
    encodes them; the system prompt goes where the tokenizer version puts it.
    """
    conversation, system = chat_conversation(messages)
    try:
        return tok.encode_instruct(conversation, system=system or default_system, tools=tools)
    except ValueError as e:
        raise bad_request("messages", str(e)) from None


def context_length_exceeded(prompt_tokens: int, ctx: int, what: str) -> APIError:
    """OpenAI's refusal of a prompt (`what`: the request's `messages` or `prompt`) that leaves no room
    for a reply; whether it does is `engine.generate.check_fits`' to say."""
    return APIError(400, f"This model's maximum context length is {ctx} tokens, but the {what} take "
                         f"{prompt_tokens} tokens and the reply needs at least 1. Shorten the {what}.",
                    param=what, code="context_length_exceeded")


def validation_error(errors: Sequence[dict]) -> APIError:
    """FastAPI's 422 detail as a 400 error object, naming the field as OpenAI does (`messages[0].role`)."""
    if not errors:
        return bad_request(None, "invalid request")
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return bad_request(None, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
    if not loc:
        if e.get("type") == "missing":
            return bad_request(None, "the request body is missing: send a JSON object")
        return bad_request(None, "the request body must be a JSON object")
    param = ""
    for p in loc:
        if isinstance(p, int):
            param += f"[{p}]"
        elif "[" in p or p in ("str", "int", "float", "bool", "dict", "list", "none", "function-after"):
            continue  # pydantic names the union member it tried; not a field
        else:
            param += f".{p}" if param else p
    return bad_request(param, e.get("msg", "invalid value").rstrip("."))
