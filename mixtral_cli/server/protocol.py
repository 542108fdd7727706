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
  finish_reason "length"); OpenAI refuses such a request.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from ..checkpoints.tokenizer import Tokenizer
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


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
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


def settings(req: _Request, defaults: GenerationConfig, *, max_tokens: int | None = None,
             max_tokens_param: str = "max_tokens") -> Settings:
    """The request's sampling and stopping, over the server's defaults (unset fields keep them)."""
    _refuse_if(req.n not in (None, 1), "n", f"only n=1 is supported (one choice per request), got {req.n}")
    _refuse_if(bool(req.logit_bias), "logit_bias", "is not supported")
    _refuse_if(req.stream_options is not None and not req.stream, "stream_options",
               "is only allowed when stream is true")
    chosen = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
    if chosen.get("top_p") == 0:  # OpenAI allows it (only the most likely token): the smallest nucleus we take
        chosen["top_p"] = SMALLEST_TOP_P
    stop = defaults.stop if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
    _refuse_if(req.stop is not None and len(stop) > MAX_STOP, "stop",
               f"at most {MAX_STOP} stop sequences are allowed, got {len(stop)}")
    gen = replace(defaults, max_tokens=defaults.max_tokens if max_tokens is None else max_tokens, stop=stop,
                  sampling=replace(defaults.sampling, **chosen))
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


def chat_settings(req: ChatRequest, defaults: GenerationConfig) -> Settings:
    _refuse_if(bool(req.logprobs), "logprobs", "is not supported")
    _refuse_if(bool(req.top_logprobs), "top_logprobs", "is not supported")
    _refuse_if(bool(req.tools), "tools", "tool calling is not supported by this server")
    _refuse_if(bool(req.functions), "functions", "function calling is not supported by this server")
    _refuse_if(req.tool_choice not in (None, "none", "auto"), "tool_choice", "tool calling is not supported")
    _refuse_if(req.function_call not in (None, "none", "auto"), "function_call", "function calling is not supported")
    fmt = (req.response_format or {}).get("type", "text")
    _refuse_if(fmt != "text", "response_format", f"only type 'text' is supported, got {fmt!r}")
    _refuse_if(bool(req.modalities) and req.modalities != ["text"], "modalities", "only ['text'] is supported")
    for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
        _refuse_if(getattr(req, name) is not None, name, "is not supported")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise bad_request("max_completion_tokens", "set max_tokens or max_completion_tokens, not both")
    param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
    limit = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    return settings(req, defaults, max_tokens=limit, max_tokens_param=param)


COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def completion_settings(req: CompletionRequest, defaults: GenerationConfig) -> Settings:
    _refuse_if(bool(req.echo), "echo", "is not supported")
    _refuse_if(bool(req.suffix), "suffix", "is not supported (no fill-in-the-middle)")
    _refuse_if(req.best_of not in (None, 1), "best_of", f"only best_of=1 is supported, got {req.best_of}")
    _refuse_if(req.logprobs is not None, "logprobs", "is not supported")
    return settings(req, defaults, max_tokens=COMPLETIONS_MAX_TOKENS if req.max_tokens is None else req.max_tokens)


def completion_prompt(req: CompletionRequest) -> str:
    """The one string prompt of a /v1/completions request."""
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            if prompt and all(isinstance(p, str) for p in prompt):
                raise bad_request("prompt", f"send one prompt per request, got {len(prompt)}")
            raise bad_request("prompt", "must be a string (token id arrays are not supported)")
        prompt = prompt[0]
    return prompt


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


def chat_conversation(messages: Sequence[Message]) -> tuple[list[dict[str, str]], str | None]:
    """Validate and normalise OpenAI messages the way mistral-common's request validator and
    normaliser do (the same for v1 and v3): (user/assistant messages, system prompt).

    Accepted: consecutive messages of one role (merged, joined by a blank line), system messages
    anywhere but right after an assistant message (all joined into one system prompt, which the
    tokenizer version puts before the first or the last user message), a conversation that does not
    start with a user message (an empty user message is put first). Refused: a conversation ending
    with an assistant message, a system message right after an assistant message, an assistant
    message without text.
    """
    if not messages:
        raise bad_request("messages", "must contain at least one message")
    roles, texts = [], []
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if m.role in ("tool", "function"):
            raise bad_request(f"messages[{i}].role", f"'{m.role}' messages are not supported (no tool calling)")
        if role is None:
            raise bad_request(f"messages[{i}].role", f"unknown role {m.role!r}; use system, developer, user or assistant")
        if m.tool_calls:
            raise bad_request(f"messages[{i}].tool_calls", "tool calling is not supported")
        text = _text(m.content, f"messages[{i}].content")
        if text is None:
            raise bad_request(f"messages[{i}].content", "is missing")
        if role == "assistant" and not text:
            raise bad_request(f"messages[{i}].content", "an assistant message needs text")
        if i and roles[-1] == "assistant" and role == "system":
            raise bad_request(f"messages[{i}].role", f"a {m.role} message cannot follow an assistant message")
        roles.append(role)
        texts.append(text)
    if len(roles) > 1 and roles[-1] == "assistant" or roles == ["assistant"]:
        raise bad_request("messages", "the conversation must end with a user message (the assistant replies to it)")
    system = "\n\n".join(t for r, t in zip(roles, texts, strict=True) if r == "system" and t) or None
    out: list[dict[str, str]] = []
    previous = None
    for role, text in zip(roles, texts, strict=True):
        if role != "system":
            if role == previous:  # merge a run of one role; a system message between two runs splits them
                if text:
                    out[-1]["content"] = f"{out[-1]['content']}\n\n{text}" if out[-1]["content"] else text
            else:
                out.append({"role": role, "content": text})
        previous = role
    if not out or out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": ""})
    return out, system


def chat_prompt_ids(tok: Tokenizer, messages: Sequence[Message], default_system: str | None = None) -> list[int]:
    """Prompt ids for the next assistant reply: the Instruct template `run` and `chat` use.

    Two user messages in a row (split by a system message) stay two `[INST]` blocks, as mistral-common
    encodes them; the system prompt goes where the tokenizer version puts it.
    """
    conversation, system = chat_conversation(messages)
    return tok.encode_instruct(conversation, system=system or default_system)


def context_length_exceeded(prompt_tokens: int, ctx: int, what: str) -> APIError:
    """OpenAI's refusal of a prompt (`what`: the request's `messages` or `prompt`) that leaves no room
    for a reply; whether it does is `engine.generate.check_fits`' to say."""
    return APIError(400, f"This model's maximum context length is {ctx} tokens, but the {what} take "
                         f"{prompt_tokens} tokens and the reply needs at least 1. Shorten the {what}.",
                    param=what, code="context_length_exceeded")


# -- responses -------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _envelope(kind: str, rid: str, created: int, model: str, choice: dict, **fields: object) -> dict:
    """OpenAI's object around one choice (index 0): a response, or one chunk of a stream."""
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [{"index": 0, **choice}],
            **fields, "system_fingerprint": None}


def _chunk_usage(include_usage: bool) -> dict:
    """With `include_usage` every chunk has `usage: null` (the last one, `usage_chunk`, has the counts)."""
    return {"usage": None} if include_usage else {}


def chat_response(rid: str, created: int, model: str, text: str, finish_reason: str, used: dict) -> dict:
    message = {"role": "assistant", "content": text, "refusal": None}
    return _envelope("chat.completion", rid, created, model,
                     {"message": message, "logprobs": None, "finish_reason": finish_reason}, usage=used)


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               *, include_usage: bool = False) -> dict:
    return _envelope("chat.completion.chunk", rid, created, model,
                     {"delta": delta, "logprobs": None, "finish_reason": finish_reason}, **_chunk_usage(include_usage))


def completion_response(rid: str, created: int, model: str, text: str, finish_reason: str, used: dict) -> dict:
    return _envelope("text_completion", rid, created, model,
                     {"text": text, "logprobs": None, "finish_reason": finish_reason}, usage=used)


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     *, include_usage: bool = False) -> dict:
    return _envelope("text_completion", rid, created, model,
                     {"text": text, "logprobs": None, "finish_reason": finish_reason}, **_chunk_usage(include_usage))


def usage_chunk(chunk: dict, used: dict) -> dict:
    """The last chunk of a stream with `include_usage`: no choices, the usage."""
    return chunk | {"choices": [], "usage": used}


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
