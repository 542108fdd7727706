"""Tests for the quant package: formats against bitsandbytes, storage, fast paths vs reference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant import (
    QuantizedTensor,
    QuantLinear,
    dequantize,
    kernels,
    prepare,
    quantize,
    reference_matmul,
    spec_for_bits,
)
from quant.formats import DYNAMIC_CODE, NF4_CODE, nf4_absmax

bnbf = pytest.importorskip("bitsandbytes.functional")

BIG = (4096, 14336)


def _student_t4(shape, gen):
    # t(4) = Z / sqrt(chi2_4 / 4), chi2_4 = 2 (E1 + E2) with E exponential
    z = torch.randn(shape, generator=gen)
    e = -torch.log(torch.rand((2, *shape), generator=gen).clamp_min_(1e-12)).sum(0)
    return z / torch.sqrt(e / 2)


@pytest.fixture(scope="module")
def big_weights():
    gen = torch.Generator().manual_seed(0)
    return {
        "gauss": torch.randn(BIG, generator=gen) * 0.02,
        "t4": _student_t4(BIG, gen) * 0.02,
    }


def _rmse(a, b):
    return (a.float() - b.float()).pow(2).mean().sqrt().item()


def test_code_books_match_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dist", ["gauss", "t4"])
def test_nf4_matches_bitsandbytes_layout_and_error(big_weights, dist):
    w = big_weights[dist]
    qt = quantize(w, spec_for_bits(4))
    q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    # 4-bit codes and the second-level state are bit-identical to bitsandbytes
    assert torch.equal(qt.parts["qweight"], q)
    assert torch.equal(qt.parts["scales_absmax"], st.state2.absmax)
    assert torch.equal(qt.parts["scales_offset"].reshape(()), st.offset)
    # 8-bit absmax codes: ours is always the nearest code, bitsandbytes' CPU search rarely is not
    assert (qt.parts["scales"] != st.absmax).float().mean() < 1e-2
    true_absmax = w.view(-1, 64).abs().amax(1)
    ours_err = (nf4_absmax(qt) - true_absmax).abs()
    bnb_err = (bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset - true_absmax).abs()
    assert (ours_err <= bnb_err + 1e-7).all()
    # bitsandbytes decodes our parts to exactly our dequantization
    state = kernels._cuda_quant_state(qt)
    state.dtype = torch.float32
    ours = dequantize(qt)
    assert torch.equal(bnbf.dequantize_4bit(qt.parts["qweight"], state), ours)
    assert _rmse(ours, w) <= 1.02 * _rmse(bnbf.dequantize_4bit(q, st), w)


@pytest.mark.parametrize("dist", ["gauss", "t4"])
def test_int8_error_no_worse_than_bitsandbytes_blockwise(big_weights, dist):
    w = big_weights[dist]
    spec = spec_for_bits(8)
    qt = quantize(w, spec)
    q, st = bnbf.quantize_blockwise(w, blocksize=spec.group_size)
    err, err_bnb = _rmse(dequantize(qt), w), _rmse(bnbf.dequantize_blockwise(q, st), w)
    assert err <= 1.02 * err_bnb
    if dist == "t4":  # block-wise scales are what make heavy tails work: per-row is much worse
        per_row = quantize(w[:256], spec_for_bits(8, w.shape[1]))
        assert _rmse(dequantize(per_row), w[:256]) > 2 * _rmse(dequantize(qt)[:256], w[:256])


def test_quantize_any_float_dtype_and_exact_values():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen)
    for bits in (4, 8):
        ref = quantize(w, spec_for_bits(bits))
        for dt in (torch.float16, torch.bfloat16, torch.float64):
            wd = w.to(dt)
            qt = quantize(wd, spec_for_bits(bits))
            assert torch.equal(dequantize(qt), dequantize(quantize(wd.float(), spec_for_bits(bits))))
        # values on the grid are quantized to themselves (nf4: the same codes; its double-quantized
        # scales are re-derived, so only int8 comes back bit-identical)
        again = quantize(dequantize(ref), spec_for_bits(bits))
        assert torch.equal(again.parts["qweight"], ref.parts["qweight"])
        if bits == 8:
            assert torch.equal(dequantize(again), dequantize(ref))
    zeros = quantize(torch.zeros(32, 128), spec_for_bits(8))
    assert torch.equal(dequantize(zeros), torch.zeros(32, 128))


@pytest.mark.parametrize("bits", [4, 8])
def test_safetensors_round_trip_is_bit_exact(tmp_path, bits):
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    spec = spec_for_bits(bits)
    qt = quantize(w, spec)
    path = tmp_path / "w.safetensors"
    save_file(qt.state_dict("model.layers.0.block_sparse_moe.experts.0.w1"), str(path))
    sd = load_file(str(path))
    back = QuantizedTensor.from_state_dict(spec, (96, 512), sd, "model.layers.0.block_sparse_moe.experts.0.w1")
    assert set(back.parts) == set(QuantizedTensor.expected_parts(spec, (96, 512)))
    for name, t in qt.parts.items():
        assert back.parts[name].dtype == t.dtype and torch.equal(back.parts[name], t)
    assert torch.equal(dequantize(back), dequantize(qt))
    assert back.nbytes() == qt.nbytes()


@pytest.mark.parametrize("bits", [4, 8])
def test_from_state_dict_rejects_bad_parts(bits):
    spec = spec_for_bits(bits)
    qt = quantize(torch.randn(64, 256), spec)
    sd = qt.state_dict("e")
    for name, (shape, dtype) in QuantizedTensor.expected_parts(spec, (64, 256)).items():
        missing = {k: v for k, v in sd.items() if k != f"e.{name}"}
        with pytest.raises(ValueError, match=f"e.{name}"):
            QuantizedTensor.from_state_dict(spec, (64, 256), missing, "e")
        wrong_shape = dict(sd, **{f"e.{name}": torch.zeros(shape[0] + 1, *shape[1:], dtype=dtype)})
        with pytest.raises(ValueError, match="shape"):
            QuantizedTensor.from_state_dict(spec, (64, 256), wrong_shape, "e")
        wrong_dtype = dict(sd, **{f"e.{name}": torch.zeros(shape, dtype=torch.float16)})
        with pytest.raises(ValueError, match="dtype"):
            QuantizedTensor.from_state_dict(spec, (64, 256), wrong_dtype, "e")
    # a checkpoint of one format is not accepted as the other
    other = spec_for_bits(12 - bits)
    with pytest.raises(ValueError):
        QuantizedTensor.from_state_dict(other, (64, 256), sd, "e")


def test_bad_bits_and_group_sizes_rejected():
    for bits in (0, 2, 3, 16):
        with pytest.raises(ValueError):
            spec_for_bits(bits)
    for gs in (0, 48, 100, 8192):
        with pytest.raises(ValueError):
            spec_for_bits(4, gs)
    for gs in (0, -2, 7, 3):
        with pytest.raises(ValueError):
            spec_for_bits(8, gs)
    assert spec_for_bits(4).group_size == 64 and spec_for_bits(8).group_size == 128
    with pytest.raises(ValueError, match="divide"):
        quantize(torch.randn(8, 96), spec_for_bits(4))  # 64 does not divide 96
    with pytest.raises(ValueError, match="divide"):
        quantize(torch.randn(8, 200), spec_for_bits(8, 128))
    with pytest.raises(ValueError, match="divide"):
        QuantizedTensor.expected_parts(spec_for_bits(8, 128), (8, 200))


def test_bnb_cpu_repack_matches_bitsandbytes():
    import copy

    qt = quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(3)), spec_for_bits(4))
    state = kernels._cuda_quant_state(qt)
    want_w, want_state = bnbf._convert_weight_packed_for_cpu(qt.parts["qweight"].clone(), copy.deepcopy(state))
    got_w, got_absmax = kernels.pack_nf4_for_bnb_cpu(qt)
    assert torch.equal(got_w, want_w) and torch.equal(got_absmax, want_state.absmax)


# relative Frobenius / relative max error allowed for a path computing in this dtype
TOL = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (1e-2, 2e-2)}


@pytest.fixture(scope="module")
def expert_qts():
    gen = torch.Generator().manual_seed(4)
    w = _student_t4((512, 1024), gen).mul_(0.02).to(torch.bfloat16)
    return {bits: quantize(w, spec_for_bits(bits)) for bits in (4, 8)}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_every_path_matches_reference(expert_qts, bits, dtype, tokens):
    qt = expert_qts[bits]
    prep = prepare(qt)
    x = torch.randn(tokens, qt.shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
    ref = reference_matmul(x, qt).float()
    paths = kernels.available_paths(x, qt, prep)
    if bits == 4 and kernels.bnb_cpu_nf4_available():
        assert "bnb_cpu_nf4" in paths
    if bits == 8 and kernels.int8pack_available():
        assert "int8_groups" in paths
    for path in paths:
        y = kernels.matmul(x, qt, prep, path=path)
        assert y.dtype == dtype and y.shape == (tokens, qt.shape[0])
        # bitsandbytes' CPU kernel computes in bfloat16 whatever the input
        rel_fro, rel_max = TOL[torch.bfloat16 if path == "bnb_cpu_nf4" else dtype]
        y = y.float()
        assert (y - ref).norm() <= rel_fro * ref.norm(), path
        assert (y - ref).abs().max() <= rel_max * ref.abs().max(), path
    # the automatic choice computes in the input's dtype
    chosen = kernels.select_path(x, qt, prep)
    if dtype == torch.float32:
        assert chosen != "bnb_cpu_nf4"
    y = kernels.matmul(x.view(1, tokens, -1), qt, prep).float().view(tokens, -1)
    rel_fro, _ = TOL[dtype]
    assert (y - ref).norm() <= rel_fro * ref.norm()


def test_quant_linear_forward_move_and_state_dict():
    lin = torch.nn.Linear(256, 96, bias=False)
    for bits in (4, 8):
        ql = QuantLinear.from_linear(lin, spec_for_bits(bits))
        assert (ql.in_features, ql.out_features) == (256, 96)
        x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
        y = ql(x)
        assert y.shape == (2, 3, 96) and y.dtype == torch.bfloat16
        ref = reference_matmul(x, ql.qt).float()
        assert (y.float() - ref).norm() <= 1e-2 * ref.norm()
        # the prepared form is cached, never part of the state dict, and rebuilt after a move
        assert set(ql.state_dict()) == set(QuantizedTensor.expected_parts(ql.spec, (96, 256)))
        first = ql.prepared()
        assert ql.prepared() is first
        ql.to("cpu")
        ql.to("meta")
        assert ql.qweight.device.type == "meta"
        assert ql._prepared is None
    with pytest.raises(ValueError):
        QuantLinear.from_linear(torch.nn.Linear(64, 32), spec_for_bits(8, 32))


def test_matmul_rejects_wrong_input_width(expert_qts):
    with pytest.raises(ValueError, match="features"):
        kernels.matmul(torch.randn(1, 100), expert_qts[8])


def test_int8_single_group_on_unaligned_storage():
    """One scale block per row and a qweight that does not start on a 64-byte boundary (as when it
    is a view into a memory-mapped file): the int8 kernel must still get an aligned copy."""
    from quant.kernels import int8pack_available, matmul

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    qt = quantize(w, spec_for_bits(8, 128))
    backing = torch.empty(qt.parts["qweight"].numel() + 8, dtype=torch.int8)
    unaligned = backing[8:].view(64, 128)
    unaligned.copy_(qt.parts["qweight"])
    assert unaligned.data_ptr() % 64 != 0
    qt = QuantizedTensor(qt.spec, qt.shape, {**qt.parts, "qweight": unaligned})
    x = torch.randn(3, 128)
    prepared = prepare(qt)
    if int8pack_available():
        assert prepared.tensors["groups"].data_ptr() % 64 == 0
    torch.testing.assert_close(matmul(x, qt, prepared), reference_matmul(x, qt), rtol=1e-4, atol=1e-4)
