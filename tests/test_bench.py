"""`mixtral bench`: the JSON contract on the tiny preset, the bound arithmetic, the slot sweep, and
synthetic quantized weights. No wall-clock thresholds: speeds are only checked to be positive."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mixtral_cli.bench import (
    SyntheticCheckpoint,
    bytes_per_token,
    decode_bound,
    preset_args,
    spec_from_bits,
    synthetic_quantized,
)
from mixtral_cli.checkpoint import EXPERT_PROJS, expert_shape
from mixtral_cli.config import ModelArgs
from quant.formats import QuantizedTensor, dequantize, spec_for_bits

TOP_FIELDS = {
    "model", "synthetic", "note", "bits", "expert_format", "device", "dtype", "threads", "params_total",
    "params_active", "slots_per_layer", "prefetch", "prompt_tokens", "gen_tokens", "warmup_tokens", "rounds",
    "load_s", "prefill_tokens_per_s", "time_to_first_token_s", "decode_tokens_per_s", "decode_ms_per_token",
    "peak_rss_bytes", "peak_gpu_bytes", "peak_gpu_reserved_bytes", "expert_cache", "prefill_expert_cache", "bandwidth", "bound", "baseline",
    "sweep",
}
CACHE_FIELDS = {"slots_per_layer", "hits", "misses", "prefetch_hits", "prefetches", "bytes_to_device", "cpu_experts",
                "stall_s", "hit_rate", "prefetch_accuracy"}


def mixtral(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mixtral_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


# -- the CLI contract ----------------------------------------------------------------------------
def test_bench_tiny_json_has_every_field():
    proc = mixtral("bench", "--preset", "tiny", "--device", "cpu", "--prompt-tokens", "12", "--gen-tokens", "5",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert set(r) >= TOP_FIELDS
    assert set(r["expert_cache"]) == CACHE_FIELDS and set(r["prefill_expert_cache"]) == CACHE_FIELDS
    assert set(r["bandwidth"]) == {"memory_read_bytes_per_s", "host_to_device_bytes_per_s", "host_to_device_method"}
    assert set(r["bound"]) == {"weight_bytes_per_token", "expert_bytes", "misses_per_token", "decode_tokens_per_s",
                               "achieved_fraction", "hybrid"}
    args = preset_args("tiny")
    assert r["model"] == "preset:tiny" and r["synthetic"] and "not representative" in r["note"]
    assert r["bits"] == 16 and r["device"] == "cpu" and r["peak_gpu_bytes"] is None and r["peak_gpu_reserved_bytes"] is None
    assert r["prompt_tokens"] == 12 and r["gen_tokens"] == 5 and r["slots_per_layer"] == args.num_local_experts
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "peak_rss_bytes"):
        assert r[key] > 0, key
    # every expert resident: each timed token uses top-k experts in every layer, all hits
    uses = args.num_hidden_layers * args.num_experts_per_tok
    assert r["expert_cache"]["hits"] == 5 * uses and r["expert_cache"]["misses"] == 0
    assert r["prefill_expert_cache"]["hits"] == 12 * uses
    b = r["bound"]
    assert b["weight_bytes_per_token"] == bytes_per_token(args, None, 2, 12 + r["warmup_tokens"] + (5 - 1) / 2)
    assert b["decode_tokens_per_s"] == pytest.approx(
        r["bandwidth"]["memory_read_bytes_per_s"] / b["weight_bytes_per_token"])
    assert b["achieved_fraction"] == pytest.approx(r["decode_tokens_per_s"] / b["decode_tokens_per_s"])
    assert r["baseline"] is None and r["sweep"] is None


def test_bench_tiny_quantized_offloaded_counts_misses():
    proc = mixtral("bench", "--preset", "tiny", "--bits", "4", "--device", "cpu", "--experts-in-gpu", "2",
                   "--prompt-tokens", "8", "--gen-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["bits"] == 4 and r["expert_format"] == "nf4" and r["slots_per_layer"] == 2
    c = r["expert_cache"]
    args = preset_args("tiny")
    assert c["hits"] + c["misses"] == 4 * args.num_hidden_layers * args.num_experts_per_tok
    assert c["bytes_to_device"] > 0 and r["bound"]["misses_per_token"] == c["misses"] / 4


def test_bench_sweep_slots_writes_one_csv_row_per_k(tmp_path):
    out = tmp_path / "sweep.csv"
    proc = mixtral("bench", "--preset", "tiny", "--device", "cpu", "--prompt-tokens", "6", "--gen-tokens", "3",
                   "--sweep-slots", "--csv", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    args = preset_args("tiny")
    ks = list(range(args.num_experts_per_tok, args.num_local_experts + 1))
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(row["slots_per_layer"]) for row in rows] == ks
    assert all(float(row["decode_tokens_per_s"]) > 0 for row in rows)
    # with a slot for every expert nothing is evicted: each expert is copied at most once
    from mixtral_cli.plan import expert_bytes

    assert int(rows[-1]["bytes_to_device"]) <= args.num_hidden_layers * args.num_local_experts * expert_bytes(args, None)
    assert float(rows[-1]["misses_per_token"]) * 3 <= args.num_hidden_layers * args.num_local_experts
    r = json.loads(proc.stdout)
    assert [row["slots_per_layer"] for row in r["sweep"]] == ks and r["sweep_csv"] == str(out)


def test_bench_table_output_and_usage_errors():
    proc = mixtral("bench", "--preset", "tiny", "--device", "cpu", "--prompt-tokens", "4", "--gen-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    assert "decode" in proc.stdout and "tok/s" in proc.stdout and "decode bound" in proc.stdout
    for bad, needle in ((["--preset", "huge"], "preset"), (["--preset", "tiny", "--bits", "3"], "--bits"),
                        (["--preset", "tiny", "--baseline", "llama.cpp"], "baseline"),
                        (["--preset", "tiny", "--gen-tokens", "0"], "at least 1")):
        proc = mixtral("bench", *bad, "--device", "cpu")
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and needle in proc.stderr


def test_bench_transformers_baseline_on_tiny():
    pytest.importorskip("transformers")
    proc = mixtral("bench", "--preset", "tiny", "--device", "cpu", "--prompt-tokens", "6", "--gen-tokens", "3",
                   "--baseline", "transformers", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    b = r["baseline"]
    assert b["name"] == "transformers" and b["dtype"] in ("bfloat16", "float32")
    assert b["device"] == "cpu" and b["device_note"] is None  # same device as ours: nothing to say
    assert set(b["probe_decode_tokens_per_s"]) == {"bfloat16", "float32"}
    assert b["dtype"] == max(b["probe_decode_tokens_per_s"], key=b["probe_decode_tokens_per_s"].get)
    assert b["decode_ratio"] == pytest.approx(r["decode_tokens_per_s"] / b["decode_tokens_per_s"])
    assert b["prefill_ratio"] == pytest.approx(r["prefill_tokens_per_s"] / b["prefill_tokens_per_s"])


def test_transformers_baseline_holds_the_same_weights():
    """Same logits as our engine in float32: the baseline computes the same model."""
    pytest.importorskip("transformers")
    from mixtral_cli.bench import build_transformers
    from mixtral_cli.runtime import RuntimeOptions, build_engine

    ckpt = SyntheticCheckpoint(preset_args("tiny"), None)
    engine = build_engine(ckpt, None, RuntimeOptions(device="cpu", dtype="float32", ctx_size=32))
    hf = build_transformers(ckpt, ckpt.args, torch.float32)
    ids = list(range(100, 116))
    ours = engine.model(torch.tensor(ids), 0)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


# -- the performance model --------------------------------------------------------------------
def test_bytes_per_token_by_hand():
    a = ModelArgs(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=10)
    # head_dim 4; q: 8x8, k: 4x8, v: 4x8, o: 8x8 -> 64 + 32 + 32 + 64 = 192 attention params
    # router 4x8 = 32, two norms 16 -> 240 params per layer; one expert 3 x 8 x 16 = 384 params
    # bf16: per layer 2 x 240 + 2 experts x 768 bytes = 2016; KV over 10 positions: 2 x 1 x 4 x 10 x 2 = 160
    # head: embedding row 8 + final norm 8 + lm_head 80 = 96 params = 192 bytes
    assert bytes_per_token(a, None, 2, 10) == 192 + 2 * (2016 + 160)
    # int8, group 8: one 8x16 or 16x8 matrix = 128 int8 + 16 float32 scales = 192 bytes; expert 576
    spec = spec_for_bits(8, group_size=8)
    assert bytes_per_token(a, spec, 2, 0) == 192 + 2 * (480 + 2 * 576)


def test_decode_bound_by_hand():
    # 1 GB per token at 20 GB/s: 50 ms -> 20 tok/s
    assert decode_bound(1e9, 20e9) == pytest.approx(20.0)
    # plus 0.5 misses x 100 MB at 25 GB/s = 2 ms -> 1 / 0.052
    assert decode_bound(1e9, 20e9, 0.5, 100e6, 25e9) == pytest.approx(1 / 0.052)
    # DESIGN.md section 6: 64 expert uses of 94 MB at h = 0 over 25 GB/s, resident reads free -> ~4.2 tok/s
    assert decode_bound(1.0, math.inf, 64, 94e6, 25e9) == pytest.approx(4.2, rel=0.02)
    # misses make it slower, never faster
    assert decode_bound(1e9, 20e9, 1, 1e8, 1e10) < decode_bound(1e9, 20e9)


# -- synthetic weights --------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_synthetic_quantized_parts_have_stored_shapes_and_dtypes(bits):
    spec = spec_for_bits(bits)
    args = preset_args("mini")
    ckpt = SyntheticCheckpoint(args, spec)
    for proj in EXPERT_PROJS:
        shape = expert_shape(args, proj)
        w = ckpt.expert_weight(3, 5, proj)
        assert isinstance(w, QuantizedTensor) and w.spec == spec and w.shape == shape
        want = QuantizedTensor.expected_parts(spec, shape)
        assert set(w.parts) == set(want)
        for name, (pshape, dtype) in want.items():
            assert tuple(w.parts[name].shape) == tuple(pshape), name
            assert w.parts[name].dtype == dtype, name
    w = ckpt.expert_weight(0, 0, "w1")
    if bits == 8:
        assert int(w.parts["qweight"].min()) >= -127
    # reproducible, different per expert, and a sane scale once dequantized
    assert torch.equal(w.parts["qweight"], ckpt.expert_weight(0, 0, "w1").parts["qweight"])
    assert not torch.equal(w.parts["qweight"], ckpt.expert_weight(0, 1, "w1").parts["qweight"])
    dense = dequantize(w)
    assert torch.isfinite(dense).all()
    assert 0.3 < float(dense.std()) * math.sqrt(args.hidden_size) < 3


def test_synthetic_dense_and_shared_tensors():
    args = preset_args("tiny")
    ckpt = SyntheticCheckpoint(args, spec_from_bits(16))
    assert ckpt.quant is None
    for proj in EXPERT_PROJS:
        w = ckpt.expert_weight(1, 2, proj)
        assert w.dtype == torch.bfloat16 and tuple(w.shape) == expert_shape(args, proj)
    for name, shape in ckpt.shapes.items():
        t = ckpt.tensor(name)
        assert tuple(t.shape) == shape and t.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    qt = synthetic_quantized(spec_for_bits(4), (64, 128), g)
    assert qt.parts["qweight"].shape == (64 * 128 // 2, 1)


def test_8x7b_preset_has_the_hub_shapes():
    a = preset_args("8x7b")
    assert a.params_total == 46_702_792_704 and a.params_active == 12_879_925_248


# -- CUDA decisions, made in plain code ----------------------------------------------------------------
def test_baseline_runs_on_our_gpu_when_it_fits_else_says_so():
    from mixtral_cli.bench import baseline_device

    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    assert baseline_device(cpu, 10**12, None) == (cpu, None)
    assert baseline_device(cuda, 9 * 10**9, 10 * 10**9) == (cuda, None)  # 9 GB <= 90% of 10 GB
    where, note = baseline_device(cuda, 93 * 10**9, 70 * 10**9)  # 8x7B dense on an 80 GB card with ours loaded
    assert where == cpu and "ran on the CPU" in note and "93.4" not in note and "93.0 GB" in note and "70.0 GB" in note


def test_sweep_is_capped_and_frees_each_cache(monkeypatch):
    """The sweep stops at the given cap, and each K's cache is the only one alive while it runs."""
    import gc
    import weakref

    from mixtral_cli import bench
    from mixtral_cli.bench import BenchOptions, sweep_slots
    from mixtral_cli.experts import ExpertCache
    from mixtral_cli.runtime import RuntimeOptions, build_engine

    ckpt = SyntheticCheckpoint(preset_args("tiny"), spec_for_bits(4))
    engine = build_engine(ckpt, None, RuntimeOptions(device="cpu", dtype="float32", ctx_size=32, experts_in_gpu=2))
    alive: list = []
    caches: list = [weakref.ref(engine.model.experts)]  # the cache built with the engine
    real = bench.measure_ours

    def measure(engine, prompt, gen_tokens, warmup=bench.WARMUP_TOKENS):
        gc.collect()
        caches.append(weakref.ref(engine.model.experts))
        alive.append(sum(1 for ref in caches if ref() is not None))
        return real(engine, prompt, gen_tokens, 0)

    monkeypatch.setattr(bench, "measure_ours", measure)
    rows = sweep_slots(engine, list(range(10, 16)), BenchOptions(preset="tiny", gen_tokens=2), 1e10, 1e10, 1000,
                       100, lambda s: None, k_max=5)
    assert [r["slots_per_layer"] for r in rows] == [2, 3, 4, 5]
    assert alive == [1, 1, 1, 1]  # the first cache (built with the engine) is gone too
    assert isinstance(engine.model.experts, ExpertCache) and engine.model.experts.stats.slots_per_layer == 5


def test_preset_layers_slice_keeps_the_matrices():
    from mixtral_cli.errors import UserError

    a = preset_args("8x7b", 2)
    assert (a.num_hidden_layers, a.hidden_size, a.intermediate_size, a.vocab_size) == (2, 4096, 14336, 32000)
    assert preset_args("8x7b").num_hidden_layers == 32
    for bad in (0, 33):
        with pytest.raises(UserError, match="--layers"):
            preset_args("8x7b", bad)


def test_layers_needs_a_preset(tmp_path):
    from mixtral_cli.bench import BenchOptions, run_bench
    from mixtral_cli.errors import UserError

    with pytest.raises(UserError, match="--layers"):
        run_bench(BenchOptions(model_dir=tmp_path, layers=2))


def test_hybrid_bound_reported_with_offloaded_experts():
    """Offloaded experts with the CPU engine: the bound copying every miss and the bound splitting
    misses between copies and the CPU, both from the measured costs; the split is never worse."""
    from mixtral_cli.bench import BenchOptions, run_bench
    from mixtral_cli.cpu_experts import ExpertCosts, layer_miss_time
    from mixtral_cli.runtime import RuntimeOptions

    rt = RuntimeOptions(device="cpu", dtype="float32", experts_in_gpu=2, cpu_experts="auto")
    r = run_bench(BenchOptions(preset="tiny", bits=4, prompt_tokens=8, gen_tokens=4, layers=2, runtime=rt))
    h = r["bound"]["hybrid"]
    assert h is not None and h["mode"] == "auto"
    assert h["hybrid_tokens_per_s"] >= h["copy_only_tokens_per_s"] > 0
    c = r["expert_cache"]
    assert h["miss_rate"] == pytest.approx(c["misses"] / (c["hits"] + c["misses"]))
    assert h["cpu_experts"] == c["cpu_experts"]
    # the copy-only bound by hand: weights at the memory bandwidth, then each layer's expected misses copied
    costs = ExpertCosts(h["copy_expert_s"], h["cpu_expert_s"])
    base = r["bound"]["weight_bytes_per_token"] / r["bandwidth"]["memory_read_bytes_per_s"]
    wait = 2 * 2 * h["miss_rate"] * h["copy_expert_s"]  # 2 layers x top-2 x miss rate x one copy
    assert layer_miss_time(h["miss_rate"], 2, costs, "never") * 2 == pytest.approx(wait)
    assert h["copy_only_tokens_per_s"] == pytest.approx(1 / (base + wait))
    resident = run_bench(BenchOptions(preset="tiny", prompt_tokens=8, gen_tokens=4, layers=2,
                                      runtime=RuntimeOptions(device="cpu")))
    assert resident["bound"]["hybrid"] is None
