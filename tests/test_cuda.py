"""The GPU path on a real GPU: `pytest -m cuda` (skipped where torch sees no CUDA device).

- K-slot offloaded generation gives the resident model's tokens, for 4-bit and 8-bit experts;
- the bitsandbytes nf4 and int8 CUDA paths match the float64 reference matmul;
- chunked prefill gives one-pass logits (float32, within CHUNK_RTOL of the largest logit);
- after a 4k-token prompt, torch's peak reserved memory plus the CUDA context stays within --gpu-mem;
- the expert store is pinned (`is_pinned()`) and torch's caching host allocator holds no pinned bytes;
- slot refills keep each slot's QuantState; stall time is measured and finite;
- quantized attention and output layers run on the bitsandbytes paths and match their dequantized weights.

Weights are synthetic (`mixtral_cli.bench.synthetic.SyntheticCheckpoint`): the checks are about memory,
placement and numerics, not text quality.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mixtral_cli.bench.synthetic import PRESETS, SyntheticCheckpoint, preset_args
from mixtral_cli.checkpoints.config import ModelArgs
from mixtral_cli.checkpoints.layout import Quantization
from mixtral_cli.checkpoints.source import CheckpointSource
from mixtral_cli.engine.experts import ExpertCache, ResidentExperts
from mixtral_cli.engine.generate import Session, chunks
from mixtral_cli.engine.loader import RuntimeOptions, build_engine, fused_attention_available
from mixtral_cli.engine.plan import CUDA_CONTEXT_BYTES, plan_memory
from mixtral_cli.kernels import bnb_cuda, dispatch
from mixtral_cli.kernels.formats import quantize, spec_for_bits
from mixtral_cli.kernels.linear import QuantLinear
from mixtral_cli.kernels.reference import reference_matmul
from mixtral_cli.system.host_memory import mem_available

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with: pytest -m cuda)"),
]

GiB, MiB = 2**30, 2**20
CHUNK_RTOL = 1e-4  # float32 on the GPU: chunked vs one pass differ by summation order and attention kernel
# 4 layers, hidden 512, 8 experts of FFN 1024: both default group sizes (64, 128) divide every width;
# 4096 positions (the tiny preset has 1024) for the chunked-prefill test's 1100-token prompt
SMALL = ModelArgs(**(PRESETS["tiny"] | {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                                         "num_attention_heads": 8, "num_key_value_heads": 2,
                                         "max_position_embeddings": 4096}))


def experts_at(bits: int | None) -> Quantization:
    return Quantization(experts=spec_for_bits(bits) if bits in (4, 8) else None)


def engine(args: ModelArgs, bits: int | None, **opts):
    return build_engine(SyntheticCheckpoint(args, experts_at(bits)), None, RuntimeOptions(device="cuda", **opts))


class Dequantized(CheckpointSource):
    """Another source's weights, every quantized one dequantized to bf16: the dense twin of a model."""

    def __init__(self, inner: CheckpointSource) -> None:
        self.inner, self.args, self.quant = inner, inner.args, Quantization()

    def tensor(self, name, into=None, dtype=None):
        prefix = name.removesuffix(".weight")
        t = self.inner.dense_weight(prefix) if self.inner.quant.spec_for(prefix) else self.inner.tensor(name)
        return t if into is None else into.copy(t, dtype)

    def weight(self, prefix, into=None, dtype=None):
        return self.tensor(f"{prefix}.weight", into, dtype)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_attention_and_output_on_cuda_match_their_dequantized_weights(bits):
    """Every linear layer quantized: attention and lm_head are QuantLinears on the bitsandbytes paths,
    and the logits match the same weights dequantized and run dense (prefill and one decode step)."""
    spec = spec_for_bits(bits)
    src = SyntheticCheckpoint(SMALL, Quantization(experts=spec, attention=spec, output=spec))
    opts = RuntimeOptions(device="cuda", dtype="bfloat16", ctx_size=64)
    quantized, dense = build_engine(src, None, opts), build_engine(Dequantized(src), None, opts)
    m = quantized.model
    assert isinstance(m.lm_head, QuantLinear) and isinstance(m.model.layers[0].self_attn.q_proj, QuantLinear)
    x = torch.randn(3, SMALL.hidden_size, device="cuda", dtype=torch.bfloat16)
    assert dispatch.select_path(x, m.lm_head.qt, m.lm_head.prepared()) == f"bnb_cuda_{spec.name}"
    ids = torch.tensor(prompt(20, seed=5), device="cuda")
    for eng in (quantized, dense):
        eng.model.setup_cache(64)
    a, b = quantized.model(ids, 0), dense.model(ids, 0)
    assert float((a - b).norm() / b.norm()) < 0.03
    a, b = quantized.model(ids[:1], 20), dense.model(ids[:1], 20)
    assert float((a - b).norm() / b.norm()) < 0.03


def greedy(eng, prompt: list[int], n: int) -> list[int]:
    eng.experts.reset_stats()
    session = Session(eng.model)
    logits, _ = session.prefill(prompt)
    out = []
    for _ in range(n):
        out.append(int(torch.argmax(logits)))
        logits = session.step(out[-1])
    return out


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("bits", [4, 8])
def test_offloaded_generation_is_token_identical_to_resident(bits):
    ids = prompt(700)  # two prefill chunks
    resident = engine(SMALL, bits, ctx_size=800, experts_in_gpu=8)
    assert isinstance(resident.experts, ResidentExperts)
    want = greedy(resident, ids, 24)
    del resident
    torch.cuda.empty_cache()
    for slots, prefetch in ((2, True), (3, True), (5, False)):
        # every miss copied: computing some on the CPU (--cpu-experts) is other arithmetic than the GPU's
        eng = engine(SMALL, bits, ctx_size=800, experts_in_gpu=slots, prefetch=prefetch, cpu_experts="never")
        cache = eng.experts
        assert isinstance(cache, ExpertCache)
        assert greedy(eng, ids, 24) == want, (bits, slots, prefetch)
        stats = cache.stats
        assert stats.misses > 0 and math.isfinite(stats.stall_s) and stats.stall_s >= 0
        assert (stats.prefetches > 0) == prefetch
        cache.store.close()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bitsandbytes_cuda_paths_match_the_reference(bits, dtype):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0")
    dev = torch.device("cuda", torch.cuda.current_device())
    assert bnb_cuda.probe(dev, "nf4" if bits == 4 else "int8", dtype), "bitsandbytes' CUDA kernel failed its self-test"
    g = torch.Generator().manual_seed(bits)
    for shape in ((1024, 512), (512, 1024)):
        qt = quantize(torch.randn(shape, generator=g) * 0.02, spec_for_bits(bits)).to(dev)
        prep = dispatch.prepare(qt)
        for rows in (1, 3, 64, 600):
            x = torch.randn(rows, shape[1], generator=g).to(dev, dtype)
            path = dispatch.select_path(x, qt, prep)
            assert path == ("bnb_cuda_nf4" if bits == 4 else "bnb_cuda_int8")
            got = dispatch.matmul(x, qt, prep).float()
            ref = reference_matmul(x.float(), qt)
            tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
            assert float((got - ref).abs().max()) <= tol * float(ref.abs().max()), (shape, rows, path)


def test_chunked_prefill_matches_one_pass():
    eng = engine(SMALL, None, dtype="float32", ctx_size=1200)
    ids = torch.tensor(prompt(1100, seed=1), device="cuda")
    one_pass = eng.model(ids, 0)
    chunked = torch.cat([eng.model(ids[a:b], a) for a, b in chunks(0, 1100, 512)])
    assert float((chunked - one_pass).abs().max()) < CHUNK_RTOL * float(one_pass.abs().max())
    logits, _ = Session(eng.model, chunk=300).prefill(ids.tolist())
    assert float((logits - one_pass[-1]).abs().max()) < CHUNK_RTOL * float(one_pass.abs().max())


def _within_budget_after_long_prompt(preset: str, budget: int, prompt_tokens: int = 4000):
    args = preset_args(preset)
    torch.cuda.init()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    free0, total = torch.cuda.mem_get_info()
    context = total - free0 - before  # what the process holds on the GPU outside torch's allocator
    eng = engine(args, 4, ctx_size=4096, gpu_mem=budget)
    cache = eng.experts
    assert isinstance(cache, ExpertCache)
    dev = torch.device("cuda")
    plan = plan_memory(args, experts_at(4), 4096, budget, eng.dtype.itemsize,
                       fused_attention_available(dev, eng.dtype, args))
    assert cache.stats.slots_per_layer == plan.slots_per_layer < args.num_local_experts
    greedy(eng, prompt(prompt_tokens, seed=2), 4)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_reserved() - before
    print(f"{preset}: budget {budget / GiB:.2f} GiB, peak reserved {peak / GiB:.2f} GiB, "
          f"CUDA context {context / GiB:.2f} GiB (planner assumes {CUDA_CONTEXT_BYTES / GiB:.2f})")
    assert peak + context <= budget, (peak / GiB, context / GiB, budget / GiB)
    # the store is pinned memory of its own: torch's caching host allocator holds none
    store = cache.store
    assert store.buffers[0][0].is_pinned() and store.buffers[-1][-1].is_pinned()
    assert store.nbytes() <= store.pinned_bytes < store.nbytes() + 2**16
    if hasattr(torch.cuda, "host_memory_stats"):
        stats = torch.cuda.host_memory_stats()
        # the block count is "allocations.current" in torch 2.13's docs and "allocation.current" in some
        # versions: one of them must be there, or this check would pass on a missing key
        counts = [k for k in ("allocations.current", "allocation.current") if k in stats]
        assert "allocated_bytes.current" in stats and counts, sorted(stats)
        assert stats["allocated_bytes.current"] == 0 and all(stats[k] == 0 for k in counts)
    # a slot refill keeps the slot's QuantState (built once per slot)
    layer = cache.layers[0]
    linear = next(m for m in layer.modules[0].modules() if isinstance(m, QuantLinear))
    state = linear.prepared().quant_state
    assert state is not None
    for eid in range(args.num_local_experts):
        list(cache.run(0, [eid], [1]))
    assert linear.prepared().quant_state is state
    store.close()
    return peak


def test_mini_with_a_4k_prompt_stays_within_the_budget():
    # 1000 MiB: 4 of 8 slots per layer at a 4096-token context, and the 512 MiB context inside it
    peak = _within_budget_after_long_prompt("mini", 1000 * MiB)
    assert peak > 300 * MiB  # the budget was really used


def test_8x7b_at_4_bits_with_a_4k_prompt_stays_within_24_gib():
    free = mem_available()
    if free is not None and free < 30 * GiB:
        pytest.skip(f"the 8x7B 4-bit store needs ~22 GB of pinned host RAM ({free / GiB:.0f} GiB available)")
    if torch.cuda.mem_get_info()[1] < 24 * GiB:
        pytest.skip("needs a GPU with at least 24 GiB")
    _within_budget_after_long_prompt("8x7b", 24 * GiB)


def test_bench_on_the_gpu_sweeps_within_the_planner_allowance(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    budget = 1000 * MiB  # mini at 4 bits: 5 slots per layer fit at this context
    proc = subprocess.run([sys.executable, "-m", "mixtral_cli", "bench", "--preset", "mini", "--bits", "4",
                           "--gpu-mem", "1000MiB", "--prompt-tokens", "600", "--gen-tokens", "8", "--sweep-slots",
                           "--csv", str(tmp_path / "sweep.csv"), "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["device"].startswith("cuda") and r["peak_gpu_reserved_bytes"] >= r["peak_gpu_bytes"] > 0
    args, dev = preset_args("mini"), torch.device("cuda")
    cap = plan_memory(args, experts_at(4), 600 + 4 + 8 + 1, budget, 2,
                      fused_attention_available(dev, torch.bfloat16, args)).slots_per_layer
    assert [row["slots_per_layer"] for row in r["sweep"]] == list(range(2, cap + 1))
