"""Expert providers: where the MoE block's experts live.

- `ResidentExperts`: every expert on the compute device (the all-in-memory case).
- `ExpertStore` + `ExpertCache`: every expert in host memory, in one page-aligned slab (pinned for
  the GPU with `cudaHostRegister`: exactly the store's bytes, none of the caching host allocator's
  power-of-two rounding), one contiguous entry per expert; each layer keeps K device slots in LRU
  order; a missing expert is one copy into a slot. While layer L computes, the experts layer L+1's
  router would pick are prefetched, queued behind layer L's own (demand) copies.

The cache logic is device-independent and runs in the CPU tests ("device" slots are CPU tensors);
only `CudaTransfer` and `CudaHostRegister` know about streams, events and page-locking.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints.layout import EXPERT_PROJS
from ..kernels.formats import QuantizedTensor, aligned
from ..kernels.linear import DenseLinear, QuantLinear, QuantSwiGLU
from ..system.host_memory import (
    AvailableRam,
    CudaHostRegister,
    HostSlab,
    mem_available,
    room_for,
)
from .cpu_experts import CpuExperts, CpuJobs
from .model import Expert
from .plan import host_ram_refusal
from .provider import CacheStats, ExpertFn


def make_linear(weight: torch.Tensor | QuantizedTensor) -> nn.Module:
    """A bias-free linear layer around a stored weight [out, in], dense or quantized, without copying it."""
    if isinstance(weight, QuantizedTensor):
        return QuantLinear(weight)
    layer = DenseLinear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def make_expert(w1, w2, w3) -> nn.Module:
    """An expert module (attributes w1, w2, w3) around the stored weights: `QuantSwiGLU` (one native call
    per expert on the CPU) when all three are quantized, else `Expert`."""
    layers = (make_linear(w1), make_linear(w2), make_linear(w3))
    return QuantSwiGLU(*layers) if all(isinstance(m, QuantLinear) for m in layers) else Expert(*layers)


class ResidentExperts:
    """All experts of all layers held on the compute device; nothing moves."""

    prefetch_enabled = False

    def __init__(self, experts: list[list[Expert]]) -> None:
        self.experts = experts  # [layer][expert]
        self.stats = CacheStats(slots_per_layer=len(experts[0]) if experts else 0)

    def run(self, layer: int, expert_ids: Sequence[int], uses: Sequence[int]) -> Iterator[tuple[int, ExpertFn]]:
        self.stats.hits += sum(uses)
        return ((eid, self.experts[layer][eid]) for eid in expert_ids)

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
    """Where each tensor of one expert (w1, w2, w3, dense or quantized) sits in a flat uint8 buffer
    (each at a multiple of `ALIGN`; `layout.packed_expert_bytes` computes the same size from the config)."""

    def __init__(self, sample: Sequence[torch.Tensor | QuantizedTensor]) -> None:
        self.entries: list[_Entry] = []
        self.quant: dict[str, tuple] = {}  # proj -> (spec, shape) for quantized projections
        self.shapes: dict[str, tuple[int, int]] = {}  # proj -> [out, in]
        offset = 0
        for proj, w in zip(EXPERT_PROJS, sample, strict=True):
            self.shapes[proj] = (int(w.shape[0]), int(w.shape[1]))
            if isinstance(w, QuantizedTensor):
                self.quant[proj] = (w.spec, w.shape)
                parts = w.parts.items()
            else:
                parts = [("weight", w)]
            for part, t in parts:
                n = t.numel() * t.element_size()
                self.entries.append(_Entry(proj, part, tuple(t.shape), t.dtype, offset, n))
                offset += aligned(n)
        self.nbytes = offset

    @property
    def spec(self):
        """The quantized format of the experts' projections (None: dense)."""
        return next((spec for spec, _ in self.quant.values()), None)

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


# -- the host store -------------------------------------------------------------------------------
def check_host_ram(need: int, available: int | None, layout: ExpertLayout | None = None) -> None:
    """Refuse to pin `need` bytes when `room_for` says no: page-locked memory cannot be swapped out."""
    if not room_for(need, available):
        raise host_ram_refusal("the expert store", need, True, available, layout.spec if layout is not None else None)


class ExpertStore:
    """Every expert of every layer in host memory: one slab of exactly layers x experts x
    `layout.nbytes` bytes (page-locked for CUDA), one contiguous entry per expert."""

    def __init__(self, layout: ExpertLayout, n_layers: int, n_experts: int, pin: bool, *,
                 pinner: CudaHostRegister | None = None, available: AvailableRam = mem_available) -> None:
        self.layout = layout
        self.n_layers, self.n_experts = n_layers, n_experts
        total = self.nbytes()
        if pin:
            check_host_ram(total, available(), layout)
            pinner = pinner or CudaHostRegister()
        self.slab = HostSlab(total, pinner if pin else None)
        nb = layout.nbytes
        self.buffers = [
            [self.slab.tensor[(L * n_experts + e) * nb:(L * n_experts + e + 1) * nb] for e in range(n_experts)]
            for L in range(n_layers)
        ]

    def put(self, layer: int, expert: int, weights: Sequence[torch.Tensor | QuantizedTensor]) -> None:
        self.layout.pack(weights, self.buffers[layer][expert])

    def module(self, layer: int, expert: int) -> nn.Module:
        """The expert as a module computing straight from its entry in the store (no copy)."""
        return make_expert(*self.layout.unpack(self.buffers[layer][expert]))

    def nbytes(self) -> int:
        return self.layout.nbytes * self.n_layers * self.n_experts

    @property
    def pinned_bytes(self) -> int:
        return self.slab.pinned_bytes

    def close(self) -> None:
        """Unpin and release the slab; the store is unusable afterwards."""
        self.buffers = []
        self.slab.close()


# -- copies ------------------------------------------------------------------------------------
class SyncTransfer:
    """Host-to-slot copies on the calling thread (CPU slots): done when `start` returns, so the
    copy time is all stall; `wait` counts it once per copy. Slots are numbered across layers."""

    def __init__(self) -> None:
        self.copy_s: dict[int, float] = {}
        self._stall = 0.0

    def start(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        t0 = time.perf_counter()
        dst.copy_(src)
        self.copy_s[slot] = time.perf_counter() - t0

    def wait(self, slot: int) -> None:
        self._stall += self.copy_s.pop(slot, 0.0)

    def release(self, slot: int) -> None:
        pass

    def take_stall_s(self) -> float:
        """Seconds compute waited on copies since the last call."""
        s, self._stall = self._stall, 0.0
        return s


class CudaTransfer:
    """Copies on one dedicated stream, shared by every layer so that they run in the order they
    were issued. Compute waits on a per-slot event only for what it is about to use, and a slot is
    overwritten only after the compute that last read it has finished.

    Stall time is measured on the GPU: when compute must wait on a copy that has not finished, a pair
    of timing events brackets the wait on the compute stream, and the time between them (how long
    compute really sat idle) is read back later, when the counters are read."""

    def __init__(self, n_slots: int, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in range(n_slots)]
        self.freed = [torch.cuda.Event() for _ in range(n_slots)]
        self._waits: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._stall = 0.0

    def start(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.freed[slot])
            dst.copy_(src, non_blocking=True)
            self.copied[slot].record(self.stream)

    def wait(self, slot: int) -> None:
        ev = self.copied[slot]
        if ev.query():  # copied already: nothing to wait for
            return
        compute = torch.cuda.current_stream(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(compute)
        compute.wait_event(ev)
        end.record(compute)
        self._waits.append((begin, end))
        self._collect(block=False)

    def release(self, slot: int) -> None:
        self.freed[slot].record(torch.cuda.current_stream(self.device))

    def _collect(self, block: bool) -> None:
        while self._waits:
            begin, end = self._waits[0]
            if not block and not end.query():
                return
            end.synchronize()
            self._stall += begin.elapsed_time(end) / 1e3
            self._waits.popleft()

    def take_stall_s(self) -> float:
        """GPU seconds compute waited on copies since the last call (waits for pending measurements)."""
        self._collect(block=True)
        s, self._stall = self._stall, 0.0
        return s


# -- the per-layer LRU cache -------------------------------------------------------------------
class _LayerSlots:
    """K device slots of one layer: which expert each holds, in least-recently-used order."""

    def __init__(self, buffers: list[torch.Tensor], first_slot: int, layout: ExpertLayout) -> None:
        self.buffers = buffers
        self.first_slot = first_slot  # global number of this layer's slot 0 (for the transfer)
        self.modules = [make_expert(*layout.unpack(b)) for b in buffers]
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert id -> slot, oldest first
        self.free = list(range(len(buffers)))
        self.prefetched: set[int] = set()  # brought in by prefetch, not used since
        self.busy: set[int] = set()  # needed by the call in progress: never evicted

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
    """Per-layer LRU cache of expert slots on the compute device, fed from an `ExpertStore`.

    All slots of all layers are one device allocation (layers x K x `layout.nbytes`), so the
    allocator adds no per-slot rounding. Copy order: `run` issues the copies of the experts the
    current call needs before it returns; `prefetch` is called after it (see `model.Lookahead`), so
    speculative copies queue behind demand copies on the copy stream. While a call still has
    missing experts waiting for a slot (a prefill needing more experts than slots), prefetch does
    nothing: a wrong guess must never delay a needed expert."""

    def __init__(self, store: ExpertStore, slots_per_layer: int, device: torch.device, prefetch: bool = True,
                 transfer: SyncTransfer | CudaTransfer | None = None) -> None:
        self.cpu: CpuExperts | None = None  # set by `use_cpu_experts`
        if not 1 <= slots_per_layer <= store.n_experts:
            raise ValueError(f"slots per layer must be in [1, {store.n_experts}], got {slots_per_layer}")
        self.store = store
        self.device = device
        self.prefetch_enabled = prefetch
        self._stats = CacheStats(slots_per_layer=slots_per_layer)
        K, nb, n_slots = slots_per_layer, store.layout.nbytes, store.n_layers * slots_per_layer
        self.slab = torch.empty(n_slots * nb, dtype=torch.uint8, device=device)
        if transfer is None:
            transfer = CudaTransfer(n_slots, device) if device.type == "cuda" else SyncTransfer()
        self.transfer = transfer
        if isinstance(transfer, CudaTransfer):
            # The copy stream writes the slots: when this cache is dropped, the allocator must not hand
            # the memory out again before that stream's copies (an unused prefetch, say) are done.
            self.slab.record_stream(transfer.stream)
        self.layers = [
            _LayerSlots([self.slab[(L * K + s) * nb:(L * K + s + 1) * nb] for s in range(K)], L * K, store.layout)
            for L in range(store.n_layers)
        ]
        self._waiting_for_slot = False  # a call in progress has demand copies not issued yet

    @property
    def stats(self) -> CacheStats:
        """The counters, with the stall time measured so far folded in."""
        self._stats.stall_s += self.transfer.take_stall_s()
        return self._stats

    def reset_stats(self) -> None:
        """Zero the counters; experts prefetched before now no longer count as prefetch hits."""
        self.transfer.take_stall_s()
        self._stats.reset()
        for slots in self.layers:
            slots.prefetched.clear()

    def use_cpu_experts(self, cpu: CpuExperts | None) -> None:
        """Let `cpu` compute the decode misses its policy picks, instead of copying them (None: always copy)."""
        self.cpu = cpu

    def resident(self, layer: int) -> list[int]:
        """Expert ids on the device for `layer`, least recently used first."""
        return list(self.layers[layer].lru)

    def _load(self, layer: int, eid: int, keep: set[int]) -> bool:
        slots = self.layers[layer]
        slot = slots.victim(keep)
        if slot is None:
            return False
        self.transfer.start(slots.first_slot + slot, slots.buffers[slot], self.store.buffers[layer][eid])
        if self.device.type != "cuda":
            # The CPU paths' prepared form may hold values read from the old contents: rebuild it.
            # On CUDA it only views the slot's buffer (`kernels.dispatch.prepare`: a bitsandbytes
            # QuantState over the stored parts, or nothing), so it stays valid across refills and is
            # built once per slot; rebuilding it per refill would copy code tables (host syncs).
            for m in slots.modules[slot].modules():
                if isinstance(m, QuantLinear):
                    m.invalidate_prepared()
        slots.lru[eid] = slot
        self._stats.bytes_to_device += self.store.layout.nbytes
        return True

    def run(self, layer: int, expert_ids: Sequence[int], uses: Sequence[int]) -> Iterator[tuple[int, ExpertFn]]:
        """Count the uses, start copying the missing experts (as many as there are slots to take),
        and return the iterator that hands the experts out, resident ones first."""
        slots = self.layers[layer]
        n_uses = dict(zip(expert_ids, uses, strict=True))
        slots.busy = set(expert_ids)  # never evicted until used in this call
        # Experts already on the device (or arriving) first, so missing ones copy while they compute.
        order = [e for e in expert_ids if e in slots.lru] + [e for e in expert_ids if e not in slots.lru]
        missing = [e for e in order if e not in slots.lru]
        self._stats.misses += len(missing)
        for eid in order:
            self._stats.hits += n_uses[eid] - (1 if eid in missing else 0)
            if eid in slots.prefetched:
                slots.prefetched.discard(eid)
                self._stats.prefetch_hits += 1
        on_cpu = self.cpu.split(missing) if self.cpu is not None and missing and self.cpu.applies(uses) else []
        if on_cpu:
            self._stats.cpu_experts += len(on_cpu)
            missing = [e for e in missing if e not in on_cpu]
            order = [e for e in order if e not in on_cpu] + on_cpu  # collected last
        self._issue(layer, missing, slots.busy)
        return self._hand_out(layer, order, missing, self.cpu.jobs(layer, on_cpu) if on_cpu else None)

    def _issue(self, layer: int, missing: list[int], keep: set[int]) -> None:
        while missing and self._load(layer, missing[0], keep):
            missing.pop(0)
        self._waiting_for_slot = bool(missing)

    def _hand_out(self, layer: int, order: list[int], missing: list[int], cpu_jobs: CpuJobs | None
                  ) -> Iterator[tuple[int, ExpertFn]]:
        slots = self.layers[layer]
        pending = slots.busy
        try:
            for eid in order:
                if cpu_jobs is not None and eid in cpu_jobs.eids:
                    yield eid, cpu_jobs.result(eid)
                    pending.discard(eid)
                    continue
                if eid not in slots.lru:  # a slot frees up only as earlier experts finish
                    if not self._load(layer, eid, pending):
                        raise RuntimeError("no expert slot free: slots per layer is below the number needed at once")
                    missing.remove(eid)
                slot = slots.lru[eid]
                self.transfer.wait(slots.first_slot + slot)
                slots.lru.move_to_end(eid)
                expert = slots.modules[slot]
                yield eid, (cpu_jobs.starting(expert) if cpu_jobs is not None else expert)
                self.transfer.release(slots.first_slot + slot)
                pending.discard(eid)
                self._issue(layer, missing, pending)
        finally:
            slots.busy = set()
            self._waiting_for_slot = False

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        if not self.prefetch_enabled or layer >= len(self.layers) or self._waiting_for_slot:
            return
        slots = self.layers[layer]
        wanted = set(expert_ids)
        for eid in expert_ids:
            if eid not in slots.lru and self._load(layer, eid, wanted):
                slots.prefetched.add(eid)
                self._stats.prefetches += 1
