"""Timing work that may run asynchronously on a device: wait for it, and take the best of a few runs.

A CUDA call returns before its kernels finish, so a timer read right after it measures only the
launch; ``sync`` waits for the device's queue first (nothing to wait for on the CPU). Used by
generation (prefill time), the CPU-expert cost model and the bench probes alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (so that a timer read next measures it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device | None = None, reps: int = 3) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` in seconds, after one untimed warm-up call; each
    call is waited for on ``device`` (None: ``fn`` is synchronous, nothing to wait for)."""

    def run() -> None:
        fn()
        if device is not None:
            sync(device)

    run()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best
