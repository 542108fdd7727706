"""The row-wise and element-wise steps of a layer: RMSNorm and the rotary embedding.

Each has a torch path (the reference's formula, op by op) and a native path (``kernels.native``: one
call instead of 6-8 small torch ops, which dominate a decode step on the CPU). The native path rounds
exactly where the torch ops do: every product and sum of the rotary embedding is rounded to the
tensor's type (so both paths agree bit for bit), and RMSNorm normalises in float32, rounds, scales and
rounds again (its sum of squares is taken in another order, so results may differ in the last bit).
``pointwise_path`` picks: ``native`` for CPU tensors of float32, bfloat16 or float16 when the kernels
are built, else ``torch``.
"""

from __future__ import annotations

import torch

from . import native


def pointwise_path(x: torch.Tensor) -> str:
    if x.device.type == "cpu" and x.dtype in native.TYPES and native.available():
        return "native"
    return "torch"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, path: str | None = None) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension of ``x [..., n]``: normalised in
    float32, rounded to ``x.dtype``, then scaled in the compute dtype (as the reference implementation
    does); ``weight [n]`` in ``x.dtype``."""
    if (path or pointwise_path(x)) == "native" and weight.dtype == x.dtype:
        return native.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, path: str | None = None) -> torch.Tensor:
    """The rotary embedding of ``x [heads, T, Hd]`` with ``cos, sin [T, Hd]`` (half-split convention):
    ``x * cos + rotate_half(x) * sin``. The native path rotates ``x`` in place and returns it; the torch
    path returns a new tensor. Either way the caller uses the result and not ``x``."""
    if (path or pointwise_path(x)) == "native" and x.stride(-1) == 1 and cos.dtype == x.dtype:
        return native.rope_(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
