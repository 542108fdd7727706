"""Perplexity over consecutive, independent windows, the KL divergence of a model's next-token
distributions from a base model's (`perplexity --kl-base`, as llama.cpp's `--kl-divergence`), and
the log-probability of each token of a prompt (the server's `echo`), all scored the same way."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .generate import Session, chunks
from .logprobs import TokenLogprob, top_alternatives
from .model import Mixtral
from .plan import LOGITS_ROWS, PREFILL_CHUNK


@dataclass
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    windows: int

    def as_dict(self) -> dict:
        return asdict(self)


def windows(ids: list[int], ctx: int) -> list[list[int]]:
    """ids[0:ctx], ids[ctx:2ctx], ... (a shorter last window included)."""
    return [ids[start:start + ctx] for start in range(0, len(ids), ctx)]


def scored_rows(ids: list[int], ctx: int) -> int:
    """Positions scored over the windows: every one but each window's last."""
    return sum(len(w) - 1 for w in windows(ids, ctx))


def row_blocks(n: int, chunk: int = PREFILL_CHUNK) -> Iterator[tuple[int, int, int, int]]:
    """For a window of `n` tokens: each prefill chunk [a, b) with each block [r0, r1) of at most
    `LOGITS_ROWS` positions that predict a next token inside the window."""
    for a, b in chunks(0, n, chunk):
        for r0, r1 in chunks(a, min(b, n - 1), LOGITS_ROWS):
            yield a, b, r0, r1


def window_logprobs(model: Mixtral, window: list[int], chunk: int = PREFILL_CHUNK) -> Iterator[torch.Tensor]:
    """The log-softmax of the next-token logits, [rows, V] float32, at every position but the last,
    block by block (`row_blocks`).

    The window goes through the model in chunks of `chunk` tokens (as a prompt does), and each
    chunk's hidden states become logits `LOGITS_ROWS` positions at a time, so no [W, V] tensor exists."""
    ids = torch.tensor(window, device=model.model.embed_tokens.weight.device)
    h, done = None, -1
    for a, b, r0, r1 in row_blocks(len(window), chunk):
        if a != done:
            h, done = model.run_layers(ids[a:b], a), a  # [n, D]
        yield F.log_softmax(model.head(h[r0 - a:r1 - a]), dim=-1)


def prompt_logprobs(session: Session, ids: list[int], top: int) -> list[TokenLogprob]:
    """Each token of `ids` scored given the ones before it, with its `top` most likely alternatives
    (the first, which nothing predicts, scored None), computed as `perplexity` computes one window.
    The session's cache then holds the prompt (all of it, or all but a last token that no
    position's logits needed), so generating from it afterwards only computes what is missing."""
    scores = [TokenLogprob(ids[0], None, None)]
    for (_, _, r0, r1), logp in zip(row_blocks(len(ids), session.chunk),
                                    window_logprobs(session.model, ids, session.chunk), strict=True):
        for row, target in enumerate(ids[r0 + 1:r1 + 1]):
            scores.append(TokenLogprob(target, float(logp[row, target]), top_alternatives(logp[row], top)))
    written = max((b for a, b in chunks(0, len(ids), session.chunk) if a < len(ids) - 1), default=0)
    session.cached = list(ids[:written])
    return scores


def _targets(window: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(window[1:], device=device)


def perplexity(model: Mixtral, ids: list[int], ctx: int, chunk: int = PREFILL_CHUNK,
               keep: Callable[[torch.Tensor], None] | None = None) -> PerplexityResult:
    """exp(mean NLL) over `windows(ids, ctx)`; `keep` receives every block of log-probabilities in
    text order (`--save-logits`)."""
    total, scored = 0.0, 0
    parts = windows(ids, ctx)
    for window in parts:
        targets = _targets(window, model.model.embed_tokens.weight.device)
        for (_, _, r0, r1), logp in zip(row_blocks(len(window), chunk), window_logprobs(model, window, chunk),
                                        strict=True):
            total -= float(logp.gather(1, targets[r0:r1, None]).sum(dtype=torch.float64))
            if keep is not None:
                keep(logp)
        scored += len(window) - 1
    if scored == 0:
        raise UserError("the text is too short to score", hint="perplexity needs at least 2 tokens")
    return PerplexityResult(math.exp(total / scored), scored, len(parts))


def _normalised(logp: torch.Tensor) -> torch.Tensor:
    """`logp` in float64, renormalised: a float32 log-softmax over 32000 entries sums to 1 only within
    ~1e-7, which would be read as a divergence of that size."""
    logp = logp.double()
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


@dataclass
class DivergenceResult:
    """The model against a base over the same positions: KL(base || model) per position in nats,
    how often their argmax agree, and both perplexities."""

    perplexity: float
    base_perplexity: float
    ppl_ratio: float
    ppl_ratio_uncertainty: float  # one standard error, from the spread of the per-position NLL differences
    kl_divergence: float  # mean over positions
    kl_divergence_uncertainty: float  # standard error of that mean
    kl_divergence_median: float
    kl_divergence_p99: float
    top1_agreement: float
    tokens_scored: int
    windows: int

    def as_dict(self) -> dict:
        return asdict(self)


def divergence(model: Mixtral, ids: list[int], ctx: int, base: Callable[[list[int]], Iterator[torch.Tensor]],
               chunk: int = PREFILL_CHUNK) -> DivergenceResult:
    """KL(base || model) at every scored position of `windows(ids, ctx)`. `base(window)` yields the
    base's log-probabilities block by block as `window_logprobs` does (a base model's, or a logits
    file's rows)."""
    kl, nll_diff, agree = [], [], 0
    nll, base_nll = 0.0, 0.0
    parts = windows(ids, ctx)
    for window in parts:
        targets = _targets(window, model.model.embed_tokens.weight.device)
        for (_, _, r0, r1), logq, logp in zip(row_blocks(len(window), chunk), window_logprobs(model, window, chunk),
                                              base(window), strict=True):
            logp, logq = _normalised(logp.to(logq.device)), _normalised(logq)
            kl.append((logp.exp() * (logp - logq)).sum(dim=-1))  # [rows]
            t = targets[r0:r1, None]
            q_nll, p_nll = -logq.gather(1, t)[:, 0].double(), -logp.gather(1, t)[:, 0].double()
            nll_diff.append(q_nll - p_nll)
            nll, base_nll = nll + float(q_nll.sum()), base_nll + float(p_nll.sum())
            agree += int((logq.argmax(dim=-1) == logp.argmax(dim=-1)).sum())
    n = sum(len(k) for k in kl)
    if n == 0:
        raise UserError("the text is too short to score", hint="perplexity needs at least 2 tokens")
    kls, diffs = torch.cat(kl).cpu(), torch.cat(nll_diff).cpu()
    ratio = math.exp(float(diffs.mean()))
    se = float(diffs.std()) / math.sqrt(n) if n > 1 else 0.0
    return DivergenceResult(
        perplexity=math.exp(nll / n), base_perplexity=math.exp(base_nll / n), ppl_ratio=ratio,
        ppl_ratio_uncertainty=ratio * se,
        kl_divergence=float(kls.mean()), kl_divergence_uncertainty=float(kls.std()) / math.sqrt(n) if n > 1 else 0.0,
        kl_divergence_median=float(kls.median()), kl_divergence_p99=float(torch.quantile(kls, 0.99)),
        top1_agreement=agree / n, tokens_scored=n, windows=len(parts),
    )
