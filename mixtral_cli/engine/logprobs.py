"""Per-token log-probabilities, as OpenAI's `logprobs` report them: the chosen token's and the most
likely alternatives'.

Generated tokens are scored under the distribution the request allows (`sampling.restrict`: the
model's logits plus `logit_bias`, the grammar's forbidden tokens removed), before penalties,
top-k/top-p/min-p and temperature, so the numbers do not depend on how the token was drawn and,
for a request with neither bias nor grammar, they are the model's own (as vLLM's default
`raw_logprobs`). Prompt tokens (`echo`) are scored under the model's own distribution, exactly as
`mixtral perplexity` scores text (`evaluate.prompt_logprobs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions allow 5


@dataclass
class TokenLogprob:
    """One token's score; a prompt's first token, which nothing predicts, has None for both."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None = field(default_factory=list)  # the `n` most likely, most likely first


def top_alternatives(logp: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The `n` most likely ids of one row of log-probabilities [V]; impossible ones (-inf) left out."""
    if n <= 0:
        return []
    values, ids = torch.topk(logp, min(n, logp.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if math.isfinite(v)]


def token_logprob(restricted: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """`token`'s log-probability under `restricted` (fp32 logits [V]) and its `n` top alternatives."""
    logp = torch.log_softmax(restricted.float(), dim=-1)
    return TokenLogprob(token, float(logp[token]), top_alternatives(logp, n))
