"""What `mixtral bench` measures besides the engines themselves: the memory and host-to-device
bandwidth probes and the median of several runs. Device-synchronised timing (``sync``) and the peak
RSS come from ``mixtral_cli.system`` and are imported from here by bench (our engine) and baseline
(transformers) alike."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..engine.experts import ExpertStore
from ..system.host_memory import CudaHostRegister, HostSlab
from ..system.host_memory import peak_rss_bytes as peak_rss_bytes  # re-exported for bench.run
from ..system.timing import best_time
from ..system.timing import sync as sync  # re-exported for bench.run and bench.baseline

WARMUP_TOKENS = 4  # decoded untimed after each prefill, before the timed steps


@dataclass
class RunTimes:
    """One measured generation: prefill, time to first token, and `gen_tokens` timed decode steps."""

    prefill_s: float
    ttft_s: float
    decode_s: float
    prompt_tokens: int
    gen_tokens: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.gen_tokens / self.decode_s if self.decode_s > 0 else 0.0


def median_times(runs: list[RunTimes]) -> RunTimes:
    return RunTimes(statistics.median(r.prefill_s for r in runs), statistics.median(r.ttft_s for r in runs),
                    statistics.median(r.decode_s for r in runs), runs[0].prompt_tokens, runs[0].gen_tokens)


def memory_bandwidth(device: torch.device, nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Read bandwidth (bytes/s): the best time of summing a float32 tensor much larger than the caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = best_time(lambda: x.sum(), device, reps)
    return nbytes / t


def host_to_device_bandwidth(device: torch.device, nbytes: int, reps: int = 5,
                             store: ExpertStore | None = None) -> tuple[float, str]:
    """Bandwidth of bringing one expert (`nbytes`) into a slot: a pinned host-to-device copy on CUDA
    (from the expert store itself when there is one, else from a page-locked buffer registered for
    the probe and released after it: never through torch's caching host allocator, which would
    keep a power-of-two pinned block for the rest of the run); on the CPU a memcpy between two host
    buffers (what a CPU slot refill is)."""
    slab = None
    if device.type == "cuda":
        if store is not None and store.pinned_bytes:
            src = store.buffers[0][0]
        else:
            slab = HostSlab(nbytes, CudaHostRegister())
            src = slab.tensor[:nbytes]
        dst = torch.empty(src.numel(), dtype=torch.uint8, device=device)
        nbytes = src.numel()
        method = "pinned host-to-device copy"
    else:  # at least 64 MiB so the copy is not served from the caches (a refill's source is cold)
        nbytes = max(nbytes, 64 * 2**20)
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty(nbytes, dtype=torch.uint8)
        method = "host memcpy (CPU slots)"
    try:
        t = best_time(lambda: dst.copy_(src, non_blocking=True), device, reps)
    finally:
        if slab is not None:
            del src
            slab.close()
    return nbytes / t, method
