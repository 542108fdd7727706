"""Bias-free linear layers for inference: ``QuantLinear`` (a ``QuantizedTensor`` weight), ``QuantSwiGLU``
(an expert of three of them) and ``DenseLinear`` (a dense weight, multiplied on the fastest path for the call: the native GEMV for a
few tokens on the CPU, torch otherwise)."""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import Prepared, dense_matmul, matmul, prepare, swiglu
from .formats import QuantizedTensor, QuantSpec


class QuantLinear(nn.Module):
    """Holds the stored parts as buffers (so ``.to(device)`` moves them and ``state_dict`` holds
    ``<name>.qweight``, ``<name>.scales``, ...); the device-specific prepared form is cached on
    the module, rebuilt after a move, and never saved."""

    def __init__(self, qt: QuantizedTensor) -> None:
        super().__init__()
        self.spec: QuantSpec = qt.spec
        self.out_features, self.in_features = qt.shape
        for name, t in qt.parts.items():
            self.register_buffer(name, t)
        self._part_names = tuple(qt.parts)
        self._qt: QuantizedTensor | None = None  # a view of the buffers, built once per placement
        self._prepared: Prepared | None = None

    @property
    def qt(self) -> QuantizedTensor:
        if self._qt is None:
            parts = {name: getattr(self, name) for name in self._part_names}
            self._qt = QuantizedTensor(self.spec, (self.out_features, self.in_features), parts)
        return self._qt

    def prepared(self) -> Prepared:
        if self._prepared is None or self._prepared.device != self.qt.device:
            self._prepared = prepare(self.qt)
        return self._prepared

    def invalidate_prepared(self) -> None:
        """Drop the prepared form: the stored parts were overwritten in place (an offload slot refill)."""
        self._prepared = None

    def _apply(self, fn, recurse=True):  # a move or cast replaces the buffers: rebuild the view and the prepared form
        self._qt = self._prepared = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.qt, self.prepared())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.spec.name}, group_size={self.spec.group_size}"
        )


class QuantSwiGLU(nn.Module):
    """The SwiGLU expert ``w2(silu(w1 x) * (w3 x))`` over three ``QuantLinear``s (kept as ``w1``, ``w2``,
    ``w3``: the state dict and every use of the layers are those of a plain expert), computed by
    ``kernels.swiglu``: one native call on the CPU where it applies. Each call reads the layers'
    current parts and prepared forms, so in-place refills and ``invalidate_prepared`` carry over."""

    def __init__(self, w1: QuantLinear, w2: QuantLinear, w3: QuantLinear) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = (self.w1, self.w3, self.w2)
        return swiglu(x, tuple(m.qt for m in lin), tuple(m.prepared() for m in lin))


class DenseLinear(nn.Linear):
    """``nn.Linear`` without bias whose forward goes through ``kernels.dense_matmul``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_matmul(x, self.weight)


def use_dense_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Turn every bias-free ``nn.Linear`` under ``module`` into a ``DenseLinear`` sharing its weight,
    except those whose attribute name is in ``skip``."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and child.bias is None and name not in skip:
            child.__class__ = DenseLinear  # same parameters, same state dict, new forward
        else:
            use_dense_linears(child, skip)
