"""Perplexity over consecutive, independent windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .model import Mixtral


@dataclass
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    windows: int

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens_scored": self.tokens_scored, "windows": self.windows}


def window_nll(model: Mixtral, window: list[int]) -> tuple[float, int]:
    """Sum of -log p(token | previous tokens of the window) over every position but the first."""
    if len(window) < 2:
        return 0.0, 0
    ids = torch.tensor(window, device=model.model.embed_tokens.weight.device)
    logits = model(ids, 0)  # [W, V] fp32
    nll = F.cross_entropy(logits[:-1], ids[1:], reduction="sum")
    return float(nll), len(window) - 1


def perplexity(model: Mixtral, ids: list[int], ctx: int) -> PerplexityResult:
    """exp(mean NLL) over windows ids[0:ctx], ids[ctx:2ctx], ... (a shorter last window included)."""
    total, scored, windows = 0.0, 0, 0
    for start in range(0, len(ids), ctx):
        nll, n = window_nll(model, ids[start:start + ctx])
        total, scored, windows = total + nll, scored + n, windows + 1
    if scored == 0:
        raise UserError("the text is too short to score", hint="perplexity needs at least 2 tokens")
    return PerplexityResult(math.exp(total / scored), scored, windows)
