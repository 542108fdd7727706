"""The CPU as a second expert engine: compute a missed expert from the host store instead of copying it.

During decode a missed expert costs either one host-to-device copy of its weights (~91 MB at 4 bits)
or one pass of the CPU over the same weights for a single token (the 8 KB activation travels
instead). Which is cheaper depends on the machine, so `measure_costs` times both once at load,
and `assign_misses` splits each call's misses between the two engines, which run in parallel
(the copy engine, and one CPU worker thread), by list scheduling: every miss goes to the engine
that would finish it first. Meanwhile the GPU computes the experts it already holds.

Policy (`--cpu-experts`): `auto` (the cost model), `never` (always copy), `always` (every decode miss
on the CPU). Prefill always uses the GPU: many tokens amortise a copy. On a CPU-only machine the
"device" slots are CPU tensors and the CPU engine computes from the store: the same arithmetic,
so the tests check the policy and the counters with token-identical output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..settings import CPU_EXPERT_MODES
from ..system.timing import best_time
from .provider import ExpertFn


@dataclass(frozen=True)
class ExpertCosts:
    """Seconds for one expert: `copy_s` host to device, `cpu_s` one token through it on the CPU."""

    copy_s: float
    cpu_s: float


def _check_mode(mode: str) -> None:
    if mode not in CPU_EXPERT_MODES:
        raise ValueError(f"cpu experts mode must be one of {CPU_EXPERT_MODES}, got {mode!r}")


def assign_misses(n_missing: int, costs: ExpertCosts, mode: str) -> list[bool]:
    """For each of `n_missing` experts, True to compute it on the CPU, False to copy it.

    `auto`: list scheduling onto two engines working in parallel, each taking its experts one after
    another; an expert goes to the engine that would finish it sooner (a tie copies: a copied
    expert stays cached for the next token)."""
    _check_mode(mode)
    if mode != "auto":
        return [mode == "always"] * n_missing
    cpu_done = copy_done = 0.0
    out = []
    for _ in range(n_missing):
        on_cpu = cpu_done + costs.cpu_s < copy_done + costs.copy_s
        if on_cpu:
            cpu_done += costs.cpu_s
        else:
            copy_done += costs.copy_s
        out.append(on_cpu)
    return out


def miss_time(n_missing: int, costs: ExpertCosts, mode: str) -> float:
    """Seconds until `n_missing` misses of one layer are served under `mode` (both engines in parallel)."""
    flags = assign_misses(n_missing, costs, mode)
    return max(costs.cpu_s * sum(flags), costs.copy_s * (n_missing - sum(flags)))


def layer_miss_time(miss_rate: float, top_k: int, costs: ExpertCosts, mode: str) -> float:
    """Expected seconds one layer of one decoded token waits for its misses, each of its `top_k`
    experts missing independently with probability `miss_rate` (layers run one after another, so
    this is what bounds decode: tokens/s <= 1 / (layers x this + the rest))."""
    return sum(math.comb(top_k, n) * miss_rate**n * (1 - miss_rate) ** (top_k - n) * miss_time(n, costs, mode)
               for n in range(top_k + 1))


class CpuExperts:
    """Experts computed on the CPU straight from the host store (no copy: modules view its buffers)."""

    def __init__(self, store, top_k: int, dtype: torch.dtype, mode: str, costs: ExpertCosts) -> None:
        _check_mode(mode)
        self.store, self.top_k, self.dtype, self.mode, self.costs = store, top_k, dtype, mode, costs
        self._modules: dict[tuple[int, int], ExpertFn] = {}  # Expert or QuantSwiGLU modules
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mixtral-cpu-experts")

    def applies(self, uses: Sequence[int]) -> bool:
        """Only one token's worth of uses (decode): prefill always copies."""
        return self.mode != "never" and sum(uses) <= self.top_k

    def split(self, missing: Sequence[int]) -> list[int]:
        """The missing experts to compute on the CPU."""
        return [e for e, cpu in zip(missing, assign_misses(len(missing), self.costs, self.mode), strict=True) if cpu]

    def module(self, layer: int, eid: int) -> ExpertFn:
        key = (layer, eid)
        if key not in self._modules:
            self._modules[key] = self.store.module(layer, eid)
        return self._modules[key]

    def _compute(self, layer: int, eid: int, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(layer, eid)(x)

    def jobs(self, layer: int, eids: Sequence[int]) -> CpuJobs:
        return CpuJobs(self, layer, list(eids))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class CpuJobs:
    """The CPU experts of one MoE call. They start on the first activation any expert of the call is
    given (before the GPU's own experts are launched, so the host copy of the activation waits for
    nothing else), run on the worker thread, and are collected last."""

    def __init__(self, engine: CpuExperts, layer: int, eids: list[int]) -> None:
        self.engine, self.layer, self.eids = engine, layer, eids
        self.futures: dict[int, Future] = {}

    def start(self, x: torch.Tensor) -> None:
        if self.futures or not self.eids:
            return
        xh = x.to("cpu", self.engine.dtype)
        for eid in self.eids:
            self.futures[eid] = self.engine._pool.submit(self.engine._compute, self.layer, eid, xh)

    def starting(self, fn: ExpertFn) -> ExpertFn:
        """`fn`, but first start the CPU jobs on its input."""
        def run(x: torch.Tensor) -> torch.Tensor:
            self.start(x)
            return fn(x)
        return run

    def result(self, eid: int) -> ExpertFn:
        def run(x: torch.Tensor) -> torch.Tensor:
            self.start(x)
            return self.futures[eid].result().to(device=x.device, dtype=x.dtype)
        return run


def measure_costs(store, device: torch.device, scratch: torch.Tensor, dtype: torch.dtype,
                  hidden_size: int) -> ExpertCosts:
    """Time one expert's host-to-device copy (into `scratch`, a free slot) and one token through it on
    the CPU, best of three each."""
    src = store.buffers[0][0]
    expert = CpuExperts(store, 1, dtype, "never", ExpertCosts(0.0, 0.0))
    x = torch.randn(1, hidden_size).to(dtype)
    try:
        with torch.inference_mode():
            return ExpertCosts(copy_s=best_time(lambda: scratch.copy_(src, non_blocking=True), device),
                               cpu_s=best_time(lambda: expert.module(0, 0)(x)))
    finally:
        expert.close()
