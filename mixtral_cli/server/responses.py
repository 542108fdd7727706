"""OpenAI's response objects: whole responses, stream chunks, usage, and log-probabilities in the
two shapes the two APIs use (chat's `logprobs.content[]`, completions' parallel lists)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from ..engine.logprobs import TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def add_usage(a: dict, b: dict) -> dict:
    """The usage of two generations together (a request with several prompts)."""
    return usage(a["prompt_tokens"] + b["prompt_tokens"], a["completion_tokens"] + b["completion_tokens"],
                 a["prompt_tokens_details"]["cached_tokens"] + b["prompt_tokens_details"]["cached_tokens"])


@dataclass
class Envelope:
    """OpenAI's object around the choices: one response's id, time and model, for the whole
    response and for each chunk of its stream. With `include_usage` every chunk has `usage: null`
    and the last one (`usage_chunk`) the counts."""

    kind: str  # "chat.completion" or "text_completion"
    rid: str
    created: int
    model: str
    include_usage: bool = False

    def _wrap(self, kind: str, choices: list[dict], **fields: object) -> dict:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **fields, "system_fingerprint": None}

    def response(self, choices: list[dict], used: dict) -> dict:
        return self._wrap(self.kind, [{"index": i, **c} for i, c in enumerate(choices)], usage=used)

    def chunk(self, choice: dict) -> dict:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else self.kind
        return self._wrap(kind, [{"index": 0, **choice}], **({"usage": None} if self.include_usage else {}))

    def usage_chunk(self, used: dict) -> dict:
        """The last chunk of a stream with `include_usage`: no choices, the usage."""
        return self.chunk({}) | {"choices": [], "usage": used}


def chat_choice(text: str | None, finish_reason: str, logprobs: dict | None = None,
                tool_calls: list[dict] | None = None) -> dict:
    message: dict = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_choice(text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- log-probabilities ---------------------------------------------------------------------------------
class TokenText:
    """Token ids as the logprobs objects spell them: the text a token adds (its bytes decoded, a
    control token by its name) and its UTF-8 bytes."""

    def __init__(self, table: Sequence[bytes]) -> None:
        self.table = table

    def is_control(self, token: int) -> bool:
        return self.table[token].startswith(b"\xff")

    def bytes(self, token: int) -> bytes:
        raw = self.table[token]
        return raw[1:] if self.is_control(token) else raw

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob], spell: TokenText) -> dict:
    """Chat's `logprobs`: `content[]` with token, logprob, bytes and `top_logprobs`."""
    def item(token: int, logprob: float) -> dict:
        return {"token": spell.text(token), "logprob": logprob, "bytes": list(spell.bytes(token))}

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], spell: TokenText, *, offset: int = 0,
                        fresh: bool = False) -> dict:
    """Completions' `logprobs`: parallel lists of tokens, their log-probabilities (None for an
    echoed first token, which nothing predicts), `top_logprobs` as {token: logprob} and each
    token's offset in the choice's text, counted from `offset`. `fresh`: the tokens start the text
    (an echoed prompt), so control tokens and the first piece's leading space add no characters."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(spell.text(e.token))
        offsets.append(offset)
        added = 0 if spell.is_control(e.token) else len(tokens[-1])
        if fresh and added:
            added -= tokens[-1].startswith(" ")
            fresh = False
        offset += added
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {spell.text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}
