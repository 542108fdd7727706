"""`mixtral bench`: prefill/decode speed, memory, expert-cache behaviour and the bounds they imply.

Weights come from a checkpoint (`-m`) or from a synthetic preset (`--preset tiny|mini|8x7b`, see
`synthetic`). Prompts are random token ids and decoding is greedy with EOS ignored, so every run
decodes exactly `--gen-tokens` tokens. No tokenizer is used.

Random routers route differently from trained ones: expert-cache hit rates measured on synthetic
presets say nothing about real text; only the speeds per hit rate carry over.

This module runs the benchmark and measures our engine; `measure` holds the machine probes,
`baseline` the transformers engine, `plan` the byte accounting and the bound, `result` what is
reported.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..checkpoints.layout import Quantization, bits_flag
from ..checkpoints.reader import Checkpoint
from ..checkpoints.source import CheckpointSource
from ..engine.cpu_experts import layer_miss_time
from ..engine.experts import ExpertCache, ExpertStore
from ..engine.generate import Session
from ..engine.loader import Engine, build_engine, fused_attention_available, gpu_budget, pick_device
from ..engine.plan import bytes_per_token, copy_wait_s, decode_bound, expert_bytes, plan_memory
from ..engine.provider import CacheStats
from ..engine.trace import recording
from ..errors import UserError
from ..settings import RuntimeOptions
from .baseline import measure_transformers, pick_transformers
from .measure import (
    WARMUP_TOKENS,
    RunTimes,
    host_to_device_bandwidth,
    median_times,
    memory_bandwidth,
    peak_rss_bytes,
    sync,
)
from .result import (
    Bandwidth,
    BaselineResult,
    BenchResult,
    Bound,
    HybridBound,
    SweepRow,
    write_sweep_csv,
    write_sweep_png,
)
from .synthetic import PRESETS, QuantizingCheckpoint, SyntheticCheckpoint, preset_args

SYNTHETIC_NOTE = ("synthetic random weights: routing (and so expert-cache hit rates and prefetch accuracy) is not "
                  "representative of real text; the speeds measured at a given hit rate carry over")


# -- what to run ---------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    preset: str | None = None
    model_dir: Path | None = None
    bits: int | None = None
    attn_bits: int | None = None
    output_bits: int | None = None
    prompt_tokens: int = 512
    gen_tokens: int = 128
    baseline: str | None = None
    sweep_slots: bool = False
    csv_path: Path | None = None
    rounds: int = 1
    seed: int = 0
    layers: int | None = None  # presets only: the first N layers
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    trace: Path | None = None  # one more round, untimed, with its routing recorded here


def _validate(o: BenchOptions) -> None:
    o.runtime.validate()
    if (o.preset is None) == (o.model_dir is None):
        raise UserError("pass either -m MODEL or --preset", hint=f"presets: {', '.join(PRESETS)}")
    if o.prompt_tokens < 1 or o.gen_tokens < 1:
        raise UserError("--prompt-tokens and --gen-tokens must be at least 1")
    if o.baseline not in (None, "transformers"):
        raise UserError(f"unknown baseline '{o.baseline}'", hint="the only baseline is: transformers")
    if o.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {o.rounds}")
    if o.layers is not None and o.preset is None:
        raise UserError("--layers applies to --preset only", hint="a checkpoint (-m) runs all its layers")


def _wanted(o: BenchOptions, base: Quantization) -> Quantization:
    """The formats the flags ask for, each group not named keeping `base`'s."""
    flags = {"experts": (o.bits, "--bits"), "attention": (o.attn_bits, "--attn-bits"),
             "output": (o.output_bits, "--output-bits")}
    return Quantization(**{group: base.spec(group) if bits is None else bits_flag(bits, flag=flag)
                           for group, (bits, flag) in flags.items()})


def open_checkpoint(o: BenchOptions) -> CheckpointSource:
    """The weights to measure: a preset's random ones in the flags' formats (bfloat16 where none is
    given), or the checkpoint, quantized as it is read where the flags ask for other formats."""
    if o.preset is not None:
        return SyntheticCheckpoint(preset_args(o.preset, o.layers), _wanted(o, Quantization()), o.seed)
    ckpt = Checkpoint(o.model_dir)
    wanted = _wanted(o, ckpt.quant)
    if wanted == ckpt.quant:
        return ckpt
    if not ckpt.quant.dense:
        raise UserError(f"{o.model_dir} is quantized ({ckpt.quant.describe()}); other formats need the original checkpoint")
    return QuantizingCheckpoint(ckpt, wanted)


# -- measuring our engine --------------------------------------------------------------------------
def measure_ours(engine: Engine, prompt: list[int], gen_tokens: int, warmup: int = WARMUP_TOKENS
                 ) -> tuple[RunTimes, CacheStats, CacheStats]:
    """Prefill `prompt`, decode `warmup` untimed tokens, then time `gen_tokens` greedy steps (EOS
    ignored). Returns the times and the expert-cache counters of the prefill and of the timed decode."""
    experts, dev = engine.experts, engine.device
    session = Session(engine.model)  # chunked prefill, as in `run` and `chat`
    experts.reset_stats()
    sync(dev)
    t0 = time.perf_counter()
    logits, _ = session.prefill(prompt)
    sync(dev)
    prefill_s = time.perf_counter() - t0
    token = int(torch.argmax(logits))
    ttft = time.perf_counter() - t0
    prefill_stats = replace(experts.stats)  # a copy, read now: CUDA stall times are collected on reading
    for _ in range(warmup):
        token = int(torch.argmax(session.step(token)))
    experts.reset_stats()
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        token = int(torch.argmax(session.step(token)))
    decode_s = time.perf_counter() - t0
    return RunTimes(prefill_s, ttft, decode_s, len(prompt), gen_tokens), prefill_stats, replace(experts.stats)


def _copy_only_bound(bw: Bandwidth, weight_bytes: int, misses_per_token: float, one_expert: int) -> float:
    """The decode bound when every miss is copied in."""
    wait = copy_wait_s(misses_per_token, one_expert, bw.host_to_device_bytes_per_s)
    return decode_bound(weight_bytes, bw.memory_read_bytes_per_s, wait)


def hybrid_bound(engine: Engine, weight_bytes: int, mem_bw: float, stats: CacheStats) -> HybridBound | None:
    """With offloaded experts and the CPU expert engine: the decode bound when every layer waits for
    its misses copied only, and when they are split between copies and the CPU (`cpu_experts`), from
    the measured per-expert costs and the measured miss rate."""
    cpu = getattr(engine.experts, "cpu", None)
    uses = stats.hits + stats.misses
    if cpu is None or not uses:
        return None
    args, miss_rate = engine.args, stats.misses / uses

    def bound(mode: str) -> float:
        layer_wait = layer_miss_time(miss_rate, args.num_experts_per_tok, cpu.costs, mode)
        return decode_bound(weight_bytes, mem_bw, args.num_hidden_layers * layer_wait)

    return HybridBound(cpu.costs.copy_s, cpu.costs.cpu_s, miss_rate, bound("never"), bound("auto"),
                       stats.cpu_experts, cpu.mode)


def sweep_slots(engine: Engine, prompt: list[int], gen_tokens: int, bw: Bandwidth, weight_bytes: int,
                one_expert: int, log: Callable[[str], None], k_max: int | None = None) -> list[SweepRow]:
    """Decode speed and hit rate for every slot count K from top-k to `k_max` (default: the number of
    experts; on CUDA the planner's allowance for the budget), with the same expert store and a fresh
    cache of K slots per layer each time: the previous cache is dropped and its device memory returned
    first, so two caches never coexist."""
    args = engine.args
    if not isinstance(engine.experts, ExpertCache):
        raise UserError("--sweep-slots needs offloaded experts", hint="leave --experts-in-gpu unset")
    store: ExpertStore = engine.experts.store
    prefetch = engine.experts.prefetch_enabled
    k_max = args.num_local_experts if k_max is None else min(k_max, args.num_local_experts)
    rows = []
    for k in range(args.num_experts_per_tok, k_max + 1):
        engine.experts = None  # the old cache goes before the new one is allocated
        gc.collect()
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        engine.experts = ExpertCache(store, k, engine.device, prefetch=prefetch)
        log(f"sweep: {k} slots per layer")
        times, _, stats = measure_ours(engine, prompt, gen_tokens)
        misses = stats.misses / gen_tokens
        rows.append(SweepRow(k, times.decode_tokens_per_s, stats.hit_rate, misses, stats.prefetch_accuracy,
                             stats.bytes_to_device, stats.stall_s,
                             _copy_only_bound(bw, weight_bytes, misses, one_expert)))
    return rows


# -- the whole benchmark, step by step -----------------------------------------------------------
@dataclass
class _Measured:
    ours: RunTimes  # medians over the rounds
    prefill_stats: CacheStats  # of the last round
    decode_stats: CacheStats
    peaks: tuple[int, int | None, int | None]  # ours alone: RSS, GPU allocated, GPU reserved
    baseline: BaselineResult | None


def _runtime(o: BenchOptions, ckpt: CheckpointSource) -> tuple[RuntimeOptions, int | None]:
    """The measured engine's runtime options (a context just long enough; with `--sweep-slots` an
    expert store to sweep over), once the run fits the model's positions and the host's RAM; and on
    CUDA the budget the planner divides (as `build_engine` computes it), which caps the sweep."""
    args, device = ckpt.args, pick_device(o.runtime.device)
    ctx = o.prompt_tokens + WARMUP_TOKENS + o.gen_tokens + 1
    if ctx > args.max_position_embeddings:
        raise UserError(f"prompt + generated tokens ({ctx}) exceed the model's {args.max_position_embeddings} positions")
    runtime = replace(o.runtime, ctx_size=ctx)
    if o.sweep_slots and runtime.experts_in_gpu is None:
        runtime.experts_in_gpu = args.num_experts_per_tok
    return runtime, gpu_budget(runtime.gpu_mem, device) if device.type == "cuda" else None


def _probe_bandwidth(engine: Engine, one_expert: int) -> Bandwidth:
    device = engine.device
    mem_bw = memory_bandwidth(device)
    store = getattr(engine.experts, "store", None)
    h2d_bw, method = host_to_device_bandwidth(device, one_expert, store=store)
    if device.type == "cuda":  # the probes' buffers count neither in the peaks nor in what stays reserved
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return Bandwidth(mem_bw, h2d_bw, method)


def _peaks(device: torch.device) -> tuple[int, int | None, int | None]:
    if device.type == "cuda":
        return peak_rss_bytes(), torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return peak_rss_bytes(), None, None


def _measure(engine: Engine, ckpt, prompt: list[int], o: BenchOptions, log: Callable[[str], None]) -> _Measured:
    """A warm-up pass, then `o.rounds` timed rounds of ours, each followed by one of the baseline's."""
    # One untimed pass each: first calls at new shapes pay one-time costs (kernel selection, allocator growth).
    log("warm-up")
    measure_ours(engine, prompt, 1)
    hf_model = None
    if o.baseline == "transformers":
        peaks = _peaks(engine.device)  # before the baseline is built
        hf_model, hf_info = pick_transformers(ckpt, engine.args, prompt, log, engine.device)
        measure_transformers(hf_model, prompt, 1)
    runs, hf_runs = [], []
    for r in range(o.rounds):
        log(f"round {r + 1}/{o.rounds}: mixtral")
        times, prefill_stats, decode_stats = measure_ours(engine, prompt, o.gen_tokens)
        runs.append(times)
        if hf_model is not None:
            log(f"round {r + 1}/{o.rounds}: transformers")
            hf_runs.append(measure_transformers(hf_model, prompt, o.gen_tokens))
    ours, baseline = median_times(runs), None
    if hf_model is None:
        peaks = _peaks(engine.device)
    else:
        baseline = BaselineResult.compare(hf_info, ours, median_times(hf_runs))
        del hf_model
        gc.collect()
    return _Measured(ours, prefill_stats, decode_stats, peaks, baseline)


def _bound(engine: Engine, o: BenchOptions, bw: Bandwidth, one_expert: int, m: _Measured) -> Bound:
    context = o.prompt_tokens + WARMUP_TOKENS + (o.gen_tokens - 1) / 2  # mean KV length over the timed steps
    weight_bytes = bytes_per_token(engine.args, engine.checkpoint.quant, engine.dtype.itemsize, context)
    misses = m.decode_stats.misses / o.gen_tokens
    bound = _copy_only_bound(bw, weight_bytes, misses, one_expert)
    return Bound(weight_bytes, one_expert, misses, bound, m.ours.decode_tokens_per_s / bound,
                 hybrid_bound(engine, weight_bytes, bw.memory_read_bytes_per_s, m.decode_stats))


def _result(o: BenchOptions, engine: Engine, load_s: float, m: _Measured, bw: Bandwidth, bound: Bound) -> BenchResult:
    args, quant, ours = engine.args, engine.checkpoint.quant, m.ours
    spec = quant.experts
    return BenchResult(
        model=f"preset:{o.preset}" if o.preset else str(o.model_dir),
        synthetic=o.preset is not None,
        note=SYNTHETIC_NOTE if o.preset else None,
        bits=spec.bits if spec else 16,
        expert_format=spec.name if spec else "bfloat16",
        attn_bits=quant.attention.bits if quant.attention else 16,
        output_bits=quant.output.bits if quant.output else 16,
        device=str(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        params_total=args.params_total,
        params_active=args.params_active,
        slots_per_layer=m.decode_stats.slots_per_layer,
        prefetch=bool(engine.experts.prefetch_enabled),
        prompt_tokens=o.prompt_tokens,
        gen_tokens=o.gen_tokens,
        warmup_tokens=WARMUP_TOKENS,
        rounds=o.rounds,
        load_s=load_s,
        prefill_tokens_per_s=ours.prefill_tokens_per_s,
        time_to_first_token_s=ours.ttft_s,
        decode_tokens_per_s=ours.decode_tokens_per_s,
        decode_ms_per_token=1e3 * ours.decode_s / o.gen_tokens,
        peak_rss_bytes=m.peaks[0],
        peak_gpu_bytes=m.peaks[1],
        peak_gpu_reserved_bytes=m.peaks[2],
        expert_cache=m.decode_stats,
        prefill_expert_cache=m.prefill_stats,
        bandwidth=bw,
        bound=bound,
        baseline=m.baseline,
    )


def _sweep(result: BenchResult, engine: Engine, prompt: list[int], o: BenchOptions, ctx: int,
           budget: int | None, log: Callable[[str], None]) -> None:
    """`--sweep-slots`: the rows into `result`, and the CSV (and PNG) files written."""
    args, device, dtype = engine.args, engine.device, engine.dtype
    k_max = args.num_local_experts
    if budget is not None:  # no more slots than the planner allows this budget
        k_max = min(k_max, plan_memory(args, engine.checkpoint.quant, ctx, budget, dtype.itemsize,
                                       fused_attention_available(device, dtype, args)).slots_per_layer)
    bound = result.bound
    result.sweep = sweep_slots(engine, prompt, o.gen_tokens, result.bandwidth, bound.weight_bytes_per_token,
                               bound.expert_bytes, log, k_max)
    path = o.csv_path or Path("bench-slots.csv")
    write_sweep_csv(result.sweep, path)
    result.sweep_csv, result.sweep_png = str(path), write_sweep_png(result.sweep, path.with_suffix(".png"))


def run_bench(o: BenchOptions, log: Callable[[str], None] = lambda s: None) -> BenchResult:
    """Run the benchmark described by `o` (`--json` prints the result's `as_dict()`)."""
    _validate(o)
    ckpt = open_checkpoint(o)
    runtime, budget = _runtime(o, ckpt)
    log("building the model")
    t0 = time.perf_counter()
    engine = build_engine(ckpt, None, runtime)  # bench feeds token ids: no tokenizer needed
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(o.seed)
    prompt = torch.randint(3, ckpt.args.vocab_size, (o.prompt_tokens,), generator=gen).tolist()
    one_expert = expert_bytes(ckpt.args, ckpt.quant.experts, engine.dtype.itemsize)
    log("measuring bandwidth")
    bw = _probe_bandwidth(engine, one_expert)
    m = _measure(engine, ckpt, prompt, o, log)
    result = _result(o, engine, load_s, m, bw, _bound(engine, o, bw, one_expert, m))
    if o.trace is not None:  # untimed: recording costs a host sync per layer and a line per pass
        log("recording the routing trace")
        with recording(engine.model, o.trace, result.model):
            measure_ours(engine, prompt, o.gen_tokens)
    if o.sweep_slots:
        _sweep(result, engine, prompt, o, runtime.ctx_size, budget, log)
    return result
