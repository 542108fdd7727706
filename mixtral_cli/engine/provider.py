"""What the MoE block asks of wherever its experts live: the expert-provider protocol, and the use
counters every provider keeps. `model.py` asks through it; `experts.py` and `cpu_experts.py` answer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch


@dataclass
class CacheStats:
    """Expert-use counters, reported by `run --json` and the chat `/stats` line.

    A use is one (token, selected expert) pair in one layer; a miss is a use that had to copy the
    expert in first (the other tokens of a prefill using the same copy count as hits)."""

    slots_per_layer: int
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # prefetched experts that were then used
    prefetches: int = 0  # experts prefetch started copying
    bytes_to_device: int = 0
    cpu_experts: int = 0  # misses computed on the CPU from the host store instead of copied (a subset of misses)
    stall_s: float = 0.0  # time compute waited on copies (on CUDA: GPU time, measured with events)

    @property
    def hit_rate(self) -> float | None:
        uses = self.hits + self.misses
        return self.hits / uses if uses else None

    @property
    def prefetch_accuracy(self) -> float | None:
        return self.prefetch_hits / self.prefetches if self.prefetches else None

    def as_dict(self) -> dict:
        return asdict(self) | {"hit_rate": self.hit_rate, "prefetch_accuracy": self.prefetch_accuracy}

    def reset(self) -> None:
        self.hits = self.misses = self.prefetch_hits = self.prefetches = self.bytes_to_device = self.cpu_experts = 0
        self.stall_s = 0.0


ExpertFn = Callable[[torch.Tensor], torch.Tensor]


class ExpertProvider(Protocol):
    """Where experts live. The MoE block asks for the experts it needs and uses them in the given
    order; the layer loop's `Lookahead` hints the ones the next layers will probably need. `stats`
    counts the uses: `run --json`, chat's `/stats` and `bench` report them."""

    prefetch_enabled: bool

    @property
    def stats(self) -> CacheStats:
        """The use counters since the last `reset_stats` (every provider counts hits and misses)."""
        ...

    def run(self, layer: int, expert_ids: Sequence[int], uses: Sequence[int]) -> Iterator[tuple[int, ExpertFn]]:
        """An iterator of (expert id, callable) for each requested id, in an order of the provider's
        choosing. `uses[i]` is how many (token, choice) pairs expert_ids[i] serves in this call. Work
        to bring missing experts in starts before `run` returns, so that `prefetch` hints given
        afterwards queue behind it. An expert stays usable (never evicted) until the iterator
        advances past it."""
        ...

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Hint: these experts of `layer` will probably be needed soon."""
        ...

    def reset_stats(self) -> None:
        """Zero the use counters (`stats`)."""
        ...
