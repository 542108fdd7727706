"""The project's own CPU kernels (``mxkernels.c``): built on first use, called through ctypes.

The C file is plain C with no torch headers, compiled once per source version with the system C
compiler into a per-user cache (``$MIXTRAL_KERNEL_CACHE``, else ``~/.cache/mixtral-cli/kernels``),
keyed by the hash of the source and the flags. A build writes a uniquely named temporary file and
renames it into place, so concurrent or killed builds never leave a lock or a half-written library.
No ``-march`` flag is used: the SIMD variants are compiled per function and picked at run time.

Instruction sets: ``avx2`` (AVX2 + FMA + F16C) where the CPU has it, else ``scalar``. The environment
variable ``ATEN_CPU_CAPABILITY`` (the one that steers torch's own kernels) caps the choice the same
way: ``default`` forces ``scalar``, ``avx2`` or higher allows ``avx2``.

If no compiler is found or the build fails, ``available()`` is False, the callers fall back to
plain torch paths, and one warning is logged (this module prints nothing: the CLI decides where log
records go, ``cli.ui.setup_logging``). ``MIXTRAL_REQUIRE_NATIVE=1`` turns that into an error (CI sets
it). A build is logged at info level, since the first run pauses for it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mxkernels.c")
CFLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-pthread", "-fno-math-errno")
ISAS = ("scalar", "avx2")  # in order of preference, lowest first
_ISA_ID = {"scalar": 0, "avx2": 1}


class NativeBuildError(RuntimeError):
    pass


def _cache_dir() -> Path:
    env = os.environ.get("MIXTRAL_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mixtral-cli" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build() -> Path:
    """The compiled library for the current source, building it if needed."""
    src = SOURCE.read_bytes()
    cc = _compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (install gcc or clang, or set CC)")
    key = hashlib.sha256(src + " ".join((cc, *CFLAGS)).encode()).hexdigest()[:16]
    out = _cache_dir() / key / "libmxkernels.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling the native CPU kernels with %s into %s (once per source version)", cc, out.parent)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise NativeBuildError(f"{cc} failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _lib() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(build()))
    except (NativeBuildError, OSError) as e:
        if os.environ.get("MIXTRAL_REQUIRE_NATIVE") == "1":
            raise
        log.warning("native CPU kernels unavailable (%s); using slower torch paths", e)
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    z = ctypes.c_size_t
    lib.mx_nf4_matmul.argtypes = [i, i, p, i, i, i, i, p, p, p, f, p, p, i, p]
    lib.mx_int8_matmul.argtypes = [i, i, p, i, i, i, i, p, p, i, p]
    lib.mx_nf4_dequant.argtypes = [i, i, i, i, p, p, p, f, p, p, p]
    lib.mx_dense_matmul.argtypes = [i, i, p, i, i, i, i, p, i, p]
    lib.mx_quantize.argtypes = [i, i, i, i, i, p, p, p, p]
    lib.mx_swiglu.argtypes = [i, i, i, p, i, i, i, i, *[p, p, p, f] * 3, p, p, i, p]
    lib.mx_attn_decode.argtypes = [i, i, p, i, i, i, p, p, z, i, i, i, f, i, p]
    lib.mx_convert.argtypes = [i, p, i, p, z]
    lib.mx_rms_norm.argtypes = [i, p, i, i, f, p, p]
    lib.mx_rope.argtypes = [i, p, i, i, i, z, z, p, p]
    lib.mx_route.argtypes = [i, i, p, i, i, i, i, p, i, p, p]
    lib.mx_use_threads.argtypes = [i]
    for fn in (lib.mx_nf4_matmul, lib.mx_int8_matmul, lib.mx_nf4_dequant, lib.mx_dense_matmul, lib.mx_quantize, lib.mx_swiglu,
               lib.mx_attn_decode, lib.mx_convert, lib.mx_rms_norm, lib.mx_rope, lib.mx_route, lib.mx_use_threads, lib.mx_cpu_has_avx2):
        fn.restype = ctypes.c_int
    lib.mx_use_threads(torch.get_num_threads())
    return lib


def available() -> bool:
    return _lib() is not None


@functools.cache
def _cpu_isas() -> tuple[str, ...]:
    """What the CPU itself supports (probed once; every kernel call consults it)."""
    lib = _lib()
    if lib is None:
        return ()
    return ("scalar", "avx2") if lib.mx_cpu_has_avx2() else ("scalar",)


def isas() -> list[str]:
    """Instruction sets this CPU (and ``ATEN_CPU_CAPABILITY``, read at each call) lets the kernels use,
    lowest first."""
    return list(_isas_for(os.environ.get("ATEN_CPU_CAPABILITY", "")))


@functools.cache
def _isas_for(capability: str) -> tuple[str, ...]:
    have = _cpu_isas()
    return ("scalar",) if have and capability.strip().lower() == "default" else have


def best_isa() -> str | None:
    found = isas()
    return found[-1] if found else None


def set_threads(n: int) -> None:
    """Threads the kernels use (the calling thread included)."""
    lib = _lib()
    if lib is not None:
        lib.mx_use_threads(int(n))


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"native {what} kernel failed (code {rc})")


def _isa_id(isa: str | None) -> int:
    """The kernels' code for ``isa`` (None: the best allowed here), checked against what is allowed."""
    have = _isas_for(os.environ.get("ATEN_CPU_CAPABILITY", ""))
    isa = isa or (have[-1] if have else None)
    if isa not in have:
        raise ValueError(f"instruction set {isa!r} is not available here (have {list(have)})")
    return _ISA_ID[isa]


# The element types the kernels read and write, by their codes in mxkernels.c (W_F32, W_BF16, W_F16).
TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous rows of a type the kernels read (they convert to float32 themselves)."""
    return (x if x.dtype in TYPES else x.float()).contiguous()


def _out(shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or torch.float32)


def nf4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scales_absmax: torch.Tensor,
               offset: float, shape: tuple[int, int], group_size: int, dyn_code: torch.Tensor,
               levels: torch.Tensor, isa: str | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [T, I] @ W.T -> [T, O]`` for an nf4 ``W`` in its stored layout, computed in float32 and given in
    ``out_dtype`` (float32, bfloat16 or float16; default float32)."""
    O, I = shape
    x = _rows(x)
    y = _out((x.shape[0], O), out_dtype)
    rc = _lib().mx_nf4_matmul(_isa_id(isa), TYPES[x.dtype], _ptr(x), x.shape[0], O, I, group_size, _ptr(qweight),
                              _ptr(scales), _ptr(scales_absmax), float(offset), _ptr(dyn_code), _ptr(levels),
                              TYPES[y.dtype], _ptr(y))
    _check(rc, "nf4 matmul")
    return y


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                isa: str | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [T, I] @ W.T -> [T, O]`` for a block-wise int8 ``W``; ``out_dtype`` as for ``nf4_matmul``."""
    O, I = qweight.shape
    x = _rows(x)
    y = _out((x.shape[0], O), out_dtype)
    rc = _lib().mx_int8_matmul(_isa_id(isa), TYPES[x.dtype], _ptr(x), x.shape[0], O, I, group_size, _ptr(qweight),
                               _ptr(scales), TYPES[y.dtype], _ptr(y))
    _check(rc, "int8 matmul")
    return y


@dataclass(frozen=True)
class SwiGLUWeights:
    """One expert's three stored matrices as ``mx_swiglu`` takes them, resolved once (a decode step calls
    the kernel for ~300 us of work: building its 20 arguments per call was a tenth of that). It holds
    the tensors it points into, so the pointers stay valid while it lives."""

    fmt: int  # 0 nf4, 1 int8
    dim: int  # D: the expert's input and output width
    inter: int  # its hidden width
    group_size: int
    args: tuple  # (qweight, scales, absmax, offset) x (w1, w3, w2), then the code tables: as mx_swiglu takes them
    keep: tuple[torch.Tensor, ...]


def swiglu_weights(fmt: str, mats: tuple[dict, dict, dict], offsets: tuple[float, float, float], dim: int,
                   inter: int, group_size: int, dyn_code: torch.Tensor | None = None,
                   levels: torch.Tensor | None = None) -> SwiGLUWeights:
    """The stored parts of ``w1, w3 [inter, dim]`` and ``w2 [dim, inter]`` (all nf4 or all int8, one group
    size) for ``swiglu``; ``offsets``: the nf4 absmax offsets (ignored for int8)."""
    args, keep = [], [t for t in (dyn_code, levels) if t is not None]
    for parts, off in zip(mats, offsets, strict=True):
        sabs = parts.get("scales_absmax")
        args += [_ptr(parts["qweight"]), _ptr(parts["scales"]), sabs if sabs is None else _ptr(sabs), float(off)]
        keep += [t for t in (parts["qweight"], parts["scales"], sabs) if t is not None]
    args += [dyn_code if dyn_code is None else _ptr(dyn_code), levels if levels is None else _ptr(levels)]
    return SwiGLUWeights(0 if fmt == "nf4" else 1, dim, inter, group_size, tuple(args), tuple(keep))


def swiglu(x: torch.Tensor, w: SwiGLUWeights, isa: str | None = None, out_dtype: torch.dtype | None = None
           ) -> torch.Tensor:
    """The SwiGLU expert ``w2(silu(w1 x) * (w3 x)) -> [T, D]`` in one call, for ``x [T, D]`` and the weights
    ``w`` (``swiglu_weights``); ``out_dtype`` as for ``nf4_matmul``."""
    x = _rows(x)
    T = x.shape[0]
    y = _out((T, w.dim), out_dtype)
    rc = _lib().mx_swiglu(w.fmt, _isa_id(isa), TYPES[x.dtype], _ptr(x), T, w.dim, w.inter, w.group_size, *w.args,
                          TYPES[y.dtype], _ptr(y))
    _check(rc, f"{'nf4' if w.fmt == 0 else 'int8'} swiglu")
    return y


def nf4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, scales_absmax: torch.Tensor, offset: float,
                   shape: tuple[int, int], group_size: int, dyn_code: torch.Tensor, codes: torch.Tensor,
                   isa: str | None = None) -> torch.Tensor:
    """The exact float32 ``[O, I]`` weight of an nf4 tensor."""
    O, I = shape
    out = torch.empty(O, I, dtype=torch.float32)
    rc = _lib().mx_nf4_dequant(_isa_id(isa), O, I, group_size, _ptr(qweight), _ptr(scales), _ptr(scales_absmax),
                               float(offset), _ptr(dyn_code), _ptr(codes), _ptr(out))
    _check(rc, "nf4 dequantize")
    return out


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, isa: str | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [T, I] @ weight.T -> [T, O]`` for a contiguous float32/bfloat16/float16 ``weight [O, I]``, computed
    in float32; ``out_dtype`` as for ``nf4_matmul``."""
    O, I = weight.shape
    x = _rows(x)
    y = _out((x.shape[0], O), out_dtype)
    rc = _lib().mx_dense_matmul(_isa_id(isa), TYPES[x.dtype], _ptr(x), x.shape[0], O, I, TYPES[weight.dtype],
                                _ptr(weight), TYPES[y.dtype], _ptr(y))
    _check(rc, "dense matmul")
    return y


def attention_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int = 0,
                     isa: str | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention of one query token: ``q [H, D]`` over ``keys, values [K, S, D]`` (float32, bfloat16 or
    float16, H a multiple of K: query head i reads kv head i // (H / K)), attending to positions
    ``start .. S-1`` with scale ``1 / sqrt(D)``; returns ``[H, D]``, computed in float32, in ``out_dtype``
    (default float32). ``keys`` and ``values`` may be views of a longer cache (positions ``D`` elements
    apart, the same strides for both)."""
    H, D = q.shape
    K, S, Dk = keys.shape
    if (Dk != D or values.shape != keys.shape or values.dtype != keys.dtype or H % K
            or keys.stride()[1:] != (D, 1) or values.stride() != keys.stride()
            or keys.dtype not in TYPES or not 0 <= start < S):
        raise ValueError(f"attention_decode: unsupported shapes/layout q {tuple(q.shape)}, keys {tuple(keys.shape)} "
                         f"{keys.dtype} strides {keys.stride()}, values strides {values.stride()}, start {start}")
    q = _rows(q)
    y = _out((H, D), out_dtype)
    rc = _lib().mx_attn_decode(_isa_id(isa), TYPES[q.dtype], _ptr(q), H, K, D, _ptr(keys), _ptr(values),
                               keys.stride(0), TYPES[keys.dtype], start, S, D ** -0.5, TYPES[y.dtype], _ptr(y))
    _check(rc, "attention")
    return y


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int, isa: str | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE router for ``x [T, D]`` and a contiguous ``gate [E, D]``: logits ``x @ gate.T`` rounded to
    ``x``'s type, softmax in float32, top ``top_k``, renormalised. Returns weights ``[T, top_k]`` float32
    and ids ``[T, top_k]`` int64, largest first."""
    E, D = gate.shape
    x = _rows(x)
    T = x.shape[0]
    if x.shape[1] != D or not 1 <= top_k <= E or gate.dtype not in TYPES or not gate.is_contiguous():
        raise ValueError(f"route: unsupported input {tuple(x.shape)} / gate {gate.dtype} {tuple(gate.shape)} / k {top_k}")
    weights = torch.empty(T, top_k, dtype=torch.float32)
    ids = torch.empty(T, top_k, dtype=torch.int64)
    rc = _lib().mx_route(_isa_id(isa), TYPES[x.dtype], _ptr(x), T, D, E, TYPES[gate.dtype], _ptr(gate), top_k,
                         _ptr(weights), _ptr(ids))
    _check(rc, "route")
    return weights, ids


def convert(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` between float32, bfloat16 and float16 by the kernels' own conversions (round to
    nearest even, as torch's): what every entry point does to its inputs and results."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    _check(_lib().mx_convert(TYPES[x.dtype], _ptr(x), TYPES[dtype], _ptr(out), x.numel()), "convert")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x [..., n]`` with ``weight [n]`` of ``x``'s type, rounding as the
    reference does (``model.RMSNorm``): normalised in float32, rounded to the type, scaled, rounded."""
    n = x.shape[-1]
    if weight.dtype != x.dtype or x.dtype not in TYPES or weight.shape != (n,):
        raise ValueError(f"rms_norm: unsupported input {x.dtype} {tuple(x.shape)} / weight {weight.dtype} "
                         f"{tuple(weight.shape)}")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    _check(_lib().mx_rms_norm(TYPES[x.dtype], _ptr(x), x.numel() // n, n, float(eps), _ptr(weight), _ptr(y)),
           "rms norm")
    return y


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place on ``x [heads, T, Hd]`` (any strides with unit stride along Hd) with
    contiguous ``cos, sin [T, Hd]`` of ``x``'s type, rounding each product and sum to the type as the
    reference does (``model.apply_rope``); returns ``x``."""
    H, T, Hd = x.shape
    if (x.stride(2) != 1 or cos.shape != (T, Hd) or sin.shape != (T, Hd) or x.dtype not in TYPES
            or cos.dtype != x.dtype or sin.dtype != x.dtype or Hd % 2):
        raise ValueError(f"rope_: unsupported input {x.dtype} {tuple(x.shape)} strides {x.stride()} / cos, sin "
                         f"{cos.dtype} {tuple(cos.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    _check(_lib().mx_rope(TYPES[x.dtype], _ptr(x), H, T, Hd, x.stride(0), x.stride(1), _ptr(cos), _ptr(sin)), "rope")
    return x


def quantize_blocks(w: torch.Tensor, fmt: str, group_size: int, nf4_midpoints: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantization of a contiguous ``[O, I]`` float weight, as ``kernels.formats`` defines it.

    ``nf4``: (packed codes ``[O*I/2]`` uint8, block absmax ``[O*I/gs]`` float32);
    ``int8``: (codes ``[O, I]`` int8, scales ``[O, I/gs]`` float32)."""
    O, I = w.shape
    w = w.contiguous()
    if fmt == "nf4":
        codes = torch.empty(O * I // 2, dtype=torch.uint8)
        mids = nf4_midpoints.to(torch.float32).contiguous()
    else:
        codes, mids = torch.empty(O, I, dtype=torch.int8), torch.empty(0)
    scales = torch.empty(O, I // group_size, dtype=torch.float32)
    rc = _lib().mx_quantize(0 if fmt == "nf4" else 1, O, I, group_size, TYPES[w.dtype], _ptr(w),
                            _ptr(mids), _ptr(codes), _ptr(scales))
    _check(rc, f"{fmt} quantize")
    return codes, scales.view(-1) if fmt == "nf4" else scales
