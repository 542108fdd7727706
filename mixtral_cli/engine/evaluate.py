"""Perplexity over consecutive, independent windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .generate import chunks
from .model import Mixtral
from .plan import LOGITS_ROWS, PREFILL_CHUNK


@dataclass
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    windows: int

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens_scored": self.tokens_scored, "windows": self.windows}


def window_nll(model: Mixtral, window: list[int], chunk: int = PREFILL_CHUNK) -> tuple[float, int]:
    """Sum of -log p(token | previous tokens of the window) over every position but the first.

    The window goes through the model in chunks of `chunk` tokens (as a prompt does), and each
    chunk's hidden states become logits `LOGITS_ROWS` positions at a time, so no [W, V] tensor exists."""
    if len(window) < 2:
        return 0.0, 0
    ids = torch.tensor(window, device=model.model.embed_tokens.weight.device)
    nll = torch.zeros((), dtype=torch.float64, device=ids.device)
    for a, b in chunks(0, len(window), chunk):
        h = model.run_layers(ids[a:b], a)  # [n, D]
        for r0, r1 in chunks(a, min(b, len(window) - 1), LOGITS_ROWS):  # the last position predicts nothing
            logits = model.head(h[r0 - a:r1 - a])  # [rows, V] fp32
            nll += F.cross_entropy(logits, ids[r0 + 1:r1 + 1], reduction="sum")
    return float(nll), len(window) - 1


def perplexity(model: Mixtral, ids: list[int], ctx: int, chunk: int = PREFILL_CHUNK) -> PerplexityResult:
    """exp(mean NLL) over windows ids[0:ctx], ids[ctx:2ctx], ... (a shorter last window included)."""
    total, scored, windows = 0.0, 0, 0
    for start in range(0, len(ids), ctx):
        nll, n = window_nll(model, ids[start:start + ctx], chunk)
        total, scored, windows = total + nll, scored + n, windows + 1
    if scored == 0:
        raise UserError("the text is too short to score", hint="perplexity needs at least 2 tokens")
    return PerplexityResult(math.exp(total / scored), scored, windows)
