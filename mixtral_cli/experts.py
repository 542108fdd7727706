"""Expert providers: where the MoE block's experts live.

`ResidentExperts` keeps every expert on the compute device (the all-in-memory case).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from quant.formats import QuantizedTensor
from quant.linear import QuantLinear

from .model import Expert, ExpertFn


def make_linear(weight: torch.Tensor | QuantizedTensor) -> nn.Module:
    """A bias-free linear layer around a stored weight [out, in], dense or quantized, without copying it."""
    if isinstance(weight, QuantizedTensor):
        return QuantLinear(weight)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def make_expert(w1, w2, w3) -> Expert:
    return Expert(make_linear(w1), make_linear(w2), make_linear(w3))


@dataclass
class CacheStats:
    """Expert-use counters, reported by `run --json` and the chat `/stats` line."""

    slots_per_layer: int
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # hits on an expert that speculative prefetch brought in
    prefetches: int = 0  # experts prefetch started copying
    bytes_to_device: int = 0
    stall_s: float = 0.0  # time compute waited on copies

    @property
    def hit_rate(self) -> float | None:
        uses = self.hits + self.misses
        return self.hits / uses if uses else None

    @property
    def prefetch_accuracy(self) -> float | None:
        return self.prefetch_hits / self.prefetches if self.prefetches else None

    def as_dict(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        self.hits = self.misses = self.prefetch_hits = self.prefetches = self.bytes_to_device = 0
        self.stall_s = 0.0


class ResidentExperts:
    """All experts of all layers held on the compute device; nothing moves."""

    prefetch_enabled = False

    def __init__(self, experts: list[list[Expert]]) -> None:
        self.experts = experts  # [layer][expert]
        self.stats = CacheStats(slots_per_layer=len(experts[0]) if experts else 0)

    def run(self, layer: int, expert_ids: Sequence[int], uses: Sequence[int]) -> Iterator[tuple[int, ExpertFn]]:
        self.stats.hits += sum(uses)
        for eid in expert_ids:
            yield eid, self.experts[layer][eid]

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        pass
