"""The plain reference every kernel path is tested against: the weight decoded element by element from
the format's definition in float64 (independent of ``formats.dequantize`` and of every kernel), and
``x @ W.T`` with it."""

from __future__ import annotations

import torch

from .formats import DYNAMIC_CODE, NESTED_BLOCK, NF4_CODE, QuantizedTensor


def plain_weight(qt: QuantizedTensor) -> torch.Tensor:
    """The float64 weight decoded element by element from the format's definition (independent of
    ``formats.dequantize`` and of the kernels)."""
    out_f, in_f = qt.shape
    p = {k: v.cpu() for k, v in qt.parts.items()}
    gs = qt.spec.group_size
    if qt.spec.name == "int8":
        return p["qweight"].double() * p["scales"].double().repeat_interleave(gs, dim=1)
    q = p["qweight"].reshape(-1).long()
    codes = torch.stack([q // 16, q % 16], dim=1).reshape(-1)  # element order: high nibble first
    n_blocks = p["scales"].numel()
    second = p["scales_absmax"].double().repeat_interleave(NESTED_BLOCK)[:n_blocks]
    absmax = DYNAMIC_CODE.double()[p["scales"].long()] * second + p["scales_offset"].double()
    return (NF4_CODE.double()[codes] * absmax.repeat_interleave(gs)).view(out_f, in_f)


@torch.no_grad()
def reference_matmul(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """The plain reference every path is tested against: ``x @ W.T`` in float64, cast to ``x.dtype``."""
    return (x.cpu().double() @ plain_weight(qt).T).to(dtype=x.dtype, device=x.device)
