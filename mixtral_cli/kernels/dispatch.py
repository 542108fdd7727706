"""Matrix multiplication with quantized weights, one fast path per format and device.

``matmul(x, qt)`` computes ``x @ dequantize(qt).T`` (``x [..., in] -> [..., out]`` in ``x.dtype``).
Every path is tested against ``reference_matmul``. ``PATHS`` is the one table of paths: each entry
says which format and device it serves, whether it can run here (``usable``), and up to how many
tokens it is preferred; ``select_path`` takes the first usable, preferred entry, ``dequant`` last.

======================  ======  ===========================================================
path                    format  when
======================  ======  ===========================================================
``native_nf4``          nf4     CPU, the project's SIMD kernel (``kernels.native``) on the
                                stored layout: activations quantized to int8 per 64
                                (nibble-ordered) elements, nf4 levels as int8 (code x 63).
                                Inexact: relative error ~1e-2 of the output (see tests).
``native_int8``         int8    CPU, the same kernel family: int8 x int8 products with the
                                activations quantized per 32 elements. Relative error ~5e-3.
``bnb_cuda_nf4``        nf4     CUDA: ``bitsandbytes.matmul_4bit`` on a ``QuantState`` that
                                views the stored parts. From bitsandbytes 0.50 its fused
                                ``gemm_4bit`` kernel (every call of up to 4 tokens) reads the
                                double-quantized absmax itself (8-bit code, second-level
                                absmax, offset): no per-call absmax kernels. Bigger calls it may
                                serve by dequantize + GEMM, where the absmax is expanded per
                                call: one small kernel next to the matrix's dequantization.
``bnb_cuda_int8``       int8    CUDA: bitsandbytes' ``dequantize_blockwise`` kernel reads this
                                format as is (code ``code[u] = float(int8(u))``, absmax = the
                                scales, block = the group size, a power of two >= 8): one pass
                                from int8 to ``x.dtype`` (3 bytes moved per weight, one
                                ``[out, in]`` transient in ``x.dtype``), then ``F.linear``.
``dequant``             both    everywhere else: dequantize to ``x.dtype`` (nf4 on the CPU
                                through the native kernel, exact), then ``F.linear``. Exact.
======================  ======  ===========================================================

The native paths are preferred up to ``native_max_tokens()`` tokens per call (on CPUs without
AVX512-BF16 that is a whole prefill chunk); above it, one exact dequantize plus torch's GEMM is
faster (measurements: docs/benchmarks.md 7.3). Inference only: callers run the products under
``torch.inference_mode`` (the model does); the native paths record no autograd graph. Nothing
derived from the stored parts is kept on the CPU: the native kernels read them where they lie
(the CPU run's weight arena, ``mixtral_cli/system/host_memory.py``, or the expert store).

``swiglu(x, (w1, w3, w2))`` runs a SwiGLU expert: one native call (``native.swiglu``) when each of
its three products would take the native path, else three ``matmul`` calls; ``fused_swiglu_ok``
decides.

``decode_attention(q, keys, values)`` is one decode step's attention over the KV cache: the native
one-token kernel on the CPU (``attention_path``; float32 scores, softmax and sums), SDPA elsewhere.
``route(x, gate_weight, k)`` is the MoE router (product, float32 softmax, top-k, renormalised): one
native call where ``dense_path`` takes the native GEMV, torch's ops elsewhere.

The native kernels read activations and write results in the caller's float32, bfloat16 or float16
(converted in C exactly as torch's ``.to`` rounds), so no conversion op surrounds a call.

Not used: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` only represents evenly spaced 4-bit
levels, which cannot express NF4's code book; bitsandbytes' CPU 4-bit kernel needs a repacked
copy of every weight (and AVX512-BF16); ``_weight_int8pack_mm`` is per-row only, so block scales
need one call per block.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import bnb_cuda, native
from .formats import DYNAMIC_CODE, NF4_CODE, QuantizedTensor, dequantize

# Set to force how many tokens per call the native kernels take (benchmarks do); None: measured
# defaults per machine kind, see `native_max_tokens`.
NATIVE_MAX_TOKENS: int | None = None


@functools.cache
def torch_bf16_is_native() -> bool:
    """Whether torch's bf16 GEMM runs natively here: only on CPUs with AVX512-BF16, and only when
    ``ATEN_CPU_CAPABILITY`` does not send torch's kernels down their AVX2 or scalar paths."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
        return False
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def native_max_tokens(dense_dtype: torch.dtype | None = None) -> int:
    """The most tokens per call for which the native kernels beat dequantize (or convert) + torch's GEMM.

    ``dense_dtype``: the weight dtype of a dense product; None for a quantized one. Without a native
    bf16 GEMM (no AVX512-BF16), torch's bf16 ``F.linear`` converts inside its kernel and loses to the
    native kernels up to a whole prefill chunk, quantized or 16-bit dense: 512; torch's float32 GEMM
    overtakes the native float32 GEMV much sooner: 64 for float32 dense weights. With a native bf16
    GEMM: 16. The measurements: docs/benchmarks.md 7.3."""
    if NATIVE_MAX_TOKENS is not None:
        return NATIVE_MAX_TOKENS
    if torch_bf16_is_native():
        return 16
    return 64 if dense_dtype == torch.float32 else 512

# nf4 levels as int8 for the native kernel: round(code * 63); -1 and 1 map to -63 and 63. Seven bits
# let the AVX2 kernel use level + 63 as the unsigned operand of its byte products (no sign trick);
# rounding the levels adds ~0.4% of the block absmax at most, next to nf4's own steps of 8-28%.
NF4_LEVELS_I8 = torch.round(NF4_CODE * 63).to(torch.int8)


@dataclass
class Prepared:
    """Device-specific state for one ``QuantizedTensor``; never written to disk."""

    device: torch.device
    cache: dict = field(default_factory=dict)  # small per-dtype derivatives (the nf4 offset, the usable paths)
    quant_state: object | None = None  # bitsandbytes QuantState on CUDA


def prepare(qt: QuantizedTensor) -> Prepared:
    """Build what the fast paths for ``qt``'s device need (kernel state; never a weight copy on CPU).
    On CUDA it holds only views of the stored parts and per-device tables, so it survives in-place
    refills (``mixtral_cli.experts`` relies on that and builds it once per slot)."""
    prep = Prepared(qt.device)
    if bnb_cuda.supported(qt):
        prep.quant_state = bnb_cuda.quant_state(qt)
    return prep


def _native_nf4(x2: torch.Tensor, qt: QuantizedTensor, prep: Prepared | None = None, isa: str | None = None) -> torch.Tensor:
    p = qt.parts
    return native.nf4_matmul(x2, p["qweight"], p["scales"], p["scales_absmax"], _nf4_offset(qt, prep), qt.shape,
                             qt.spec.group_size, DYNAMIC_CODE, NF4_LEVELS_I8, isa, out_dtype=x2.dtype)


def _native_int8(x2: torch.Tensor, qt: QuantizedTensor, prep: Prepared | None = None, isa: str | None = None) -> torch.Tensor:
    return native.int8_matmul(x2, qt.parts["qweight"], qt.parts["scales"], qt.spec.group_size, isa,
                              out_dtype=x2.dtype)


def _nf4_offset(qt: QuantizedTensor, prep: Prepared | None) -> float:
    if prep is None:
        return float(qt.parts["scales_offset"])
    if "offset" not in prep.cache:
        prep.cache["offset"] = float(qt.parts["scales_offset"])
    return prep.cache["offset"]


def dequantize_fast(qt: QuantizedTensor, dtype: torch.dtype, isa: str | None = None) -> torch.Tensor:
    """``dequantize(qt, dtype)``, through the native kernel for nf4 on the CPU when it is built (exact)."""
    if qt.device.type == "cpu" and qt.spec.name == "nf4" and native.available():
        p = qt.parts
        w = native.nf4_dequantize(p["qweight"], p["scales"], p["scales_absmax"], float(p["scales_offset"]),
                                  qt.shape, qt.spec.group_size, DYNAMIC_CODE, NF4_CODE, isa)
        return w.to(dtype)
    return dequantize(qt, dtype)


def _native_nf4_usable(qt: QuantizedTensor, prep: Prepared, dtype: torch.dtype) -> bool:
    return native.available() and qt.spec.group_size % 64 == 0 and qt.shape[1] % 64 == 0


def _native_int8_usable(qt: QuantizedTensor, prep: Prepared, dtype: torch.dtype) -> bool:
    return native.available() and qt.spec.group_size % 32 == 0


@dataclass(frozen=True)
class KernelPath:
    name: str
    format: str | None  # None: any format
    device: str | None  # None: any device
    usable: Callable[[QuantizedTensor, Prepared, torch.dtype], bool]  # for activations of that dtype
    few_tokens: bool  # preferred only up to native_max_tokens() tokens per call
    run: Callable[..., torch.Tensor]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def _bnb_cuda_usable(qt: QuantizedTensor, prep: Prepared, dtype: torch.dtype) -> bool:
    return prep.quant_state is not None and bnb_cuda.probe(qt.device, qt.spec.name, dtype)


def _dequant(x2: torch.Tensor, qt: QuantizedTensor, prep: Prepared | None = None, isa: str | None = None) -> torch.Tensor:
    return F.linear(x2, dequantize_fast(qt, x2.dtype, isa))


PATHS: tuple[KernelPath, ...] = (
    KernelPath("native_nf4", "nf4", "cpu", _native_nf4_usable, True, _native_nf4),
    KernelPath("native_int8", "int8", "cpu", _native_int8_usable, True, _native_int8),
    KernelPath("bnb_cuda_nf4", "nf4", "cuda", _bnb_cuda_usable, False,
               lambda x2, qt, prep, isa=None: bnb_cuda.nf4_matmul(x2, qt, prep.quant_state)),
    KernelPath("bnb_cuda_int8", "int8", "cuda", _bnb_cuda_usable, False,
               lambda x2, qt, prep, isa=None: bnb_cuda.int8_matmul(x2, qt, prep.quant_state)),
    KernelPath("dequant", None, None, lambda qt, prep, dtype: True, False, _dequant),
)
_BY_NAME = {p.name: p for p in PATHS}


def available_paths(x: torch.Tensor, qt: QuantizedTensor, prepared: Prepared) -> list[str]:
    """Every path that can run ``x`` through ``qt`` here, in order of preference."""
    return [
        p.name for p in PATHS
        if p.format in (None, qt.spec.name) and p.device in (None, qt.device.type)
        and x.dtype in p.dtypes and p.usable(qt, prepared, x.dtype)
    ]


def select_path(x: torch.Tensor, qt: QuantizedTensor, prepared: Prepared) -> str:
    """The path ``matmul`` takes for input ``x``: the first available path preferred at this many tokens."""
    tokens = x.numel() // x.shape[-1] if x.numel() else 0
    key = ("paths", x.dtype)  # what is available does not change for a prepared tensor and a dtype
    if key not in prepared.cache:
        prepared.cache[key] = available_paths(x, qt, prepared)
    for name in prepared.cache[key]:
        if not _BY_NAME[name].few_tokens or tokens <= native_max_tokens():
            return name
    return "dequant"


def dense_path(x: torch.Tensor, weight: torch.Tensor) -> str:
    """``native_dense`` (the native GEMV, float32 accumulation) for few tokens on the CPU, else ``torch``."""
    tokens = x.numel() // x.shape[-1] if x.numel() else 0
    if (weight.device.type == "cpu" and 0 < tokens <= native_max_tokens(weight.dtype)
            and weight.dtype in native.TYPES
            and weight.is_contiguous() and native.available()):
        return "native_dense"
    return "torch"


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, *, path: str | None = None, isa: str | None = None
                 ) -> torch.Tensor:
    """``F.linear(x, weight)`` for a dense ``weight [out, in]``, in ``x.dtype``, on the faster path here."""
    if (path or dense_path(x, weight)) == "torch":
        return F.linear(x, weight)
    if x.dim() == 2:
        return native.dense_matmul(x, weight, isa, out_dtype=x.dtype)
    y = native.dense_matmul(x.reshape(-1, x.shape[-1]), weight, isa, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, *, path: str | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE router for ``x [T, D]`` and the gate's ``[E, D]`` weight: logits in ``x.dtype``, float32 softmax,
    top-k, renormalised; weights ``[T, k]`` float32 and ids ``[T, k]``. ``native_router`` (one call for the
    product, softmax and selection, ~5 us against ~55 us of torch ops for a decode step) where
    ``dense_path`` takes the native GEMV, else ``torch``. Ties between logits may be broken differently."""
    if (path or ("native_router" if dense_path(x, gate_weight) == "native_dense" else "torch")) == "native_router":
        return native.route(x, gate_weight, top_k)
    probs = F.softmax(F.linear(x, gate_weight).float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, A]
    return weights / weights.sum(dim=-1, keepdim=True), ids


def attention_path(keys: torch.Tensor) -> str:
    """``native_attention`` (the native one-token attention, float32 softmax and sums) for a CPU cache
    of float32/bfloat16/float16, else ``sdpa``. Measured on the AVX2-only machine (docs/benchmarks.md
    7.4): torch's bfloat16/float16 SDPA for one query token is 6-21x slower than the native kernel
    from 40 positions on (its flash kernel is built for many queries), float32 SDPA up to 2x slower."""
    if keys.device.type == "cpu" and keys.dtype in native.TYPES and native.available():
        return "native_attention"
    return "sdpa"


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int = 0, *,
                     path: str | None = None, isa: str | None = None) -> torch.Tensor:
    """Attention of one query token, ``q [H, D]`` over ``keys, values [K, S, D]`` (grouped: query head i
    reads kv head i // (H / K)), attending to positions ``start .. S-1``; ``[H, D]`` in ``q.dtype``."""
    if (path or attention_path(keys)) == "native_attention":
        return native.attention_decode(q, keys, values, start, isa, out_dtype=q.dtype)
    out = F.scaled_dot_product_attention(q[None, :, None], keys[None, :, start:], values[None, :, start:],
                                         enable_gqa=True)  # [1, H, 1, D]
    return out[0, :, 0]


def matmul(x: torch.Tensor, qt: QuantizedTensor, prepared: Prepared | None = None, *, path: str | None = None,
           isa: str | None = None) -> torch.Tensor:
    """``x [..., in] @ W.T -> [..., out]`` in ``x.dtype``, on the fastest correct path here.

    Pass the ``prepare(qt)`` result (``QuantLinear`` caches it); without it, it is built for this
    call only. ``path`` forces a path (it must be available); ``isa`` forces the native kernels'
    instruction set (``kernels.native.isas()``).
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
    y = _BY_NAME[path].run(x2, qt, prepared, isa)
    return y.reshape(*lead, qt.shape[0])


def fused_swiglu_ok(x: torch.Tensor, qts: tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor],
                    preps: tuple[Prepared, Prepared, Prepared]) -> bool:
    """Whether ``swiglu`` takes the one-call native kernel: all three weights in one format and group size
    on the CPU, and the native path the one ``matmul`` would choose for each of them."""
    w1, w3, w2 = qts
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0 or len({(q.spec.name, q.spec.group_size) for q in qts}) != 1:
        return False
    if w1.shape != w3.shape or w2.shape != (w1.shape[1], w1.shape[0]) or x.shape[-1] != w1.shape[1]:
        return False
    want = "native_nf4" if w1.spec.name == "nf4" else "native_int8"
    return all(select_path(x2, q, p) == want for q, p in zip(qts, preps, strict=True))


def _fused_weights(x: torch.Tensor, qts: tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor],
                   preps: tuple[Prepared, Prepared, Prepared]) -> native.SwiGLUWeights | None:
    """The weights as the one-call kernel takes them when ``fused_swiglu_ok``, else None. Kept in w1's
    prepared form per input dtype and token class, and used while w3's and w2's prepared forms are the
    ones it was made with (a refill or a move rebuilds them)."""
    few = x.numel() // x.shape[-1] <= native_max_tokens() if x.numel() else None
    key = ("swiglu", x.dtype, few)
    got = preps[0].cache.get(key)
    if got is None or got[0][0] is not preps[1] or got[0][1] is not preps[2]:
        w = None
        if fused_swiglu_ok(x, qts, preps):
            w1 = qts[0]
            nf4 = w1.spec.name == "nf4"
            offsets = tuple(_nf4_offset(q, p) if nf4 else 0.0 for q, p in zip(qts, preps, strict=True))
            w = native.swiglu_weights(w1.spec.name, tuple(q.parts for q in qts), offsets, w1.shape[1], w1.shape[0],
                                      w1.spec.group_size, DYNAMIC_CODE if nf4 else None,
                                      NF4_LEVELS_I8 if nf4 else None)
        got = preps[0].cache[key] = ((preps[1], preps[2]), w)
    return got[1]


def swiglu(x: torch.Tensor, qts: tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor],
           preps: tuple[Prepared, Prepared, Prepared] | None = None, *, fused: bool | None = None,
           isa: str | None = None) -> torch.Tensor:
    """The SwiGLU expert ``w2(silu(w1 x) * (w3 x))`` for ``qts = (w1, w3, w2)``, in ``x.dtype``.

    One native call when ``fused_swiglu_ok`` (silu and the product in float32 there), else three
    ``matmul`` calls with torch's silu and product in ``x.dtype``. ``fused`` forces either (True must be
    possible here); ``isa`` as for ``matmul``."""
    if preps is None:
        preps = tuple(prepare(q) for q in qts)
    weights = _fused_weights(x, qts, preps)
    if fused and weights is None:
        raise ValueError("the fused SwiGLU kernel cannot run these weights and input here")
    if weights is None or fused is False:
        (w1, w3, w2), (p1, p3, p2) = qts, preps
        return matmul(F.silu(matmul(x, w1, p1, isa=isa)) * matmul(x, w3, p3, isa=isa), w2, p2, isa=isa)
    return native.swiglu(x.reshape(-1, x.shape[-1]), weights, isa, out_dtype=x.dtype).reshape(x.shape)
