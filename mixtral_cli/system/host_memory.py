"""The weights a CPU run computes from, in one anonymous mapping with transparent huge pages requested.

A CPU decode step streams every weight it uses from memory, so where those bytes lie matters.
Measured on the AVX2 machine (2-layer real-shape slice, 2 threads, interleaved): decode from the
memory-mapped safetensors pages (file-backed, 4 KiB) ran at 22.2-24.0 tok/s at 8 bits; from a copy
in anonymous memory 24.7-24.9; from anonymous memory with huge pages 25.0-25.9 (4 bits: 26.8-27.4
-> 30.6-31.4). Huge pages also spare the page walks of a stream that crosses a 4 KiB page every
few microseconds.

So a CPU run reads each weight straight from its file into a ``HostArena`` (``Checkpoint.tensor(...,
into=arena)``: a plain read, no file mapping, so the resident size is the arena and not the arena
plus the mapped file), when the arena fits in the RAM available (``arena_fits``: ``MemAvailable``
less 2 GiB for the system). A model larger than that stays memory-mapped, where the kernel can page
it from the file instead of failing. The arena is one private anonymous mapping
(``experts.anonymous_mapping``, as for the expert store) whose block starts on a 2 MiB boundary,
advised ``MADV_HUGEPAGE`` where the platform has it (Linux; the kernel's ``transparent_hugepage``
setting decides), holding the tensors back to back at 64-byte alignment.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable

import torch

from ..checkpoints.config import ModelArgs
from ..checkpoints.reader import EXPERT_PROJS, expert_shape, shared_shapes
from ..engine.experts import HOST_HEADROOM, anonymous_mapping, mem_available
from ..kernels.formats import QuantizedTensor, QuantSpec

HUGE_PAGE = 2 << 20
ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


EMBEDDING = "model.embed_tokens.weight"


def streamed_shared(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The shared (non-expert) weights a decode step reads whole, with their shapes: all but the embedding
    table, of which a step reads one row (unless the output layer shares it). These go to the arena;
    the embedding stays in the memory-mapped file, where only the rows used are ever resident."""
    shapes = shared_shapes(args)
    return shapes if args.tie_word_embeddings else {k: v for k, v in shapes.items() if k != EMBEDDING}


def weight_bytes(args: ModelArgs, quant: QuantSpec | None, dtype: torch.dtype, experts: bool) -> int:
    """Arena bytes for the streamed shared weights in ``dtype`` and, with ``experts``, every expert (its
    stored parts when quantized, else in ``dtype``), each rounded up to the arena's alignment."""
    total = sum(_aligned(tensor_bytes(shape, dtype)) for shape in streamed_shared(args).values())
    if experts:
        per_expert = 0
        for proj in EXPERT_PROJS:
            shape = expert_shape(args, proj)
            if quant is None:
                per_expert += _aligned(tensor_bytes(shape, dtype))
            else:
                per_expert += sum(_aligned(tensor_bytes(s, d)) for s, d in QuantizedTensor.expected_parts(quant, shape).values())
        total += per_expert * args.num_hidden_layers * args.num_local_experts
    return total


def arena_fits(nbytes: int, available: Callable[[], int | None] = mem_available) -> bool:
    """Whether an arena of ``nbytes`` leaves the system ``HOST_HEADROOM`` of the RAM available now
    (True where that cannot be read)."""
    have = available()
    return have is None or nbytes + HOST_HEADROOM <= have


class HostArena:
    """A bump allocator over one block of host memory (see the module docstring). Tensors it hands out
    are views of the block and keep it alive; it is never freed piecemeal."""

    def __init__(self, nbytes: int) -> None:
        self.size, self.used = nbytes, 0
        self.huge_pages = hasattr(mmap, "MADV_HUGEPAGE")
        # No explicit unmapping: `torch.frombuffer` holds the mapping, which goes with the last view.
        block = torch.frombuffer(anonymous_mapping(nbytes + HUGE_PAGE, huge_pages=True), dtype=torch.uint8)
        start = (-block.data_ptr()) % HUGE_PAGE
        self._block = block[start:start + nbytes]

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the arena."""
        n = tensor_bytes(shape, dtype)
        at = _aligned(self.used)
        if at + n > self.size:
            raise RuntimeError(f"host arena of {self.size} bytes cannot hold {n} more at {at}")
        self.used = at + n
        return self._block[at:at + n].view(dtype).view(shape)

    def copy(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` (converted to ``dtype``) copied into the arena."""
        out = self.alloc(tuple(t.shape), dtype or t.dtype)
        out.copy_(t)
        return out

    def copy_weight(self, w: torch.Tensor | QuantizedTensor, dtype: torch.dtype | None = None
                    ) -> torch.Tensor | QuantizedTensor:
        """A stored weight copied into the arena: dense in ``dtype``, quantized parts as they are."""
        if isinstance(w, QuantizedTensor):
            return QuantizedTensor(w.spec, w.shape, {k: self.copy(v) for k, v in w.parts.items()})
        return self.copy(w, dtype)
