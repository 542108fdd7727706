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
plain torch paths, and one notice line is logged. ``MIXTRAL_REQUIRE_NATIVE=1`` turns that into an
error (CI sets it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("mixtral_cli")

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
        print(f"notice: native CPU kernels unavailable ({e}); using slower torch paths", file=sys.stderr)
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.mx_nf4_matmul.argtypes = [i, p, i, i, i, i, p, p, p, f, p, p, p]
    lib.mx_int8_matmul.argtypes = [i, p, i, i, i, i, p, p, p]
    lib.mx_nf4_dequant.argtypes = [i, i, i, i, p, p, p, f, p, p, p]
    lib.mx_dense_matmul.argtypes = [i, p, i, i, i, i, p, p]
    lib.mx_quantize.argtypes = [i, i, i, i, i, p, p, p, p]
    lib.mx_swiglu.argtypes = [i, i, p, i, i, i, i, *[p, p, p, f] * 3, p, p, p]
    lib.mx_attn_decode.argtypes = [i, p, i, i, i, p, p, ctypes.c_size_t, i, i, i, f, p]
    lib.mx_use_threads.argtypes = [i]
    for fn in (lib.mx_nf4_matmul, lib.mx_int8_matmul, lib.mx_nf4_dequant, lib.mx_dense_matmul, lib.mx_quantize, lib.mx_swiglu,
               lib.mx_attn_decode, lib.mx_use_threads, lib.mx_cpu_has_avx2):
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
    have = list(_cpu_isas())
    if not have:
        return []
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if cap == "default":
        have = ["scalar"]
    return have


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
    have = isas()
    isa = isa or (have[-1] if have else None)
    if isa not in have:
        raise ValueError(f"instruction set {isa!r} is not available here (have {have})")
    return _ISA_ID[isa]


def _as_f32_rows(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def nf4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scales_absmax: torch.Tensor,
               offset: float, shape: tuple[int, int], group_size: int, dyn_code: torch.Tensor,
               levels: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """``x [T, I] @ W.T -> [T, O]`` float32 for an nf4 ``W`` in its stored layout."""
    O, I = shape
    xf = _as_f32_rows(x)
    y = torch.empty(xf.shape[0], O, dtype=torch.float32)
    rc = _lib().mx_nf4_matmul(_isa_id(isa), _ptr(xf), xf.shape[0], O, I, group_size, _ptr(qweight), _ptr(scales),
                              _ptr(scales_absmax), float(offset), _ptr(dyn_code), _ptr(levels), _ptr(y))
    _check(rc, "nf4 matmul")
    return y


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                isa: str | None = None) -> torch.Tensor:
    """``x [T, I] @ W.T -> [T, O]`` float32 for a block-wise int8 ``W``."""
    O, I = qweight.shape
    xf = _as_f32_rows(x)
    y = torch.empty(xf.shape[0], O, dtype=torch.float32)
    rc = _lib().mx_int8_matmul(_isa_id(isa), _ptr(xf), xf.shape[0], O, I, group_size, _ptr(qweight),
                               _ptr(scales), _ptr(y))
    _check(rc, "int8 matmul")
    return y


def swiglu(x: torch.Tensor, fmt: str, mats: tuple[dict, dict, dict], offsets: tuple[float, float, float],
           inter: int, group_size: int, dyn_code: torch.Tensor | None = None, levels: torch.Tensor | None = None,
           isa: str | None = None) -> torch.Tensor:
    """The SwiGLU expert ``w2(silu(w1 x) * (w3 x)) -> [T, D]`` float32 in one call, for ``x [T, D]`` and
    the stored parts of ``w1, w3 [inter, D]`` and ``w2 [D, inter]`` (all nf4 or all int8, one group size);
    ``offsets``: the nf4 absmax offsets (ignored for int8)."""
    xf = _as_f32_rows(x)
    T, D = xf.shape
    y = torch.empty(T, D, dtype=torch.float32)
    args = []
    for parts, off in zip(mats, offsets, strict=True):
        sabs = parts.get("scales_absmax")
        args += [_ptr(parts["qweight"]), _ptr(parts["scales"]), sabs if sabs is None else _ptr(sabs), float(off)]
    rc = _lib().mx_swiglu(0 if fmt == "nf4" else 1, _isa_id(isa), _ptr(xf), T, D, inter, group_size, *args,
                          dyn_code if dyn_code is None else _ptr(dyn_code),
                          levels if levels is None else _ptr(levels), _ptr(y))
    _check(rc, f"{fmt} swiglu")
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


DENSE_WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """``x [T, I] @ weight.T -> [T, O]`` float32 for a contiguous float32/bfloat16/float16 ``weight [O, I]``."""
    O, I = weight.shape
    xf = _as_f32_rows(x)
    y = torch.empty(xf.shape[0], O, dtype=torch.float32)
    rc = _lib().mx_dense_matmul(_isa_id(isa), _ptr(xf), xf.shape[0], O, I, DENSE_WEIGHT_TYPES[weight.dtype],
                                _ptr(weight), _ptr(y))
    _check(rc, "dense matmul")
    return y


def attention_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int = 0,
                     isa: str | None = None) -> torch.Tensor:
    """Attention of one query token: ``q [H, D]`` over ``keys, values [K, S, D]`` (float32, bfloat16 or
    float16, H a multiple of K: query head i reads kv head i // (H / K)), attending to positions
    ``start .. S-1`` with scale ``1 / sqrt(D)``; returns ``[H, D]`` float32. ``keys`` and ``values`` may be
    views of a longer cache (positions ``D`` elements apart, the same strides for both)."""
    H, D = q.shape
    K, S, Dk = keys.shape
    if (Dk != D or values.shape != keys.shape or values.dtype != keys.dtype or H % K
            or keys.stride()[1:] != (D, 1) or values.stride() != keys.stride()
            or keys.dtype not in DENSE_WEIGHT_TYPES or not 0 <= start < S):
        raise ValueError(f"attention_decode: unsupported shapes/layout q {tuple(q.shape)}, keys {tuple(keys.shape)} "
                         f"{keys.dtype} strides {keys.stride()}, values strides {values.stride()}, start {start}")
    qf = _as_f32_rows(q)
    y = torch.empty(H, D, dtype=torch.float32)
    rc = _lib().mx_attn_decode(_isa_id(isa), _ptr(qf), H, K, D, _ptr(keys), _ptr(values), keys.stride(0),
                               DENSE_WEIGHT_TYPES[keys.dtype], start, S, D ** -0.5, _ptr(y))
    _check(rc, "attention")
    return y


def quantize_blocks(w: torch.Tensor, fmt: str, group_size: int, nf4_midpoints: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantization of a contiguous ``[O, I]`` float weight, as ``quant.formats`` defines it.

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
    rc = _lib().mx_quantize(0 if fmt == "nf4" else 1, O, I, group_size, DENSE_WEIGHT_TYPES[w.dtype], _ptr(w),
                            _ptr(mids), _ptr(codes), _ptr(scales))
    _check(rc, f"{fmt} quantize")
    return codes, scales.view(-1) if fmt == "nf4" else scales
