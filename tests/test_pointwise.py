"""The native kernels' element types, RMSNorm, rotary embedding and router against their torch paths.

Conversions and the rotary embedding must agree bit for bit with torch (they round the same way);
RMSNorm may differ in the last bit (its sum of squares is taken in another order); the router's
weights to float32 precision, its choices exactly (no ties in these inputs).
"""

from __future__ import annotations

import pytest
import torch

from mixtral_cli.engine.model import rope_cos_sin
from mixtral_cli.kernels import dispatch, native, pointwise, quantize, spec_for_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _float32_sweep() -> torch.Tensor:
    """Random bit patterns (every exponent: subnormals, NaNs, infinities) plus the rounding edge cases of
    bfloat16 and float16: ties, the largest float16, the first value that rounds to infinity, the
    subnormal/normal boundary."""
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x38800000,
                          0x387FFFFF, 0x387FF000, 0x33800000, 0x33000000, 0x33000001, 0x7F800000, 0x7FC00000,
                          0x7F800001, 0x00000001, 0x7F7FFFFF, 0], dtype=torch.int64).to(torch.int32)
    bits = torch.cat([rand, edges, edges | -0x80000000])
    return bits.view(torch.float32)


@needs_native
@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
def test_conversions_match_torch_bit_for_bit(src, dst):
    x = _float32_sweep().to(src)
    got, want = native.convert(x, dst), x.to(dst)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(_bits(got)[~nan], _bits(want)[~nan])  # NaN payloads: torch's own paths differ


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1024), (5, 64), (3, 2, 96), (0, 32)])
def test_rms_norm_native_matches_torch(dtype, shape, exercised):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w = (1 + torch.randn(shape[-1], generator=gen) / 4).to(dtype)
    want = pointwise.rms_norm(x, w, 1e-5, path="torch")
    got = pointwise.rms_norm(x, w, 1e-5, path="native")
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    else:  # the same roundings: at most one unit in the last place apart, and rarely
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert bool(((got.float() - want.float()).abs() <= ulp * 2).all())
        assert (got != want).float().mean() < 0.02 if got.numel() else True
    assert pointwise.pointwise_path(x) == "native"
    exercised.add("native_rms_norm[scalar]")


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("H", "T", "Hd", "layout"), [
    (8, 1, 128, "decode"),    # one token, Mixtral's head size: heads of one contiguous row
    (4, 7, 64, "prefill"),    # [T, H, Hd] transposed to [H, T, Hd], as the model's projections give it
    (3, 5, 6, "contiguous"),  # a tiny head
])
def test_rope_native_matches_torch_bit_for_bit(dtype, H, T, Hd, layout, exercised):
    gen = torch.Generator().manual_seed(H * T * Hd)
    if layout == "prefill":
        x = torch.randn(T, H, Hd, generator=gen).to(dtype).transpose(0, 1)
    else:
        x = torch.randn(H, T, Hd, generator=gen).to(dtype)
    cos, sin = rope_cos_sin(torch.arange(40, 40 + T), Hd, 1e6, dtype)
    want = pointwise.apply_rope(x, cos, sin, path="torch")
    before = x.clone()
    got = pointwise.apply_rope(x, cos, sin, path="native")
    assert got is x and not torch.equal(before, x)  # rotated in place
    assert torch.equal(_bits(got.contiguous()), _bits(want.contiguous()))
    exercised.add("native_rope[scalar]")


def test_native_pointwise_refuses_bad_inputs():
    if not native.available():
        pytest.skip("native kernels not built")
    with pytest.raises(ValueError, match="unsupported"):
        native.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-5)  # weight of another type
    with pytest.raises(ValueError, match="unsupported"):
        native.rope_(torch.randn(2, 3, 8).transpose(1, 2), *rope_cos_sin(torch.arange(8), 3, 1e4, torch.float32))
    with pytest.raises(ValueError, match="unsupported"):
        native.route(torch.randn(1, 16), torch.randn(4, 16), 5)  # more choices than experts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "E", "k"), [(1, 8, 2), (5, 8, 2), (3, 4, 3), (2, 16, 1)])
def test_router_native_matches_torch(dtype, T, E, k, exercised):
    gen = torch.Generator().manual_seed(T * E + k)
    x = torch.randn(T, 256, generator=gen).to(dtype)
    gate = (torch.randn(E, 256, generator=gen) / 8).to(dtype)
    want_w, want_ids = dispatch.route(x, gate, k, path="torch")
    assert dispatch.route(x, gate, k)[1].shape == (T, k)
    for isa in native.isas():
        w, ids = native.route(x, gate, k, isa)
        assert w.dtype == torch.float32 and ids.dtype == torch.int64
        assert torch.equal(ids, want_ids), isa
        torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.sum(-1), torch.ones(T))
        exercised.add(f"native_router[{isa}]")


@needs_native
def test_router_survives_nan_logits():
    w, ids = native.route(torch.full((1, 64), float("nan")), torch.randn(8, 64), 2)
    assert sorted(ids[0].tolist()) == [0, 1]  # still two distinct valid experts


@needs_native
@pytest.mark.parametrize("xtype", DTYPES)
@pytest.mark.parametrize("ytype", DTYPES)
def test_entry_points_take_and_give_every_type(xtype, ytype):
    """Every entry point reads activations of each type and writes results of each type exactly as
    converting before and after a float32 call would (the same values, rounded the same way)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=gen).to(torch.bfloat16)
    nf4, int8 = (quantize(torch.randn(64, 128, generator=gen), spec_for_bits(b)) for b in (4, 8))
    keys = torch.randn(2, 9, 32, generator=gen)
    calls = {  # name: (call(input, out_dtype), input [T, in])
        "dense": (lambda a, o: native.dense_matmul(a, w, out_dtype=o), torch.randn(3, 128, generator=gen)),
        "nf4": (lambda a, o: native.nf4_matmul(a, nf4.parts["qweight"], nf4.parts["scales"],
                                               nf4.parts["scales_absmax"], float(nf4.parts["scales_offset"]),
                                               nf4.shape, nf4.spec.group_size, dispatch.DYNAMIC_CODE, dispatch.NF4_LEVELS_I8,
                                               out_dtype=o), torch.randn(3, 128, generator=gen)),
        "int8": (lambda a, o: native.int8_matmul(a, int8.parts["qweight"], int8.parts["scales"],
                                                 int8.spec.group_size, out_dtype=o),
                 torch.randn(3, 128, generator=gen)),
        "attention": (lambda a, o: native.attention_decode(a, keys, keys, out_dtype=o), torch.randn(8, 32, generator=gen)),
    }
    for bits in (4, 8):
        expert = tuple(quantize(torch.randn(s, generator=gen), spec_for_bits(bits)) for s in ((256, 128), (256, 128),
                                                                                               (128, 256)))
        weights = dispatch._fused_weights(torch.ones(1, 128), expert, tuple(dispatch.prepare(q) for q in expert))
        calls[f"{bits}-bit swiglu"] = (lambda a, o, wt=weights: native.swiglu(a, wt, out_dtype=o),
                                       torch.randn(3, 128, generator=gen))
    for name, (call, inp) in calls.items():
        x = inp.to(xtype)
        want = call(x.float(), torch.float32).to(ytype)
        got = call(x, ytype)
        assert got.dtype == ytype and torch.equal(_bits(got), _bits(want)), name
