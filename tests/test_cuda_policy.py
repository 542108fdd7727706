"""The decisions behind the CUDA paths, made in plain code and tested here on the CPU.

The CUDA-only code is kept thin (streams, events, page-locking, kernel calls); what it relies on
is checked here: which dtype `--dtype auto` picks per compute capability, that the int8 format is
exactly what bitsandbytes' blockwise kernel decodes, which block sizes that kernel takes, that the
code tables are copied to a device once, that a broken bitsandbytes falls back with one warning
line, and that bitsandbytes decodes nf4's nested absmax from the stored parts itself.
tests/test_cuda.py runs the same paths on a GPU (`pytest -m cuda`).
"""

from __future__ import annotations

import logging

import pytest
import torch

from mixtral_cli.engine.loader import cuda_bf16_native
from mixtral_cli.kernels import bnb_cuda
from mixtral_cli.kernels.formats import (
    DYNAMIC_CODE,
    INT8_CODE,
    dequantize,
    device_code,
    quantize,
    spec_for_bits,
)
from mixtral_cli.kernels.reference import reference_matmul

bnb = pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")
META = torch.device("meta")


@pytest.mark.parametrize("capability, native", [
    ((6, 1), False),  # Pascal
    ((7, 0), False),  # Volta
    ((7, 5), False),  # Turing: torch.cuda.is_bf16_supported() says True (emulation)
    ((8, 0), True),  # A100
    ((8, 6), True),  # RTX 30xx
    ((8, 9), True),  # RTX 40xx
    ((9, 0), True),  # H100
    ((12, 0), True),  # RTX 50xx
])
def test_auto_dtype_is_bf16_only_from_compute_capability_8(capability, native):
    assert cuda_bf16_native(capability) is native


def test_int8_code_table_is_the_signed_byte_value():
    code = INT8_CODE
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert code[0] == 0 and code[1] == 1 and code[127] == 127 and code[129] == -127 and code[255] == -1
    # every stored int8 value u, read as a byte b, decodes to u
    u = torch.arange(-127, 128, dtype=torch.int8)
    assert torch.equal(code[u.view(torch.uint8).long()], u.float())


def test_bitsandbytes_blockwise_kernel_decodes_our_int8_format_exactly():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    qt = quantize(w, spec_for_bits(8))  # group 128
    state = bnb_cuda.int8_quant_state(qt)
    assert state.blocksize == 128 and state.absmax.data_ptr() == qt.parts["scales"].data_ptr()  # a view
    got = torch.ops.bitsandbytes.dequantize_blockwise.default(
        qt.parts["qweight"].view(torch.uint8), state.absmax, state.code, state.blocksize, torch.float32)
    assert torch.equal(got, dequantize(qt))
    # the int8 CUDA path's code, run here on CPU tensors, against the float64 reference
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    y = bnb_cuda.int8_matmul(x, qt, state)
    torch.testing.assert_close(y, reference_matmul(x, qt), rtol=1e-5, atol=1e-5)


def test_int8_block_sizes_the_kernel_takes():
    assert [g for g in (2, 4, 6, 8, 16, 32, 64, 96, 128, 256, 384) if bnb_cuda.int8_block_ok(g)] == [8, 16, 32, 64, 128, 256]


def test_code_tables_are_copied_to_a_device_once():
    # A move to the meta device makes a new tensor on every call, as a move to a GPU does; on the CPU
    # `.to` hands back the table itself, which would hide a missing cache.
    assert device_code("nf4", META) is device_code("nf4", META)
    assert torch.equal(device_code("dynamic", CPU), DYNAMIC_CODE)
    moved = quantize(torch.randn(64, 128), spec_for_bits(4)).to(META)
    a, b = bnb_cuda.nf4_quant_state(moved), bnb_cuda.nf4_quant_state(moved)
    assert a.code is b.code and a.state2.code is b.state2.code  # no per-state (per-refill) copy
    qt = quantize(torch.randn(64, 128), spec_for_bits(4))
    assert bnb_cuda.nf4_quant_state(qt).absmax.data_ptr() == qt.parts["scales"].data_ptr()  # views of the stored parts


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bitsandbytes_probe_passes_where_its_kernels_work(fmt, dtype):
    # the probe runs the CUDA paths' code on the given device; bitsandbytes' CPU kernels stand in here
    assert bnb_cuda.probe.__wrapped__(CPU, fmt, dtype) is True


def test_broken_bitsandbytes_falls_back_with_one_warning_line(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("libbitsandbytes_cuda126.so: cannot open shared object file\nmore detail")

    monkeypatch.setattr(bnb_cuda, "int8_matmul", broken)
    with caplog.at_level(logging.WARNING, logger="mixtral_cli"):
        assert bnb_cuda.probe.__wrapped__(CPU, "int8", torch.float16) is False
    lines = [r.getMessage() for r in caplog.records if r.name == "mixtral_cli"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "cannot open shared object" in lines[0] and "slower" in lines[0] and "int8" in lines[0]


def test_a_kernel_broken_in_one_dtype_leaves_the_other_dtype_and_format(monkeypatch):
    """The probe checks each format in the compute dtype that will run: an int8 kernel that is wrong
    in bf16 only disables int8 in bf16."""
    right = bnb_cuda.int8_matmul

    def wrong_in_bf16(x, qt, state):
        out = right(x, qt, state)
        return out * 1.5 if x.dtype == torch.bfloat16 else out

    monkeypatch.setattr(bnb_cuda, "int8_matmul", wrong_in_bf16)
    assert bnb_cuda.probe.__wrapped__(CPU, "int8", torch.bfloat16) is False
    assert bnb_cuda.probe.__wrapped__(CPU, "int8", torch.float16) is True
    assert bnb_cuda.probe.__wrapped__(CPU, "nf4", torch.bfloat16) is True


@pytest.mark.parametrize("rows", [1, 4])  # up to 4 tokens: one fused kernel on CUDA
def test_bitsandbytes_reads_the_nested_absmax_from_the_stored_parts(rows):
    """The nf4 state hands bitsandbytes the double-quantized absmax as it is stored (8-bit codes, their
    code table, the second-level absmax and the offset, as views), and `matmul_4bit` decodes it
    itself: after the parts are overwritten in place, as an expert-slot refill does, the same state
    multiplies by the new weight."""
    g = torch.Generator().manual_seed(rows)
    slot = quantize(torch.randn(64, 512, generator=g), spec_for_bits(4))
    refill = quantize(3 * torch.randn(64, 512, generator=g), spec_for_bits(4))  # other absmax, offset
    state = bnb_cuda.nf4_quant_state(slot)
    assert state.nested
    for name, t in refill.parts.items():
        slot.parts[name].copy_(t)
    x = torch.randn(rows, 512, generator=g)
    y = bnb_cuda.nf4_matmul(x, slot, state)
    torch.testing.assert_close(y, reference_matmul(x, refill), rtol=1e-4, atol=1e-4)


def test_a_budget_beyond_free_gpu_memory_is_cut_to_it_with_one_warning(caplog):
    from mixtral_cli.engine.loader import clamp_budget

    free = 25_380_000_000 - 900 * 2**20  # a "24 GB" card (23.64 GiB) with a desktop on it
    with caplog.at_level(logging.WARNING, logger="mixtral_cli"):
        assert clamp_budget(None, free) == free
        assert clamp_budget(20 * 2**30, free) == 20 * 2**30
        assert not caplog.records
        assert clamp_budget(24 * 2**30, free) == free
    lines = [r.getMessage() for r in caplog.records if r.name == "mixtral_cli"]
    assert lines == ["--gpu-mem 24.00 GiB is more than the GPU has free (22.76 GiB): planning for 22.76 GiB"]
