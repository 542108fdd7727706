"""`CheckpointSource`: what the loader, the quantizer and the benchmarks read weights from.

Three kinds implement it: `reader.Checkpoint` (safetensors files), and in the bench wing
`SyntheticCheckpoint` (reproducible random weights) and `QuantizingCheckpoint` (a dense checkpoint
quantized as it is read). Each provides `args`, `quant`, `tensor(name)` for the tensors stored dense
and `weight(prefix)` for a linear weight as stored; the rest is built on those here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from ..kernels.formats import QuantizedTensor, dequantize
from .config import ModelArgs
from .layout import Quantization, expert_prefix

if TYPE_CHECKING:
    from ..system.host_memory import HostArena

Weight = torch.Tensor | QuantizedTensor


class CheckpointSource(ABC):
    args: ModelArgs
    quant: Quantization
    # Whether tensors are views of files that the OS pages in and out, so that a CPU run may compute
    # from them in place when its weight arena does not fit (generated weights have no such file).
    memory_mapped: bool = False

    @abstractmethod
    def tensor(self, name: str, into: HostArena | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor stored dense (norms, the router, the embedding, a dense linear weight), by its Hub
        name; with `into`, copied into the arena in `dtype`."""

    @abstractmethod
    def weight(self, prefix: str, into: HostArena | None = None, dtype: torch.dtype | None = None) -> Weight:
        """The linear weight `prefix` (its Hub name without ".weight") as stored: a dense [out, in]
        tensor or a QuantizedTensor (`dtype` applies to a dense weight only)."""

    def expert_weight(self, layer: int, expert: int, proj: str, into: HostArena | None = None,
                      dtype: torch.dtype | None = None) -> Weight:
        return self.weight(expert_prefix(layer, expert, proj), into, dtype)

    def dense_weight(self, prefix: str) -> torch.Tensor:
        """The linear weight `prefix` as a bf16 [out, in] tensor, dequantized when stored quantized."""
        w = self.weight(prefix)
        return dequantize(w, torch.bfloat16) if isinstance(w, QuantizedTensor) else w
