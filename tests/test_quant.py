"""Tests for the quant package: formats against bitsandbytes, storage, fast paths vs reference."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_cli.kernels import (
    QuantizedTensor,
    QuantLinear,
    bnb_cuda,
    dequantize,
    dispatch,
    native,
    prepare,
    quantize,
    spec_for_bits,
)
from mixtral_cli.kernels.formats import DYNAMIC_CODE, NF4_CODE

bnbf = pytest.importorskip("bitsandbytes.functional")

# The formats by their definition (the table in kernels/formats.py), decoded here in float64 with
# bitsandbytes' code books: the expectation the kernels and the quantizers are checked against, with
# nothing from the package under test in it.
NF4_TABLE = bnbf.get_4bit_type("nf4", device="cpu").double()
DYNAMIC_TABLE = bnbf.create_dynamic_map(signed=True).double()
NESTED = 256  # blocks of nf4 absmax values under one second-level absmax


def _absmax64(qt: QuantizedTensor) -> torch.Tensor:
    """nf4 block absmax: ``DYNAMIC[scales[b]] * scales_absmax[b // 256] + offset``."""
    p = qt.parts
    second = p["scales_absmax"].double().repeat_interleave(NESTED)[:p["scales"].numel()]
    return DYNAMIC_TABLE[p["scales"].long()] * second + p["scales_offset"].double()


def _weight64(qt: QuantizedTensor) -> torch.Tensor:
    """int8: ``qweight * scale`` per block; nf4: ``NF4[code] * absmax`` per block, two codes a byte,
    the first element in the high nibble."""
    out_f, in_f = qt.shape
    p, gs = qt.parts, qt.spec.group_size
    if qt.spec.name == "int8":
        return p["qweight"].double() * p["scales"].double().repeat_interleave(gs, dim=1)
    byte = p["qweight"].reshape(-1).long()
    codes = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)
    return (NF4_TABLE[codes] * _absmax64(qt).repeat_interleave(gs)).view(out_f, in_f)


def _matmul64(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    return x.double() @ _weight64(qt).T

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
    ours_err = (_absmax64(qt) - true_absmax.double()).abs()
    bnb_err = (bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset - true_absmax).abs()
    assert (ours_err <= bnb_err + 1e-7).all()
    # bitsandbytes decodes our parts to exactly our dequantization
    state = bnb_cuda.nf4_quant_state(qt)
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


@pytest.mark.parametrize("reference", [False, True])  # the native quantizer (where built) and the torch one
def test_int8_by_hand(reference):
    # block 1: absmax 2.54, scale 0.02, -1.013 / 0.02 = -50.65 -> -51; block 2: all zero, scale 0
    qt = quantize(torch.tensor([[2.54, -1.013, 0.0, 0.0]]), spec_for_bits(8, 2), reference=reference)
    assert qt.parts["qweight"].tolist() == [[127, -51, 0, 0]]
    torch.testing.assert_close(qt.parts["scales"], torch.tensor([[0.02, 0.0]]))
    torch.testing.assert_close(dequantize(qt), torch.tensor([[2.54, -1.02, 0.0, 0.0]]))


@pytest.mark.parametrize("reference", [False, True])
def test_nf4_by_hand(reference):
    """One block of 64, absmax 2: 2 / 2 = 1 is code 15, -1 / 2 = -0.5 is nearest -0.5251 (code 2),
    0.3 / 2 = 0.15 nearest 0.1609 (code 9), 0 is code 7. With one block the offset (the mean absmax)
    is the absmax itself, and the second level holds 0."""
    w = torch.zeros(1, 64)
    w[0, :3] = torch.tensor([2.0, -1.0, 0.3])
    qt = quantize(w, spec_for_bits(4), reference=reference)
    assert qt.parts["qweight"].view(-1).tolist() == [0xF2, 0x97] + [0x77] * 30
    assert qt.parts["scales_absmax"].tolist() == [0.0] and qt.parts["scales_offset"].tolist() == [2.0]
    want = torch.zeros(1, 64)
    want[0, :3] = torch.tensor([2.0, 2 * -0.5250730514526367, 2 * 0.16093020141124725])
    assert torch.equal(dequantize(qt), want)
    x = torch.ones(1, 64)  # every path: 2 - 1.0501461 + 0.3218604
    for path in dispatch.available_paths(x, qt, prepare(qt)):
        assert dispatch.matmul(x, qt, prepare(qt), path=path).item() == pytest.approx(1.2717143, rel=_tol(path, torch.float32)[1])


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


# relative Frobenius / relative max error allowed, per path kind and input dtype
TOL = {
    ("exact", torch.float32): (2e-5, 5e-5),
    ("exact", torch.bfloat16): (1e-2, 2e-2),
    # the native kernels quantize activations to int8 and (nf4) the code book to code x 63
    ("native", torch.float32): (2e-2, 6e-2),
    ("native", torch.bfloat16): (2.5e-2, 8e-2),
}


def _tol(path, dtype):
    return TOL[("native" if path.startswith("native") else "exact", dtype)]


@pytest.fixture(scope="module")
def expert_qts():
    gen = torch.Generator().manual_seed(4)
    w = _student_t4((512, 1024), gen).mul_(0.02).to(torch.bfloat16)
    return {bits: quantize(w, spec_for_bits(bits)) for bits in (4, 8)}


def _cpu_has_avx2() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " avx2" in flags and " fma" in flags


def test_native_kernels_build_where_a_compiler_exists():
    """CI (CI=true) and any machine with a C compiler must get the native dispatch, with every ISA the
    CPU offers: a silent fallback would hide a 100x slowdown."""
    if os.environ.get("CI") or shutil.which("cc") or shutil.which("gcc"):
        assert native.available()
        if _cpu_has_avx2() and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != "default":
            assert "avx2" in native.isas()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 6, 64])  # 6: a tile of 4 tokens and a remainder of 2
def test_every_path_matches_reference(expert_qts, bits, dtype, tokens, exercised):
    qt = expert_qts[bits]
    prep = prepare(qt)
    x = torch.randn(tokens, qt.shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
    ref = _matmul64(x, qt)
    paths = dispatch.available_paths(x, qt, prep)
    if native.available():
        assert paths[0] == ("native_nf4" if bits == 4 else "native_int8")
    for path in paths:
        for isa in native.isas() if path.startswith("native") else [None]:
            y = dispatch.matmul(x, qt, prep, path=path, isa=isa)
            assert y.dtype == dtype and y.shape == (tokens, qt.shape[0])
            rel_fro, rel_max = _tol(path, dtype)
            y = y.float()
            assert (y - ref).norm() <= rel_fro * ref.norm(), (path, isa)
            assert (y - ref).abs().max() <= rel_max * ref.abs().max(), (path, isa)
            exercised.add(f"{path}[{isa}]" if isa else path)
    # the automatic choice: native kernels up to native_max_tokens(), exact dequantize + GEMM above
    chosen = dispatch.select_path(x, qt, prep)
    if native.available():
        assert chosen == (paths[0] if tokens <= dispatch.native_max_tokens() else "dequant")
    y = dispatch.matmul(x.view(1, tokens, -1), qt, prep).float().view(tokens, -1)
    assert (y - ref).norm() <= _tol(chosen, dtype)[0] * ref.norm()


def test_native_token_limits_by_machine_kind(monkeypatch):
    """Measured crossovers (docs/benchmarks.md 7.3): without a native bf16 GEMM in torch the native
    kernels take whole prefill chunks, except float32 dense weights (torch's sgemm wins above 64)."""
    monkeypatch.setattr(dispatch, "torch_bf16_is_native", lambda: False)
    assert dispatch.native_max_tokens() == 512 and dispatch.native_max_tokens(torch.bfloat16) == 512
    assert dispatch.native_max_tokens(torch.float32) == 64
    monkeypatch.setattr(dispatch, "torch_bf16_is_native", lambda: True)
    assert dispatch.native_max_tokens() == 16 and dispatch.native_max_tokens(torch.float32) == 16
    monkeypatch.setattr(dispatch, "NATIVE_MAX_TOKENS", 3)
    assert dispatch.native_max_tokens() == 3 and dispatch.native_max_tokens(torch.float32) == 3


def test_paths_hand_over_above_the_token_limit(expert_qts, monkeypatch):
    monkeypatch.setattr(dispatch, "NATIVE_MAX_TOKENS", 3)
    w = torch.randn(16, 1024, dtype=torch.bfloat16)
    for n, native_expected in ((3, True), (4, False)):
        x = torch.randn(n, 1024, dtype=torch.bfloat16)
        for bits, name in ((4, "native_nf4"), (8, "native_int8")):
            want = name if native.available() and native_expected else "dequant"
            assert dispatch.select_path(x, expert_qts[bits], prepare(expert_qts[bits])) == want
        assert dispatch.dense_path(x, w) == ("native_dense" if native.available() and native_expected else "torch")


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_forced_torch_capability_has_no_native_bf16_gemm(monkeypatch, capability):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    dispatch.torch_bf16_is_native.cache_clear()
    try:
        assert not dispatch.torch_bf16_is_native()
    finally:
        dispatch.torch_bf16_is_native.cache_clear()


@pytest.mark.parametrize(("group_size", "width"), [(64, 768), (64, 1536), (128, 1024), (256, 512)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_native_nf4_block_layouts(group_size, width, tokens, exercised):
    """Block layouts beside the default: several chunks per block (128, 256), a row whose block count is
    not a multiple of 8 (768 = 12 blocks), and rows whose blocks straddle a 256-block group of the
    second-level absmax (1536 = 24 blocks a row)."""
    if not native.available():
        pytest.skip("native kernels not built")
    gen = torch.Generator().manual_seed(group_size + width)
    qt = quantize(_student_t4((96, width), gen).mul_(0.02), spec_for_bits(4, group_size))
    x = torch.randn(tokens, width, generator=gen)
    ref = _matmul64(x, qt)
    for isa in native.isas():
        y = dispatch.matmul(x, qt, prepare(qt), path="native_nf4", isa=isa)
        assert (y - ref).norm() <= _tol("native_nf4", torch.float32)[0] * ref.norm(), isa
        exercised.add(f"native_nf4[{isa}]")


def _first_rows(qt: QuantizedTensor, n: int) -> QuantizedTensor:
    """The first ``n`` rows of ``qt`` as a tensor of their own, sharing its stored values (nf4: the
    row's blocks keep their second-level absmax group when the rows start at row 0)."""
    out_f, in_f = qt.shape
    p = qt.parts
    if qt.spec.name == "int8":
        parts = {"qweight": p["qweight"][:n], "scales": p["scales"][:n]}
    else:
        blocks = n * in_f // qt.spec.group_size
        parts = {"qweight": p["qweight"][:n * in_f // 2], "scales": p["scales"][:blocks],
                 "scales_absmax": p["scales_absmax"][:-(-blocks // NESTED)], "scales_offset": p["scales_offset"]}
    return QuantizedTensor(qt.spec, (n, in_f), parts)


@pytest.mark.parametrize("bits", [4, 8])
def test_native_one_token_row_remainders(bits, exercised):
    """Row counts that leave partial groups give each row exactly what it gets inside a larger matrix:
    the int8 one-token kernel takes four rows at a time, the nf4 one looks up the next row's absmax
    inside each row, and chunks hold at least 16 rows and about 64 KiB (1030 rows of 512 or 1024
    bytes: a partial last chunk)."""
    if not native.available():
        pytest.skip("native kernels not built")
    gen = torch.Generator().manual_seed(bits)
    qt = quantize(torch.randn(1030, 1024, generator=gen) * 0.02, spec_for_bits(bits))
    x = torch.randn(1, 1024, generator=gen)
    path = "native_nf4" if bits == 4 else "native_int8"
    ref = _matmul64(x, qt)
    for isa in native.isas():
        y = dispatch.matmul(x, qt, prepare(qt), path=path, isa=isa)
        assert (y - ref).norm() <= _tol(path, torch.float32)[0] * ref.norm(), isa
        for rows in (1, 2, 3, 5, 7, 17, 50):
            sub = _first_rows(qt, rows)
            assert torch.equal(dispatch.matmul(x, sub, prepare(sub), path=path, isa=isa), y[:, :rows]), (isa, rows)
        exercised.add(f"{path}[{isa}]")


@pytest.mark.parametrize("tokens", [1, 3])  # the one-token (decode) kernel and the token-tiled one
def test_native_isas_agree_bit_for_bit_on_integer_sums(expert_qts, tokens):
    """Scalar and SIMD variants do the same integer arithmetic; only float summation differs (its order,
    and for nf4 on AVX2 the offset of the unsigned levels, taken off in float once per row), so the
    tolerance is relative to the largest output."""
    isas = native.isas()
    if len(isas) < 2:
        pytest.skip(f"one instruction set here: {isas}")
    x = torch.randn(tokens, 1024, generator=torch.Generator().manual_seed(9))
    for bits in (4, 8):
        ys = [dispatch.matmul(x, expert_qts[bits], path=f"native_{'nf4' if bits == 4 else 'int8'}", isa=i) for i in isas]
        for y in ys[1:]:
            torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5 * float(ys[0].abs().max()))


def test_aten_cpu_capability_default_forces_scalar(monkeypatch):
    if not native.available():
        pytest.skip("native kernels not built")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert native.isas() == ["scalar"] and native.best_isa() == "scalar"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert native.isas() == (["scalar", "avx2"] if _cpu_has_avx2() else ["scalar"])


def test_native_nf4_dequantize_is_exact(expert_qts):
    """The native dequantize equals the torch one bit for bit (same float32 arithmetic), and both equal
    the float64 definition up to float32 rounding."""
    qt = expert_qts[4]
    want = dequantize(qt)
    torch.testing.assert_close(want, _weight64(qt).float(), rtol=1e-6, atol=1e-9)
    for isa in native.isas():
        assert torch.equal(dispatch.dequantize_fast(qt, torch.float32, isa), want), isa


def test_build_cache_is_keyed_by_source_and_survives_a_killed_build(tmp_path, monkeypatch):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("MIXTRAL_KERNEL_CACHE", str(tmp_path))
    first = native.build()
    assert first.is_file() and first.parent.parent == tmp_path
    stamp = first.stat().st_mtime_ns
    # a build killed half-way leaves only its uniquely named temporary file: no lock, no effect
    (first.parent / ".build-killed.so").write_bytes(b"partial")
    assert native.build() == first and first.stat().st_mtime_ns == stamp
    # another source gets another key
    src = tmp_path / "mxkernels.c"
    src.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", src)
    other = native.build()
    assert other != first and other.is_file()


def test_no_compiler_is_a_clear_build_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTRAL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(native.NativeBuildError, match="no C compiler"):
        native.build()


def test_quant_linear_forward_move_and_state_dict():
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(96, 256, generator=gen) * 0.05
    for bits in (4, 8):
        ql = QuantLinear(quantize(weight, spec_for_bits(bits)))
        assert (ql.in_features, ql.out_features) == (256, 96)
        x = torch.randn(2, 3, 256, generator=gen).to(torch.bfloat16)
        y = ql(x)
        assert y.shape == (2, 3, 96) and y.dtype == torch.bfloat16
        ref = _matmul64(x, ql.qt)
        path = dispatch.select_path(x.view(6, 256), ql.qt, ql.prepared())
        assert (y.float() - ref).norm() <= _tol(path, torch.bfloat16)[0] * ref.norm(), path
        # the prepared form is cached, never part of the state dict, and rebuilt after a move
        assert set(ql.state_dict()) == set(QuantizedTensor.expected_parts(ql.spec, (96, 256)))
        first = ql.prepared()
        assert ql.prepared() is first
        ql.to("cpu")
        ql.to("meta")
        assert ql.qweight.device.type == "meta"
        assert ql._prepared is None
        assert ql.qt.parts["qweight"] is ql.qweight  # the cached view follows the moved buffers


def test_matmul_rejects_wrong_input_width(expert_qts):
    with pytest.raises(ValueError, match="features"):
        dispatch.matmul(torch.randn(1, 100), expert_qts[8])


@pytest.mark.parametrize("bits", [4, 8])
def test_native_kernels_read_unaligned_storage(bits):
    """Weights viewed straight out of a memory-mapped file need not be aligned."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    qt = quantize(w, spec_for_bits(bits, 64 if bits == 4 else 128))
    parts = {}
    for name, t in qt.parts.items():
        shift = 3 if t.element_size() == 1 else t.element_size()  # off any SIMD alignment
        backing = torch.empty(t.numel() * t.element_size() + shift, dtype=torch.uint8)
        view = backing[shift:].view(t.dtype).view(t.shape)
        view.copy_(t)
        parts[name] = view
    assert parts["qweight"].data_ptr() % 4 != 0
    qt = QuantizedTensor(qt.spec, qt.shape, parts)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    ref = _matmul64(x, qt)
    for path in dispatch.available_paths(x, qt, prepare(qt)):
        for isa in native.isas() if path.startswith("native") else [None]:
            y = dispatch.matmul(x, qt, path=path, isa=isa)
            assert (y - ref).norm() <= _tol(path, torch.float32)[0] * ref.norm(), (path, isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 42])  # the native GEMV, a 3-token tile, 10 tiles and 2 tokens
def test_dense_paths_match_float64(dtype, tokens, exercised):
    """The native GEMV accumulates in float32 like torch's kernels: only rounding order differs."""
    gen = torch.Generator().manual_seed(tokens)
    w = (torch.randn(300, 520, generator=gen) * 0.05).to(dtype)  # 520: exercises the non-multiple-of-32 tail
    x = torch.randn(tokens, 520, generator=gen).to(dtype)
    ref = x.double() @ w.double().T
    want = "native_dense" if native.available() and tokens <= dispatch.native_max_tokens(dtype) else "torch"
    assert dispatch.dense_path(x, w) == want
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for path in ["torch"] + (["native_dense"] if native.available() else []):
        for isa in native.isas() if path == "native_dense" else [None]:
            y = dispatch.dense_matmul(x, w, path=path, isa=isa)
            assert y.dtype == dtype and y.shape == (tokens, 300)
            assert (y.double() - ref).norm() <= tol * ref.norm(), (path, isa)
            exercised.add(f"{path}[{isa}]" if isa else path)


def _attention_float64(q, keys, values, start):
    """softmax(q k^T / sqrt(D)) v per query head in float64, kv head i // (H / K), positions start.."""
    H, D = q.shape
    G = H // keys.shape[0]
    k = keys[:, start:].double().repeat_interleave(G, dim=0)  # [H, S', D]
    v = values[:, start:].double().repeat_interleave(G, dim=0)
    p = torch.softmax(torch.einsum("hd,hsd->hs", q.double(), k) / D ** 0.5, dim=-1)
    return torch.einsum("hs,hsd->hd", p, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("H", "K", "D", "S", "start"), [
    (8, 2, 64, 1, 0),      # the first decode step: one position
    (8, 2, 128, 37, 0),    # Mixtral's head size, a few positions
    (6, 6, 72, 300, 0),    # no grouping; 72: the AVX2 output loop's partial 64-float block
    (8, 4, 16, 50, 41),    # a sliding window: positions 41..49 only
    (4, 1, 12, 9, 3),      # D not a multiple of 8: the scalar loop on every instruction set
    (8, 1, 32, 20, 0),     # 8 query heads per kv head: two groups of 4 in the AVX2 kernel
    (6, 2, 24, 11, 2),     # groups of 3; D = 16 + 8
])
def test_decode_attention_matches_float64(dtype, H, K, D, S, start, exercised):
    """The native one-token attention (float32 scores, softmax and sums) against float64, on views of a
    longer cache as the model passes them, and SDPA (the fallback) against the same reference."""
    gen = torch.Generator().manual_seed(S + D)
    cache_k = torch.randn(K, S + 20, D, generator=gen).to(dtype)  # the cache holds more positions than used
    cache_v = torch.randn(K, S + 20, D, generator=gen).to(dtype)
    keys, values = cache_k[:, :S], cache_v[:, :S]
    q = (torch.randn(H, D, generator=gen) * 2).to(dtype)
    ref = _attention_float64(q, keys, values, start)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the result is rounded to dtype
    y = dispatch.decode_attention(q, keys, values, start, path="sdpa")
    assert y.dtype == dtype and y.shape == (H, D)
    assert (y.double() - ref).norm() <= tol * ref.norm()
    exercised.add("sdpa")
    assert dispatch.attention_path(keys) == ("native_attention" if native.available() else "sdpa")
    for isa in native.isas():
        y = dispatch.decode_attention(q, keys, values, start, path="native_attention", isa=isa)
        assert y.dtype == dtype and y.shape == (H, D)
        assert (y.double() - ref).norm() <= tol * ref.norm(), isa
        exact = native.attention_decode(q, keys, values, start, isa)  # float32, before rounding to dtype
        assert (exact.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), isa
        exercised.add(f"native_attention[{isa if D % 8 == 0 else 'scalar'}]")


def test_decode_attention_refuses_bad_layouts():
    q, kv = torch.randn(8, 16), torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match="unsupported"):
        native.attention_decode(q, kv.transpose(1, 2).contiguous().transpose(1, 2), kv)  # positions not D apart
    with pytest.raises(ValueError, match="unsupported"):
        native.attention_decode(torch.randn(6, 16), torch.randn(4, 10, 16), torch.randn(4, 10, 16))  # 6 heads, 4 kv heads
    with pytest.raises(ValueError, match="unsupported"):
        native.attention_decode(q, kv, kv, start=10)  # nothing to attend to


def test_use_dense_linears_swaps_in_place_and_skips():
    from mixtral_cli.kernels.linear import DenseLinear, use_dense_linears

    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 4, bias=True))
    model.gate = torch.nn.Linear(4, 2, bias=False)
    weight = model[0].weight
    use_dense_linears(model, skip=("gate",))
    assert type(model[0]) is DenseLinear and model[0].weight is weight
    assert type(model[1]) is torch.nn.Linear and type(model.gate) is torch.nn.Linear  # bias; skipped
    x = torch.randn(2, 8)
    torch.testing.assert_close(model[0](x), x @ weight.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "group_size", "width"), [(4, 64, 512), (4, 256, 512), (8, 128, 512), (8, 32, 512),
                                                          (8, 6144, 6144)])  # a block wider than the kernel's buffer
def test_native_quantize_equals_reference_bit_for_bit(dtype, bits, group_size, width):
    if not native.available():
        pytest.skip("native kernels not built")
    gen = torch.Generator().manual_seed(bits * group_size)
    w = torch.cat([torch.randn(64, width, generator=gen), _student_t4((64, width), gen)]).mul_(0.02)
    w[3, :group_size] = 0.0  # an all-zero block
    w = w.to(dtype)
    fast = quantize(w, spec_for_bits(bits, group_size))
    ref = quantize(w, spec_for_bits(bits, group_size), reference=True)
    for name, t in ref.parts.items():
        assert torch.equal(fast.parts[name], t), name


@pytest.fixture(scope="module")
def swiglu_qts():
    """(w1, w3, w2) of a small expert (D 256, I 512) for each bit width."""
    gen = torch.Generator().manual_seed(7)
    ws = [_student_t4(shape, gen).mul_(0.05).to(torch.bfloat16) for shape in ((512, 256), (512, 256), (256, 512))]
    return {bits: tuple(quantize(w, spec_for_bits(bits)) for w in ws) for bits in (4, 8)}


def _swiglu_reference(x, qts):
    w1, w3, w2 = (_weight64(q) for q in qts)
    x = x.double()
    return torch.nn.functional.silu(x @ w1.T) * (x @ w3.T) @ w2.T


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_fused_swiglu_matches_reference_and_unfused(swiglu_qts, bits, dtype, tokens, exercised):
    """One native call per expert: within the native tolerance of the float64 SwiGLU (two quantized
    activations in series, so twice one product's), and close to the three separate native products."""
    if not native.available():
        pytest.skip("native kernels not built")
    qts = swiglu_qts[bits]
    preps = tuple(prepare(q) for q in qts)
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    ref = _swiglu_reference(x.float(), qts)
    assert dispatch.fused_swiglu_ok(x, qts, preps)
    rel_fro, rel_max = _tol("native", dtype)
    for isa in native.isas():
        y = dispatch.swiglu(x, qts, preps, isa=isa)
        assert y.dtype == dtype and y.shape == x.shape
        y = y.double()
        assert (y - ref).norm() <= 2 * rel_fro * ref.norm(), isa
        assert (y - ref).abs().max() <= 2 * rel_max * ref.abs().max(), isa
        unfused = dispatch.swiglu(x, qts, preps, fused=False, isa=isa).double()
        # float32 silu * mul instead of x.dtype's: only bf16's rounding of h apart
        assert (y - unfused).norm() <= (1e-5 if dtype == torch.float32 else 1e-2) * ref.norm(), isa
        exercised.add(f"native_swiglu[{isa}]")


def test_fused_swiglu_hands_over_above_the_token_limit(swiglu_qts, monkeypatch):
    monkeypatch.setattr(dispatch, "NATIVE_MAX_TOKENS", 3)
    calls = []
    monkeypatch.setattr(native, "swiglu", lambda *a, **k: calls.append(1) or torch.zeros(a[0].shape))
    for bits in (4, 8):
        qts = swiglu_qts[bits]
        preps = tuple(prepare(q) for q in qts)
        for n, fused in ((3, native.available()), (4, False)):
            x = torch.randn(n, 256)
            assert dispatch.fused_swiglu_ok(x, qts, preps) == fused
            calls.clear()
            dispatch.swiglu(x, qts, preps)
            assert len(calls) == int(fused)
        with pytest.raises(ValueError, match="fused"):
            dispatch.swiglu(torch.randn(4, 256), qts, preps, fused=True)


def test_quant_swiglu_module_reads_refilled_parts(swiglu_qts):
    """Same state dict keys as a plain expert; an in-place refill of the parts is what the next call uses."""
    from mixtral_cli.kernels.linear import QuantSwiGLU

    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1))
    a, b = swiglu_qts[4], swiglu_qts[8]
    w1, w3, w2 = (QuantLinear(q) for q in a)
    mod = QuantSwiGLU(w1, w2, w3)
    assert set(mod.state_dict()) == {f"{n}.{p}" for n in ("w1", "w2", "w3") for p in a[0].parts}
    rel_fro = 2 * _tol("native", torch.float32)[0]  # what the fused kernel may be off by (see above)
    ref = _swiglu_reference(x, a)
    assert (mod(x).double() - ref).norm() <= rel_fro * ref.norm()
    c = tuple(quantize(-_weight64(q).float(), spec_for_bits(4)) for q in b)  # other weights, same layout
    for lin, q in zip((w1, w3, w2), c, strict=True):
        for name, t in q.parts.items():
            getattr(lin, name).copy_(t)
        lin.invalidate_prepared()
    ref = _swiglu_reference(x, c)
    assert (mod(x).double() - ref).norm() <= rel_fro * ref.norm()
