"""Quantized weight formats: specs, storage container, reference quantize/dequantize, the format table.

One job over ~450 lines: what each format is, down to the exact arithmetic of its reference
quantizer, which the native quantizers must match bit for bit; splitting the definition from that
arithmetic would put one format's facts in two files.

Two formats, both weight-only and block-wise along ``in_features`` (the last axis of an
``nn.Linear`` weight ``[out_features, in_features]``):

``nf4`` (4 bits, block 64, ~4.13 bits/weight)
    Exactly the bitsandbytes layout of ``quantize_4bit(w, quant_type="nf4", blocksize=64,
    compress_statistics=True)``, so bitsandbytes' CUDA kernels read it as is:

    ===================  =======================  ============================================
    part                 shape, dtype             meaning
    ===================  =======================  ============================================
    ``qweight``          ``[O*I/2, 1]`` uint8     two NF4 codes per byte, first element in the
                                                  high nibble, row-major over ``[O, I]``
    ``scales``           ``[O*I/64]`` uint8       block absmax, 8-bit "dynamic" code index
    ``scales_absmax``    ``[ceil(O*I/64/256)]``   absmax of each 256-block of ``absmax - offset``
                         float32
    ``scales_offset``    ``[1]`` float32          mean of the block absmax values
    ===================  =======================  ============================================

    ``absmax[b] = DYNAMIC_CODE[scales[b]] * scales_absmax[b // 256] + offset`` and
    ``w[i] = NF4_CODE[q[i]] * absmax[i // 64]``.

``int8`` (8 bits, default block 128, 8.25 bits/weight)
    ``qweight`` ``[O, I]`` int8 in ``[-127, 127]`` and ``scales`` ``[O, I/group]`` float32;
    ``w = qweight * scales`` per block (symmetric absmax).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import native

FORMAT_VERSION: int = 2  # 2: every linear group may be quantized; 1 (experts only) is still read

NF4_BLOCK = 64
NESTED_BLOCK = 256  # block of the second-level (double) quantization of the nf4 absmax
# Default int8 block: 128. Measured on 4096x14336 matrices, int8 error (RMSE) relative to
# block 64 is 1.09x (Gaussian) and 1.21x (Student-t, 4 dof), while per-row scales are 3.4x worse
# on the heavy-tailed matrix. 128 halves the scale overhead of block 64 (0.25 vs 0.5 bits/weight
# with float32 scales) and halves the number of per-group products the CPU int8 kernel runs.
INT8_DEFAULT_GROUP = 128

# NF4 code book (QLoRA), identical to bitsandbytes.functional.get_4bit_type("nf4").
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


def _dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic code book of bitsandbytes (``create_dynamic_map(signed=True)``)."""
    data: list[float] = []
    max_exp, non_sign_bits = 7, 7
    for i in range(max_exp):
        items = 2 ** (i + non_sign_bits - max_exp) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exp - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()  # float32 products
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_code()


ALIGN = 64  # bytes: stored tensors start at multiples of this (files, arena, expert slots) for SIMD reads in place


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of ``ALIGN``."""
    return -(-nbytes // ALIGN) * ALIGN


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class QuantSpec:
    """``name``: "nf4" or "int8"; ``bits``: 4 or 8; ``group_size``: elements per scale block."""

    name: str
    bits: int
    group_size: int

    @property
    def format(self) -> Format:
        """What this spec's format knows about itself (callers ask it instead of comparing names)."""
        return FORMATS[self.name]

    def check_shape(self, shape: tuple[int, int]) -> None:
        out_f, in_f = shape
        if out_f <= 0 or in_f <= 0:
            raise ValueError(f"bad weight shape {shape}")
        if in_f % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide in_features={in_f} of weight {tuple(shape)}"
            )


def _nf4_group_problem(gs: object) -> str | None:
    # The bitsandbytes kernels (and so the on-disk layout) support these block sizes only.
    if gs not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        return f"nf4 group size must be a power of two in 32..4096, got {gs}"
    return None


def _int8_group_problem(gs: object) -> str | None:
    if not isinstance(gs, int) or isinstance(gs, bool) or gs < 2 or gs % 2:
        return f"int8 group size must be an even integer >= 2, got {gs}"
    return None


def spec_for_bits(bits: int, group_size: int | None = None) -> QuantSpec:
    """The format for ``bits`` (4 -> nf4, 8 -> int8), with its default block unless given."""
    fmt = next((f for f in FORMATS.values() if f.bits == bits), None)
    if fmt is None:
        raise ValueError(f"unsupported bits {bits}: expected 4 or 8")
    gs = fmt.default_group if group_size is None else group_size
    problem = fmt.group_problem(gs)
    if problem:
        raise ValueError(problem)
    return QuantSpec(fmt.name, bits, gs)


def _check_spec(spec: QuantSpec) -> None:
    if spec.name not in FORMATS or spec != spec_for_bits(spec.bits, spec.group_size):
        raise ValueError(f"unsupported quantization spec {spec}")


@dataclass
class QuantizedTensor:
    """A quantized ``[out_features, in_features]`` weight: its spec, shape and stored parts."""

    spec: QuantSpec
    shape: tuple[int, int]
    parts: dict[str, torch.Tensor]

    @property
    def device(self) -> torch.device:
        return self.parts["qweight"].device

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": t for name, t in self.parts.items()}

    @staticmethod
    def expected_parts(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every stored part of a weight of ``shape`` in ``spec``."""
        _check_spec(spec)
        spec.check_shape(shape)
        return spec.format.parts(spec.group_size, shape)

    @staticmethod
    def part_bytes(spec: QuantSpec, shape: tuple[int, int]) -> list[int]:
        """Bytes of every stored part of a weight of ``shape`` in ``spec``."""
        return [tensor_bytes(s, d) for s, d in QuantizedTensor.expected_parts(spec, shape).values()]

    @classmethod
    def from_state_dict(
        cls, spec: QuantSpec, shape: tuple[int, int], sd: dict[str, torch.Tensor], prefix: str
    ) -> QuantizedTensor:
        shape = (int(shape[0]), int(shape[1]))
        parts = {}
        for name, (pshape, dtype) in cls.expected_parts(spec, shape).items():
            key = f"{prefix}.{name}"
            if key not in sd:
                raise ValueError(f"missing tensor {key!r} for {spec.name} weight of shape {shape}")
            t = sd[key]
            if tuple(t.shape) != pshape:
                raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {pshape}")
            if t.dtype != dtype:
                raise ValueError(f"tensor {key!r} has dtype {t.dtype}, expected {dtype}")
            parts[name] = t
        return cls(spec, shape, parts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedTensor:
        parts = {k: v.to(device, non_blocking=non_blocking) for k, v in self.parts.items()}
        return QuantizedTensor(self.spec, self.shape, parts)


# ---------------------------------------------------------------------------------------------
# Reference quantizers. They work on CPU in row chunks with reused buffers: fresh full-size
# temporaries cost more than the arithmetic on this kind of machine.

_CHUNK_ELEMS = 1 << 20


def _rows_per_chunk(in_f: int) -> int:
    return max(1, _CHUNK_ELEMS // in_f)


class _CodeIndexer:
    """Nearest-code index for values in [-1, 1], equal to ``bucketize(x, midpoints)``.

    A uniform grid of cells maps x to the number of midpoints below the cell (``lo``); one compare
    against the only midpoint inside the cell (``+inf`` if none) finishes the job. The grid is
    chosen so that no midpoint lies near a cell edge, which makes the result exact even when
    ``(x + 1) * cells`` rounds into the neighbouring cell.
    """

    def __init__(self, code: torch.Tensor) -> None:
        mids = (code[:-1] + code[1:]) / 2
        gap = float((mids[1:] - mids[:-1]).min())
        cells = 2 ** math.ceil(math.log2(4 / gap))  # per unit; cell width <= gap / 4
        while True:
            edges = torch.arange(2 * cells + 2, dtype=torch.float64) / cells - 1
            dist = (mids.double()[None, :] - edges[:, None]).abs().min()
            if dist > 1e-5:
                break
            cells *= 2
        self.cells = cells
        lo = torch.bucketize(edges.float(), mids)  # number of midpoints < edge
        self.lo = lo.to(torch.uint8)
        self.mid = torch.cat([mids, torch.tensor([math.inf])])[lo]
        self.mids = mids

    def __call__(self, x: torch.Tensor, tmp: torch.Tensor, idx: torch.Tensor, out: torch.Tensor,
                 mid: torch.Tensor) -> torch.Tensor:
        torch.add(x, 1.0, out=tmp).mul_(self.cells)
        idx.copy_(tmp)
        torch.index_select(self.lo, 0, idx, out=out)
        torch.index_select(self.mid, 0, idx, out=mid)
        out += x > mid
        return out


_NF4_INDEXER = _CodeIndexer(NF4_CODE)


def _blockwise_dynamic(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic quantization of a 1-D float32 tensor in blocks of 256 (nearest code)."""
    n = a.numel()
    pad = (-n) % NESTED_BLOCK
    ap = torch.nn.functional.pad(a, (0, pad)).view(-1, NESTED_BLOCK)
    absmax = ap.abs().amax(1)
    scaled = torch.clamp(ap * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    q = torch.bucketize(scaled, (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2, out_int32=True)
    return q.to(torch.uint8), absmax


def _nf4_parts(qweight: torch.Tensor, absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored nf4 parts from packed codes and float32 block absmax (double quantization)."""
    offset = absmax.mean()
    qabs, absmax2 = _blockwise_dynamic(absmax - offset)
    return {
        "qweight": qweight.view(-1, 1),
        "scales": qabs,
        "scales_absmax": absmax2,
        "scales_offset": offset.reshape(1),
    }


def _quantize_nf4(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The torch reference of nf4 quantization (the native kernel must match it bit for bit)."""
    out_f, in_f = w.shape
    bs = spec.group_size
    rows = _rows_per_chunk(in_f)
    qweight = torch.empty(out_f * in_f // 2, dtype=torch.uint8)
    absmax = torch.empty(out_f * in_f // bs, dtype=torch.float32)
    cap = rows * in_f
    f, tmp, mid = (torch.empty(cap) for _ in range(3))
    idx = torch.empty(cap, dtype=torch.int32)
    q = torch.empty(cap, dtype=torch.uint8)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        n = (r1 - r0) * in_f
        fc, tc = f[:n], tmp[:n]
        fc.view(r1 - r0, in_f).copy_(w[r0:r1])
        am = absmax[r0 * in_f // bs : r1 * in_f // bs]
        torch.amax(torch.abs(fc, out=tc).view(-1, bs), 1, out=am)
        # same arithmetic as bitsandbytes: x * (1 / absmax), clamped
        fc.view(-1, bs).mul_((1.0 / am.clamp(min=1e-38))[:, None]).clamp_(-1, 1)
        qc = _NF4_INDEXER(fc, tc, idx[:n], q[:n], mid[:n]).view(-1, 2)
        torch.bitwise_or(qc[:, 0] << 4, qc[:, 1], out=qweight[r0 * in_f // 2 : r1 * in_f // 2])
    return _nf4_parts(qweight, absmax)


def _quantize_int8(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The torch reference of int8 quantization (the native kernel must match it bit for bit)."""
    out_f, in_f = w.shape
    gs = spec.group_size
    rows = _rows_per_chunk(in_f)
    qweight = torch.empty(out_f, in_f, dtype=torch.int8)
    scales = torch.empty(out_f, in_f // gs, dtype=torch.float32)
    f, tmp = torch.empty(rows * in_f), torch.empty(rows * in_f)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        n = (r1 - r0) * in_f
        fc, tc = f[:n].view(-1, gs), tmp[:n].view(-1, gs)
        fc.view(r1 - r0, in_f).copy_(w[r0:r1])
        sc = scales[r0:r1].view(-1)
        torch.amax(torch.abs(fc, out=tc), 1, out=sc)
        sc.div_(127.0)
        fc.div_(sc.clamp(min=1e-30)[:, None]).round_().clamp_(-127, 127)
        qweight[r0:r1].view(-1, gs).copy_(fc)
    return {"qweight": qweight, "scales": scales}


# The native quantizers make one pass over the weight: ~10x less memory traffic than the torch
# reference, and one parallel region per matrix, so they hold up on a busy machine.
def _quantize_nf4_native(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    codes, absmax = native.quantize_blocks(w, "nf4", spec.group_size, _NF4_INDEXER.mids)
    return _nf4_parts(codes, absmax)


def _quantize_int8_native(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    codes, scales = native.quantize_blocks(w, "int8", spec.group_size)
    return {"qweight": codes, "scales": scales}


def native_quantize_usable(w: torch.Tensor, spec: QuantSpec) -> bool:
    return w.dtype in native.TYPES and native.available()


@torch.no_grad()
def quantize(w: torch.Tensor, spec: QuantSpec, *, reference: bool = False) -> QuantizedTensor:
    """Quantize a float weight ``[out_features, in_features]`` (any float dtype) on the CPU.

    The native kernel does it when built (bit for bit the same result); ``reference=True`` forces
    the torch implementation."""
    _check_spec(spec)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got shape {tuple(w.shape)} dtype {w.dtype}")
    shape = (int(w.shape[0]), int(w.shape[1]))
    spec.check_shape(shape)
    w = w.detach().to("cpu")
    fmt = spec.format
    native_ok = not reference and native_quantize_usable(w, spec)
    parts = (fmt.quantize_native if native_ok else fmt.quantize_reference)(w, spec)
    return QuantizedTensor(spec, shape, parts)


def nf4_absmax(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 absmax of every nf4 block (undoes the double quantization)."""
    p = qt.parts
    code = device_code("dynamic", p["scales"].device)
    n = p["scales"].numel()
    a = code[p["scales"].long()]
    pad = (-n) % NESTED_BLOCK
    a = torch.nn.functional.pad(a, (0, pad)).view(-1, NESTED_BLOCK) * p["scales_absmax"][:, None]
    return a.reshape(-1)[:n] + p["scales_offset"]


_NF4_PAIRS = torch.stack([NF4_CODE[torch.arange(256) >> 4], NF4_CODE[torch.arange(256) & 0xF]], dim=1)
_CUDA_CHUNK_ELEMS = 1 << 22  # weights per row chunk on a GPU: float32 temporaries of 16 MiB


INT8_CODE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).float()  # code[u] = float(int8(u))
_CODES = {"nf4": NF4_CODE, "dynamic": DYNAMIC_CODE, "int8": INT8_CODE, "nf4_pairs": _NF4_PAIRS}


@functools.cache
def device_code(name: str, device: torch.device) -> torch.Tensor:
    """The code table ``name`` (nf4, dynamic, int8, nf4_pairs) on ``device``, copied there once per
    device: a copy per call is a synchronous host-to-device transfer (a host sync)."""
    return _CODES[name].to(device)


def _dequantize_rows(in_f: int, device: torch.device) -> int:
    """Rows per chunk: the float32 temporaries stay small (in cache on CPU; bounded on a GPU)."""
    return _rows_per_chunk(in_f) if device.type == "cpu" else max(1, _CUDA_CHUNK_ELEMS // in_f)


def _dequantize_nf4(qt: QuantizedTensor, out: torch.Tensor) -> None:
    out_f, in_f = qt.shape
    gs, dev = qt.spec.group_size, out.device
    rows = _dequantize_rows(in_f, dev)
    pairs = device_code("nf4_pairs", dev)  # byte -> (high code, low code)
    packed = qt.parts["qweight"].view(out_f, in_f // 2)
    absmax = nf4_absmax(qt).view(out_f, in_f // gs)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        w = pairs[packed[r0:r1].reshape(-1).long()].view(-1, gs) * absmax[r0:r1].reshape(-1, 1)
        out[r0:r1] = w.view(r1 - r0, in_f)


def _dequantize_int8(qt: QuantizedTensor, out: torch.Tensor) -> None:
    out_f, in_f = qt.shape
    gs = qt.spec.group_size
    rows = _dequantize_rows(in_f, out.device)
    qweight, scales = qt.parts["qweight"], qt.parts["scales"]
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        w = qweight[r0:r1].view(r1 - r0, -1, gs).float() * scales[r0:r1, :, None]
        out[r0:r1] = w.view(r1 - r0, in_f)


@torch.no_grad()
def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[out_features, in_features]`` weight in ``dtype`` (computed in float32)."""
    out = torch.empty(qt.shape, dtype=dtype, device=qt.parts["qweight"].device)
    qt.spec.format.dequantize(qt, out)
    return out


# ---------------------------------------------------------------------------------------------
# The format table: everything that differs between the formats, looked up by name.


def _nf4_parts_shapes(group: int, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    n = shape[0] * shape[1]
    blocks = n // group
    return {
        "qweight": ((n // 2, 1), torch.uint8),
        "scales": ((blocks,), torch.uint8),
        "scales_absmax": ((math.ceil(blocks / NESTED_BLOCK),), torch.float32),
        "scales_offset": ((1,), torch.float32),
    }


def _int8_parts_shapes(group: int, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out_f, in_f = shape
    return {"qweight": ((out_f, in_f), torch.int8), "scales": ((out_f, in_f // group), torch.float32)}


@dataclass(frozen=True)
class Format:
    """One storage format: its stored parts, its quantizers and dequantizer, and what it costs."""

    name: str
    bits: int
    default_group: int
    group_problem: Callable[[object], str | None]  # why a group size is refused, or None
    parts: Callable[[int, tuple[int, int]], dict[str, tuple[tuple[int, ...], torch.dtype]]]
    quantize_reference: Callable[[torch.Tensor, QuantSpec], dict[str, torch.Tensor]]
    quantize_native: Callable[[torch.Tensor, QuantSpec], dict[str, torch.Tensor]]
    dequantize: Callable[[QuantizedTensor, torch.Tensor], None]
    float_scale_copies: int  # float32 temporaries per block that dequantizing a whole matrix allocates

    def dequantize_workspace(self, shape: tuple[int, int], group: int, dense_bytes: int) -> int:
        """Bytes of one ``shape`` matrix dequantized to the compute dtype, with its float32 scale temporaries."""
        n = shape[0] * shape[1]
        return n * dense_bytes + self.float_scale_copies * (n // group) * 4


FORMATS: dict[str, Format] = {
    # nf4's block absmax is rebuilt in float32 (twice: the lookup, then the scaled copy)
    "nf4": Format("nf4", 4, NF4_BLOCK, _nf4_group_problem, _nf4_parts_shapes, _quantize_nf4,
                  _quantize_nf4_native, _dequantize_nf4, float_scale_copies=2),
    "int8": Format("int8", 8, INT8_DEFAULT_GROUP, _int8_group_problem, _int8_parts_shapes, _quantize_int8,
                   _quantize_int8_native, _dequantize_int8, float_scale_copies=0),
}
