"""The sampler: the request's hard limits, a chain of logits processors, then a seeded draw.

First `restrict` adds OpenAI's `logit_bias` and masks the tokens a grammar forbids: what it gives is
the distribution the request allows, the one log-probabilities are reported from. Then the chain
runs in llama.cpp's order: penalties (repeat, then OpenAI's presence and frequency over the generated
tokens only), top-k, top-p, min-p, temperature. A step whose setting is off is left out of the
chain. Temperature 0 is greedy: the most likely token after the penalties.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from ..settings import SamplingConfig

# history: the prompt's ids, then the generated ones
Processor = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]  # (logits [V] fp32, history) -> logits


def penalize_repeats(logits: torch.Tensor, recent: Sequence[int], penalty: float) -> torch.Tensor:
    """llama.cpp's rule: a recently seen token's logit is divided by `penalty` if positive, else
    multiplied by it."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def penalize_presence_frequency(logits: torch.Tensor, generated: Sequence[int], presence: float,
                                frequency: float) -> torch.Tensor:
    """OpenAI's rule: logit[t] -= frequency * count(t) + presence * (count(t) > 0)."""
    if not generated:
        return logits
    ids, counts = torch.tensor(list(generated)).unique(return_counts=True)
    ids, counts = ids.to(logits.device), counts.to(logits.device)
    logits = logits.clone()
    logits[ids] -= counts * frequency + presence
    return logits


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (to -inf) all but the `k` most likely tokens (ties with the k-th stay)."""
    if not 0 < k < logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Mask the tokens outside the nucleus: the smallest set of most likely tokens whose probability
    reaches `p` (always at least one token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop = before >= p
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def keep_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Mask the tokens less likely than `p` x the most likely one's probability."""
    if p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < p * probs.max(), float("-inf"))


def processors(cfg: SamplingConfig, prompt_len: int) -> list[Processor]:
    """The chain for `cfg`; `history[prompt_len:]` is what was generated (what presence and
    frequency count)."""
    cfg = replace(cfg)  # a snapshot: the steps are chosen now, so their settings are fixed now too
    chain: list[Processor] = []
    if cfg.repeat_penalty != 1.0 and cfg.repeat_last_n:
        chain.append(lambda logits, history: penalize_repeats(logits, history[-cfg.repeat_last_n:],
                                                              cfg.repeat_penalty))
    if cfg.presence_penalty or cfg.frequency_penalty:
        chain.append(lambda logits, history: penalize_presence_frequency(
            logits, history[prompt_len:], cfg.presence_penalty, cfg.frequency_penalty))
    if cfg.temperature == 0:
        return chain  # greedy takes the argmax of the penalised logits
    if cfg.top_k > 0:
        chain.append(lambda logits, _: keep_top_k(logits, cfg.top_k))
    if cfg.top_p < 1.0:
        chain.append(lambda logits, _: keep_top_p(logits, cfg.top_p))
    if cfg.min_p > 0.0:
        chain.append(lambda logits, _: keep_min_p(logits, cfg.min_p))
    chain.append(lambda logits, _: logits / cfg.temperature)
    return chain


def run_chain(chain: Sequence[Processor], logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
    """`logits` [V] in fp32 through each step of `chain`."""
    logits = logits.float()
    for step in chain:
        logits = step(logits, history)
    return logits


def restrict(logits: torch.Tensor, bias: dict[int, float], allowed: torch.Tensor | None) -> torch.Tensor:
    """`logits` [V] in fp32 with OpenAI's `logit_bias` added and, with `allowed` (bool [V]), every
    other token masked to -inf."""
    logits = logits.float()
    if bias:
        ids = torch.tensor(list(bias), device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits


class Sampler:
    """`restrict`, the chain for a (validated: `Completion` validates it) `cfg`, then greedy or a
    draw from a generator seeded with `cfg.seed` (same seed, same tokens). The history's first
    `prompt_len` ids are the prompt (0: it was all generated)."""

    def __init__(self, cfg: SamplingConfig, prompt_len: int = 0) -> None:
        self.bias = dict(cfg.logit_bias)
        self.chain, self.greedy = processors(cfg, prompt_len), cfg.temperature == 0
        seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(7), "little")
        self.gen = torch.Generator().manual_seed(seed)

    def restrict(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        return restrict(logits, self.bias, allowed)

    def draw(self, restricted: torch.Tensor, history: Sequence[int]) -> int:
        """The next token from `restrict`'s output."""
        logits = run_chain(self.chain, restricted, history)
        if self.greedy:
            return int(torch.argmax(logits))
        return int(torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=self.gen))

    def __call__(self, logits: torch.Tensor, history: Sequence[int], allowed: torch.Tensor | None = None) -> int:
        return self.draw(self.restrict(logits, allowed), history)

