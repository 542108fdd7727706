"""Expert providers: where the MoE block's experts live.

- `ResidentExperts`: every expert on the compute device (the all-in-memory case).
- `ExpertStore` + `ExpertCache`: every expert in host memory, one contiguous (pinned, with CUDA)
  buffer per expert; each layer keeps K device slots in LRU order; a missing expert is one copy
  into a slot. While layer L computes, the experts layer L+1's router would pick are prefetched.

The cache logic is device-independent and runs in the CPU tests ("device" slots are CPU tensors);
only `CudaTransfer` knows about streams and events.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from quant.formats import QuantizedTensor
from quant.linear import QuantLinear

from .checkpoint import EXPERT_PROJS
from .model import Expert, ExpertFn

ALIGN = 64  # bytes; every tensor in a packed expert starts at a multiple of this


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
    """Expert-use counters, reported by `run --json` and the chat `/stats` line.

    A use is one (token, selected expert) pair in one layer; a miss is a use that had to copy the
    expert in first (the other tokens of a prefill using the same copy count as hits)."""

    slots_per_layer: int
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # prefetched experts that were then used
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
        return asdict(self) | {"hit_rate": self.hit_rate, "prefetch_accuracy": self.prefetch_accuracy}

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

    def reset_stats(self) -> None:
        self.stats.reset()


# -- packing one expert into one flat buffer ---------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    proj: str
    part: str  # "weight" for dense, else the quantized part name
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


class ExpertLayout:
    """Where each tensor of one expert (w1, w2, w3, dense or quantized) sits in a flat uint8 buffer."""

    def __init__(self, sample: Sequence[torch.Tensor | QuantizedTensor]) -> None:
        self.entries: list[_Entry] = []
        self.quant: dict[str, tuple] = {}  # proj -> (spec, shape) for quantized projections
        offset = 0
        for proj, w in zip(EXPERT_PROJS, sample, strict=True):
            if isinstance(w, QuantizedTensor):
                self.quant[proj] = (w.spec, w.shape)
                parts = w.parts.items()
            else:
                parts = [("weight", w)]
            for part, t in parts:
                n = t.numel() * t.element_size()
                self.entries.append(_Entry(proj, part, tuple(t.shape), t.dtype, offset, n))
                offset += -(-n // ALIGN) * ALIGN
        self.nbytes = offset

    def pack(self, weights: Sequence[torch.Tensor | QuantizedTensor], out: torch.Tensor) -> None:
        """Copy the expert's tensors into `out` [nbytes] uint8."""
        by_proj = dict(zip(EXPERT_PROJS, weights, strict=True))
        for e in self.entries:
            w = by_proj[e.proj]
            t = w.parts[e.part] if isinstance(w, QuantizedTensor) else w
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise ValueError(f"{e.proj}.{e.part}: {tuple(t.shape)} {t.dtype} does not match the layout")
            out[e.offset:e.offset + e.nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))

    def unpack(self, buf: torch.Tensor) -> list[torch.Tensor | QuantizedTensor]:
        """Views into `buf` shaped as the expert's w1, w2, w3 (no copy)."""
        parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in EXPERT_PROJS}
        for e in self.entries:
            parts[e.proj][e.part] = buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
        out = []
        for proj in EXPERT_PROJS:
            if proj in self.quant:
                spec, shape = self.quant[proj]
                out.append(QuantizedTensor(spec, shape, parts[proj]))
            else:
                out.append(parts[proj]["weight"])
        return out


class ExpertStore:
    """Every expert of every layer in host memory, one contiguous buffer each (pinned for CUDA)."""

    def __init__(self, layout: ExpertLayout, n_layers: int, n_experts: int, pin: bool) -> None:
        self.layout = layout
        self.n_layers, self.n_experts = n_layers, n_experts
        self.buffers = [
            [torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n_experts)]
            for _ in range(n_layers)
        ]

    def put(self, layer: int, expert: int, weights: Sequence[torch.Tensor | QuantizedTensor]) -> None:
        self.layout.pack(weights, self.buffers[layer][expert])

    def nbytes(self) -> int:
        return self.layout.nbytes * self.n_layers * self.n_experts


# -- copies ------------------------------------------------------------------------------------
class SyncTransfer:
    """Host-to-slot copies on the calling thread (CPU slots): done when `start` returns, so the
    copy time is all stall; `wait` reports it once per copy."""

    def __init__(self) -> None:
        self.copy_s: dict[int, float] = {}

    def start(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        t0 = time.perf_counter()
        dst.copy_(src)
        self.copy_s[slot] = time.perf_counter() - t0

    def wait(self, slot: int) -> float:
        return self.copy_s.pop(slot, 0.0)

    def release(self, slot: int) -> None:
        pass


class CudaTransfer:
    """Copies on a dedicated stream; compute waits on a per-slot event only for what it is about to use,
    and a slot is overwritten only after the compute that last read it has finished."""

    def __init__(self, n_slots: int, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in range(n_slots)]
        self.freed = [torch.cuda.Event() for _ in range(n_slots)]

    def start(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.freed[slot])
            dst.copy_(src, non_blocking=True)
            self.copied[slot].record(self.stream)

    def wait(self, slot: int) -> float:
        """Make compute wait for the slot's copy; returns host seconds spent if the copy was still running."""
        ev = self.copied[slot]
        if ev.query():
            return 0.0
        t0 = time.perf_counter()
        torch.cuda.current_stream().wait_event(ev)
        return time.perf_counter() - t0

    def release(self, slot: int) -> None:
        self.freed[slot].record(torch.cuda.current_stream())


# -- the per-layer LRU cache -------------------------------------------------------------------
class _LayerSlots:
    """K device slots of one layer: which expert each holds, in least-recently-used order."""

    def __init__(self, k: int, layout: ExpertLayout, device: torch.device, transfer) -> None:
        self.buffers = [torch.empty(layout.nbytes, dtype=torch.uint8, device=device) for _ in range(k)]
        self.modules = [make_expert(*layout.unpack(b)) for b in self.buffers]
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert id -> slot, oldest first
        self.free = list(range(k))
        self.prefetched: set[int] = set()  # brought in by prefetch, not used since
        self.busy: set[int] = set()  # needed by the call in progress: never evicted
        self.transfer = transfer

    def victim(self, keep: set[int]) -> int | None:
        """A free slot, else the least recently used slot whose expert is neither busy nor in `keep`."""
        if self.free:
            return self.free.pop()
        for eid, slot in self.lru.items():
            if eid not in keep and eid not in self.busy:
                del self.lru[eid]
                self.prefetched.discard(eid)
                return slot
        return None


class ExpertCache:
    """Per-layer LRU cache of expert slots on the compute device, fed from an `ExpertStore`."""

    def __init__(self, store: ExpertStore, slots_per_layer: int, device: torch.device, prefetch: bool = True) -> None:
        if not 1 <= slots_per_layer <= store.n_experts:
            raise ValueError(f"slots per layer must be in [1, {store.n_experts}], got {slots_per_layer}")
        self.store = store
        self.device = device
        self.prefetch_enabled = prefetch
        self.stats = CacheStats(slots_per_layer=slots_per_layer)

        def transfer():
            return CudaTransfer(slots_per_layer, device) if device.type == "cuda" else SyncTransfer()

        self.layers = [_LayerSlots(slots_per_layer, store.layout, device, transfer()) for _ in range(store.n_layers)]

    def reset_stats(self) -> None:
        """Zero the counters; experts prefetched before now no longer count as prefetch hits."""
        self.stats.reset()
        for slots in self.layers:
            slots.prefetched.clear()

    def resident(self, layer: int) -> list[int]:
        """Expert ids on the device for `layer`, least recently used first."""
        return list(self.layers[layer].lru)

    def _load(self, layer: int, eid: int, keep: set[int]) -> bool:
        slots = self.layers[layer]
        slot = slots.victim(keep)
        if slot is None:
            return False
        slots.transfer.start(slot, slots.buffers[slot], self.store.buffers[layer][eid])
        for m in slots.modules[slot].modules():
            if isinstance(m, QuantLinear):
                m.invalidate_prepared()
        slots.lru[eid] = slot
        self.stats.bytes_to_device += self.store.layout.nbytes
        return True

    def run(self, layer: int, expert_ids: Sequence[int], uses: Sequence[int]) -> Iterator[tuple[int, ExpertFn]]:
        slots = self.layers[layer]
        n_uses = dict(zip(expert_ids, uses, strict=True))
        pending = slots.busy = set(expert_ids)  # never evicted until used in this call
        # Experts already on the device (or arriving) first, so missing ones copy while they compute.
        order = [e for e in expert_ids if e in slots.lru] + [e for e in expert_ids if e not in slots.lru]
        missing = [e for e in order if e not in slots.lru]
        self.stats.misses += len(missing)
        for eid in order:
            self.stats.hits += n_uses[eid] - (1 if eid in missing else 0)
            if eid in slots.prefetched:
                slots.prefetched.discard(eid)
                self.stats.prefetch_hits += 1
        while missing and self._load(layer, missing[0], pending):
            missing.pop(0)
        for eid in order:
            if eid not in slots.lru:  # a slot frees up only as earlier experts finish
                if not self._load(layer, eid, pending):
                    raise RuntimeError("no expert slot free: slots per layer is below the number needed at once")
                missing.remove(eid)
            slot = slots.lru[eid]
            self.stats.stall_s += slots.transfer.wait(slot)
            slots.lru.move_to_end(eid)
            yield eid, slots.modules[slot]
            slots.transfer.release(slot)
            pending.discard(eid)
            while missing and self._load(layer, missing[0], pending):
                missing.pop(0)
        slots.busy = set()

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        if not self.prefetch_enabled or layer >= len(self.layers):
            return
        slots = self.layers[layer]
        wanted = set(expert_ids)
        for eid in expert_ids:
            if eid not in slots.lru and self._load(layer, eid, wanted):
                slots.prefetched.add(eid)
                self.stats.prefetches += 1
