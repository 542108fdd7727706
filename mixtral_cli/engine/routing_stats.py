"""What a routing trace says about the router (`mixtral experts`): how each layer's selections spread
over its experts, and how often a token reuses the experts the token before it used.

Plain Python, no torch. As in the Mixtral paper's routing analysis: the share of expert e at layer L
is the fraction of L's selections (tokens x top-k) that went to e; the reuse rate at L is the
fraction of a token's experts at L that the previous token also used at L. The previous token is
the one at the position before, computed just before it: the trace's preceding row, when its
position is one less (a new sequence, a chat turn recomputed from an earlier position, or a
`/clear` starts over and pairs nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from .trace import PHASES, Trace


@dataclass(frozen=True)
class RoutingStats:
    phase: str  # "all", "prefill" or "decode": which tokens were counted
    tokens: int
    counts: list[list[int]]  # [L][E] selections of expert e at layer L
    pairs: int  # tokens whose previous token is in the trace
    reused: list[int]  # [L] experts shared with the previous token, summed over the pairs
    top_k: int

    @property
    def shares(self) -> list[list[float]]:
        """[L][E] fraction of layer L's selections that went to expert e (0 with no tokens)."""
        total = self.tokens * self.top_k
        return [[c / total if total else 0.0 for c in row] for row in self.counts]

    @property
    def reuse(self) -> list[float | None]:
        """[L] fraction of a token's experts at L that the previous token also used (None: no pairs)."""
        return [r / (self.pairs * self.top_k) if self.pairs else None for r in self.reused]

    @property
    def mean_reuse(self) -> float | None:
        return sum(self.reused) / (self.pairs * self.top_k * len(self.reused)) if self.pairs else None

    @property
    def random_reuse(self) -> float:
        """The reuse rate of a router that picks top-k of E uniformly at random: k / E."""
        return self.top_k / len(self.counts[0])

    def as_dict(self) -> dict:
        return {"phase": self.phase, "tokens": self.tokens, "pairs": self.pairs, "counts": self.counts,
                "shares": self.shares, "reuse": self.reuse, "mean_reuse": self.mean_reuse,
                "random_reuse": self.random_reuse}


def routing_stats(trace: Trace, phase: str = "all") -> RoutingStats:
    """Usage and reuse over the tokens of `phase` ("all", "prefill" or "decode"); a decode token's
    previous token may be a prompt token (the first decode step's is the prompt's last)."""
    if phase != "all" and phase not in PHASES:
        raise ValueError(f"phase must be all, {' or '.join(PHASES)}, got {phase!r}")
    h = trace.header
    counts = [[0] * h.num_experts for _ in range(h.num_layers)]
    reused = [0] * h.num_layers
    tokens = pairs = 0
    prev_pos, prev = -2, None  # the previous row's position and experts [L][A]
    for p in trace.passes:
        counted = phase in ("all", p.phase)
        for i, per_layer in enumerate(p.experts):
            pos = p.pos + i
            if counted:
                tokens += 1
                for L, ids in enumerate(per_layer):
                    for e in ids:
                        counts[L][e] += 1
                if prev is not None and prev_pos == pos - 1:
                    pairs += 1
                    for L, ids in enumerate(per_layer):
                        reused[L] += len(set(ids) & set(prev[L]))
            prev_pos, prev = pos, per_layer
    return RoutingStats(phase, tokens, counts, pairs, reused, h.top_k)
