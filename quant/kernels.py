"""Matrix multiplication with quantized weights, one fast path per format and device.

``matmul(x, qt)`` computes ``x @ dequantize(qt).T`` (``x [..., in] -> [..., out]`` in ``x.dtype``).
Paths, each tested against ``reference_matmul``:

======================  ======  ===========================================================
path                    format  when
======================  ======  ===========================================================
``bnb_cpu_nf4``         nf4     CPU, x bfloat16, bitsandbytes with its AVX512-BF16 kernel.
                                Needs the weight repacked into bitsandbytes' CPU layout
                                (done by ``prepare``, kept in memory only).
``int8_groups``         int8    CPU, x float32/bfloat16/float16, at most ``INT8_GROUPS_MAX_TOKENS``
                                tokens: ``torch.ops.aten._weight_int8pack_mm`` is per-row only,
                                so it runs once per scale block on that block's columns with
                                that block's scales and the partial products are summed in
                                float32. Exact up to summation order.
``bnb_cuda_nf4``        nf4     CUDA: ``bitsandbytes.matmul_4bit`` on a ``QuantState`` built
                                from the stored parts (its batch-1 gemv kernel when decoding).
``dequant``             both    everywhere else: dequantize to ``x.dtype``, then ``F.linear``.
======================  ======  ===========================================================

Not used: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` only represents evenly spaced 4-bit
levels (``(q - 8) * scale + zero``), which cannot express NF4's code book, and ``gemv_4bit``
on the standard (non-repacked) layout gives wrong results on CPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .formats import DYNAMIC_CODE, NESTED_BLOCK, NF4_CODE, QuantizedTensor, dequantize, nf4_absmax

# Above this many tokens the per-block int8 products lose to dequantize + dense matmul
# (measured by benchmarks/bench_quant.py on a 14336x4096 matrix).
INT8_GROUPS_MAX_TOKENS = 32
_BNB_CPU_BLOCK_N = 32  # rows per tile of bitsandbytes' CPU 4-bit layout


@functools.cache
def _bnb():
    # bitsandbytes logs a warning at import when the optional `kernels` package is absent; its
    # built-in CPU kernel is used then, so keep the user's terminal clean.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except Exception:  # missing, or no usable native library
        return None
    return bitsandbytes


@functools.cache
def bnb_cpu_nf4_available() -> bool:
    """bitsandbytes' fused 4-bit CPU kernel is present (it needs AVX512-BF16)."""
    bnb = _bnb()
    if bnb is None:
        return False
    try:
        if not bnb.functional.has_avx512bf16():
            return False
        return torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::gemv_4bit", "CPU")
    except Exception:
        return False


@functools.cache
def int8pack_available() -> bool:
    try:
        x = torch.ones(1, 4)
        y = torch.ops.aten._weight_int8pack_mm(x, torch.ones(2, 4, dtype=torch.int8), torch.ones(2))
        return bool(torch.equal(y, torch.full((1, 2), 4.0)))
    except Exception:
        return False


@dataclass
class Prepared:
    """Device-specific derived tensors for one ``QuantizedTensor``; never written to disk."""

    device: torch.device
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # lazily built per compute dtype
    quant_state: object | None = None  # bitsandbytes QuantState on CUDA

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def pack_nf4_for_bnb_cpu(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack nf4 into bitsandbytes' CPU kernel layout: ``([O, I/2] uint8, [I/64, O] bf16)``.

    Within each tile of 32 output rows and each pair of input columns ``(2k, 2k+1)``, one 64-byte
    run holds the 32 rows' column-``2k`` codes in its first half and column-``2k+1`` codes in its
    second half; byte ``j`` of a run is ``(hi[j] << 4) | lo[j]`` with ``lo`` the first 32 codes
    and ``hi`` the last 32.
    """
    out_f, in_f = qt.shape
    packed = qt.parts["qweight"].view(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(out_f // _BNB_CPU_BLOCK_N, _BNB_CPU_BLOCK_N, in_f // 2, 2)
    runs = codes.transpose(1, 2).reshape(-1, 2 * _BNB_CPU_BLOCK_N)
    weight = ((runs[:, _BNB_CPU_BLOCK_N:] << 4) | runs[:, :_BNB_CPU_BLOCK_N]).reshape(out_f, in_f // 2)
    absmax = nf4_absmax(qt).view(out_f, in_f // qt.spec.group_size).T.to(torch.bfloat16).contiguous()
    return weight, absmax


def _cuda_quant_state(qt: QuantizedTensor):
    from bitsandbytes.functional import QuantState

    dev = qt.device
    p = qt.parts
    state2 = QuantState(absmax=p["scales_absmax"], code=DYNAMIC_CODE.to(dev), blocksize=NESTED_BLOCK, dtype=torch.float32)
    return QuantState(
        absmax=p["scales"],
        shape=torch.Size(qt.shape),
        code=NF4_CODE.to(dev),
        blocksize=qt.spec.group_size,
        quant_type="nf4",
        dtype=torch.bfloat16,
        offset=p["scales_offset"].reshape(()),
        state2=state2,
    )


def prepare(qt: QuantizedTensor) -> Prepared:
    """Build what the fast paths for ``qt``'s device need (repacked weights, kernel state)."""
    dev = qt.device
    prep = Prepared(dev)
    if dev.type == "cpu":
        out_f, in_f = qt.shape
        if qt.spec.name == "nf4" and bnb_cpu_nf4_available() and out_f % _BNB_CPU_BLOCK_N == 0:
            prep.tensors["bnb_weight"], prep.tensors["bnb_absmax"] = pack_nf4_for_bnb_cpu(qt)
        if qt.spec.name == "int8" and int8pack_available():
            gs = qt.spec.group_size
            # [G, O, gs]: each block's columns contiguous, as the int8 kernel wants them
            # A fresh (allocator-aligned) copy: the int8 kernel crashes on weights that are not
            # 64-byte aligned, and with one group the transpose would return the stored tensor itself.
            prep.tensors["groups"] = qt.parts["qweight"].view(out_f, -1, gs).transpose(0, 1).clone(
                memory_format=torch.contiguous_format)
            prep.tensors["group_scales"] = qt.parts["scales"].T.contiguous()
    elif dev.type == "cuda" and qt.spec.name == "nf4" and _bnb() is not None:
        prep.quant_state = _cuda_quant_state(qt)
    return prep


def select_path(x: torch.Tensor, qt: QuantizedTensor, prepared: Prepared) -> str:
    """The path ``matmul`` takes for input ``x``."""
    dev = qt.device.type
    tokens = x.numel() // x.shape[-1] if x.numel() else 0
    if dev == "cpu":
        if "bnb_weight" in prepared.tensors and x.dtype == torch.bfloat16:
            return "bnb_cpu_nf4"
        if "groups" in prepared.tensors and tokens <= INT8_GROUPS_MAX_TOKENS and x.dtype in (
            torch.float32, torch.bfloat16, torch.float16
        ):
            return "int8_groups"
    elif dev == "cuda" and prepared.quant_state is not None and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return "bnb_cuda_nf4"
    return "dequant"


def available_paths(x: torch.Tensor, qt: QuantizedTensor, prepared: Prepared) -> list[str]:
    """Every path that can run ``x`` through ``qt`` here (for tests and benchmarks)."""
    paths = ["dequant"]
    if qt.device.type == "cpu":
        if "bnb_weight" in prepared.tensors:
            paths.append("bnb_cpu_nf4")
        if "groups" in prepared.tensors and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            paths.append("int8_groups")
    elif prepared.quant_state is not None:
        paths.append("bnb_cuda_nf4")
    return paths


def _bnb_cpu_nf4(x2: torch.Tensor, qt: QuantizedTensor, prep: Prepared) -> torch.Tensor:
    code = prep.cache.get("code")
    if code is None:
        code = prep.cache["code"] = NF4_CODE.clone()
    w, absmax = prep.tensors["bnb_weight"], prep.tensors["bnb_absmax"]
    y = torch.ops.bitsandbytes.gemv_4bit.default(
        x2.to(torch.bfloat16).contiguous(), w, list(qt.shape), absmax, code, qt.spec.group_size
    )
    return y.to(x2.dtype)


def _int8_groups(x2: torch.Tensor, qt: QuantizedTensor, prep: Prepared) -> torch.Tensor:
    groups = prep.tensors["groups"]  # [G, O, gs] int8
    key = ("scales", x2.dtype)
    scales = prep.cache.get(key)
    if scales is None:
        scales = prep.cache[key] = prep.tensors["group_scales"].to(x2.dtype)  # [G, O]
    n_groups, _, gs = groups.shape
    xg = x2.view(x2.shape[0], n_groups, gs)
    acc = torch.zeros(x2.shape[0], qt.shape[0], dtype=torch.float32)
    for g in range(n_groups):
        acc += torch.ops.aten._weight_int8pack_mm(xg[:, g].contiguous(), groups[g], scales[g])
    return acc.to(x2.dtype)


def _bnb_cuda_nf4(x2: torch.Tensor, qt: QuantizedTensor, prep: Prepared) -> torch.Tensor:
    import bitsandbytes as bnb

    qs = prep.quant_state
    qs.dtype = x2.dtype
    # the transposed view is how bitsandbytes' Linear4bit passes its weight
    return bnb.matmul_4bit(x2, qt.parts["qweight"].t(), quant_state=qs)


def _dequant(x2: torch.Tensor, qt: QuantizedTensor, prep: Prepared | None = None) -> torch.Tensor:
    return F.linear(x2, dequantize(qt, x2.dtype))


_PATHS = {"bnb_cpu_nf4": _bnb_cpu_nf4, "int8_groups": _int8_groups, "bnb_cuda_nf4": _bnb_cuda_nf4, "dequant": _dequant}


@torch.no_grad()
def matmul(x: torch.Tensor, qt: QuantizedTensor, prepared: Prepared | None = None, *, path: str | None = None) -> torch.Tensor:
    """``x [..., in] @ W.T -> [..., out]`` in ``x.dtype``, on the fastest correct path here.

    Pass the ``prepare(qt)`` result (``QuantLinear`` caches it); without it, it is built for this
    call only. ``path`` forces a path (it must be available).
    """
    if x.shape[-1] != qt.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, weight expects {qt.shape[1]}")
    if prepared is None:
        prepared = prepare(qt)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*lead, qt.shape[0])
    if path is None:
        path = select_path(x2, qt, prepared)
    elif path not in available_paths(x2, qt, prepared):
        raise ValueError(f"path {path!r} is not available for {qt.spec.name} on {qt.device} with {x.dtype}")
    y = _PATHS[path](x2, qt, prepared)
    return y.reshape(*lead, qt.shape[0])


@torch.no_grad()
def reference_matmul(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """Dequantize to ``x.dtype``, then ``x @ w.T``."""
    return x @ dequantize(qt, x.dtype).T
