"""Prefill and the decode loop, in pipeline order (the sampler is `sampling.py`'s).

`Session` owns what the KV cache holds (the token ids at positions 0..n) so a follow-up prompt that
shares a prefix with the cached one (the next chat turn) only prefills the new tokens.
`Completion` drives generation for one prompt and yields text; the caller decides how to render it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..checkpoints.tokenizer import StreamDecoder, Tokenizer
from ..errors import UserError
from ..settings import GenerationConfig
from ..system.timing import sync
from .grammar import Constraint
from .logprobs import TokenLogprob, token_logprob
from .model import Mixtral
from .plan import PREFILL_CHUNK
from .sampling import Sampler


def chunks(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """[start, end) cut into consecutive pieces of at most `size` positions."""
    return [(a, min(a + size, end)) for a in range(start, end, size)]


class Session:
    """The model plus the token ids its KV cache currently holds.

    Prompts are computed in chunks of at most `chunk` tokens (the planner's `PREFILL_CHUNK`: its
    workspace is sized for one chunk), each attending to everything cached before it."""

    def __init__(self, model: Mixtral, chunk: int = PREFILL_CHUNK) -> None:
        self.model = model
        self.chunk = chunk
        self.cached: list[int] = []
        self.device = model.model.embed_tokens.weight.device

    def reset(self) -> None:
        self.cached = []

    def _forward(self, ids: Sequence[int], pos: int, phase: str) -> torch.Tensor:
        """Logits [V] after ids, which go to positions pos..; the earlier chunks skip the logits.
        `phase` ("prefill" or "decode") is what a routing trace calls these passes."""
        pieces = chunks(0, len(ids), self.chunk)
        for a, b in pieces:
            tokens = torch.tensor(ids[a:b], device=self.device)
            if b < len(ids):
                self.model.run_layers(tokens, pos + a)
            else:
                logits = self.model(tokens, pos + a, last_only=True)[0]
            # Only after a chunk's forward pass completes does the cache hold its positions (Ctrl-C safe).
            self.cached = self.cached[:pos + a] + list(ids[a:b])
            if self.model.trace is not None:
                self.model.trace.commit(phase, pos + a, ids[a:b])
        return logits

    def prefill(self, ids: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Logits [V] after `ids`, reusing the cached common prefix. Returns (logits, tokens computed)."""
        common = 0
        for a, b in zip(self.cached, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # recompute at least the last token to get its logits
        return self._forward(ids[common:], common, "prefill"), len(ids) - common

    def step(self, token: int) -> torch.Tensor:
        return self._forward([token], len(self.cached), "decode")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from the cache)
    prefill_s: float = 0.0
    completion_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first completion token comes out of prefill; the rest each cost one decode step.
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


class ContextOverflow(UserError):
    """The prompt leaves no room in the context for even one generated token."""

    def __init__(self, prompt_tokens: int, ctx: int) -> None:
        super().__init__(f"the prompt is {prompt_tokens} tokens but the context holds {ctx}",
                         hint="shorten the prompt or raise -c/--ctx-size")
        self.prompt_tokens, self.ctx = prompt_tokens, ctx


def check_fits(prompt_tokens: int, ctx: int) -> None:
    """Raise ContextOverflow unless a prompt of `prompt_tokens` leaves room in `ctx` for a reply."""
    if prompt_tokens >= ctx:
        raise ContextOverflow(prompt_tokens, ctx)


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could start a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Completion:
    """Generate from `prompt_ids`, yielding text as it becomes final.

    Stops at EOS, at a stop string (which is not emitted), when `cfg.grammar` is complete and
    nothing more can follow it, at `max_tokens`, or when the context is full. After iteration:
    `token_ids`, `text`, `finish_reason` ("stop" or "length": a grammar still open when the tokens
    run out is "length"), `stats`, and with `logprobs` one `TokenLogprob` per generated token (EOS too).
    """

    def __init__(self, session: Session, tokenizer: Tokenizer, prompt_ids: Sequence[int], cfg: GenerationConfig,
                 *, continuation: bool = False, logprobs: int | None = None) -> None:
        """`continuation`: the text continues the prompt (raw completion), so a leading space of the
        first generated piece is kept; a chat reply starts fresh and drops it. `logprobs`: record
        each token's log-probability with that many top alternatives (None: record nothing).

        The library's one check of `cfg` (InvalidSetting) and of the prompt's length (ContextOverflow):
        front ends check their input where it enters, and may leave both to this."""
        check_fits(len(prompt_ids), session.model.max_len)
        cfg.validate()
        self.session, self.tokenizer, self.cfg = session, tokenizer, cfg
        self.prompt_ids = list(prompt_ids)
        self.continuation = continuation
        self.sampler = Sampler(cfg.sampling, prompt_len=len(self.prompt_ids))
        self.constraint = Constraint(cfg.grammar, tokenizer) if cfg.grammar is not None else None
        self.top_logprobs = logprobs
        self.logprobs: list[TokenLogprob] = []
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason = "length"
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))

    def tokens(self) -> Iterator[int]:
        """The raw token stream (EOS included when produced)."""
        room = self.session.model.max_len - len(self.prompt_ids)
        budget = room if self.cfg.max_tokens is None else min(self.cfg.max_tokens, room)
        if budget <= 0:
            return
        t0 = time.perf_counter()
        logits, self.stats.prefill_tokens = self.session.prefill(self.prompt_ids)
        sync(self.session.device)  # queued GPU work is prefill time, not the first decode step's
        self.stats.prefill_s = time.perf_counter() - t0
        history = list(self.prompt_ids)
        t0 = time.perf_counter()
        eos = self.tokenizer.eos_id
        while True:
            # The grammar's mask is computed here, after the forward pass was queued and before its
            # logits are read: on a GPU the two overlap.
            allowed = self.constraint.allowed() if self.constraint is not None else None
            restricted = self.sampler.restrict(logits, allowed)
            token = self.sampler.draw(restricted, history)
            history.append(token)
            self.token_ids.append(token)
            self.stats.completion_tokens += 1
            if self.top_logprobs is not None:
                self.logprobs.append(token_logprob(restricted, token, self.top_logprobs))
            if self.constraint is not None and token != eos:
                self.constraint.advance(token)
            self.stats.decode_s = time.perf_counter() - t0
            finished = token == eos or (self.constraint is not None and self.constraint.done)
            if finished:
                self.finish_reason = "stop"
            yield token
            if finished or len(self.token_ids) >= budget:
                return
            logits = self.session.step(token)

    def __iter__(self) -> Iterator[str]:
        stops = [s for s in self.cfg.stop if s]
        decoder = StreamDecoder(self.tokenizer, self.prompt_ids if self.continuation else None)
        pending = ""
        for token in self.tokens():
            if token == self.tokenizer.eos_id:
                break
            pending += decoder.push(token)
            hit = _first_stop(pending, stops)
            if hit >= 0:
                yield from self._emit(pending[:hit])
                self.finish_reason = "stop"
                return
            keep = _holdback(pending, stops)
            ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
            yield from self._emit(ready)
        pending += decoder.flush()
        hit = _first_stop(pending, stops)
        if hit >= 0:
            pending, self.finish_reason = pending[:hit], "stop"
        yield from self._emit(pending)

    def _emit(self, text: str) -> Iterator[str]:
        if text:
            self.text += text
            yield text
