"""bitsandbytes on CUDA: the stored nf4 and int8 layouts handed to its kernels as they lie, and the
one-time self-test that decides whether they are used. Which path runs is `dispatch`'s decision."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .formats import NESTED_BLOCK, QuantizedTensor, device_code
from .reference import reference_matmul


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


log = logging.getLogger("mixtral_cli")


@functools.cache
def _missing() -> bool:
    """Whether bitsandbytes cannot be imported; said in one warning line, once."""
    if _bnb() is not None:
        return False
    log.warning("bitsandbytes is not installed: quantized weights on CUDA use the slower plain torch path")
    return True


@functools.cache
def probe(device: torch.device, fmt: str, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes' kernel for format ``fmt`` ("nf4" or "int8") loads and computes right on
    ``device`` with activations in ``dtype`` (the compute dtype that will run), checked once per
    device, format and dtype on small matrices against the reference: a broken bf16 kernel does not
    pass for fp16, nor one format for the other. A broken install (its native library failed to load)
    still imports and fails only at the first call; then one warning line is logged and the plain
    torch path serves that format and dtype."""
    if _missing():
        return False
    try:
        from .formats import quantize, spec_for_bits

        g = torch.Generator().manual_seed(0)
        w = torch.randn(256, 512, generator=g)
        qt = quantize(w, spec_for_bits(4 if fmt == "nf4" else 8)).to(device)
        state = quant_state(qt)
        for rows in (1, 37):
            x = torch.randn(rows, 512, generator=g).to(device, dtype)
            got = (nf4_matmul if fmt == "nf4" else int8_matmul)(x, qt, state).float()
            ref = reference_matmul(x.float(), qt)
            if not torch.allclose(got, ref, rtol=0.02, atol=0.02 * float(ref.abs().max())):
                raise RuntimeError("its results differ from the reference")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return True
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("bitsandbytes' CUDA %s kernel does not work here in %s (%s): %s weights use the slower plain "
                    "torch path", fmt, str(dtype).removeprefix("torch."), msg, fmt)
        return False


def nf4_quant_state(qt: QuantizedTensor):
    """The nf4 ``QuantState``: views of the stored parts plus the per-device code tables (so it stays
    valid when the parts are overwritten in place, as an expert-slot refill does)."""
    from bitsandbytes.functional import QuantState

    dev = qt.device
    p = qt.parts
    state2 = QuantState(absmax=p["scales_absmax"], code=device_code("dynamic", dev), blocksize=NESTED_BLOCK,
                        dtype=torch.float32)
    return QuantState(
        absmax=p["scales"],
        shape=torch.Size(qt.shape),
        code=device_code("nf4", dev),
        blocksize=qt.spec.group_size,
        quant_type="nf4",
        dtype=torch.bfloat16,
        offset=p["scales_offset"].reshape(()),
        state2=state2,
    )


def int8_quant_state(qt: QuantizedTensor):
    """The int8 format as bitsandbytes' blockwise 8-bit state: the scales are the block absmax."""
    from bitsandbytes.functional import QuantState

    return QuantState(absmax=qt.parts["scales"].view(-1), code=device_code("int8", qt.device),
                      blocksize=qt.spec.group_size, dtype=torch.float32)


def int8_block_ok(group_size: int) -> bool:
    """bitsandbytes' blockwise kernel gives each thread 8 consecutive values under one absmax and
    finds the block by a shift: the block must be a power of two of at least 8."""
    return group_size >= 8 and group_size & (group_size - 1) == 0


def quant_state(qt: QuantizedTensor):
    """The bitsandbytes state that reads ``qt``'s stored parts where they lie, for its format."""
    return {"nf4": nf4_quant_state, "int8": int8_quant_state}[qt.spec.name](qt)


def supported(qt: QuantizedTensor) -> bool:
    """Whether bitsandbytes' CUDA kernels could serve ``qt``: on a GPU, in a block they take, with
    bitsandbytes importable (``probe`` then decides per compute dtype)."""
    block_ok = qt.spec.name == "nf4" or int8_block_ok(qt.spec.group_size)
    return qt.device.type == "cuda" and block_ok and not _missing()


def usable(qt: QuantizedTensor, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes' CUDA kernels serve ``qt`` for activations in ``dtype``."""
    return supported(qt) and probe(qt.device, qt.spec.name, dtype)


def nf4_matmul(x2: torch.Tensor, qt: QuantizedTensor, qs) -> torch.Tensor:
    """``x2 @ W.T`` through ``matmul_4bit`` (its GEMV for one row); ``qs``: ``quant_state(qt)``."""
    import bitsandbytes as bnb

    qs.dtype = x2.dtype
    # the transposed view is how bitsandbytes' Linear4bit passes its weight
    return bnb.matmul_4bit(x2, qt.parts["qweight"].t(), quant_state=qs)


def int8_matmul(x2: torch.Tensor, qt: QuantizedTensor, qs) -> torch.Tensor:
    """``x2 @ W.T``: one blockwise dequantize to ``x2.dtype`` on the GPU, then ``F.linear``: 5 bytes of
    memory traffic per weight (read 1 and write 2 in the dequantize, read the 2 again in the GEMM)."""
    w = torch.ops.bitsandbytes.dequantize_blockwise.default(
        qt.parts["qweight"].view(torch.uint8), qs.absmax, qs.code, qs.blocksize, x2.dtype)  # [out, in]
    return F.linear(x2, w)
