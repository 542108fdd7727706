"""`mixtral bench`: the JSON contract on the tiny preset, the bound and speeds from fixed measurements
(numbers worked out by hand below), the slot sweep, the baseline, and synthetic quantized weights.
No wall-clock thresholds: measured speeds are only checked to be positive."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from mixtral_cli.bench import run as bench
from mixtral_cli.bench.measure import WARMUP_TOKENS, RunTimes
from mixtral_cli.bench.result import Bandwidth, BaselineResult
from mixtral_cli.bench.run import BenchOptions, hybrid_bound, run_bench, sweep_slots
from mixtral_cli.bench.synthetic import SyntheticCheckpoint, preset_args, synthetic_quantized
from mixtral_cli.checkpoints.layout import EXPERT_PROJS, Quantization, bits_flag, expert_shape
from mixtral_cli.engine.cpu_experts import ExpertCosts
from mixtral_cli.engine.loader import build_engine
from mixtral_cli.engine.provider import CacheStats
from mixtral_cli.errors import UserError
from mixtral_cli.kernels.formats import QuantizedTensor, dequantize, spec_for_bits
from mixtral_cli.settings import RuntimeOptions

TOP_FIELDS = {
    "model", "synthetic", "note", "bits", "expert_format", "attn_bits", "output_bits", "device", "dtype", "threads", "params_total",
    "params_active", "slots_per_layer", "prefetch", "prompt_tokens", "gen_tokens", "warmup_tokens", "rounds",
    "load_s", "prefill_tokens_per_s", "time_to_first_token_s", "decode_tokens_per_s", "decode_ms_per_token",
    "peak_rss_bytes", "peak_gpu_bytes", "peak_gpu_reserved_bytes", "expert_cache", "prefill_expert_cache", "bandwidth", "bound", "baseline",
    "sweep",
}
CACHE_FIELDS = {"slots_per_layer", "hits", "misses", "prefetch_hits", "prefetches", "bytes_to_device", "cpu_experts",
                "stall_s", "hit_rate", "prefetch_accuracy"}
BOUND_FIELDS = {"weight_bytes_per_token", "expert_bytes", "misses_per_token", "decode_tokens_per_s", "achieved_fraction",
                "hybrid"}

# The tiny preset by hand (hidden 64, FFN 128, 3 layers, 4 heads / 2 KV heads of 16, 8 experts, top-2, vocab 32000):
# - per layer: attention 64 x (2 x 64 + 2 x 32) = 12,288, router 8 x 64 = 512, two norms 128 -> 12,928 params
# - what one token reads besides experts: lm_head 32000 x 64 = 2,048,000 + its embedding row 64 + final norm 64
#   + 3 x 12,928 = 2,086,912 params = 4,173,824 bf16 bytes
# - one bf16 expert: 3 x 64 x 128 x 2 = 49,152 bytes; one nf4 expert: each 8,192-weight matrix is 4,096 bytes of
#   codes + 128 block scales + one fp32 second-level absmax + one fp32 offset = 4,232; x 3 = 12,696 bytes
# - KV per position: 2 (K, V) x 3 layers x 2 heads x 16 x 2 bytes = 384
TINY_SHARED_PER_TOKEN = 4_173_824
TINY_EXPERT_BF16, TINY_EXPERT_NF4 = 49_152, 12_696
TINY_KV_PER_POSITION = 384


def mixtral(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mixtral_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


# -- the CLI contract ----------------------------------------------------------------------------
def test_bench_tiny_json_has_every_field():
    proc = mixtral("bench", "--preset", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--prompt-tokens", "12",
                   "--gen-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert set(r) == TOP_FIELDS
    assert set(r["expert_cache"]) == CACHE_FIELDS and set(r["prefill_expert_cache"]) == CACHE_FIELDS
    assert set(r["bandwidth"]) == {"memory_read_bytes_per_s", "host_to_device_bytes_per_s", "host_to_device_method"}
    assert set(r["bound"]) == BOUND_FIELDS
    assert r["model"] == "preset:tiny" and r["synthetic"] and "not representative" in r["note"]
    assert r["bits"] == 16 and r["device"] == "cpu" and r["peak_gpu_bytes"] is None and r["peak_gpu_reserved_bytes"] is None
    assert r["prompt_tokens"] == 12 and r["gen_tokens"] == 5 and r["slots_per_layer"] == 8
    # embed_tokens and lm_head 2 x 2,048,000 + final norm 64 + 3 x 12,928 = 4,134,848 shared params, plus
    # 3 layers x 8 experts x 24,576 = 589,824 (total) or 3 x 2 x 24,576 = 147,456 (active)
    assert r["params_total"] == 4_724_672 and r["params_active"] == 4_282_304
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "peak_rss_bytes"):
        assert r[key] > 0, key
    # every expert resident: each token uses top-2 experts in each of 3 layers, all hits
    assert r["expert_cache"]["hits"] == 5 * 6 and r["expert_cache"]["misses"] == 0
    assert r["prefill_expert_cache"]["hits"] == 12 * 6
    # KV over the mean context of the timed steps: 12 prompt + 4 warm-up + (5 - 1) / 2 = 18 positions
    b = r["bound"]
    assert b["weight_bytes_per_token"] == TINY_SHARED_PER_TOKEN + 6 * TINY_EXPERT_BF16 + 18 * 384 == 4_475_648
    assert b["expert_bytes"] == TINY_EXPERT_BF16 and b["misses_per_token"] == 0 and b["hybrid"] is None
    assert r["baseline"] is None and r["sweep"] is None


def test_bench_tiny_quantized_offloaded_counts_misses():
    proc = mixtral("bench", "--preset", "tiny", "--bits", "4", "--device", "cpu", "--experts-in-gpu", "2",
                   "--prompt-tokens", "8", "--gen-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["bits"] == 4 and r["expert_format"] == "nf4" and r["slots_per_layer"] == 2
    c = r["expert_cache"]
    assert c["hits"] + c["misses"] == 4 * 3 * 2  # 4 tokens x 3 layers x top-2
    assert c["misses"] > 0 and c["bytes_to_device"] > 0
    assert r["bound"]["expert_bytes"] == TINY_EXPERT_NF4


def test_bench_sweep_slots_writes_one_csv_row_per_k(tmp_path):
    out = tmp_path / "sweep.csv"
    proc = mixtral("bench", "--preset", "tiny", "--device", "cpu", "--prompt-tokens", "6", "--gen-tokens", "3",
                   "--sweep-slots", "--csv", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(row["slots_per_layer"]) for row in rows] == [2, 3, 4, 5, 6, 7, 8]
    assert all(float(row["decode_tokens_per_s"]) > 0 for row in rows)
    # with a slot for every expert nothing is evicted: each of 3 x 8 experts is copied at most once
    assert int(rows[-1]["bytes_to_device"]) <= 3 * 8 * TINY_EXPERT_BF16
    assert float(rows[-1]["misses_per_token"]) * 3 <= 3 * 8
    r = json.loads(proc.stdout)
    assert [row["slots_per_layer"] for row in r["sweep"]] == [2, 3, 4, 5, 6, 7, 8] and r["sweep_csv"] == str(out)
    assert set(r) == TOP_FIELDS | {"sweep_csv", "sweep_png"}


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


def test_bench_a_checkpoint_quantized_in_memory_over_two_rounds(tiny_ckpt):
    """`-m MODEL --bits 4` quantizes the 16-bit checkpoint's experts in memory; `--rounds 2` repeats the
    measurement; a 4-bit checkpoint cannot be benchmarked at another width."""
    proc = mixtral("bench", "-m", str(tiny_ckpt), "--bits", "4", "--rounds", "2", "--device", "cpu",
                   "--prompt-tokens", "6", "--gen-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert (r["bits"], r["expert_format"], r["rounds"], r["synthetic"]) == (4, "nf4", 2, False)
    assert r["bound"]["expert_bytes"] == TINY_EXPERT_NF4
    proc = mixtral("bench", "-m", str(tiny_ckpt), "--bits", "7", "--device", "cpu")
    assert proc.returncode == 2 and "--bits 7: must be 4, 8 or 16" in proc.stderr


def test_run_bench_validates_the_runtime_options_as_the_command_line_does():
    with pytest.raises(UserError, match="device"):
        run_bench(BenchOptions(preset="tiny", runtime=RuntimeOptions(device="tpu")))


# -- the bound and the speeds, from fixed measurements ---------------------------------------------
def fix_measurements(monkeypatch, decode_s: list[float], hits: int | None = None, misses: int | None = None):
    """Bandwidths of 4 GB/s (memory) and 1 GB/s (copies); each measurement decodes in the next of
    `decode_s`, prefills in a quarter of that and has its first token 0.1 s after the prefill; the
    decode counters, if given, replace the measured ones. The engine still runs: only the numbers it
    reports are fixed."""
    monkeypatch.setattr(bench, "memory_bandwidth", lambda device: 4e9)
    monkeypatch.setattr(bench, "host_to_device_bandwidth", lambda device, nbytes, store=None: (1e9, "fixed"))
    real, rounds = bench.measure_ours, iter(decode_s)

    def measure(engine, prompt, gen_tokens, warmup=WARMUP_TOKENS):
        _, prefill, decode = real(engine, prompt, gen_tokens, warmup)
        if hits is not None:
            decode = replace(decode, hits=hits, misses=misses)
        decode_s = next(rounds)
        return RunTimes(decode_s / 4, decode_s / 4 + 0.1, decode_s, len(prompt), gen_tokens), prefill, decode

    monkeypatch.setattr(bench, "measure_ours", measure)


def test_resident_bound_and_median_speeds_by_hand(monkeypatch):
    # the untimed warm-up pass, then 3 rounds decoding 5 tokens in 4 s, 2 s and 1 s (prefilling in 1 s,
    # 0.5 s and 0.25 s): the medians are 2 s and 0.5 s
    fix_measurements(monkeypatch, [9.0, 4.0, 2.0, 1.0])
    rt = RuntimeOptions(device="cpu", dtype="bfloat16")
    r = run_bench(BenchOptions(preset="tiny", prompt_tokens=12, gen_tokens=5, rounds=3, runtime=rt))
    assert r.prefill_tokens_per_s == 24.0 and r.time_to_first_token_s == pytest.approx(0.6)  # 12 tokens in 0.5 s
    assert r.decode_tokens_per_s == 2.5 and r.decode_ms_per_token == 400.0  # 5 tokens in 2 s
    assert r.bandwidth == Bandwidth(4e9, 1e9, "fixed")
    # 4,475,648 bytes per token (see test_bench_tiny_json_has_every_field) at 4 GB/s, no misses
    b = r.bound
    assert b.weight_bytes_per_token == 4_475_648 and b.misses_per_token == 0
    assert b.decode_tokens_per_s == pytest.approx(893.72533318)  # 4e9 / 4,475,648
    assert b.achieved_fraction == pytest.approx(0.00279728)  # 2.5 / 893.725...
    assert b.hybrid is None
    d = r.as_dict()
    assert set(d) == TOP_FIELDS and set(d["bound"]) == BOUND_FIELDS and set(d["expert_cache"]) == CACHE_FIELDS
    assert json.loads(json.dumps(d)) == d  # plain JSON values throughout


def test_offloaded_bound_counts_the_copies_by_hand(monkeypatch, tmp_path):
    # 6 misses in 4 decoded tokens: 1.5 expert copies per token
    fix_measurements(monkeypatch, [1.0] * 9, hits=18, misses=6)
    rt = RuntimeOptions(device="cpu", dtype="bfloat16", experts_in_gpu=2, cpu_experts="never")
    r = run_bench(BenchOptions(preset="tiny", bits=4, prompt_tokens=8, gen_tokens=4, sweep_slots=True,
                               csv_path=tmp_path / "s.csv", runtime=rt))
    # KV at 8 + 4 + 1.5 = 13.5 positions: 5,184 bytes; six nf4 experts 6 x 12,696 = 76,176
    b = r.bound
    assert b.weight_bytes_per_token == TINY_SHARED_PER_TOKEN + 76_176 + 5_184 == 4_255_184
    assert b.expert_bytes == TINY_EXPERT_NF4 and b.misses_per_token == 1.5
    # 1 / (4,255,184 / 4e9 + 1.5 x 12,696 / 1e9) = 1 / (1.063796 ms + 0.019044 ms)
    assert b.decode_tokens_per_s == pytest.approx(923.49746962)
    # each sweep row (K = 2..8 slots) had the same fixed counters, so the same bound
    assert [row.slots_per_layer for row in r.sweep] == [2, 3, 4, 5, 6, 7, 8]
    assert all(row.misses_per_token == 1.5 and row.bound_tokens_per_s == pytest.approx(923.49746962)
               for row in r.sweep)
    d = r.as_dict()
    assert set(d) == TOP_FIELDS | {"sweep_csv", "sweep_png"} and d["sweep_csv"] == str(tmp_path / "s.csv")
    assert d["sweep"][0]["slots_per_layer"] == 2 and d["bits"] == 4 and d["expert_format"] == "nf4"


def test_hybrid_bound_by_hand():
    """2 layers, top-2, 8 uses of which 2 missed: a miss rate of 1/4. One expert costs 2 ms to copy,
    1 ms on the CPU; 1 GB per token at 20 GB/s is 50 ms."""
    engine = SimpleNamespace(args=preset_args("tiny", 2), experts=SimpleNamespace(
        cpu=SimpleNamespace(costs=ExpertCosts(copy_s=2e-3, cpu_s=1e-3), mode="auto")))
    h = hybrid_bound(engine, 10**9, 20e9, CacheStats(slots_per_layer=2, hits=6, misses=2, cpu_experts=1))
    assert h.miss_rate == 0.25 and h.cpu_experts == 1 and h.mode == "auto"
    assert (h.copy_expert_s, h.cpu_expert_s) == (2e-3, 1e-3)
    # copying every miss: a layer waits 2 experts x 1/4 x 2 ms = 1 ms on average; 2 layers: 50 + 2 ms
    assert h.copy_only_tokens_per_s == pytest.approx(1 / 0.052)
    # split: one miss (probability 2 x 1/4 x 3/4 = 3/8) goes to the CPU, 1 ms; two misses (1/16) go one to
    # each engine, 2 ms: 3/8 ms + 1/8 ms = 0.5 ms per layer; 2 layers: 50 + 1 ms
    assert h.hybrid_tokens_per_s == pytest.approx(1 / 0.051)
    resident = SimpleNamespace(args=engine.args, experts=SimpleNamespace())
    assert hybrid_bound(resident, 10**9, 20e9, CacheStats(slots_per_layer=8, hits=8)) is None


def test_hybrid_bound_reported_with_offloaded_experts():
    """Offloaded experts with the CPU engine: both bounds reported, the split never worse."""
    rt = RuntimeOptions(device="cpu", dtype="float32", experts_in_gpu=2, cpu_experts="auto")
    r = run_bench(BenchOptions(preset="tiny", bits=4, prompt_tokens=8, gen_tokens=4, layers=2, runtime=rt))
    h = r.bound.hybrid
    assert h is not None and h.mode == "auto" and h.cpu_experts == r.expert_cache.cpu_experts
    assert h.hybrid_tokens_per_s >= h.copy_only_tokens_per_s > 0
    resident = run_bench(BenchOptions(preset="tiny", prompt_tokens=8, gen_tokens=4, layers=2,
                                      runtime=RuntimeOptions(device="cpu")))
    assert resident.bound.hybrid is None


# -- the slot sweep --------------------------------------------------------------------------------
def test_sweep_is_capped_and_frees_each_cache(monkeypatch):
    """The sweep stops at the given cap, each K's cache is the only one alive while it runs, and each
    row's bound counts its misses."""
    import gc
    import weakref

    from mixtral_cli.engine.experts import ExpertCache

    ckpt = SyntheticCheckpoint(preset_args("tiny"), Quantization(experts=spec_for_bits(4)))
    engine = build_engine(ckpt, None, RuntimeOptions(device="cpu", dtype="float32", ctx_size=32, experts_in_gpu=2))
    alive: list = []
    caches: list = [weakref.ref(engine.experts)]  # the cache built with the engine
    real = bench.measure_ours

    def measure(engine, prompt, gen_tokens, warmup=WARMUP_TOKENS):
        gc.collect()
        caches.append(weakref.ref(engine.experts))
        alive.append(sum(1 for ref in caches if ref() is not None))
        times, prefill, decode = real(engine, prompt, gen_tokens, 0)
        return times, prefill, replace(decode, misses=6)

    monkeypatch.setattr(bench, "measure_ours", measure)
    rows = sweep_slots(engine, list(range(10, 16)), 2, Bandwidth(1e10, 1e10, "fixed"), 1000, 100, lambda s: None,
                       k_max=5)
    assert [r.slots_per_layer for r in rows] == [2, 3, 4, 5]
    assert alive == [1, 1, 1, 1]  # the first cache (built with the engine) is gone too
    assert isinstance(engine.experts, ExpertCache) and engine.experts.stats.slots_per_layer == 5
    # 6 misses in 2 tokens: 1000 bytes / 1e10 + 3 x 100 bytes / 1e10 = 130 ns per token
    assert all(r.misses_per_token == 3 and r.bound_tokens_per_s == pytest.approx(1 / 130e-9) for r in rows)


# -- the transformers baseline -----------------------------------------------------------------------
def test_bench_transformers_baseline_on_tiny():
    pytest.importorskip("transformers")
    proc = mixtral("bench", "--preset", "tiny", "--device", "cpu", "--prompt-tokens", "6", "--gen-tokens", "3",
                   "--baseline", "transformers", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    b = r["baseline"]
    assert set(b) == {"name", "version", "dtype", "device", "device_note", "experts_implementation", "weights",
                      "probe_decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s",
                      "decode_tokens_per_s", "prefill_ratio", "decode_ratio"}
    assert b["name"] == "transformers" and b["dtype"] in ("bfloat16", "float32")
    assert b["device"] == "cpu" and b["device_note"] is None  # same device as ours: nothing to say
    assert set(b["probe_decode_tokens_per_s"]) == {"bfloat16", "float32"}
    assert b["dtype"] == max(b["probe_decode_tokens_per_s"], key=b["probe_decode_tokens_per_s"].get)
    assert b["prefill_ratio"] > 0 and b["decode_ratio"] > 0


def test_baseline_ratios_by_hand():
    from mixtral_cli.bench.baseline import BaselineInfo

    info = BaselineInfo("transformers", "5.0", "float32", "cpu", None, None, "the same bfloat16 weights", {})
    ours = RunTimes(prefill_s=0.5, ttft_s=0.6, decode_s=2.0, prompt_tokens=100, gen_tokens=10)  # 200, 5 tok/s
    theirs = RunTimes(prefill_s=2.0, ttft_s=2.5, decode_s=8.0, prompt_tokens=100, gen_tokens=10)  # 50, 1.25 tok/s
    b = BaselineResult.compare(info, ours, theirs)
    assert (b.prefill_tokens_per_s, b.time_to_first_token_s, b.decode_tokens_per_s) == (50.0, 2.5, 1.25)
    assert b.prefill_ratio == 4.0 and b.decode_ratio == 4.0
    assert b.as_dict()["version"] == "5.0" and b.as_dict()["decode_ratio"] == 4.0


def test_transformers_baseline_holds_the_same_weights():
    """Same logits as our engine in float32: the baseline computes the same model."""
    pytest.importorskip("transformers")
    from mixtral_cli.bench.baseline import build_transformers

    ckpt = SyntheticCheckpoint(preset_args("tiny"), Quantization())
    engine = build_engine(ckpt, None, RuntimeOptions(device="cpu", dtype="float32", ctx_size=32))
    hf = build_transformers(ckpt, ckpt.args, torch.float32)
    ids = list(range(100, 116))
    ours = engine.model(torch.tensor(ids), 0)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_baseline_runs_on_our_gpu_when_it_fits_else_says_so():
    from mixtral_cli.bench.baseline import baseline_device

    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    assert baseline_device(cpu, 10**12, None) == (cpu, None)
    assert baseline_device(cuda, 9 * 10**9, 10 * 10**9) == (cuda, None)  # 9 GB <= 90% of 10 GB
    where, note = baseline_device(cuda, 93 * 10**9, 70 * 10**9)  # 8x7B dense on an 80 GB card with ours loaded
    assert where == cpu and "ran on the CPU" in note and "93.4" not in note and "93.0 GB" in note and "70.0 GB" in note


# -- presets and synthetic weights -----------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_synthetic_quantized_parts_have_stored_shapes_and_dtypes(bits):
    spec = spec_for_bits(bits)
    args = preset_args("mini")
    ckpt = SyntheticCheckpoint(args, Quantization(experts=spec, attention=spec, output=spec))
    for prefix, shape in (("model.layers.2.self_attn.k_proj", (256, 1024)), ("lm_head", (32000, 1024))):
        w = ckpt.weight(prefix)
        assert isinstance(w, QuantizedTensor) and w.spec == spec and w.shape == shape
        assert {n: (tuple(t.shape), t.dtype) for n, t in w.parts.items()} == {
            n: (tuple(s), d) for n, (s, d) in QuantizedTensor.expected_parts(spec, shape).items()}
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
    ckpt = SyntheticCheckpoint(args, Quantization(experts=bits_flag(16)))
    assert ckpt.quant.dense
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


def test_preset_layers_slice_keeps_the_matrices():
    a = preset_args("8x7b", 2)
    assert (a.num_hidden_layers, a.hidden_size, a.intermediate_size, a.vocab_size) == (2, 4096, 14336, 32000)
    assert preset_args("8x7b").num_hidden_layers == 32
    for bad in (0, 33):
        with pytest.raises(UserError, match="--layers"):
            preset_args("8x7b", bad)


def test_layers_needs_a_preset(tmp_path):
    with pytest.raises(UserError, match="--layers"):
        run_bench(BenchOptions(model_dir=tmp_path, layers=2))


def test_bits_flag_is_parsed_once_for_every_command():
    """info and bench take 16 (bf16) too, quantize only 4 and 8; every refusal names the flags given."""
    assert bits_flag(None) is None and bits_flag(16) is None
    assert (bits_flag(4).name, bits_flag(4).group_size) == ("nf4", 64)
    assert (bits_flag(8, 64).name, bits_flag(8, 64).group_size) == ("int8", 64)
    with pytest.raises(UserError, match=r"^--bits 5: must be 4, 8 or 16 \("):
        bits_flag(5)
    with pytest.raises(UserError, match=r"^--bits 16: must be 4 or 8 \("):
        bits_flag(16, dense=False)
    with pytest.raises(UserError, match=r"^--bits 4 --group-size 48: nf4 group size must be a power of two"):
        bits_flag(4, 48)
